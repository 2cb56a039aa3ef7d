#!/usr/bin/env bash
# Everything a session with a GPU should run, in one command (about 4-5 minutes on an H200):
# the CUDA extension build, benches/gpu_check.py (equivalence, speed, memory: $OUT/gpu_check.*),
# the mask-op and engine tests on the GPU, the mask-op benchmark and its kernel profile on the
# GPU, and BESA / Wanda / joint 4-bit on LLaMA-7B- and LLaMA-2-70B-shaped blocks
# (benches/gpu_block.py: time, GPU memory, error in fp32 / bf16 / fp16).
# Needs python3 with torch (CUDA), transformers, nvcc, pytest, hypothesis, and the Rust extension
# built here (device run: carry python/besa_rs/_native.abi3.so).
#
#   device run:  bash benches/gpu_session.sh        (results under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/besa-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  echo "== python -m besa_rs.ste build"
  time "$PY" -m besa_rs.ste build || status=1
  echo "== benches/gpu_check.py"
  OUT="$OUT" "$PY" benches/gpu_check.py || status=1
  echo "== pytest (mask op and engine on the GPU)"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_ste.py tests/test_ste_ext.py \
    tests/test_ste_determinism.py "tests/test_besa.py::test_prune_on_cuda" || status=1
  echo "== benches/ste_mask.py --device cuda"
  "$PY" benches/ste_mask.py --device cuda || status=1
  echo "== benches/gpu_mask_profile.py"
  OUT="$OUT" "$PY" benches/gpu_mask_profile.py || status=1
  echo "== benches/gpu_block.py"
  OUT="$OUT" "$PY" benches/gpu_block.py || status=1
  exit $status
} 2>&1 | tee "$OUT/gpu_session.log"
exit "${PIPESTATUS[0]}"
