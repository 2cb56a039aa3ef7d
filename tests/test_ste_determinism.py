"""The mask op's PyTorch fallback on CUDA avoids the ops torch documents as non-deterministic
there (``index_add_``, ``cumsum``): its deterministic path, forced here on the CPU, matches the
reference, uses none of those ops, and runs under ``torch.use_deterministic_algorithms``."""

from __future__ import annotations

import pytest
import torch
from ste_reference import assert_close_rel, reference_ste
from ste_reference import make_case as _case
from torch.utils._python_dispatch import TorchDispatchMode

from besa_rs import ste
from besa_rs.ste import _fallback

#: aten ops that torch.use_deterministic_algorithms lists as non-deterministic on CUDA and that a
#: sum of gradients could use
_NONDET_ON_CUDA = ("index_add", "cumsum", "scatter_add", "scatter_reduce", "index_reduce", "put_")


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # integer bookkeeping (bucket boundaries on the CPU) is exact whatever the order
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            self.ops.add(func.overloadpacket.__name__)
        if func.overloadpacket.__name__.startswith("index_put") and (
            (kwargs or {}).get("accumulate") or (len(args) > 3 and args[3])
        ):
            self.ops.add("index_put_accumulate")
        return func(*args, **(kwargs or {}))


def _grads(weight, ranks, logits, cands, up, smoothing=True):
    lg = logits.clone().requires_grad_(True)
    out = ste.ste_mask(weight, ranks, lg, cands, smoothing)
    (out.float() * up.float()).sum().backward()
    return out, lg.grad


def _recorded_backward_ops(force: bool | None, monkeypatch) -> set[str]:
    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", force)
    weight, _, _, ranks, logits, cands, up = _case(8, 200, 8, 0.01, torch.float32, "cpu", seed=1)
    lg = logits.clone().requires_grad_(True)
    out = ste.ste_mask(weight, ranks, lg, cands)
    loss = (out * up).sum()
    rec = _OpRecorder()
    with rec:
        loss.backward()
    assert lg.grad is not None
    return rec.ops


def test_deterministic_path_uses_no_op_that_is_nondeterministic_on_cuda(monkeypatch):
    fast = _recorded_backward_ops(False, monkeypatch)
    assert "index_add_" in fast and "cumsum" in fast  # the recorder sees the CPU fast path's ops
    det = _recorded_backward_ops(True, monkeypatch)
    bad = sorted(op for op in det if op.startswith(_NONDET_ON_CUDA) or op == "index_put_accumulate")
    assert not bad, bad
    # and the default on a CUDA device is the deterministic path
    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", None)
    assert _fallback.deterministic_path(torch.device("cuda"))
    assert not _fallback.deterministic_path(torch.device("cpu"))


@pytest.mark.parametrize(
    "rows,cols,groups,step,dtype",
    [
        (16, 523, 16, 0.01, torch.float32),
        (12, 300, 3, 0.05, torch.float16),
        (8, 257, 1, 0.25, torch.bfloat16),  # few, uneven buckets
        (6, 97, 6, 0.01, torch.float64),  # more candidates than columns: empty buckets
    ],
)
@pytest.mark.parametrize("chunk", [1 << 22, 700])  # one chunk, several chunks
def test_deterministic_path_matches_reference_and_fast_path(
    rows, cols, groups, step, dtype, chunk, monkeypatch
):
    monkeypatch.setattr(_fallback, "_CHUNK_ELEMS", chunk)
    case = _case(rows, cols, groups, step, dtype, "cpu", seed=3, ties=True)
    weight, _, order, ranks, logits, cands, up = case
    ref_lg = logits.clone().requires_grad_(True)
    ref_out, _, _ = reference_ste(weight, order, ref_lg, cands, True)
    (ref_out * up.to(ref_out.dtype)).sum().backward()

    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", False)
    out_f, g_fast = _grads(weight, ranks, logits, cands, up)
    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", True)
    out_d, g_det = _grads(weight, ranks, logits, cands, up)
    out_d2, g_det2 = _grads(weight, ranks, logits, cands, up)

    assert torch.equal(out_d, out_f)  # the forward value is the same op
    assert torch.equal(g_det, g_det2)  # run to run
    assert_close_rel(g_det, g_fast, 1e-6)  # both accumulate in fp32 (the logits' dtype)
    assert_close_rel(g_det, ref_lg.grad, 1e-5)
    # soft mode (forward prefix sums) also agrees
    s_det = ste.soft_mask(ranks, logits, cands)
    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", False)
    assert_close_rel(s_det, ste.soft_mask(ranks, logits, cands), 1e-6)


def test_runs_under_use_deterministic_algorithms(monkeypatch):
    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", True)
    weight, _, order, ranks, logits, cands, up = _case(10, 300, 5, 0.01, torch.float32, "cpu")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, g = _grads(weight, ranks, logits, cands, up)
        s = ste.soft_mask(ranks, logits, cands)
    finally:
        torch.use_deterministic_algorithms(was)
    ref_lg = logits.clone().requires_grad_(True)
    ref_out, _, ref_soft = reference_ste(weight, order, ref_lg, cands, True)
    (ref_out * up).sum().backward()
    assert_close_rel(g, ref_lg.grad, 1e-5)
    assert_close_rel(s, ref_soft.detach(), 1e-5)


def test_suffix_sums():
    x = torch.randn(5, 37, dtype=torch.float64)
    expect = x.flip(1).cumsum(1).flip(1)
    old = _fallback.FORCE_DETERMINISTIC
    try:
        _fallback.FORCE_DETERMINISTIC = True
        assert torch.allclose(_fallback.suffix_sums(x), expect, rtol=1e-12, atol=1e-12)
        _fallback.FORCE_DETERMINISTIC = False
        assert torch.equal(_fallback.suffix_sums(x), expect)
    finally:
        _fallback.FORCE_DETERMINISTIC = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fallback_is_bitwise_repeatable_on_cuda(monkeypatch):
    monkeypatch.setenv("BESA_STE_BACKEND", "torch")
    weight, _, _, ranks, logits, cands, up = _case(512, 4096, 512, 0.01, torch.float16, "cuda")
    grads = [_grads(weight, ranks, logits, cands, up)[1] for _ in range(5)]
    for g in grads[1:]:
        assert torch.equal(g, grads[0])
