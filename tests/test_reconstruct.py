"""``--reconstruct`` as a control arm of every method: the method's own mask, then the same
least-squares refit BESA's masks get; dead input columns zeroed by the refit and counted as
pruned."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import single_thread, tiny_model, tiny_tokens  # noqa: E402, F401

from besa_rs import PruneConfig, prune  # noqa: E402
from besa_rs.cli import main as cli_main  # noqa: E402
from besa_rs.pruning.adapters import block_linears  # noqa: E402
from besa_rs.pruning.baselines import (  # noqa: E402
    magnitude_mask,
    refine_masked_lstsq,
    refit_masked,
    sparsegpt_prune,
)

METHODS = ["magnitude", "wanda", "sparsegpt", "besa"]


@pytest.fixture(scope="module")
def toks():
    return tiny_tokens(n=8, seqlen=32)


def _prune_block0(method, toks, reconstruct, model=None, **kw):
    model = model if model is not None else tiny_model("llama", layers=2, seed=0)
    dense = copy.deepcopy(model)
    cfg = PruneConfig(
        method=method, reconstruct=reconstruct, num_blocks=1, progress=False, seed=0, **kw
    )
    rep = prune(model, toks, cfg)
    return model, dense, rep


def _block0_out(model, toks):
    got = {}

    def hook(_m, _i, out):
        got["y"] = out[0] if isinstance(out, (tuple, list)) else out

    h = model.model.layers[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(toks)
    finally:
        h.remove()
    return got["y"]


def _block_error(model, dense, toks):
    """Relative reconstruction error of block 0's output (same inputs: block 0 is the first)."""
    y, yd = _block0_out(model, toks), _block0_out(dense, toks)
    return float(((y - yd) ** 2).sum() / (yd**2).sum())


@pytest.mark.parametrize(
    "method,kw", [(m, {}) for m in METHODS] + [("wanda", {"structure": "2:4"})]
)
def test_reconstruct_lowers_block_error_and_keeps_the_mask(method, kw, toks):
    plain, dense, rep_p = _prune_block0(method, toks, reconstruct=False, **kw)
    refit, _, rep_r = _prune_block0(method, toks, reconstruct=True, **kw)
    assert rep_r["settings"]["reconstruct"] is True
    e_plain, e_refit = _block_error(plain, dense, toks), _block_error(refit, dense, toks)
    assert e_refit < 0.9 * e_plain, (method, e_plain, e_refit)
    # same zeros: the refit changes kept weights only, never the mask
    lp, lr = block_linears(plain.model.layers[0]), block_linears(refit.model.layers[0])
    changed = 0
    for name in lp:
        wp, wr = lp[name].weight, lr[name].weight
        assert torch.equal(wp == 0, wr == 0), (method, name)
        changed += int((wp != wr).sum())
    assert changed > 0
    assert rep_r["totals"]["realised_sparsity"] == pytest.approx(
        rep_p["totals"]["realised_sparsity"]
    )
    # the blocks after the first are untouched (num_blocks=1)
    assert torch.equal(
        refit.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight
    )


def test_refit_function_keeps_mask_and_lowers_layer_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 48, generator=g) @ torch.randn(48, 48, generator=g)
    W = torch.randn(16, 48, generator=g)
    H = 2 * X.t() @ X / X.shape[0]
    keep = magnitude_mask(W, 0.5)
    fit = refit_masked(W, keep, H)

    def err(V):
        return float(((X @ (W - V).t()) ** 2).sum())

    assert torch.equal(fit.keep, keep) and fit.dead_columns == 0
    assert torch.equal(fit.weight == 0, ~keep)
    obs, _ = sparsegpt_prune(W, H, mask=keep)
    assert err(fit.weight) < err(obs) < err(W * keep)
    # it is exactly the OBS pass followed by the CG refinement, from the dense weight
    assert torch.equal(fit.weight, refine_masked_lstsq(W, obs, keep, H, iters=20))
    # SparseGPT's own weights = the refit's OBS pass with SparseGPT's mask imposed (unstructured
    # and N:M), so SparseGPT + reconstruct starts exactly where SparseGPT ends
    for kw in ({"sparsity": 0.5, "blocksize": 16}, {"n": 2, "m": 4, "blocksize": 16}):
        w_sgpt, k_sgpt = sparsegpt_prune(W, H, **kw)
        w_obs, _ = sparsegpt_prune(W, H, mask=k_sgpt, blocksize=16)
        assert torch.equal(w_sgpt, w_obs)


def test_sparsegpt_reconstruct_starts_from_its_own_update(toks):
    """SparseGPT + reconstruct = SparseGPT's mask, refit from the dense weight: the refit's OBS
    pass repeats SparseGPT's own update for that mask, then CG steps continue."""
    model, dense, _ = _prune_block0("sparsegpt", toks, reconstruct=True)
    plain, _, _ = _prune_block0("sparsegpt", toks, reconstruct=False)
    # the layer objective (dense weight as the target) only falls from SparseGPT's weights
    X = _block0_in(dense, toks)
    name = "self_attn.q_proj"
    wd = block_linears(dense.model.layers[0])[name].weight
    wp = block_linears(plain.model.layers[0])[name].weight
    wr = block_linears(model.model.layers[0])[name].weight
    with torch.no_grad():
        xn = model.model.layers[0].input_layernorm(X)
        e_p = float(((xn @ (wd - wp).t()) ** 2).sum())
        e_r = float(((xn @ (wd - wr).t()) ** 2).sum())
    assert e_r < e_p


def _block0_in(model, toks):
    got = {}

    def pre(_m, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]

    h = model.model.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(toks)
    finally:
        h.remove()
    return got["x"].detach()


def _with_dead_channel(channel: int):
    """Block 0's attention input norm multiplies channel ``channel`` by 0: q/k/v of block 0 then
    have a dead input column (no calibration signal)."""
    model = tiny_model("llama", layers=2, seed=0)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[channel] = 0.0
    return model


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@pytest.mark.parametrize("method", ["magnitude", "besa"])
def test_dead_columns_are_zeroed_and_counted(method, toks):
    ch = 5
    model = _with_dead_channel(ch)
    lins0 = block_linears(model.model.layers[0])
    dense = {n: lin.weight.detach().clone() for n, lin in lins0.items()}
    # BESA with magnitude importance: the dead column is not ranked first, so its mask keeps
    # some of it (with Wanda importance it would be pruned anyway: its input norm is 0)
    kw = {"metric": "magnitude"} if method == "besa" else {}
    model, _, rep = _prune_block0(method, toks, reconstruct=True, model=model, **kw)
    layers = {li["name"]: li for li in rep["blocks"][0]["layers"]}
    total_dead_w = 0
    zeros = params = 0
    for name, lin in block_linears(model.model.layers[0]).items():
        W, li = lin.weight, layers[name]
        zeros += int((W == 0).sum())
        params += W.numel()
        # the realised sparsity is the zeros actually written, dead columns included
        assert li["realised_sparsity"] == pytest.approx(float((W == 0).float().mean()), abs=1e-9)
        if name in QKV:
            assert li["dead_columns"] == 1
            assert (W[:, ch] == 0).all()
            total_dead_w += li["dead_weights_zeroed"]
        else:
            assert li["dead_columns"] == 0 and li["dead_weights_zeroed"] == 0
    if method == "magnitude":
        # magnitude keeps about half of the dead column: those are zeroed on top of its mask
        expect = sum(int(magnitude_mask(dense[n], 0.5)[:, ch].sum()) for n in QKV)
        assert total_dead_w == expect > 0
        assert rep["blocks"][0]["realised_sparsity"] > 0.5
    assert total_dead_w > 0
    b = rep["blocks"][0]
    assert b["dead_columns"] == 3 and b["dead_weights_zeroed"] == total_dead_w
    assert rep["totals"]["dead_columns"] == 3
    assert rep["totals"]["dead_weights_zeroed"] == total_dead_w
    assert rep["totals"]["realised_sparsity"] == pytest.approx(zeros / params, abs=1e-9)


def test_sparsegpt_counts_dead_columns(toks):
    ch = 7
    model, _, rep = _prune_block0(
        "sparsegpt", toks, reconstruct=False, model=_with_dead_channel(ch)
    )
    layers = {li["name"]: li for li in rep["blocks"][0]["layers"]}
    for name, lin in block_linears(model.model.layers[0]).items():
        W = lin.weight
        assert layers[name]["realised_sparsity"] == pytest.approx(
            float((W == 0).float().mean()), abs=1e-9
        )
        assert layers[name]["dead_columns"] == (1 if name in QKV else 0)
        if name in QKV:
            assert (W[:, ch] == 0).all()


def test_cli_accepts_reconstruct_for_every_method(tmp_path):
    from _tiny import save_tiny

    src = save_tiny(tmp_path / "m", layers=1)
    calib = tmp_path / "calib.txt"
    calib.write_text("the state of the union is strong and so is the text " * 60)
    for method in ("wanda", "sparsegpt", "magnitude"):
        out = tmp_path / f"out-{method}"
        rc = cli_main(
            [
                "prune",
                str(src),
                "--out",
                str(out),
                "--method",
                method,
                "--reconstruct",
                "--calib",
                str(calib),
                "--nsamples",
                "2",
                "--seqlen",
                "32",
                "--quiet",
            ]
        )
        assert rc == 0, method
        import json

        rep = json.loads((out / "besa_report.json").read_text())
        assert rep["settings"]["reconstruct"] is True and rep["settings"]["method"] == method
