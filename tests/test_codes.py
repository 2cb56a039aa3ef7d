"""Bucket codes (besa_rs.ste.codes): exactly the ranks' masks, the ranks' gradients to float
rounding, and a chunked linear layer equal to ``F.linear`` of the masked weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from besa_rs import ste
from besa_rs.errors import ConfigError
from besa_rs.pruning import quant
from besa_rs.pruning.config import QuantSpec
from besa_rs.ste import codes


def _importance(rows: int, cols: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: the column order decides inside every tie
        return torch.randint(0, 7, (rows, cols), generator=g).float()
    return torch.rand(rows, cols, generator=g)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "cols,step", [(100, 0.01), (37, 0.01), (64, 0.25), (300, 0.01), (50, 1 / 254)]
)
def test_keep_is_the_ranks_mask_for_every_prune_count(monkeypatch, ties, cols, step):
    """For every prune count 0..C (each row a different one, boundaries of buckets included),
    the codes give exactly ``ranks >= n``; several unaligned chunks of rows."""
    monkeypatch.setattr(codes, "CHUNK_ELEMS", 3 * cols + 5)
    rows = cols + 1
    imp = _importance(rows, cols, cols, ties)
    cand = ste.candidate_sparsities(step)
    bc = codes.BucketCodes.build(lambda a, b: imp[a:b], imp.shape, "cpu", cand)
    assert bc.codes.dtype == torch.uint8
    ranks = ste.row_ranks(imp, torch.int32)
    for shift in range(3):
        n = (torch.arange(rows) + shift * 7) % (cols + 1)  # every count, rows permuted
        want = ranks >= n[:, None]
        assert torch.equal(bc.keep(n), want)
        a, b = 5, rows - 3
        assert torch.equal(bc.keep(n, a, b), want[a:b])
    # the codes are the ranks' buckets (m(k) of ste's lookup table)
    t = ste.candidate_prune_counts(cand, cols)
    m = (t[None, None, :] > ranks[:, :, None].long()).sum(-1)
    assert torch.equal(bc.codes.long(), m)


def test_unsorted_candidates_and_too_many_buckets():
    imp = _importance(20, 40, 1, True)
    cand = torch.tensor([0.3, 0.9, 0.0, 0.55, 1.0])  # not descending
    bc = codes.BucketCodes.build(lambda a, b: imp[a:b], imp.shape, "cpu", cand)
    ranks = ste.row_ranks(imp, torch.int32)
    n = torch.arange(20) * 2
    assert torch.equal(bc.keep(n), ranks >= n[:, None])
    with pytest.raises(ConfigError, match="buckets"):
        codes.BucketCodes.build(lambda a, b: imp[a:b], imp.shape, "cpu", torch.rand(256))


def _setup(rows, cols, groups, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, cols, generator=g) * 0.1).to(dtype)
    imp = W.float().abs() * torch.rand(cols, generator=g)
    cand = ste.candidate_sparsities(0.05)
    logits = (torch.randn(groups, cand.shape[0], generator=g) * 2).requires_grad_(True)
    return W, imp, cand, logits


@pytest.mark.parametrize("groups_of", [lambda r: r, lambda r: 1, lambda r: r // 4])
def test_mask_gradient_matches_ste_mask(monkeypatch, groups_of):
    """Row-wise, layer-wise and row-block groups: the values are ste_mask's exactly and the
    logits' gradients agree with its (rank-ordered) sums to float rounding."""
    monkeypatch.setattr(codes, "CHUNK_ELEMS", 4 * 48 + 3)
    rows, cols = 24, 48
    W, imp, cand, logits = _setup(rows, cols, groups_of(rows))
    ranks = ste.row_ranks(imp, torch.int16)
    gout = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))

    ref = ste.ste_mask(W, ranks, logits, cand)
    (g_ref,) = torch.autograd.grad((ref * gout).sum(), logits)

    bc = codes.BucketCodes.build(lambda a, b: imp[a:b], imp.shape, "cpu", cand)
    w_rows, n_rows, alpha = codes.step_plan(logits, cand, True, rows, cols)
    assert torch.equal(alpha, ste.expected_sparsity(logits, cand))
    layer = codes.MaskedLayer(W, bc, n_rows)
    parts = [layer.rows(a, b, [w_rows[a:b]]) for a, b in codes._chunks(rows, cols)]
    got = torch.cat(parts)
    assert torch.equal(got, ref.detach())
    (g_got,) = torch.autograd.grad((got * gout).sum(), logits)
    assert g_got.abs().max() > 0
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_row_chunked_linear_matches_linear_of_masked_weight(monkeypatch, dtype, joint, bias):
    """Forward output, input gradient and the gradients of the sparsity and clipping logits of
    the chunked layer agree with ``F.linear(x, fake_quant(ste_mask(W)))`` (one whole masked
    weight), in float32 and bfloat16, several chunks of rows."""
    rows, cols = 40, 32
    monkeypatch.setattr(codes, "CHUNK_ELEMS", 7 * cols)  # 6 chunks, the last short
    W, imp, cand, logits = _setup(rows, cols, rows, seed=3, dtype=dtype)
    spec = QuantSpec(4, 8) if joint else None
    clip = quant.init_clip_logits(rows, cols // 8) if joint else None
    if clip is not None:
        with torch.no_grad():
            clip.add_(torch.randn(clip.shape, generator=torch.Generator().manual_seed(9)))
    b = torch.randn(rows).to(dtype) if bias else None
    x = torch.randn(2, 5, cols, generator=torch.Generator().manual_seed(4)).to(dtype)
    gy = torch.randn(2, 5, rows, generator=torch.Generator().manual_seed(6)).to(dtype)
    params = [logits] + ([clip] if clip is not None else [])

    ranks = ste.row_ranks(imp, torch.int16)
    xr = x.clone().requires_grad_(True)
    m = ste.ste_mask(W, ranks, logits, cand)
    if spec is not None:
        m = quant.fake_quant(m, clip, spec)
    y_ref = F.linear(xr, m, b)
    g_ref = torch.autograd.grad(y_ref, [xr, *params], gy)

    bc = codes.BucketCodes.build(lambda a, b: imp[a:b], imp.shape, "cpu", cand)
    w_rows, n_rows, alpha = codes.step_plan(logits, cand, True, rows, cols)
    assert torch.equal(alpha, ste.expected_sparsity(logits, cand))
    qf = (lambda w, c: quant.fake_quant(w, c, spec)) if spec is not None else None
    layer = codes.MaskedLayer(W, bc, n_rows, qf)
    calls = []
    xg = x.clone().requires_grad_(True)
    lp = [w_rows] + ([clip] if clip is not None else [])
    y = codes.layer_forward(xg, b, layer, lp, lambda: calls.append(1))
    g = torch.autograd.grad(y, [xg, *params], gy)
    assert calls == [1, 1]  # after the forward and after the backward
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    for a, r in zip(g, g_ref, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a.float(), r.float(), **tol)
