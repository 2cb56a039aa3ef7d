"""The reference cycle model, written literally from the authors' hw_sim script
(docs/simulator.md, "Reference mode"), as the oracle for the Rust engine; plus a vectorised numpy port used as the
benchmark baseline (benches/simulate.py imports both from here).

Literal means: an explicit edge list in row-major order, the relabel applied as value
substitutions to the edge labels (temporary id 200 included), ``Mp`` materialised with
out-of-range labels skipped, ``Ns`` counted from ``Mp[:, G:]`` with scipy's COO matrix, the
original's float arithmetic. ``f32=True`` reproduces torch's type promotion in the authors'
code: ``out_degrees() > threshold`` and ``D / E`` are int64 tensors combined with Python
floats, which torch evaluates in float32 (checked against torch in ``test_torch_promotion``).
Behaviour where the original divides by zero (nothing kept): 0 cycles, 0 FLOPs, one
evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.sparse import coo_matrix

import besa_rs

TMP = 200


# ---------------------------------------------------------------- literal oracle
def oracle_calc(keep: np.ndarray, threshold: float, f32: bool) -> tuple[int, int, np.ndarray, int]:
    """``calc``: (D, E, Mp, G)."""
    rows, cols = keep.shape
    # One edge per kept weight, row-major (the original's double loop), column -> row.
    v_arr, u_arr = np.nonzero(keep)
    u: list[int] = u_arr.tolist()  # edge sources: column ids
    v: list[int] = v_arr.tolist()  # edge targets: row ids
    n_node = max(max(u), max(v)) + 1 if u else 0
    out_deg = [0] * n_node
    for j in u:
        out_deg[j] += 1
    if f32:
        dense = [k for k in range(n_node) if np.float32(out_deg[k]) > np.float32(threshold)]
    else:
        dense = [k for k in range(n_node) if out_deg[k] > threshold]
    a = np.array(u, dtype=np.int64)
    b = np.array(v, dtype=np.int64)
    total_dense = 0
    for k in dense:
        total_dense += int(np.sum(a == k))
    for i in range(len(dense)):
        a[a == i] = TMP
        b[b == i] = TMP
        a[a == dense[i]] = i
        b[b == dense[i]] = i
        a[a == TMP] = dense[i]
        b[b == TMP] = dense[i]
    mp = np.ones((rows, cols))
    inside = (b < rows) & (a < cols)  # the original's try/except IndexError skips the rest
    mp[b[inside], a[inside]] = 0
    return total_dense, len(u), mp, len(dense)


def oracle_simulate(
    mp: np.ndarray, g: int, pe_w: int = 64, pe_h: int = 64
) -> tuple[int, int, dict]:
    """``simulate`` + ``flops``: (cycles, flops, details)."""
    rows, cols = mp.shape
    sparser = coo_matrix(1 - mp[:, g:])
    pairs = np.column_stack((sparser.row, sparser.col))
    num_list = []
    acc = 0
    prev = 0
    for r, _c in pairs:
        if r == prev:
            acc += 1
        else:
            num_list.append(acc)
            acc = 1
        prev = r
    num_list.append(acc)
    ns = sum(num_list)
    if len(pairs) + g * rows == 0:
        dense_ratio = 0.0  # ZeroDivisionError in the original (nothing kept)
    else:
        dense_ratio = g * rows / (len(pairs) + g * rows)
    wd = int(pe_w * dense_ratio)
    ws = pe_w - wd
    dense_cycles = math.ceil((cols * 1 * g) / (wd * pe_h)) if wd > 0 else 0
    sparse_cycles = ns
    if ws > 0:
        sparse_cycles = math.ceil(sparse_cycles / (ws * pe_h))
    return max(dense_cycles, sparse_cycles), g * rows + ns, {"ns": ns, "wd": wd}


def oracle_search(
    keep: np.ndarray, start: float = 0.5, f32: bool = True, pe_w: int = 64, pe_h: int = 64
):
    """``process_layer_loop``: (min cycles, its flops, trace of (ratio, G, D, E, Ns, cycles))."""
    ratio = start
    tries = 0
    best, best_flops = float("inf"), float("inf")
    trace = []
    while True:
        d, e, mp, g = oracle_calc(keep, ratio * keep.shape[0], f32)
        cyc, flops, det = oracle_simulate(mp, g, pe_w, pe_h)
        trace.append((ratio, g, d, e, det["ns"], cyc))
        if cyc < best:
            best, best_flops = cyc, flops
        if e == 0:
            break
        if f32 and g > 0:
            q = np.float32(d) / np.float32(e)
            up, down = q >= np.float32(0.6), q <= np.float32(0.4)
        else:
            q = d / e
            up, down = q >= 0.6, q <= 0.4
        if up:
            ratio += 0.1
            tries += 1
        elif down:
            ratio -= 0.1
            tries += 1
        else:
            break
        if tries == 5:
            break
    return best, best_flops, trace


def oracle_matrix(keep: np.ndarray, chunk: bool = False, **kw):
    """Whole matrix: down_proj-style column chunks of width R when ``chunk`` and C > R."""
    rows, cols = keep.shape
    if chunk and cols > rows:
        parts = [keep[:, b : min(cols, b + rows)] for b in range(0, cols, rows)]
    else:
        parts = [keep]
    res = [oracle_search(p, **kw) for p in parts]
    return sum(r[0] for r in res), sum(r[1] for r in res), [r[2] for r in res]


# ---------------------------------------------------------------- vectorised numpy port
def numpy_port(
    keep: np.ndarray, start: float = 0.5, pe_w: int = 64, pe_h: int = 64
) -> tuple[int, int]:
    """The same model vectorised with numpy (f32 comparisons): the relabel applied to a lookup
    table over the id space (equivalent: the substitutions are element-wise), ``Mp`` built by
    fancy indexing. The benchmark baseline."""
    rows, cols = keep.shape
    deg = keep.sum(axis=0)
    r_idx, c_idx = np.nonzero(keep)
    e = len(r_idx)
    ratio, tries = start, 0
    best, best_flops = None, None
    m = max(rows, cols, TMP + 1)
    while True:
        h = np.flatnonzero(deg.astype(np.float32) > np.float32(ratio * rows))
        g = len(h)
        d = int(deg[h].sum())
        lab = np.arange(m)
        for i in range(g):
            lab[lab == i] = TMP
            lab[lab == h[i]] = i
            lab[lab == TMP] = h[i]
        a, b = lab[c_idx], lab[r_idx]
        ok = (a < cols) & (b < rows)
        mp = np.ones((rows, cols), dtype=bool)
        mp[b[ok], a[ok]] = False
        ns = int(np.count_nonzero(~mp[:, g:]))
        denom = ns + g * rows
        dense_ratio = g * rows / denom if denom else 0.0
        wd = int(pe_w * dense_ratio)
        ws = pe_w - wd
        dc = math.ceil(cols * g / (wd * pe_h)) if wd > 0 else 0
        sc = math.ceil(ns / (ws * pe_h)) if ws > 0 else ns
        cyc = max(dc, sc)
        if best is None or cyc < best:
            best, best_flops = cyc, g * rows + ns
        if e == 0:
            break
        q = np.float32(d) / np.float32(e) if g > 0 else 0.0
        if q >= np.float32(0.6):
            ratio += 0.1
        elif q <= np.float32(0.4):
            ratio -= 0.1
        else:
            break
        tries += 1
        if tries == 5:
            break
    return best, best_flops


# ---------------------------------------------------------------- tests
def rust(keep: np.ndarray, kind: str = "q", **kw) -> dict:
    return besa_rs.simulate_matrix(keep, kind=kind, **kw)


def assert_same(
    keep: np.ndarray, chunk: bool = False, start: float = 0.5, f32: bool = True, pe=(64, 64)
):
    cyc, flops, traces = oracle_matrix(
        keep, chunk=chunk, start=start, f32=f32, pe_w=pe[0], pe_h=pe[1]
    )
    r = rust(
        keep,
        kind="down" if chunk else "q",
        start_ratio=start,
        float_mode="f32" if f32 else "f64",
        pe_width=pe[0],
        pe_height=pe[1],
    )
    got = [
        [(ev["ratio"], ev["g"], ev["d"], ev["e"], ev["ns"], ev["cycles"]) for ev in ch["evals"]]
        for ch in r["chunks"]
    ]
    assert got == traces, f"shape {keep.shape}"
    assert (r["cycles"], r["flops"]) == (cyc, flops)


def random_mask(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    style = rng.integers(0, 4)
    if style == 0:  # i.i.d.
        return rng.random((rows, cols)) < rng.uniform(0.05, 0.95)
    if style == 1:  # column-clustered: per-column densities
        p = rng.beta(0.5, 0.5, size=cols)
        return rng.random((rows, cols)) < p[None, :]
    if style == 2:  # row-clustered
        p = rng.beta(0.5, 0.5, size=rows)
        return rng.random((rows, cols)) < p[:, None]
    # a few very dense columns on a sparse background (many moves of the search)
    m = rng.random((rows, cols)) < rng.uniform(0.0, 0.3)
    m[:, rng.choice(cols, size=max(1, cols // 5), replace=False)] = True
    return m


@pytest.mark.parametrize("seed", range(12))
def test_random_masks_match_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(4):
        rows = int(rng.integers(1, 330))
        cols = int(rng.integers(1, 330))
        assert_same(
            random_mask(rng, rows, cols), start=float(rng.choice([0.5, rng.uniform(0.05, 0.95)]))
        )


@pytest.mark.parametrize(
    "shape",
    [
        (200, 200),
        (201, 201),
        (199, 230),
        (230, 199),
        (256, 256),
        (300, 220),
        (3, 260),
        (260, 3),
        (1, 300),
        (300, 1),
        (1, 1),
        (2, 5),
        (205, 7),
        (7, 205),
    ],
)
def test_collision_and_edge_shapes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        assert_same(random_mask(rng, *shape))


def test_fully_dense_and_fully_pruned() -> None:
    for shape in [(250, 250), (64, 300), (300, 64), (1, 1)]:
        assert_same(np.ones(shape, dtype=bool))
        assert_same(np.zeros(shape, dtype=bool))
        r = rust(np.zeros(shape, dtype=bool))
        assert r["cycles"] == 0 and r["flops"] == 0 and len(r["chunks"][0]["evals"]) == 1


def test_down_chunks_match_oracle() -> None:
    rng = np.random.default_rng(5)
    for shape in [(60, 170), (210, 500), (100, 100), (100, 99)]:
        assert_same(random_mask(rng, *shape), chunk=True)


def test_f64_mode_matches_oracle() -> None:
    rng = np.random.default_rng(11)
    for _ in range(6):
        assert_same(
            random_mask(rng, int(rng.integers(1, 260)), int(rng.integers(1, 260))), f32=False
        )


def test_pe_array_parameters() -> None:
    rng = np.random.default_rng(3)
    for pe in [(16, 16), (32, 8), (1, 1), (128, 64)]:
        assert_same(random_mask(rng, 120, 240), pe=pe)


def test_float32_threshold_quirk() -> None:
    """0.7999999999999999 * 5 = 3.9999999999999996: a column with 4 kept of 5 rows is dense in
    float64 but not in torch's float32 comparison."""
    torch = pytest.importorskip("torch")
    thr = (0.5 + 0.1 + 0.1 + 0.1) * 5
    assert thr == 3.9999999999999996
    assert not bool((torch.tensor([4]) > thr)[0])
    keep = np.zeros((5, 6), dtype=bool)
    keep[:4, 0] = True
    keep[:1, 1:] = True
    f32 = rust(keep, start_ratio=0.5 + 0.1 + 0.1 + 0.1)
    f64 = rust(keep, start_ratio=0.5 + 0.1 + 0.1 + 0.1, float_mode="f64")
    assert f32["chunks"][0]["evals"][0]["g"] == 0
    assert f64["chunks"][0]["evals"][0]["g"] == 1
    assert_same(keep, start=0.5 + 0.1 + 0.1 + 0.1)
    assert_same(keep, start=0.5 + 0.1 + 0.1 + 0.1, f32=False)


def test_torch_promotion() -> None:
    """The oracle's float32 rule is what torch does with the authors' expressions."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = int(rng.integers(1, 50)) * 5
        ratio = 0.5 + 0.1 * int(rng.integers(-4, 5))
        ratio = float(
            np.float64(0.5)
            + sum([0.1 if ratio > 0.5 else -0.1] * int(round(abs(ratio - 0.5) / 0.1)))
        )
        deg = torch.tensor(rng.integers(0, rows + 1, size=64), dtype=torch.int64)
        thr = ratio * rows
        want = deg > thr
        got = torch.tensor([np.float32(int(x)) > np.float32(thr) for x in deg])
        assert torch.equal(want, got)
        d = torch.tensor(int(rng.integers(1, 1 << 26)), dtype=torch.int64)
        e = int(d) + int(rng.integers(0, 1 << 26))
        assert bool(d / e >= 0.6) == bool(np.float32(int(d)) / np.float32(e) >= np.float32(0.6))


def test_search_reaches_five_moves() -> None:
    # Dense columns everywhere: D/E stays >= 0.6, the ratio climbs 5 times, 5 evaluations.
    keep = np.ones((40, 40), dtype=bool)
    keep[:, ::7] = False
    r = rust(keep)
    ratios = [ev["ratio"] for ev in r["chunks"][0]["evals"]]
    assert ratios == [0.5, 0.6, 0.7, 0.7999999999999999, 0.8999999999999999]
    assert_same(keep)


def test_numpy_port_matches_oracle() -> None:
    rng = np.random.default_rng(21)
    for _ in range(6):
        keep = random_mask(rng, int(rng.integers(1, 260)), int(rng.integers(1, 260)))
        cyc, flops, _ = oracle_search(keep)
        assert numpy_port(keep) == (cyc, flops)


def test_worked_figure_4096() -> None:
    """spec: a 4096 x 4096 i.i.d. 50% mask gives about 3,000-3,100 cycles (~1.3x)."""
    keep = np.random.default_rng(0).random((4096, 4096)) < 0.5
    r = rust(keep)
    assert 3000 <= r["cycles"] <= 3100
    assert r["dense_cycles"] == 4096
    assert (r["cycles"], r["flops"]) == numpy_port(keep)


@pytest.mark.parametrize(
    "rows,cols,dense",
    [
        (230, 260, [0, 200]),  # step 0 merges ids 0 and 200
        (230, 260, [200]),  # h[0] = 200
        (210, 260, list(range(0, 250))),  # h[i] = i, 200 among them, G > 200
        (210, 260, list(range(3, 250, 1))),  # G > 200, shifted
        (150, 260, [5, 100, 200, 201, 259]),  # R < 200 < C: row labels out of range
        (260, 150, [0, 1, 149]),  # C < 200 < R: id 200 is only a row
        (260, 210, list(range(0, 210, 2))),
    ],
)
def test_chosen_dense_columns(rows: int, cols: int, dense: list[int]) -> None:
    """Dense columns placed on the ids that trigger the relabel quirk."""
    rng = np.random.default_rng(rows * cols)
    keep = rng.random((rows, cols)) < 0.1
    keep[:, dense] = rng.random((rows, len(dense))) < 0.95
    assert_same(keep)
    if len(dense) < 10:
        assert_same(keep, f32=False)
