import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import single_thread, tiny_model, tiny_tokens  # noqa: E402, F401

from besa_rs.errors import ConfigError, ShapeError  # noqa: E402
from besa_rs.pruning.adapters import get_adapter  # noqa: E402
from besa_rs.pruning.baselines import (  # noqa: E402
    magnitude_mask,
    nm_mask,
    refine_masked_lstsq,
    sparsegpt_prune,
    wanda_mask,
)
from besa_rs.pruning.config import PruneConfig, parse_structure  # noqa: E402
from besa_rs.pruning.sequential import run_pruning  # noqa: E402


def _layer_problem(rows=24, cols=64, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven feature scales, like real activations
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    X *= torch.linspace(0.1, 3.0, cols)
    W = torch.randn(rows, cols, generator=g)
    H = 2 * X.t() @ X / tokens
    return X, W, H


def _err(X, W, Wp):
    return ((X @ (W - Wp).t()) ** 2).sum().item()


def test_wanda_prunes_exactly_per_row_and_uses_norms():
    X, W, _ = _layer_problem()
    keep = wanda_mask(W, (X * X).sum(0), 0.5)
    assert (keep.sum(1) == 32).all()
    # with uniform weights, the lowest-norm input features go first
    keep_u = wanda_mask(torch.ones(3, 64), torch.arange(64.0), 0.25)
    assert not keep_u[:, :16].any() and keep_u[:, 16:].all()


def test_magnitude_row_layer_and_nm():
    _, W, _ = _layer_problem()
    W = W * torch.linspace(0.1, 3.0, W.shape[0]).unsqueeze(1)  # rows of very different scale
    keep = magnitude_mask(W, 0.3)  # default: every row loses its own lowest 30%
    assert ((~keep).sum(1) == int(0.3 * W.shape[1])).all()
    for r in range(W.shape[0]):
        assert W[r].abs()[~keep[r]].max() <= W[r].abs()[keep[r]].min()
    keep = magnitude_mask(W, 0.3, group="layer")
    assert (~keep).sum().item() == int(0.3 * W.numel())
    assert W.abs()[~keep].max() <= W.abs()[keep].min()
    assert (~keep[0]).sum() > (~keep[-1]).sum()  # the small-scale row loses more
    with pytest.raises(ConfigError, match="comparison group 'column'"):
        magnitude_mask(W, 0.3, group="column")
    keep = wanda_mask(W, torch.ones(W.shape[1]), 0.3, group="layer")
    assert (~keep).sum().item() == int(0.3 * W.numel())
    for n, m in [(2, 4), (4, 8)]:
        k = magnitude_mask(W, 0.5, n, m)
        groups = (~k).reshape(W.shape[0], -1, m).sum(-1)
        assert (groups == n).all()


def test_nm_mask_keeps_largest_in_each_group():
    score = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, True, False, True, False, False, True]]


def test_sparsegpt_beats_wanda_and_magnitude_on_layer_error():
    X, W, H = _layer_problem()
    Ws, keep = sparsegpt_prune(W, H, 0.5)
    assert (~keep).sum().item() == W.numel() // 2
    assert (Ws[~keep] == 0).all()
    e_sgpt = _err(X, W, Ws)
    e_wanda = _err(X, W, W * wanda_mask(W, (X * X).sum(0), 0.5))
    e_mag = _err(X, W, W * magnitude_mask(W, 0.5))
    assert e_sgpt < e_wanda < e_mag


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_sparsegpt_nm(nm):
    X, W, H = _layer_problem()
    n, m = nm
    Ws, keep = sparsegpt_prune(W, H, n=n, m=m)
    assert ((~keep).reshape(W.shape[0], -1, m).sum(-1) == n).all()
    assert _err(X, W, Ws) < _err(X, W, W * wanda_mask(W, (X * X).sum(0), 0.5, n, m))


def test_reconstruction_with_a_given_mask_lowers_error():
    """The OBS update for an imposed (non-uniform) mask keeps the mask and reduces the error
    versus just zeroing the weights; it matches the exact least-squares optimum closely."""
    X, W, H = _layer_problem()
    g = torch.Generator().manual_seed(3)
    rates = torch.rand(W.shape[0], generator=g) * 0.6 + 0.2  # non-uniform per-row sparsity
    score = torch.rand(W.shape, generator=g)
    keep = torch.ones_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        keep[r, torch.argsort(score[r])[: int(rates[r] * 64)]] = False
    Wr, keep2 = sparsegpt_prune(W, H, mask=keep)
    assert torch.equal(keep, keep2) and (Wr[~keep] == 0).all()
    e_rec, e_zero = _err(X, W, Wr), _err(X, W, W * keep)
    # exact least squares per row on the kept columns
    Wls = torch.zeros_like(W)
    for r in range(W.shape[0]):
        idx = keep[r].nonzero().flatten()
        sol = torch.linalg.lstsq(X[:, idx].double(), (X @ W[r]).double().unsqueeze(1)).solution
        Wls[r, idx] = sol.flatten().float()
    e_ls = _err(X, W, Wls)
    assert e_ls <= e_rec < e_zero
    # conjugate-gradient refinement continues to (nearly) the exact optimum
    Wf = refine_masked_lstsq(W, Wr, keep, H, iters=20)
    assert (Wf[~keep] == 0).all()
    e_ref = _err(X, W, Wf)
    assert e_ls <= e_ref < e_rec
    assert e_ref <= 1.15 * e_ls


def test_parse_structure_errors():
    assert parse_structure("2:4") == (2, 4)
    for bad in ["3:2", "x:y", "dense", "4:4"]:
        with pytest.raises(ConfigError):
            parse_structure(bad)


ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "falcon", "phi", "phi3", "gemma"]


def _rel_err(model, toks, ref):
    with torch.no_grad():
        out = model(toks).logits
    return ((out - ref) ** 2).mean().item() / (ref**2).mean().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_baselines_on_tiny_models(arch):
    toks = tiny_tokens(n=4, seqlen=32)
    errs = {}
    for method in ["magnitude", "wanda", "sparsegpt"]:
        for structure in ["unstructured", "2:4"]:
            model = tiny_model(arch)
            with torch.no_grad():
                ref = model(toks).logits
            rep = run_pruning(
                model, toks, PruneConfig(method=method, structure=structure, progress=False)
            )
            assert abs(rep["totals"]["realised_sparsity"] - 0.5) < 1e-6
            ad = get_adapter(model)
            for i in range(len(ad)):
                for name, lin in ad.linears(i).items():
                    W = lin.weight
                    if structure == "2:4":
                        assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all(), name
                    else:
                        assert abs((W == 0).float().mean().item() - 0.5) < 0.01, name
            errs[(method, structure)] = _rel_err(model, toks, ref)
    assert errs[("sparsegpt", "unstructured")] < errs[("magnitude", "unstructured")]
    assert errs[("sparsegpt", "unstructured")] < errs[("wanda", "unstructured")]
    assert errs[("sparsegpt", "2:4")] < errs[("magnitude", "2:4")]


def test_nm_needs_divisible_columns():
    model = tiny_model("llama", intermediate=100)  # down_proj: 100 columns, not divisible by 8
    with pytest.raises(ShapeError, match="not divisible by M=8"):
        run_pruning(
            model, tiny_tokens(n=2), PruneConfig(method="wanda", structure="4:8", progress=False)
        )


def test_baseline_is_deterministic():
    toks = tiny_tokens()
    ws = []
    for _ in range(2):
        model = tiny_model("llama")
        run_pruning(model, toks, PruneConfig(method="sparsegpt", progress=False))
        ws.append(model.model.layers[1].mlp.down_proj.weight.clone())
    assert torch.equal(ws[0], ws[1])


def test_magnitude_driver_reads_weights_only():
    """Magnitude pruning through the sequential driver equals per-row magnitude on each weight,
    and never runs a block on calibration data."""
    import besa_rs

    model = tiny_model("llama")
    adapter = get_adapter(model)
    expected = {
        (i, name): magnitude_mask(lin.weight, 0.5)
        for i in range(len(adapter))
        for name, lin in adapter.linears(i).items()
    }
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for b in adapter.blocks]
    rep = besa_rs.prune(model, tiny_tokens(), method="magnitude", progress=False)
    for h in hooks:
        h.remove()
    assert calls == []
    assert rep["totals"]["realised_sparsity"] == pytest.approx(0.5)
    for (i, name), keep in expected.items():
        W = adapter.linears(i)[name].weight
        assert torch.equal(W != 0, keep)


def test_driver_dispatches_through_the_registry():
    """The sequential driver imports no pruning method; every built-in method (and BESA's
    clipping-only variant) is found in the registry, and a registered method is used."""
    import ast

    import besa_rs.pruning.sequential as seq
    from besa_rs.pruning import registry

    tree = ast.parse(Path(seq.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not imported & {"besa", "baselines", "uniform", "quant", ".besa", ".quant"}
    assert set(registry.method_names()) >= {"besa", "wanda", "sparsegpt", "magnitude"}
    clip = registry.method_for(PruneConfig(wbits=4, sparsity=0.0))
    assert clip.prune_block.__name__ == "prune_block_clip_only"
    assert registry.method_for(PruneConfig()).prune_block.__name__ == "prune_block_besa"

    seen = []
    base = registry.method_for(PruneConfig(method="magnitude"))

    def spy(ctx):
        seen.append(ctx.index)
        return base.prune_block(ctx)

    registry.register(registry.Method("spy-magnitude", spy, reads_inputs=lambda cfg: False))
    try:
        model = tiny_model("llama")
        rep = run_pruning(
            model, tiny_tokens(n=2), PruneConfig(method="spy-magnitude", progress=False)
        )
    finally:
        registry._METHODS.pop("spy-magnitude")
    assert seen == list(range(rep["num_blocks"])) and rep["settings"]["method"] == "spy-magnitude"


# --- chunked mask selection: bit-identical to the whole-matrix int64 argsort it replaced --------
def _whole_sort_per_row(score, sparsity):
    """The former selection: one stable argsort of the whole score matrix."""
    k = int(sparsity * score.shape[1])
    mask = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
    return mask


def _whole_sort_nm(score, n, m):
    rows, cols = score.shape
    g = score.reshape(rows, cols // m, m)
    mask = torch.ones_like(g, dtype=torch.bool)
    mask.scatter_(2, torch.argsort(g, dim=2, stable=True)[:, :, :n], False)
    return mask.reshape(rows, cols)


def _whole_sort_global(score, sparsity):
    k = int(sparsity * score.numel())
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.argsort(score.flatten(), stable=True)[:k]] = False
    return mask.view_as(score)


def _tied_problem(dtype):
    g = torch.Generator().manual_seed(3)
    # few distinct values: most scores tie with others of their row; signed zeros included
    W = (torch.randint(-3, 4, (53, 40), generator=g).float() * 0.25).to(dtype)
    W[0, :7] = -0.0
    W[5] = 0.0
    norms = torch.randint(0, 3, (40,), generator=g).float()  # zero norms: more ties at 0
    return W, norms


@pytest.mark.parametrize("chunk", [1, 7 * 40 + 13, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_selection_is_the_whole_matrix_sort(monkeypatch, chunk, dtype):
    """Wanda and magnitude select per row a chunk of rows at a time (one row, an unaligned
    chunk, the whole matrix): the masks equal the whole-matrix stable argsort's bit for bit,
    ties included."""
    from besa_rs.pruning import baselines
    from besa_rs.pruning.baselines import wanda_score

    monkeypatch.setattr(baselines, "SELECT_CHUNK_ELEMS", chunk)
    W, norms = _tied_problem(dtype)
    score_w, score_m = wanda_score(W, norms), W.float().abs()
    assert (score_w[:, None, :] == score_w[:, :, None]).sum() > 3 * score_w.numel()  # ties
    for s in (0.0, 0.01, 0.3, 0.5, 0.99):
        assert torch.equal(wanda_mask(W, norms, s), _whole_sort_per_row(score_w, s)), s
        assert torch.equal(magnitude_mask(W, s), _whole_sort_per_row(score_m, s)), s
    for s in (0.0, 0.01, 0.3, 0.5, 0.99, 1.0):
        assert torch.equal(
            wanda_mask(W, norms, s, group="layer"), _whole_sort_global(score_w, s)
        ), s
        assert torch.equal(magnitude_mask(W, s, group="layer"), _whole_sort_global(score_m, s)), s
    for n, m in ((2, 4), (1, 4), (3, 8)):
        assert torch.equal(wanda_mask(W, norms, 0.5, n, m), _whole_sort_nm(score_w, n, m))
        assert torch.equal(magnitude_mask(W, 0.5, n, m), _whole_sort_nm(score_m, n, m))
        assert torch.equal(nm_mask(score_w, n, m), _whole_sort_nm(score_w, n, m))


@pytest.mark.parametrize("chunk", [1, 100, 1 << 22])
def test_layer_wide_selection_orders_like_a_stable_sort(monkeypatch, chunk):
    """The radix select of ``group="layer"`` against a stable argsort of the flattened matrix:
    signed zeros tie, NaN sorts last, infinities, subnormals, negative scores, many ties."""
    from besa_rs.pruning import baselines

    monkeypatch.setattr(baselines, "SELECT_CHUNK_ELEMS", chunk)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-4, 5, (31, 17), generator=g).float()
    specials = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45]
    flat = x.view(-1)
    pos = torch.randperm(flat.numel(), generator=g)[: 4 * len(specials)]
    flat[pos] = torch.tensor(specials * 4)
    x = torch.cat([x, torch.randn(9, 17, generator=g) * 1e30])  # spread over the exponents
    for s in (0.0, 1 / x.numel(), 0.1, 0.37, 0.5, 0.93, 1.0):
        got = baselines.prune_lowest_global(lambda a, b: x[a:b], x.shape, x.device, s)
        assert torch.equal(got, _whole_sort_global(x, s)), s
        assert torch.equal(baselines.keep_lowest_pruned_global(x, s), _whole_sort_global(x, s))
