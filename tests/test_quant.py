"""Joint sparsity + weight quantization (issue 11): the quantizer's grid, learned clipping with
straight-through rounding, GPTQ inside SparseGPT's pass, the baselines and BESA joint on tiny
models, saving, resume and bad input."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import (  # noqa: E402, F401
    SAMPLE_TEXT,
    prune_args,
    save_tiny,
    single_thread,
    tiny_model,
    tiny_tokens,
)

import besa_rs  # noqa: E402
from besa_rs.cli import main  # noqa: E402
from besa_rs.errors import ConfigError, FormatError, ShapeError  # noqa: E402
from besa_rs.pruning import PruneConfig, quant  # noqa: E402
from besa_rs.pruning.baselines import wanda_mask  # noqa: E402


def _weight(rows=32, cols=128, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[0, :] *= 4  # an outlier row
    W[3, 5] = 0.9  # an outlier weight
    return W.to(dtype)


def _expand(t, cols):
    return t.repeat_interleave(cols // t.shape[1], dim=1)


# ---------------------------------------------------------------------------------------------
# the grid
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,gs", [(2, 32), (3, -1), (4, 64), (8, 16)])
def test_rtn_grid_is_exact_and_codes_in_range(dtype, bits, gs):
    W = _weight(dtype=dtype)
    p = quant.rtn(W, quant.QuantSpec(bits, gs))
    groups = 1 if gs == -1 else 128 // gs
    assert p.codes.dtype == torch.uint8 and p.zero.dtype == torch.uint8
    assert p.scale.dtype == dtype and p.scale.shape == (32, groups) and p.zero.shape == (32, groups)
    assert int(p.codes.max()) <= 2**bits - 1 and int(p.zero.max()) <= 2**bits - 1
    Wq = p.dequantize()
    assert Wq.dtype == dtype
    # independent: the exact product (q - z) * scale in float64, rounded once to the dtype
    ref = ((p.codes.double() - _expand(p.zero.double(), 128)) * _expand(p.scale.double(), 128)).to(
        dtype
    )
    assert torch.equal(Wq, ref)
    # at most 2^N distinct values per group, and within half a step of the weight
    width = 128 if gs == -1 else gs
    for r in (0, 3, 17):
        for k in range(groups):
            vals = Wq[r, k * width : (k + 1) * width]
            assert vals.unique().numel() <= 2**bits
    # (plus, in a 16-bit dtype, the rounding of the scale and of the product)
    err = (Wq.double() - W.double()).abs()
    step = _expand(p.scale.double(), 128)
    u = torch.finfo(dtype).eps
    assert bool((err <= 0.5 * step + 2**bits * u * step + u * W.double().abs() + 1e-9).all())


def test_rtn_matches_a_plain_reference():
    """Per (row, group), in numpy float32: scale = (max(w, 0) - min(w, 0)) / (2^N - 1),
    z = -round(min / scale), q = clip(round(w / scale) + z, 0, 2^N - 1)."""
    W = _weight(rows=8, cols=64, seed=3)
    for bits, gs in [(3, 16), (4, -1), (2, 8)]:
        p = quant.rtn(W, quant.QuantSpec(bits, gs))
        qmax = 2**bits - 1
        width = 64 if gs == -1 else gs
        Wn = W.numpy()
        for r in range(8):
            for k in range(64 // width):
                w = Wn[r, k * width : (k + 1) * width]
                hi, lo = np.float32(max(w.max(), 0)), np.float32(min(w.min(), 0))
                scale = np.float32((hi - lo) / np.float32(qmax))
                z = np.clip(-np.round(lo / scale), 0, qmax)
                q = np.clip(np.round(w / scale) + z, 0, qmax)
                assert float(p.scale[r, k]) == float(scale)
                assert int(p.zero[r, k]) == int(z)
                assert np.array_equal(p.codes[r, k * width : (k + 1) * width].numpy(), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_is_on_the_grid_pruned_weights_stay_zero(bits):
    W = _weight(seed=bits)
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(W.shape, generator=g) > 0.6
    keep[5] = False  # an all-zero row: every group empty
    Wm = W * keep
    spec = quant.QuantSpec(bits, 32)
    p = quant.rtn(Wm, spec)
    Wq = p.dequantize()
    assert bool((Wq[~keep] == 0).all())
    assert torch.equal(p.codes[~keep].long(), _expand(p.zero.long(), 128)[~keep])
    assert bool((Wq[5] == 0).all()) and bool(torch.isfinite(p.scale).all())
    # learned clipping keeps zeros too, in the training forward and in the final grid
    logits = torch.randn(2, 32, 4) + 1.0
    assert bool((quant.fake_quant(Wm, logits, spec)[~keep] == 0).all())
    assert bool((quant.rtn(Wm, spec, logits).dequantize()[~keep] == 0).all())


def test_training_forward_equals_final_grid():
    """The fake-quant forward BESA trains with and the final RTN with the learned clipping give
    the same values (fp32), with and without clipping."""
    W = _weight()
    spec = quant.QuantSpec(3, 32)
    logits = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(1)) + 2.0
    assert torch.equal(quant.fake_quant(W, logits, spec), quant.rtn(W, spec, logits).dequantize())
    no_clip = torch.full((2, 32, 4), 100.0)  # sigmoid = 1 exactly in fp32
    assert torch.equal(quant.fake_quant(W, no_clip, spec), quant.rtn(W, spec).dequantize())
    # clipping at init (sigmoid(4) = 0.982) shrinks the range of every group
    p0 = quant.rtn(W, spec, quant.init_clip_logits(32, 4).detach())
    assert bool((p0.scale < quant.rtn(W, spec).scale).all())


def test_ste_gradient_of_clipping_logits_matches_finite_differences():
    """Precisely: autograd's gradient of ``sum(c * fake_quant(W, g))`` w.r.t. the clipping logits
    ``g`` equals the finite-difference derivative of the surrogate in which every ``round(u)`` is
    replaced by ``u + (round(u0) - u0)`` with ``u0`` its value at the evaluation point (the
    straight-through estimator's definition: rounding offsets held constant, identity slope) and
    the code clamp's active set held at the evaluation point (a code is clamped iff its rounded
    value lies strictly outside ``[0, 2^N - 1]``: torch.clamp passes the gradient at the bounds,
    where every rounded code that is not clipped sits), everything else (sigmoid, max/min)
    exact. fp64, central differences."""
    torch.manual_seed(0)
    spec = quant.QuantSpec(3, 16)
    W = _weight(rows=6, cols=64, seed=5).double()
    c = torch.randn(6, 64, dtype=torch.float64)
    g0 = (torch.randn(2, 6, 4, dtype=torch.float64) * 0.5 + 1.5).requires_grad_(True)
    (c * quant.fake_quant(W, g0, spec)).sum().backward()
    auto = g0.grad.clone()

    Wg = W.reshape(6, 4, 16)
    qmax = spec.qmax

    def parts(g):
        s = torch.sigmoid(g)
        hi = s[0] * Wg.amax(-1).clamp_min(0)
        lo = s[1] * Wg.amin(-1).clamp_max(0)
        scale = ((hi - lo) / qmax).unsqueeze(-1)
        return lo.unsqueeze(-1) / scale, Wg / scale, scale

    uz0, uq0, _ = parts(g0.detach())
    off_z, off_q = torch.round(uz0) - uz0, torch.round(uq0) - uq0
    z0 = torch.clamp(-torch.round(uz0), 0, qmax)
    above, below = torch.round(uq0) + z0 > qmax, torch.round(uq0) + z0 < 0

    def surrogate(g):
        uz, uq, scale = parts(g)
        z = torch.clamp(-(uz + off_z), 0, qmax)  # z stays inside [0, qmax] for any g
        q = uq + off_q + z
        q = torch.where(above, torch.full_like(q, qmax), torch.where(below, 0.0, q))
        return float((c * ((q - z) * scale).reshape(6, 64)).sum())

    fd = torch.zeros_like(auto)
    eps = 1e-6
    base = g0.detach()
    for idx in np.ndindex(*auto.shape):
        gp, gm = base.clone(), base.clone()
        gp[idx] += eps
        gm[idx] -= eps
        fd[idx] = (surrogate(gp) - surrogate(gm)) / (2 * eps)
    assert bool((auto.abs() > 0).any(dim=(1, 2)).all())  # both clipping sides get gradient
    assert torch.allclose(auto, fd, rtol=1e-5, atol=1e-7), (auto - fd).abs().max()


def test_searched_clipping_init_minimises_the_weighted_error():
    """``clip_init="search"``: per group the shrink of the search grid (top = the fixed init)
    whose RTN error, weighted per input column, is smallest; checked against a brute force over
    the same grid with ``rtn``, and the column weights change the choice."""
    W = _weight(rows=16, cols=128, seed=3)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    Wm = W * keep
    spec = quant.QuantSpec(3, 32)
    cw = torch.rand(128, generator=torch.Generator().manual_seed(5)) ** 4 * 10
    grid = torch.linspace(
        torch.sigmoid(torch.tensor(quant.CLIP_INIT_LOGIT)).item(),
        quant.CLIP_SEARCH_MIN,
        quant.CLIP_SEARCH_STEPS,
    ).tolist()

    def group_err(logits, w):
        d = (quant.rtn(Wm, spec, logits).dequantize() - Wm) ** 2 * w
        return d.reshape(16, 4, 32).sum(-1)

    for w in (torch.ones(128), cw):
        got = quant.search_clip_logits(Wm, spec, w)
        assert got.shape == (2, 16, 4) and got.requires_grad and got.is_leaf
        assert torch.equal(got[0], got[1])  # one common shrink for max and min
        errs = torch.stack([group_err(torch.logit(torch.full((2, 16, 4), s)), w) for s in grid])
        e_got = group_err(got.detach(), w)
        assert torch.allclose(e_got, errs.min(0).values, rtol=1e-4, atol=1e-9)
        # never worse than the fixed init, and strictly better on some groups
        fixed = group_err(quant.init_clip_logits(16, 4).detach(), w)
        assert bool((e_got <= fixed * (1 + 1e-5)).all()) and bool((e_got < 0.99 * fixed).any())
    plain = quant.search_clip_logits(Wm, spec, None)
    assert torch.equal(plain, quant.search_clip_logits(Wm, spec, torch.ones(128)))
    assert not torch.equal(plain, quant.search_clip_logits(Wm, spec, cw))


def test_block_clip_search_init_uses_the_search():
    W = _weight(rows=16, cols=64, seed=6)
    cw = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.1
    dev = torch.device("cpu")
    fixed = quant.BlockClip.create(PruneConfig(wbits=3, group_size=32), {"l": W}, dev, 0)
    cfg = PruneConfig(wbits=3, group_size=32, clip_init="search")
    searched = quant.BlockClip.create(cfg, {"l": W}, dev, 0, {"l": cw})
    assert fixed is not None and searched is not None
    assert bool((fixed.logits["l"] == quant.CLIP_INIT_LOGIT).all())
    assert torch.equal(
        searched.logits["l"], quant.search_clip_logits(W, quant.QuantSpec(3, 32), cw)
    )
    assert searched.logits["l"].requires_grad and searched.logits["l"].is_leaf


# ---------------------------------------------------------------------------------------------
# GPTQ in SparseGPT's pass
def _layer_problem(rows=48, cols=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(n, cols, generator=g) @ A + 0.3 * torch.randn(n, cols, generator=g)
    W = torch.randn(rows, cols, generator=g) * 0.05
    H = 2.0 / n * X.T @ X
    return W, X, H


def _out_err(X, W, V):
    return float(((X @ (V - W).T) ** 2).mean() / ((X @ W.T) ** 2).mean())


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, -1), (3, 32)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, gs):
    W, X, H = _layer_problem()
    spec = quant.QuantSpec(bits, gs)
    Wr = quant.rtn(W, spec).dequantize()
    Wg, keep, p = quant.sparsegpt_quant_prune(W, H, spec, blocksize=128)
    assert bool(keep.all()) and torch.equal(Wg, p.dequantize())
    assert _out_err(X, W, Wg) < 0.75 * _out_err(X, W, Wr)
    # joint: mask chosen in the pass, 50%, against Wanda's mask then RTN
    Wj, keep, p = quant.sparsegpt_quant_prune(W, H, spec, sparsity=0.5, blocksize=64)
    assert abs(1 - float(keep.float().mean()) - 0.5) < 1e-9
    assert torch.equal(Wj, p.dequantize()) and bool((Wj[~keep] == 0).all())
    wk = wanda_mask(W, (X * X).sum(0), 0.5)
    assert _out_err(X, W, Wj) < 0.85 * _out_err(X, W, quant.rtn(W * wk, spec).dequantize())


def test_gptq_group_parameters_come_from_the_updated_weights():
    """Group 0's scale/zero are computed before any update (= RTN's of the masked weight); later
    groups' from the weights as updated by the pass so far, including the lazy in-block update:
    the result does not depend on the column block size (blocksize 1 updates every column
    eagerly), and it differs from RTN's."""
    W, X, H = _layer_problem(rows=16, cols=128)
    keep = wanda_mask(W, (X * X).sum(0), 0.5)
    spec = quant.QuantSpec(4, 32)
    _, _, p = quant.sparsegpt_quant_prune(W, H, spec, mask=keep, blocksize=48)
    r = quant.rtn(W * keep, spec)
    assert torch.equal(p.scale[:, 0], r.scale[:, 0]) and torch.equal(p.zero[:, 0], r.zero[:, 0])
    assert not torch.equal(p.scale[:, 1:], r.scale[:, 1:])
    _, _, p1 = quant.sparsegpt_quant_prune(W, H, spec, mask=keep, blocksize=1)
    assert torch.allclose(p.scale, p1.scale, rtol=1e-4)
    assert float((p.zero != p1.zero).float().mean()) < 0.02
    assert float((p.codes != p1.codes).float().mean()) < 0.02
    # whole rows: one group, parameters from the untouched (masked) weight
    _, _, p2 = quant.sparsegpt_quant_prune(W, H, quant.QuantSpec(4, -1), mask=keep)
    r2 = quant.rtn(W * keep, quant.QuantSpec(4, -1))
    assert torch.equal(p2.scale, r2.scale) and torch.equal(p2.zero, r2.zero)


def test_quantization_aware_refit_beats_quantizing_after():
    """BESA's ``--reconstruct`` with quantization: least-squares refit of the kept weights, then
    the GPTQ pass on the mask: better than RTN of the refitted weights and than the GPTQ pass
    from the original weights."""
    from besa_rs.pruning.baselines import refine_masked_lstsq, sparsegpt_prune

    W, X, H = _layer_problem()
    keep = wanda_mask(W, (X * X).sum(0), 0.5)
    spec = quant.QuantSpec(3, 64)
    Ws, _ = sparsegpt_prune(W, H, mask=keep)
    Wl = refine_masked_lstsq(W, Ws, keep, H)
    Wq, k2, p = quant.sparsegpt_quant_prune(Wl, H, spec, mask=keep)
    assert torch.equal(k2, keep) and torch.equal(Wq, p.dequantize())
    assert bool((Wq[~keep] == 0).all())
    e_lsq, e_q = _out_err(X, W, Wl), _out_err(X, W, Wq)
    e_rtn = _out_err(X, W, quant.rtn(Wl, spec).dequantize())
    assert e_q - e_lsq < 0.85 * (e_rtn - e_lsq)  # the error quantization adds
    # and better than the joint pass run from the original weights with the mask imposed
    Wj, _, _ = quant.sparsegpt_quant_prune(W, H, spec, mask=keep)
    assert e_q < 0.9 * _out_err(X, W, Wj)


def test_besa_final_quantization_uses_the_gptq_pass_with_a_hessian():
    """``BlockClip.finish`` (BESA's last step): with the Hessian (``--reconstruct``) the GPTQ pass
    with the mask imposed and the learned clipping; without, RTN with the learned clipping."""
    from besa_rs.pruning.baselines import refine_masked_lstsq, sparsegpt_prune

    W, X, H = _layer_problem(rows=32, cols=128)
    keep = wanda_mask(W, (X * X).sum(0), 0.5)
    Ws, _ = sparsegpt_prune(W, H, mask=keep)
    Wl = refine_masked_lstsq(W, Ws, keep, H)
    cfg = PruneConfig(wbits=3, group_size=32)
    errs = {}
    for with_h in (False, True):
        lin = torch.nn.Linear(128, 32, bias=False)
        with torch.no_grad():
            lin.weight.copy_(Wl)
        clip = quant.BlockClip.create(cfg, {"l": Wl}, torch.device("cpu"), 0)
        info = clip.finish("l", lin, keep, H if with_h else None, cfg, 0)
        p = getattr(lin, quant.ATTR)
        assert torch.equal(lin.weight.detach(), p.dequantize()) and info["wbits"] == 3
        assert bool((lin.weight[~keep] == 0).all())
        errs[with_h] = _out_err(X, W, lin.weight.detach())
        # the baselines' hook for a refit (--reconstruct for every method) does the same
        lin2 = torch.nn.Linear(128, 32, bias=False)
        with torch.no_grad():
            lin2.weight.copy_(Wl)
        quant.finish_layer(cfg, lin2, keep, {}, "l", hessian=H if with_h else None)
        if with_h:  # plain min/max, no learned clipping
            assert _out_err(X, W, lin2.weight.detach()) < 0.97 * errs[False]
        else:
            assert torch.equal(lin2.weight, quant.rtn(Wl, quant.QuantSpec(3, 32)).dequantize())
    assert errs[True] < 0.97 * errs[False], errs


# ---------------------------------------------------------------------------------------------
# tiny models, every method
TOKS = tiny_tokens(n=8, seqlen=32)

RUNS = {
    "wanda": dict(method="wanda"),  # not quantized: the reference for the cost of quantization
    "magnitude+rtn": dict(method="magnitude"),
    "joint-wanda": dict(method="wanda"),
    "sparsegpt-joint": dict(method="sparsegpt"),
    "besa-joint": dict(epochs=3),
    "besa-joint+reconstruct": dict(epochs=3, reconstruct=True),
    "rtn": dict(method="magnitude", sparsity=0.0),
    "rtn-wanda-path": dict(method="wanda", sparsity=0.0),
    "gptq": dict(method="sparsegpt", sparsity=0.0),
    "clip": dict(sparsity=0.0, epochs=3),
    "clip+gptq": dict(sparsity=0.0, epochs=3, reconstruct=True),
}


#: the tiny runs take 8 x 3 = 24 steps per block; their thresholds were set with the rates 0.2
#: (sparsity) and 0.1 (clipping) on each of those steps, so the step budget's reference is 24
#: steps here (the default 32 would give 0.27 and 0.13 per step)
TINY_BUDGET = dict(lr_reference_steps=24)


def _tiny_run(kw, bits, gs, arch="llama"):
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model(TOKS).logits
    kw = {**TINY_BUDGET, **kw}
    cfg = dict(kw, wbits=bits, group_size=gs) if bits is not None else dict(kw)
    rep = besa_rs.prune(model, TOKS, PruneConfig(progress=False, **cfg))
    with torch.no_grad():
        out = model(TOKS).logits
    err = ((out - ref) ** 2).mean().item() / (ref**2).mean().item()
    return model, rep, err


@pytest.fixture(scope="module", params=[(3, -1), (4, 32)], ids=["3bit-row", "4bit-g32"])
def runs(request):
    bits, gs = request.param
    return (
        bits,
        gs,
        {name: _tiny_run(kw, None if name == "wanda" else bits, gs) for name, kw in RUNS.items()},
    )


def test_every_method_puts_weights_exactly_on_the_grid(runs):
    bits, gs, res = runs
    for name, (model, rep, err) in res.items():
        if name == "wanda":
            assert quant.collect(model) == {}
            continue
        target = RUNS[name].get("sparsity", 0.5)
        assert err < 0.2, (name, err)  # a working model, not zeros that happen to be on a grid
        assert abs(rep["totals"]["realised_sparsity"] - target) < 0.005, name
        params = quant.collect(model)
        assert len(params) == 2 * 7, name  # every linear of both blocks, not lm_head
        sd = model.state_dict()
        for wname, p in params.items():
            assert p.bits == bits and p.group_size == gs
            W = sd[wname]
            assert torch.equal(W, p.dequantize(W.dtype)), (name, wname)
            assert int(p.codes.max()) <= 2**bits - 1
        for b in rep["blocks"]:
            for li in b["layers"]:
                assert li["wbits"] == bits and li["group_size"] == gs
                assert li["zero_fraction"] >= li["realised_sparsity"]


def test_joint_methods_rank_as_expected(runs):
    _, _, res = runs
    e = {k: v[2] for k, v in res.items()}
    assert e["besa-joint"] < e["joint-wanda"], e
    assert e["besa-joint+reconstruct"] < e["sparsegpt-joint"], e
    assert e["sparsegpt-joint"] < e["joint-wanda"], e
    assert e["clip"] < e["rtn"], e  # learned clipping alone beats round-to-nearest
    assert e["gptq"] < e["rtn"], e
    assert e["clip+gptq"] < e["clip"], e  # learned clipping through the GPTQ pass
    assert e["rtn-wanda-path"] == e["rtn"]  # quantization only: the same RTN either way
    assert e["joint-wanda"] > e["wanda"]  # quantization costs something


def test_besa_joint_learns_the_clipping(runs):
    _, _, res = runs
    for name in ("besa-joint", "besa-joint+reconstruct", "clip", "clip+gptq"):
        _, rep, _ = res[name]
        assert rep["settings"]["clip_lr"] == 0.1
        for b in rep["blocks"]:
            n = TOKS.shape[0]  # third epoch against the first, on the same samples
            assert sum(b["loss"][-n:]) < sum(b["loss"][:n]), (name, b["loss"])
            for li in b["layers"]:
                # moved away from the init sigmoid(4) = 0.982 (both ways are possible)
                assert li["clip_max_min"] < 0.978 and li["clip_min_min"] < 0.978, (name, li)


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, 16)])
def test_besa_joint_beats_besa_then_rtn(bits, gs):
    """Learning masks and clipping together beats learning masks, then rounding to nearest with
    plain min/max, and with the initial clipping (sigmoid(4)): the latter is what the joint run
    would give if its clipping and masks did not learn from the quantized forward, except that
    in the joint run later blocks are calibrated on the quantized outputs of earlier ones."""
    errs = []
    for init_clip in (False, True):
        model = tiny_model("llama")
        with torch.no_grad():
            ref = model(TOKS).logits
        besa_rs.prune(model, TOKS, PruneConfig(progress=False, epochs=3, **TINY_BUDGET))
        spec = quant.QuantSpec(bits, gs)
        for mod in model.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                rows, cols = mod.weight.shape
                logits = quant.init_clip_logits(rows, cols // spec.group_width(cols)).detach()
                p = quant.rtn(mod.weight.detach(), spec, logits if init_clip else None)
                quant.attach(mod, p)
        with torch.no_grad():
            errs.append(((model(TOKS).logits - ref) ** 2).mean().item() / (ref**2).mean().item())
    _, _, e_joint = _tiny_run(RUNS["besa-joint"], bits, gs)
    assert e_joint < min(errs), (e_joint, errs)


def test_bf16_model_grid_is_exact():
    for kw in (RUNS["magnitude+rtn"], RUNS["sparsegpt-joint"], RUNS["besa-joint"]):
        model = tiny_model("llama").to(torch.bfloat16)
        besa_rs.prune(model, TOKS, PruneConfig(progress=False, wbits=4, group_size=16, **kw))
        sd = model.state_dict()
        for wname, p in quant.collect(model).items():
            assert p.scale.dtype == torch.bfloat16
            assert torch.equal(sd[wname], p.dequantize()), wname


# ---------------------------------------------------------------------------------------------
# one optimisation loop for every learned method; quantization-aware refit for every method
def test_clip_only_runs_in_the_shared_loop_with_float16_loss_scaling():
    """Learned clipping alone (``sparsity = 0``) runs in BESA's loop: in float16 a loss scale far
    too large overflows the gradients, those steps are skipped and the scale halves (no error,
    no silent inf update), the next block starts from the scale the previous one ended with,
    and the clipping rate follows the step budget like the sparsity logits' rate."""
    model = tiny_model("llama").half()
    cfg = PruneConfig(progress=False, sparsity=0.0, wbits=4, group_size=32, loss_scale_init=2.0**22)
    rep = besa_rs.prune(model, TOKS, cfg)
    b0, b1 = rep["blocks"]
    assert b0["loss_scaling"] is True
    assert b0["skipped_steps"] >= 1 and b0["skipped_at"][0] == 0
    assert b0["loss_scale"] <= 2.0 ** (22 - b0["skipped_steps"])
    assert b0["skipped_steps"] < b0["steps"] == TOKS.shape[0]  # it learned on the others
    assert b1["skipped_steps"] <= 1  # started from block 0's scale
    assert b0["clip_lr_per_step"] == pytest.approx(0.1 * 32 / TOKS.shape[0])
    for b in rep["blocks"]:
        assert all(np.isfinite(b["loss"]))
        for li in b["layers"]:
            assert li["clip_max_min"] < 0.98  # the clipping moved
    sd = model.state_dict()
    for wname, p in quant.collect(model).items():
        assert torch.equal(sd[wname], p.dequantize(torch.float16)), wname


def test_besa_joint_float16_shares_the_scaler_and_the_budget():
    """BESA joint (masks + clipping) in float16: the same scaler, both groups on the budget."""
    model = tiny_model("llama").half()
    cfg = PruneConfig(progress=False, wbits=4, group_size=32, loss_scale_init=2.0**22)
    b0 = besa_rs.prune(model, TOKS, cfg)["blocks"][0]
    assert b0["loss_scaling"] is True and b0["skipped_at"][:1] == [0]
    steps = TOKS.shape[0]
    assert b0["lr_per_step"] == pytest.approx(0.2 * 32 / steps)
    assert b0["clip_lr_per_step"] == pytest.approx(0.1 * 32 / steps)
    assert abs(b0["realised_sparsity"] - 0.5) < 0.005


def _block0_error(model, dense, toks):
    """Relative error of block 0's output against the dense model's (same inputs)."""
    got = []

    def hook(_m, _i, out):
        got.append(out[0] if isinstance(out, (tuple, list)) else out)

    for m in (model, dense):
        h = m.model.layers[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                m(toks)
        finally:
            h.remove()
    y, yd = got
    return float(((y - yd) ** 2).sum() / (yd**2).sum())


def test_wanda_reconstruct_with_wbits_is_quantization_aware():
    """``--method wanda --reconstruct --wbits 3``: Wanda's mask, the shared refit, then the GPTQ
    pass with the mask: exact grid values, the same mask, and a lower block error than Wanda +
    RTN (no reconstruct) and than the refit followed by plain RTN (a refit that is not
    quantization-aware)."""
    import copy

    spec = quant.QuantSpec(3, 32)
    dense = tiny_model("llama")
    runs = {}
    for name, kw in {
        "wanda+rtn": dict(wbits=3),
        "wanda+refit+gptq": dict(wbits=3, reconstruct=True),
        "wanda+refit": dict(reconstruct=True),
    }.items():
        model = copy.deepcopy(dense)
        rep = besa_rs.prune(
            model,
            TOKS,
            PruneConfig(method="wanda", group_size=32, num_blocks=1, progress=False, **kw),
        )
        runs[name] = (model, rep)
    # the refit, then RTN of the refitted weights
    rtn_after = copy.deepcopy(runs["wanda+refit"][0])
    for mod in rtn_after.model.layers[0].modules():
        if isinstance(mod, torch.nn.Linear):
            quant.attach(mod, quant.rtn(mod.weight.detach(), spec))
    model, rep = runs["wanda+refit+gptq"]
    assert rep["settings"]["reconstruct"] is True
    params = quant.collect(model)
    assert len(params) == 7  # block 0's linears
    sd = model.state_dict()
    for wname, p in params.items():
        assert torch.equal(sd[wname], p.dequantize(sd[wname].dtype)), wname
        # the mask of the refit (Wanda's) survives: pruned weights stay 0
        assert bool((sd[wname][runs["wanda+refit"][0].state_dict()[wname] == 0] == 0).all())
    for li in rep["blocks"][0]["layers"]:
        assert li["wbits"] == 3 and "dead_columns" in li
    e = {k: _block0_error(m, dense, TOKS) for k, (m, _) in runs.items()}
    e["wanda+refit+rtn"] = _block0_error(rtn_after, dense, TOKS)
    assert e["wanda+refit+gptq"] < 0.9 * e["wanda+rtn"], e
    assert e["wanda+refit+gptq"] < e["wanda+refit+rtn"], e


# ---------------------------------------------------------------------------------------------
# saving, CLI, resume


@pytest.mark.parametrize(
    "extra",
    [
        ("--method", "wanda", "--wbits", "4", "--group-size", "32"),
        ("--wbits", "3", "--group-size", "-1", "--reconstruct", "--clip-lr", "0.05"),
        ("--method", "sparsegpt", "--wbits", "4", "--sparsity", "0", "--group-size", "16"),
        ("--method", "wanda", "--reconstruct", "--wbits", "3", "--group-size", "32"),
    ],
)
def test_cli_saves_grid_values_and_parameters(tiny_dir, calib_file, tmp_path, extra):
    out = tmp_path / "q"
    assert main(prune_args(tiny_dir, out, calib_file, *extra)) == 0
    rep = json.loads((out / "besa_report.json").read_text())
    bits = int(extra[extra.index("--wbits") + 1])
    assert rep["quantization"]["file"] == quant.QUANT_FILE and rep["quantization"]["bits"] == bits
    assert rep["settings"]["wbits"] == bits
    weights = load_file(str(out / "model.safetensors"))
    params = quant.read_quant_file(out)
    assert len(params) == 14
    for wname, p in params.items():
        assert torch.equal(weights[wname], p.dequantize()), wname
    # transformers loads it as a plain model (the side file is not in its way)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        m.model.layers[1].mlp.down_proj.weight, weights["model.layers.1.mlp.down_proj.weight"]
    )


def test_no_side_file_without_wbits(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "plain"
    assert main(prune_args(tiny_dir, out, calib_file, "--method", "magnitude")) == 0
    assert not (out / quant.QUANT_FILE).exists()
    assert "quantization" not in json.loads((out / "besa_report.json").read_text())
    with pytest.raises(FormatError, match="was not quantized"):
        quant.read_quant_file(out)


def test_resume_restores_quantization_parameters(tmp_path):
    """A run resumed from a checkpoint holding every block writes the same side file."""
    from besa_rs.pruning.checkpoint import Checkpointer
    from besa_rs.pruning.output import write_outputs
    from besa_rs.pruning.sequential import run_pruning

    cfg = PruneConfig(progress=False, wbits=3, group_size=32, epochs=1)
    m1 = tiny_model("llama")
    ck = Checkpointer(tmp_path / "ck", cfg, TOKS, resume=False)
    rep = run_pruning(m1, TOKS, cfg, checkpoint=ck)
    write_outputs(m1, None, rep, tmp_path / "a")
    m2 = tiny_model("llama")
    ck2 = Checkpointer(tmp_path / "ck", cfg, TOKS, resume=True)
    rep2 = run_pruning(m2, TOKS, cfg, checkpoint=ck2)
    assert ck2.resumed_from == 2
    write_outputs(m2, None, rep2, tmp_path / "b")
    a, b = (
        load_file(str(tmp_path / "a" / quant.QUANT_FILE)),
        load_file(str(tmp_path / "b" / quant.QUANT_FILE)),
    )
    assert a.keys() == b.keys() and len(a) == 3 * 14
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(wbits=1), "wbits must be an integer in 2..8"),
        (dict(wbits=9), "wbits must be an integer in 2..8"),
        (dict(wbits=4, group_size=0), "group_size must be -1"),
        (dict(wbits=4, group_size=-2), "group_size must be -1"),
        (dict(sparsity=0.0), "0 only with wbits"),
        (dict(wbits=4, clip_lr=0.0), "clip_lr must be > 0"),
        (dict(wbits=4, clip_init="mse"), "unknown clip_init 'mse'"),
    ],
)
def test_bad_quant_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        PruneConfig(**kw).validate()


def test_wbits_16_means_off():
    cfg = PruneConfig(wbits=16).validate()
    assert cfg.wbits is None and quant.spec_of(cfg) is None


def test_group_size_must_divide_every_layer():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ShapeError, match=r"block 0 self_attn.q_proj: group size 48 does not divide its 64"
    ):
        besa_rs.prune(
            model, TOKS, PruneConfig(progress=False, method="magnitude", wbits=4, group_size=48)
        )
    # nothing was touched: the check runs before the first block
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ShapeError, match="group size 7"):
        quant.rtn(torch.zeros(4, 64), quant.QuantSpec(4, 7), name="x")


@pytest.mark.parametrize(
    "extra,msg",
    [
        (("--wbits", "1"), "wbits must be an integer in 2..8"),
        (("--wbits", "4", "--group-size", "48"), "group size 48 does not divide its 64 input"),
        (("--sparsity", "0"), "0 only with wbits"),
    ],
)
def test_cli_bad_quant_input(tiny_dir, calib_file, tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    assert main(prune_args(tiny_dir, out, calib_file, *extra)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("besa-rs prune: error:") and msg in last, last
    assert not out.exists()


def test_damaged_side_file_is_a_format_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_model("llama")
    besa_rs.prune(
        model, TOKS, PruneConfig(progress=False, method="magnitude", wbits=4, group_size=16)
    )
    assert quant.write_quant_file(model, tmp_path)["layers"] == 14
    path = tmp_path / quant.QUANT_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    assert len(quant.read_quant_file(tmp_path)) == 14
    tensors.pop("model.layers.1.mlp.up_proj.weight_scale")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FormatError, match="unreadable quantization parameters"):
        quant.read_quant_file(tmp_path)
    save_file(load_file(str(path)), str(path), metadata={"format": "other"})
    with pytest.raises(FormatError, match="not a besa-rs-quant file"):
        quant.read_quant_file(tmp_path)


def test_clip_init_auto_searches_for_joint_pruning_at_four_bits_and_more():
    """The default start of the learned clipping, chosen on the validation split: the searched
    start for joint pruning at 4+ bits, the fixed one at 3 bits and for clipping alone."""
    assert PruneConfig(wbits=4, group_size=64).clip_init_mode == "search"
    assert PruneConfig(wbits=8, group_size=64).clip_init_mode == "search"
    assert PruneConfig(wbits=3, group_size=64).clip_init_mode == "fixed"
    assert PruneConfig(wbits=4, group_size=64, sparsity=0).clip_init_mode == "fixed"
    assert PruneConfig(wbits=3, group_size=64, clip_init="search").clip_init_mode == "search"
    assert PruneConfig(wbits=4, group_size=64, clip_init="fixed").clip_init_mode == "fixed"
    assert PruneConfig(wbits=4, group_size=64).to_dict()["clip_init"] == "search"
    assert PruneConfig().to_dict()["clip_init"] is None  # not quantized


@pytest.mark.parametrize("gs", [32, -1])
def test_rtn_and_clip_search_by_row_chunks_are_the_whole_layers(monkeypatch, gs):
    """RTN and the clipping search work a chunk of rows at a time (their float32 temporaries
    are one chunk's): codes, scales, zero points and searched logits are those of one pass
    over the whole layer, with learned clipping and column weights, unaligned chunks."""
    W = _weight(rows=37, cols=128, seed=8)
    W = W * (torch.rand(W.shape, generator=torch.Generator().manual_seed(9)) > 0.4)
    spec = quant.QuantSpec(3, gs)
    groups = 128 // spec.group_width(128)
    logits = quant.init_clip_logits(37, groups).detach()
    logits += torch.randn(logits.shape, generator=torch.Generator().manual_seed(10))
    cw = torch.rand(128, generator=torch.Generator().manual_seed(11)) * 3

    def run():
        return (
            quant.rtn(W, spec),
            quant.rtn(W.to(torch.bfloat16), spec, logits),
            quant.search_clip_logits(W, spec, cw).detach(),
        )

    monkeypatch.setattr(quant, "ROW_CHUNK_ELEMS", 1 << 30)
    whole = run()
    monkeypatch.setattr(quant, "ROW_CHUNK_ELEMS", 5 * 128 + 17)  # chunks of 5 rows
    assert len(quant._row_chunks(37, 128)) == 8
    chunked = run()
    for a, b in zip(whole[:2], chunked[:2], strict=True):
        for f in ("codes", "scale", "zero"):
            assert getattr(a, f).dtype == getattr(b, f).dtype
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert torch.equal(whole[2], chunked[2])
