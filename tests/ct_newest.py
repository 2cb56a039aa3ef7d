"""Runs the newest compressed-tensors release (requirements/ct-newest.txt) in a subprocess.

That release cannot share the venv with compressed-tensors 0.14 (the sparse-bitmask reference
of tests/test_pack_interop.py), so `make ct-newest` installs it --no-deps into its own target
directory (``.venv/ct-newest``) and this file, run as a script with ``PYTHONPATH`` pointing
there, is the only code that imports it. :func:`run` is what tests call.

Script commands (tensors in and out as safetensors files; several in one run, separated by
an argument ``;``):

* ``compress SPEC.json IN OUT``: per module ``m`` of SPEC (``{m: {"bits", "group_size"}}``),
  IN holds ``m.weight`` (dequantized), ``m.weight_scale``, ``m.weight_zero_point`` (unsigned
  uint8, as besa-rs' side file); OUT gets the parts of compressed-tensors'
  ``PackedQuantizationCompressor.compress``.
* ``decompress DIR OUT [DIR OUT ...]``: every module of the checkpoint DIR with a ``weight_packed`` part,
  decompressed by ``PackedQuantizationCompressor.decompress`` with the scheme parsed from DIR's
  config.json (``QuantizationConfig``), OUT gets ``m.weight``.
* ``load DIR OUT [DIR OUT ...]``: ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` with
  compressed-tensors decompressing (``run_compressed=False``), OUT gets the state dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "requirements" / "ct-newest.txt"
TARGET = Path(os.environ.get("BESA_RS_CT_NEWEST", ROOT / ".venv" / "ct-newest"))


def pinned_version() -> str:
    for line in PIN_FILE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("compressed-tensors=="):
            return line.split("==", 1)[1]
    raise RuntimeError(f"{PIN_FILE}: no compressed-tensors pin")


def run(*args: str, timeout: float = 900) -> None:
    """Runs this script with the newest compressed-tensors first on ``sys.path``; raises with
    its stderr when it fails."""
    if not (TARGET / "compressed_tensors").is_dir():
        raise RuntimeError(
            f"compressed-tensors {pinned_version()} is not installed in {TARGET}: run "
            "`make ct-newest` (or set BESA_RS_CT_NEWEST to such a --target directory)"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TARGET), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ct_newest {' '.join(args)} failed:\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------
# the script side (imports compressed_tensors from TARGET)
def _scheme(bits: int, group_size: int):  # type: ignore[no-untyped-def]
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=False,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
        dynamic=False,
    )
    return QuantizationScheme(targets=["Linear"], weights=args)


def _compress(spec_path: str, inp: str, out: str) -> None:
    import torch
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from safetensors.torch import load_file, save_file

    spec = json.loads(Path(spec_path).read_text())
    t = load_file(inp)
    res = {}
    for m, ms in spec.items():
        bits = int(ms["bits"])
        scheme = _scheme(bits, int(ms["group_size"]))
        zp = (t[f"{m}.weight_zero_point"].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        sd = {
            "weight": t[f"{m}.weight"],
            "weight_scale": t[f"{m}.weight_scale"],
            "weight_zero_point": zp,
        }
        for k, v in PackedQuantizationCompressor.compress(sd, scheme).items():
            res[f"{m}.{k}"] = v.contiguous()
    save_file(res, out)


def _decompress(directory: str, out: str) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(cfg)
    assert qc.format == "pack-quantized", qc.format
    (scheme,) = qc.config_groups.values()
    state: dict = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(f)))
    res = {}
    for key in state:
        if key.endswith(".weight_packed"):
            m = key[: -len(".weight_packed")]
            sd = {k.split(".")[-1]: v for k, v in state.items() if k.startswith(m + ".weight_")}
            res[f"{m}.weight"] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    save_file({k: v.contiguous() for k, v in res.items()}, out)


def _load(directory: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, out)


def main(argv: list[str]) -> None:
    import compressed_tensors

    want = pinned_version()
    where = Path(compressed_tensors.__file__).resolve()
    if compressed_tensors.__version__ != want or TARGET.resolve() not in where.parents:
        raise SystemExit(
            f"expected compressed-tensors {want} from {TARGET}, got "
            f"{compressed_tensors.__version__} from {compressed_tensors.__file__}"
        )
    # several commands in one run (the import alone takes seconds): separated by ";"
    while argv:
        end = argv.index(";") if ";" in argv else len(argv)
        cmd, *rest = argv[:end]
        argv = argv[end + 1 :]
        if cmd == "compress":
            _compress(*rest)
        else:
            fn = {"decompress": _decompress, "load": _load}[cmd]
            for directory, out in zip(rest[::2], rest[1::2], strict=True):
                fn(directory, out)


if __name__ == "__main__":
    main(sys.argv[1:])
