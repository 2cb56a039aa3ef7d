"""Equivalence of the fused straight-through mask with the authors' formulation."""

from __future__ import annotations

import zlib
from collections import OrderedDict

import pytest
import torch
from ste_reference import assert_close_rel, reference_masks, reference_ste
from ste_reference import make_case as _case

import besa_rs
from besa_rs import ste
from besa_rs.errors import ConfigError, DtypeError, ShapeError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _close(actual, expected, rtol=1e-5):
    assert_close_rel(actual, expected, rtol)


# --------------------------------------------------------------------------------------------
def test_candidate_sparsities():
    c = ste.candidate_sparsities(0.01)
    assert c.dtype == torch.float32 and c.numel() == 101
    assert c[0].item() == 1.0 and c[-1].item() == 0.0
    assert torch.equal(c, (torch.arange(100, -1, -1, dtype=torch.float64) / 100).float())
    assert bool((c[1:] < c[:-1]).all())
    c5 = ste.candidate_sparsities(0.05)
    assert c5.numel() == 21 and c5[1].item() == pytest.approx(0.95)
    assert ste.candidate_sparsities(1.0).tolist() == [1.0, 0.0]
    for bad in (0.0, -0.1, 0.03, 1.5, float("nan")):
        with pytest.raises(ConfigError):
            ste.candidate_sparsities(bad)


@pytest.mark.parametrize("step", [0.01, 0.05, 0.25])
def test_candidate_prune_counts_exact(step):
    cands = ste.candidate_sparsities(step)
    n = cands.numel() - 1
    for cols in (1, 7, 100, 101, 257, 4096, 11008, 13824):
        t = ste.candidate_prune_counts(cands, cols)
        expected = torch.tensor([(i * cols) // n for i in range(n, -1, -1)])
        assert torch.equal(t, expected), cols
    # the naive float product gets some of these wrong: the snapping is what makes them exact
    assert int(ste.candidate_prune_counts(torch.tensor([0.29]), 100)) == 29


def test_row_ranks_stable_with_ties():
    imp = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    r = ste.row_ranks(imp)
    assert r.dtype == torch.int32
    assert r.tolist() == [[4, 0, 1, 3, 2], [0, 1, 2, 3, 4]]
    big = torch.randint(0, 3, (7, 301)).float()
    r = ste.row_ranks(big).long()
    order = torch.sort(big, dim=1, stable=True).indices
    assert torch.equal(r.gather(1, order), torch.arange(301).expand(7, 301))


def test_candidate_weights_and_alpha():
    logits = torch.zeros(3, 101)
    cands = ste.candidate_sparsities()
    w = ste.candidate_weights(logits)
    assert w.dtype == torch.float32 and torch.allclose(w.sum(-1), torch.ones(3))
    alpha = ste.expected_sparsity(logits, cands)
    assert torch.allclose(alpha, torch.full((3,), 0.5))
    # sigmoid smoothing caps alpha near 62.4%; plain softmax does not
    big = torch.zeros(1, 101)
    big[0, 0] = 50.0
    assert ste.expected_sparsity(big, cands).item() < 0.63
    assert ste.expected_sparsity(big, cands, smoothing=False).item() > 0.99
    lg = torch.randn(2, 101, requires_grad=True)
    ste.expected_sparsity(lg, cands).sum().backward()
    assert lg.grad is not None and lg.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
SHAPES = [(1, 7), (1, 1), (5, 13), (12, 100), (6, 257), (9, 1000)]


def _groups(rows, gran):
    if gran == "row":
        return rows
    if gran == "layer":
        return 1
    k = 3 if rows % 3 == 0 else (2 if rows % 2 == 0 else 1)
    return rows // k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gran", ["row", "block", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", [0.01, 0.05])
@pytest.mark.parametrize("smoothing", [True, False])
def test_matches_reference(device, shape, gran, dtype, step, smoothing):
    rows, cols = shape
    groups = _groups(rows, gran)
    seed = zlib.crc32(repr((shape, gran, str(dtype), step, smoothing)).encode()) % 1000
    weight, _, order, ranks, logits, cands, up = _case(
        rows, cols, groups, step, dtype, device, seed=seed, ties=(seed % 2 == 0)
    )
    ref_logits = logits.clone().requires_grad_(True)
    ref_out, ref_hard, ref_soft = reference_ste(weight, order, ref_logits, cands, smoothing)
    (ref_out * up.float()).sum().backward()

    lg = logits.clone().requires_grad_(True)
    out = ste.ste_mask(weight, ranks, lg, cands, smoothing)
    assert out.dtype == dtype and out.shape == weight.shape
    (out.float() * up.float()).sum().backward()

    hard = ste.hard_mask(ranks, logits, cands, smoothing)
    assert hard.dtype == torch.bool
    assert torch.equal(hard, ref_hard.bool()), "hard mask differs from the reference"
    # forward value: exactly W * hard
    assert torch.equal(out, weight * hard.to(dtype))
    _close(out.float(), ref_out.detach().float())
    soft = ste.soft_mask(ranks, logits, cands, smoothing)
    _close(soft, ref_soft.detach())
    _close(lg.grad, ref_logits.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gran", ["row", "block", "layer"])
def test_matches_float64_truth(device, gran):
    """Gradients against the reference evaluated in float64 (the exact value, not fp32 noise)."""
    rows, cols = 12, 523
    groups = _groups(rows, gran)
    weight, _, order, ranks, logits, cands, up = _case(
        rows, cols, groups, 0.01, torch.float32, device, seed=7
    )
    lg64 = logits.double().requires_grad_(True)
    ref_out, _, _ = reference_ste(weight.double(), order, lg64, cands)
    (ref_out * up.double()).sum().backward()
    lg = logits.clone().requires_grad_(True)
    (ste.ste_mask(weight, ranks, lg, cands).double() * up.double()).sum().backward()
    _close(lg.grad, lg64.grad, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gran", ["row", "block", "layer"])
@pytest.mark.parametrize("smoothing", [True, False])
def test_gradcheck_float64(device, gran, smoothing):
    rows, cols = 6, 11
    groups = _groups(rows, gran)
    weight, _, _, ranks, logits, _, _ = _case(
        rows, cols, groups, 0.25, torch.float64, device, seed=3, scale=1.0
    )
    cands = ste.candidate_sparsities(0.25).double().to(device)
    lg = logits.double().requires_grad_(True)
    wt = weight.double().requires_grad_(True)

    def f(lg, wt):
        return ste.soft_mask(ranks, lg, cands, smoothing, weight=wt)

    # full Jacobian check on the layer-wise case, random-projection check on the others
    fast = gran != "layer"
    assert torch.autograd.gradcheck(f, (lg, wt), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)
    # the straight-through op has the same logit gradient as the soft one
    g1 = torch.autograd.grad(ste.ste_mask(weight.double(), ranks, lg, cands, smoothing).sum(), lg)
    g2 = torch.autograd.grad(f(lg, weight.double()).sum(), lg)
    _close(g1[0], g2[0], rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_is_masked(device, dtype):
    weight, _, _, ranks, logits, cands, up = _case(8, 64, 8, 0.01, dtype, device, seed=5)
    wt = weight.clone().requires_grad_(True)
    lg = logits.clone().requires_grad_(True)
    out = ste.ste_mask(wt, ranks, lg, cands)
    out.backward(up)
    hard = ste.hard_mask(ranks, logits, cands)
    assert torch.equal(wt.grad, up * hard.to(dtype))
    assert lg.grad is not None
    # frozen weight: no weight gradient, logits still get one
    lg2 = logits.clone().requires_grad_(True)
    ste.ste_mask(weight, ranks, lg2, cands).backward(up)
    assert torch.equal(lg2.grad, lg.grad)


def test_chunked_fallback_matches(monkeypatch):
    """Many small row chunks give the same result as one chunk."""
    from besa_rs.ste import _fallback

    weight, _, order, ranks, logits, cands, up = _case(37, 301, 37, 0.01, torch.float32, "cpu")
    lg1 = logits.clone().requires_grad_(True)
    out1 = ste.ste_mask(weight, ranks, lg1, cands)
    out1.backward(up)
    monkeypatch.setattr(_fallback, "_CHUNK_ELEMS", 700)  # 2 rows per chunk
    lg2 = logits.clone().requires_grad_(True)
    out2 = ste.ste_mask(weight, ranks, lg2, cands)
    out2.backward(up)
    assert torch.equal(out1, out2)
    assert torch.equal(lg1.grad, lg2.grad)
    _close(ste.soft_mask(ranks, logits, cands), reference_masks(order, logits, cands)[1])


@pytest.mark.parametrize("rank_dtype", [torch.int16, torch.int32, torch.int64])
def test_rank_dtypes(rank_dtype):
    weight, _, _, ranks, logits, cands, up = _case(4, 50, 2, 0.05, torch.float32, "cpu")
    base_lg = logits.clone().requires_grad_(True)
    base = ste.ste_mask(weight, ranks, base_lg, cands)
    base.backward(up)
    lg = logits.clone().requires_grad_(True)
    out = ste.ste_mask(weight, ranks.to(rank_dtype), lg, cands)
    out.backward(up)
    assert torch.equal(out, base) and torch.equal(lg.grad, base_lg.grad)


def test_unsorted_candidates():
    """Candidates in any order give the same result as the sorted ones, permuted."""
    weight, _, order, ranks, logits, cands, up = _case(6, 40, 6, 0.05, torch.float32, "cpu")
    perm = torch.randperm(cands.numel(), generator=torch.Generator().manual_seed(1))
    lg = logits[:, perm].clone().requires_grad_(True)
    out = ste.ste_mask(weight, ranks, lg, cands[perm])
    out.backward(up)
    ref_lg = logits.clone().requires_grad_(True)
    ref_out = ste.ste_mask(weight, ranks, ref_lg, cands)
    ref_out.backward(up)
    assert torch.equal(out, ref_out)
    _close(lg.grad, ref_lg.grad[:, perm])


@pytest.mark.parametrize("by_value", [True, False], ids=["by-value", "by-identity"])
def test_candidate_cache_follows_in_place_changes(monkeypatch, by_value):
    """The candidates' sorted prune counts are cached (by value on the CPU, else by tensor
    identity and version counter): an in-place change of the candidates is seen."""
    monkeypatch.setattr(ste, "_key_by_value", lambda t: by_value)
    monkeypatch.setattr(ste, "_ORDER_CACHE", OrderedDict())
    weight, _, _, ranks, logits, cands, up = _case(6, 40, 6, 0.05, torch.float32, "cpu")

    def run(c, lg0):
        lg = lg0.clone().requires_grad_(True)
        out = ste.ste_mask(weight, ranks, lg, c)
        out.backward(up)
        return out, lg.grad

    c = cands.clone()
    first, again = run(c, logits), run(c, logits)
    assert len(ste._ORDER_CACHE) == 1  # the second call was a hit
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    perm = torch.randperm(cands.numel(), generator=torch.Generator().manual_seed(3))
    c.copy_(cands[perm])  # in place: now unsorted
    got = run(c, logits[:, perm])
    want = run(cands[perm].clone(), logits[:, perm])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(got[0], first[0])
    _close(got[1], first[1][:, perm])
    with torch.inference_mode():  # no version counter: computed, not cached
        c_inf = cands.clone()
        hard = ste.hard_mask(ranks, logits, c_inf)
    assert torch.equal(hard, ste.hard_mask(ranks, logits, cands))


def test_zero_logits_is_half_sparsity():
    weight, _, _, ranks, _, cands, _ = _case(4, 100, 4, 0.01, torch.float32, "cpu")
    hard = ste.hard_mask(ranks, torch.zeros(4, 101), cands)
    assert hard.sum(1).tolist() == [50, 50, 50, 50]
    assert torch.equal(hard, ranks >= 50)


def test_bad_inputs():
    w = torch.randn(4, 10)
    r = ste.row_ranks(torch.rand(4, 10))
    c = ste.candidate_sparsities(0.1)
    lg = torch.zeros(4, 11)
    with pytest.raises(ShapeError, match="logits"):
        ste.ste_mask(w, r, torch.zeros(3, 11), c)
    with pytest.raises(ShapeError, match="candidates"):
        ste.ste_mask(w, r, torch.zeros(4, 10), c)
    with pytest.raises(ShapeError, match="weight shape"):
        ste.ste_mask(w[:, :9], r, lg, c)
    with pytest.raises(DtypeError, match="ranks"):
        ste.ste_mask(w, r.float(), lg, c)
    with pytest.raises(DtypeError, match="weight"):
        ste.ste_mask(w.to(torch.int32), r, lg, c)
    with pytest.raises(ShapeError, match="empty"):
        ste.ste_mask(w, r, torch.zeros(4, 0), torch.zeros(0))
    with pytest.raises(ShapeError, match="importance"):
        ste.row_ranks(torch.rand(3))


def test_backend_and_lazy_export():
    assert ste.backend("cpu") == "torch"
    assert besa_rs.ste_mask is ste.ste_mask
    assert besa_rs.row_ranks is ste.row_ranks


@pytest.mark.parametrize("chunk", [1, 3 * 29 + 5, 1 << 22])
def test_row_ranks_by_chunks_are_the_whole_sort(monkeypatch, chunk):
    """Ranks are sorted a chunk of rows at a time, in int16 or int32: the same ranks as one
    stable sort of the whole matrix, ties in column order."""
    monkeypatch.setattr(ste, "_RANK_CHUNK_ELEMS", chunk)
    imp = torch.randint(0, 4, (37, 29), generator=torch.Generator().manual_seed(0)).float()
    order = torch.sort(imp, dim=1, stable=True).indices
    expect = torch.empty_like(order).scatter_(1, order, torch.arange(29).expand(37, 29))
    for dt in (torch.int16, torch.int32):
        r = ste.row_ranks(imp, dt)
        assert r.dtype == dt and torch.equal(r.long(), expect)
        r = ste.row_ranks_by_chunks(lambda a, b: imp[a:b] * 1.0, imp.shape, "cpu", dt)
        assert r.dtype == dt and torch.equal(r.long(), expect)
    assert ste.rank_dtype(11008) == torch.int16 and ste.rank_dtype(32767) == torch.int16
    assert ste.rank_dtype(32768) == torch.int32
    with pytest.raises(DtypeError, match="int16 or int32"):
        ste.row_ranks(imp, torch.int64)
    with pytest.raises(ShapeError, match="columns"):
        ste.row_ranks_by_chunks(lambda a, b: imp[a:b], (2, 40000), "cpu", torch.int16)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_int16_ranks_give_the_same_mask_and_gradients(wdtype):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 300, generator=g).to(wdtype)
    imp = torch.randint(0, 5, (12, 300), generator=g).float()
    cands = ste.candidate_sparsities()
    out = {}
    for dt in (torch.int16, torch.int32):
        logits = torch.randn(4, 101, generator=torch.Generator().manual_seed(2))
        logits.requires_grad_(True)
        y = ste.ste_mask(W, ste.row_ranks(imp, dt), logits, cands)
        (y.float() * torch.linspace(-1, 1, 300)).sum().backward()
        out[dt] = (y, logits.grad)
    assert torch.equal(out[torch.int16][0], out[torch.int32][0])
    assert torch.equal(out[torch.int16][1], out[torch.int32][1])
