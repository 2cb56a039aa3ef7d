"""The CUDA kernels of the straight-through mask, run on the CPU emulator (tests/cuda_emu).

Without a GPU this is what checks the kernels' logic: the select and bucket-sum kernels against
straightforward computations (bit-exact / to rounding), over every dtype, rank dtype, several
shared-memory tiles and many candidates; independence of the thread schedule (no races); and
the whole op through the extension's code path in ``besa_rs.ste`` against the authors'
formulation, with the same cases as test_ste.py."""

from __future__ import annotations

import os

import pytest
import test_ste
import torch
from cuda_emu import (
    EmulatedExtension,
    EmulatorError,
    bucket_sums_in_kernel_order,
    compiler,
    load,
    segment_length,
)

from besa_rs import ste
from besa_rs.ste import _ext, _fallback

#: the emulated device's opt-in shared memory per block (Hopper's 227 KiB)
HOPPER_OPTIN = 227 * 1024


@pytest.fixture(scope="module")
def dll():
    if compiler() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler to build the CUDA emulator")
        pytest.skip("no C++ compiler to build the CUDA emulator")
    return load()


@pytest.fixture
def optin(dll):
    """Sets the emulated device's opt-in shared memory for one test (restored afterwards)."""
    yield dll.emu_set_optin_shared
    dll.emu_set_optin_shared(0)


@pytest.fixture
def emu(dll, monkeypatch):
    """Routes ``besa_rs.ste`` through its CUDA-extension path, backed by the emulator."""
    ext = EmulatedExtension(dll)
    monkeypatch.setattr(_ext, "load", lambda: ext)
    monkeypatch.setattr(ste, "backend", lambda device=None: "cuda-ext")
    yield ext
    assert ext.calls["forward"] + ext.calls["backward"] > 0, "the emulated kernels were not used"


def _rows(rows: int, cols: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    imp = (
        torch.randint(0, 3, (rows, cols), generator=g).float()
        if ties
        else torch.rand(rows, cols, generator=g)
    )
    return ste.row_ranks(imp)


def _bucket_truth(grad, weight, ranks, t_sorted) -> torch.Tensor:
    """float64 bucket sums: bucket of rank k = number of candidates with t_d > k."""
    prod = grad.double() * weight.double()
    j = (t_sorted.view(1, 1, -1) > ranks.long().unsqueeze(-1)).sum(-1)
    out = torch.zeros(ranks.shape[0], t_sorted.numel() + 1, dtype=torch.float64)
    return out.scatter_add_(1, j, prod)


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idx", [torch.int16, torch.int32, torch.int64])
def test_select_is_bit_exact(dll, dtype, idx):
    ext = EmulatedExtension(dll)
    rows, cols = 5, 1500  # more columns than one block's 256 threads x 4
    w = torch.randn(rows, cols).to(dtype)
    ranks = _rows(rows, cols, seed=1).to(idx)
    n = torch.tensor([0, 1, 700, 1499, 1500])
    out = ext.forward(w, ranks, n)
    expected = w * (ranks.long() >= n[:, None]).to(dtype)  # pruned: +-0 with W's sign
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    assert torch.equal(out.view(bits), expected.view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("acc_double", [False, True])
@pytest.mark.parametrize(
    "rows,cols,step",
    [(1, 1, 0.01), (3, 7, 0.05), (4, 1000, 0.01), (2, 12000, 0.01), (2, 9500, 0.001)],
    ids=["1x1", "3x7", "4x1000", "two-or-three-tiles", "1001-candidates"],
)
def test_bucket_sums_match(dll, dtype, acc_double, rows, cols, step):
    ext = EmulatedExtension(dll)
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    grad = torch.randn(rows, cols, generator=g).to(dtype)
    ranks = _rows(rows, cols, seed=cols, ties=True)
    t = ste.candidate_prune_counts(ste.candidate_sparsities(step), cols)
    hist = ext.bucket_sums(grad, w, ranks, t, acc_double)
    assert hist.dtype == (torch.float64 if acc_double else torch.float32)
    truth = _bucket_truth(grad, w, ranks, t)
    scale = (grad.double() * w.double()).abs().sum(1, keepdim=True).clamp_min(1e-30)
    tol = 1e-12 if acc_double else 1e-5
    assert ((hist.double() - truth).abs() / scale).max().item() <= tol


def _at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``x`` that starts ``offset`` elements into its storage (so its
    address is not 16-byte aligned for an odd offset)."""
    buf = torch.zeros(x.numel() + offset, dtype=x.dtype)
    view = buf[offset:].view(x.shape)
    view.copy_(x)
    return view


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize(
    "dtype,idx,acc_double",
    [
        (torch.float32, torch.int16, False),
        (torch.bfloat16, torch.int16, False),
        (torch.float16, torch.int32, False),
        (torch.float64, torch.int64, True),
        (torch.float32, torch.int32, True),
    ],
)
@pytest.mark.parametrize(
    "rows,cols,step,optin_kib",
    [
        (3, 1003, 0.01, 0),  # odd width: every row starts at another vector phase, ragged tails
        (2, 30011, 0.01, 0),  # one whole-row tile over 48 KiB (opt-in), three pieces per row
        (2, 30011, 0.01, 64),  # tiles of one piece: the row is read once per tile
        (2, 9500, 0.001, 96),  # 1001 candidates, several pieces per tile
        (4, 37, 0.25, 0),  # rows shorter than a vector's worth of threads
    ],
)
@pytest.mark.parametrize("offsets", [(0, 0, 0), (1, 1, 1), (1, 0, 3)], ids=str)
def test_bucket_sums_are_the_documented_order_bit_for_bit(
    dll, optin, dtype, idx, acc_double, rows, cols, step, optin_kib, offsets
):
    """Whatever the tile size, alignment and vector path, the sums are the bits of the
    documented summation order (that of the first, 48 KiB-tile version of the kernel)."""
    optin(optin_kib * 1024)
    ext = EmulatedExtension(dll)
    g = torch.Generator().manual_seed(cols + rows)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    grad = torch.randn(rows, cols, generator=g).to(dtype)
    ranks = _rows(rows, cols, seed=cols).to(idx)
    t = ste.candidate_prune_counts(ste.candidate_sparsities(step), cols)
    og, ow, orank = offsets  # (1, 0, 3): misaligned differently, so no common vector phase
    hist = ext.bucket_sums(
        _at_offset(grad, og), _at_offset(w, ow), _at_offset(ranks, orank), t, acc_double
    )
    acc = torch.float64 if acc_double else torch.float32
    assert torch.equal(_bits(hist), _bits(bucket_sums_in_kernel_order(grad, w, ranks, t, acc)))
    a = 8 if acc_double else 4
    smem = int(dll.emu_last_smem())
    if (t.numel() + 1 + cols) * a <= (optin_kib * 1024 or HOPPER_OPTIN):
        assert smem == (t.numel() + 1 + cols) * a  # the whole row in one tile
    else:  # tiles of a multiple of the piece length, shorter than the row
        tile = (smem - (t.numel() + 1) * a) // a
        assert tile < cols and tile % segment_length(cols, t.numel(), acc) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idx", [torch.int16, torch.int64])
@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (3, 0), (0, 5)], ids=str)
@pytest.mark.parametrize("rows,cols", [(5, 1003), (3, 7), (2, 4096)])
def test_select_vector_and_scalar_paths_are_bit_exact(dll, dtype, idx, offsets, rows, cols):
    """Unaligned rows, ragged tails, misaligned views (vector path with a scalar head, or all
    scalar when the arrays have no common 16-byte phase): the same bits as W * hard."""
    ext = EmulatedExtension(dll)
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[0, :3] = -0.0  # pruned negative zeros keep their sign
    ranks = _rows(rows, cols, seed=2).to(idx)
    n = torch.randint(0, cols + 1, (rows,), generator=g)
    out = ext.forward(_at_offset(w, offsets[0]), _at_offset(ranks, offsets[1]), n)
    expected = w * (ranks.long() >= n[:, None]).to(dtype)
    assert torch.equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 22, 102, 1002])
def test_suffix_kernel_is_the_fallback_scan_bit_for_bit(dll, monkeypatch, acc, n):
    """The suffix kernel adds exactly what the deterministic torch scan (_fallback.suffix_sums,
    used on CUDA before it) adds, in the same order: the logit gradient keeps its bits."""
    monkeypatch.setattr(_fallback, "FORCE_DETERMINISTIC", True)
    g = torch.Generator().manual_seed(n)
    h = (torch.randn(4, n, generator=g) * torch.logspace(-3, 3, n)).to(acc)
    out = EmulatedExtension(dll).neg_suffix(h)
    expected = -_fallback.suffix_sums(h)[:, 1:]
    assert out.shape == (4, n - 1) and torch.equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows_per_group", [1, 3])
def test_prune_rows_kernel_matches_torch(dll, acc, rows_per_group):
    cols = 11008
    alpha = torch.tensor(
        [0.0, 1.0, 0.5, 0.29, 0.3, 1 / 3, 0.99999994, -0.25, 1.5, 1e-9, 0.62415], dtype=acc
    )
    alpha = torch.cat([alpha, torch.rand(40, generator=torch.Generator().manual_seed(0))])
    n = EmulatedExtension(dll).prune_rows(alpha, alpha.numel() * rows_per_group, cols)
    expected = ste.prune_counts(alpha, cols).repeat_interleave(rows_per_group)
    assert n.dtype == torch.int64 and torch.equal(n, expected)


def test_bucket_sums_do_not_depend_on_the_thread_schedule(dll):
    """Shuffled thread orders (seeds) give bit-identical sums: no races, no atomics."""
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(3, 12000, generator=g), torch.randn(3, 12000, generator=g)
    ranks = _rows(3, 12000, seed=2)
    t = ste.candidate_prune_counts(ste.candidate_sparsities(0.01), 12000)
    first = EmulatedExtension(dll, seed=0).bucket_sums(grad, w, ranks, t, False)
    for seed in (1, 2, 3):
        again = EmulatedExtension(dll, seed=seed).bucket_sums(grad, w, ranks, t, False)
        assert torch.equal(first, again)


def test_too_many_candidates_is_refused(dll):
    """Candidate buckets that leave no room for a shared-memory tile: a launch error, not a
    silent overflow."""
    ext = EmulatedExtension(dll)
    w = torch.randn(2, 64)
    t = torch.arange(4200, 0, -1) % 65
    with pytest.raises(EmulatorError, match="invalid configuration"):
        ext.bucket_sums(w, w, _rows(2, 64, seed=0), t, False)


# ------------------------------------------------------------------------------------------
# the whole op through the extension path: the same cases as test_ste.py
@pytest.mark.parametrize("shape", test_ste.SHAPES)
@pytest.mark.parametrize("gran", ["row", "block", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", [0.01, 0.05])
@pytest.mark.parametrize("smoothing", [True, False])
def test_matches_reference(emu, shape, gran, dtype, step, smoothing):
    test_ste.test_matches_reference("cpu", shape, gran, dtype, step, smoothing)
    assert emu.calls["forward"] and emu.calls["backward"]


@pytest.mark.parametrize("gran", ["row", "block", "layer"])
def test_matches_float64_truth(emu, gran):
    test_ste.test_matches_float64_truth("cpu", gran)


@pytest.mark.parametrize("gran", ["row", "block", "layer"])
@pytest.mark.parametrize("smoothing", [True, False])
def test_gradcheck_float64(emu, gran, smoothing):
    test_ste.test_gradcheck_float64("cpu", gran, smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_is_masked(emu, dtype):
    test_ste.test_weight_gradient_is_masked("cpu", dtype)


@pytest.mark.parametrize("rank_dtype", [torch.int16, torch.int32, torch.int64])
def test_rank_dtypes(emu, rank_dtype):
    test_ste.test_rank_dtypes(rank_dtype)


def test_agrees_with_fallback_at_llama_width(emu, monkeypatch):
    """One 11008-wide row block (a LLaMA-7B down_proj row length): extension path vs fallback."""
    rows, cols = 4, 11008
    weight, _, _, ranks, logits, cands, up = test_ste._case(
        rows, cols, rows, 0.01, torch.float32, "cpu", seed=9
    )
    lg = logits.clone().requires_grad_(True)
    out = ste.ste_mask(weight, ranks, lg, cands)
    out.backward(up)
    monkeypatch.setattr(ste, "backend", lambda device=None: "torch")
    lg2 = logits.clone().requires_grad_(True)
    out2 = ste.ste_mask(weight, ranks, lg2, cands)
    out2.backward(up)
    assert torch.equal(out, out2)
    test_ste._close(lg.grad, lg2.grad)
