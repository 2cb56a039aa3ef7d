//! Reference mode: the BESA authors' ViTCoD cycle model, bit-for-bit (see docs/simulator.md).
//!
//! The original builds a graph with one edge per kept weight, relabels node ids with a
//! temporary id 200 (which collides with a real id for LLM shapes), materialises the reordered
//! mask `Mp` and counts its zeros. Here the relabel is computed once on the id space as a map
//! `F` (it is an element-wise substitution), and the zeros of `Mp[:, G:]` are counted from
//! column degrees, correcting only for the few labels `F` merges or sends out of range:
//!
//! `Ns = |{(F(x), F(y)) : keep[x][y], F(x) < R, G <= F(y) < C}|`.
//!
//! Cells whose row and column both have an injective label are counted from the degrees (minus
//! the rows whose label is out of range or merged); cells touching a merged label are
//! enumerated and deduplicated per merged class.

use serde::{Deserialize, Serialize};

use crate::mask::MaskView;

/// The temporary id of the original relabel loop.
pub const TMP_ID: u32 = 200;
const NONE: u32 = u32::MAX;

/// Floating-point semantics of the two comparisons of the threshold search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefFloat {
    /// What the authors' code computes: `out_degrees() > threshold` and `D / E` are torch ops on
    /// int64 tensors with Python floats, which torch promotes to float32 (default dtype).
    F32,
    /// The same comparisons in float64 (the spec read with Python floats).
    F64,
}

/// Parameters of the reference model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RefParams {
    pub pe_width: u64,
    pub pe_height: u64,
    /// First threshold ratio (the authors' `-t`, 0.5).
    pub start_ratio: f64,
    /// Ratio step (0.1), added or subtracted by repeated float accumulation.
    pub step: f64,
    /// Move up when `D/E >= hi` (0.6), down when `D/E <= lo` (0.4).
    pub hi: f64,
    pub lo: f64,
    /// Stop after this many moves (5; the last move is not evaluated, as in the original).
    pub max_moves: u32,
    pub float: RefFloat,
}

impl Default for RefParams {
    fn default() -> Self {
        Self {
            pe_width: 64,
            pe_height: 64,
            start_ratio: 0.5,
            step: 0.1,
            hi: 0.6,
            lo: 0.4,
            max_moves: 5,
            float: RefFloat::F32,
        }
    }
}

/// One run of `calc` + `simulate` at one threshold ratio.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Eval {
    pub ratio: f64,
    pub threshold: f64,
    /// Dense columns.
    pub g: u64,
    /// Kept weights in dense columns, and all kept weights (before relabelling).
    pub d: u64,
    pub e: u64,
    /// Zeros of `Mp[:, G:]`.
    pub ns: u64,
    pub dense_width: u64,
    pub sparse_width: u64,
    pub dense_cycles: u64,
    pub sparse_cycles: u64,
    pub cycles: u64,
    pub flops: u64,
}

/// Result of the threshold search on one matrix (or one down_proj column chunk).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkResult {
    /// Columns `[begin, end)` of the matrix.
    #[serde(serialize_with = "crate::model::as_list")]
    pub cols: [usize; 2],
    pub cycles: u64,
    pub dense_cycles: u64,
    pub flops: u64,
    /// The evaluation that gave the minimum (the first one on ties).
    pub best: Eval,
    /// Every evaluation, in search order.
    pub evals: Vec<Eval>,
}

/// The dense baseline of a matrix (or chunk) of width `c`: `ceil(c * c / (W * H))` — the
/// original simulates the dense weight with all columns dense, so `C x C`, not `R x C`.
pub fn dense_baseline(c: u64, p: &RefParams) -> u64 {
    let pe = p.pe_width * p.pe_height;
    (c * c).div_ceil(pe)
}

/// Column chunks of a matrix: `R`-wide chunks when `chunk` and `C > R` (down_proj), else one.
pub fn chunks(rows: usize, cols: usize, chunk: bool) -> Vec<[usize; 2]> {
    if chunk && cols > rows && rows > 0 {
        (0..cols)
            .step_by(rows)
            .map(|b| [b, (b + rows).min(cols)])
            .collect()
    } else {
        vec![[0, cols]]
    }
}

/// The reference cycles of a whole matrix (summing its chunks when `chunk`).
pub fn simulate_matrix(view: &MaskView<'_>, chunk: bool, p: &RefParams) -> Vec<ChunkResult> {
    simulate_matrix_with_degrees(view, &view.column_degrees(), chunk, p)
}

/// [`simulate_matrix`] given the column degrees of the whole view.
pub fn simulate_matrix_with_degrees(
    view: &MaskView<'_>,
    deg: &[u32],
    chunk: bool,
    p: &RefParams,
) -> Vec<ChunkResult> {
    assert_eq!(deg.len(), view.cols(), "one degree per column");
    chunks(view.rows(), view.cols(), chunk)
        .into_iter()
        .map(|[b, e]| {
            let v = view.columns(b, e - b);
            let mut r = search(&v, &deg[b..e], p);
            r.cols = [b, e];
            r
        })
        .collect()
}

/// The threshold search of one matrix given its column degrees.
pub fn search(view: &MaskView<'_>, deg: &[u32], p: &RefParams) -> ChunkResult {
    let e: u64 = deg.iter().map(|&d| d as u64).sum();
    let mut ratio = p.start_ratio;
    let mut moves = 0;
    let mut evals: Vec<Eval> = Vec::new();
    let mut best: Option<usize> = None;
    loop {
        let ev = evaluate(view, deg, e, ratio, p);
        if best.is_none_or(|b| ev.cycles < evals[b].cycles) {
            best = Some(evals.len());
        }
        let (d, g) = (ev.d, ev.g);
        evals.push(ev);
        if e == 0 {
            // The original divides by zero here; with nothing kept every threshold is alike.
            break;
        }
        let (up, down) = match p.float {
            RefFloat::F64 => {
                let q = d as f64 / e as f64;
                (q >= p.hi, q <= p.lo)
            }
            // With no dense column D is the Python int 0 and D/E the float 0.0.
            RefFloat::F32 if g == 0 => (0.0 >= p.hi, 0.0 <= p.lo),
            RefFloat::F32 => {
                let q = d as f32 / e as f32;
                (q >= p.hi as f32, q <= p.lo as f32)
            }
        };
        if up {
            ratio += p.step;
        } else if down {
            ratio -= p.step;
        } else {
            break;
        }
        moves += 1;
        if moves >= p.max_moves {
            break;
        }
    }
    let best = evals[best.expect("at least one evaluation")].clone();
    ChunkResult {
        cols: [0, view.cols()],
        cycles: best.cycles,
        dense_cycles: dense_baseline(view.cols() as u64, p),
        flops: best.flops,
        best,
        evals,
    }
}

/// Dense columns at a threshold: ids with `deg > ratio * R` (strict), ascending.
pub fn dense_columns(deg: &[u32], rows: usize, ratio: f64, float: RefFloat) -> Vec<u32> {
    let thr = ratio * rows as f64;
    let dense = |d: u32| match float {
        RefFloat::F64 => d as f64 > thr,
        RefFloat::F32 => d as f32 > thr as f32,
    };
    (0..deg.len() as u32)
        .filter(|&j| dense(deg[j as usize]))
        .collect()
}

/// `calc` + `simulate` at one ratio.
pub fn evaluate(view: &MaskView<'_>, deg: &[u32], e: u64, ratio: f64, p: &RefParams) -> Eval {
    let rows = view.rows() as u64;
    let cols = view.cols() as u64;
    let h = dense_columns(deg, view.rows(), ratio, p.float);
    let g = h.len() as u64;
    let d: u64 = h.iter().map(|&j| deg[j as usize] as u64).sum();
    let ns = if e == 0 { 0 } else { count_ns(view, deg, &h) };
    let dense_work = g * rows;
    let (w, ht) = (p.pe_width, p.pe_height);
    // Python: G*R / (Ns + G*R) in float64, int(W * ratio); the original divides by zero when
    // nothing is kept: we take ratio 0 (all PEs sparse, 0 cycles).
    let denom = ns + dense_work;
    let dense_ratio = if denom == 0 {
        0.0
    } else {
        dense_work as f64 / denom as f64
    };
    let wd = (w as f64 * dense_ratio) as u64;
    let ws = w - wd;
    let dense_cycles = if wd > 0 {
        ((cols * g) as f64 / (wd * ht) as f64).ceil() as u64
    } else {
        0
    };
    let sparse_cycles = if ws > 0 {
        (ns as f64 / (ws * ht) as f64).ceil() as u64
    } else {
        ns
    };
    Eval {
        ratio,
        threshold: ratio * rows as f64,
        g,
        d,
        e,
        ns,
        dense_width: wd,
        sparse_width: ws,
        dense_cycles,
        sparse_cycles,
        cycles: dense_cycles.max(sparse_cycles),
        flops: dense_work + ns,
    }
}

/// The relabel as a map on node ids `0..m`.
pub struct Relabel {
    /// `f[x]`: the final label of id `x`.
    pub f: Vec<u32>,
    /// Ids that share their final label with another id.
    pub merged: Vec<bool>,
    /// The merged classes: (final label, member ids).
    pub classes: Vec<(u32, Vec<u32>)>,
}

/// Applies, for `i = 0..G`: `i -> 200`, `h[i] -> i`, `200 -> h[i]` (value substitutions) to
/// every id of `0..m` (`m > 200`, `m > max(h)`), tracking the ids that end on one label.
pub fn relabel(h: &[u32], m: usize) -> Relabel {
    assert!(
        m > TMP_ID as usize,
        "id space must contain the temporary id"
    );
    // at[v]: the class (named by its founding id) currently labelled v; extra[c]: the ids merged
    // into class c besides c itself.
    let mut at: Vec<u32> = (0..m as u32).collect();
    let mut extra: Vec<Vec<u32>> = vec![Vec::new(); m];
    let mut sub = |a: u32, b: u32| {
        if a == b {
            return;
        }
        let ca = at[a as usize];
        if ca == NONE {
            return;
        }
        at[a as usize] = NONE;
        let cb = at[b as usize];
        if cb == NONE {
            at[b as usize] = ca;
        } else {
            let moved = std::mem::take(&mut extra[ca as usize]);
            let target = &mut extra[cb as usize];
            target.push(ca);
            target.extend(moved);
        }
    };
    for (i, &hi) in h.iter().enumerate() {
        let i = i as u32;
        sub(i, TMP_ID);
        sub(hi, i);
        sub(TMP_ID, hi);
    }
    let mut f = vec![0u32; m];
    let mut merged = vec![false; m];
    let mut classes = Vec::new();
    for (v, &c) in at.iter().enumerate() {
        if c == NONE {
            continue;
        }
        f[c as usize] = v as u32;
        let ex = &extra[c as usize];
        if !ex.is_empty() {
            merged[c as usize] = true;
            let mut members = vec![c];
            for &x in ex {
                f[x as usize] = v as u32;
                merged[x as usize] = true;
                members.push(x);
            }
            classes.push((v as u32, members));
        }
    }
    Relabel { f, merged, classes }
}

/// Number of zeros of `Mp[:, G:]`, exactly as the original materialises it.
pub fn count_ns(view: &MaskView<'_>, deg: &[u32], h: &[u32]) -> u64 {
    let (r, c) = (view.rows(), view.cols());
    let g = h.len() as u32;
    let m = r.max(c).max(TMP_ID as usize + 1);
    let Relabel { f, merged, classes } = relabel(h, m);
    let valid_col = |y: usize| f[y] >= g && (f[y] as usize) < c;
    let valid_row = |x: usize| (f[x] as usize) < r;
    // Columns with an injective, in-range label.
    let plain_col: Vec<bool> = (0..c).map(|y| valid_col(y) && !merged[y]).collect();
    let mut ns: u64 = (0..c)
        .filter(|&y| plain_col[y])
        .map(|y| deg[y] as u64)
        .sum();
    // Remove the cells of rows whose label is out of range or merged.
    for x in (0..r).filter(|&x| !valid_row(x) || merged[x]) {
        let mut k = 0u64;
        view.for_each_kept_in_row(x, |y| k += plain_col[y] as u64);
        ns -= k;
    }
    // Cells touching a merged label: distinct pairs, grouped by the merged row label, then by the
    // merged column label (rows with injective labels only, so no pair is counted twice).
    let mut stamp = vec![0u32; m];
    let mut cur = 0u32;
    for (v, members) in &classes {
        let v = *v as usize;
        if v < r && members.iter().any(|&x| (x as usize) < r) {
            cur += 1;
            for &x in members.iter().filter(|&&x| (x as usize) < r) {
                view.for_each_kept_in_row(x as usize, |y| {
                    if valid_col(y) {
                        let l = f[y] as usize;
                        if stamp[l] != cur {
                            stamp[l] = cur;
                            ns += 1;
                        }
                    }
                });
            }
        }
        if v >= g as usize && v < c && members.iter().any(|&y| (y as usize) < c) {
            cur += 1;
            for &y in members.iter().filter(|&&y| (y as usize) < c) {
                for x in 0..r {
                    if !merged[x] && valid_row(x) && view.is_kept(x, y as usize) {
                        let l = f[x] as usize;
                        if stamp[l] != cur {
                            stamp[l] = cur;
                            ns += 1;
                        }
                    }
                }
            }
        }
    }
    ns
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::Dtype;

    /// Literal: substitute on an explicit edge list, build Mp, count.
    fn literal_ns(keep: &[Vec<bool>], h: &[u32]) -> u64 {
        let r = keep.len();
        let c = keep[0].len();
        let mut a = vec![]; // column labels
        let mut b = vec![]; // row labels
        for (i, row) in keep.iter().enumerate() {
            for (j, &k) in row.iter().enumerate() {
                if k {
                    a.push(j as u32);
                    b.push(i as u32);
                }
            }
        }
        for (i, &hi) in h.iter().enumerate() {
            let i = i as u32;
            for lab in [&mut a, &mut b] {
                lab.iter_mut()
                    .filter(|x| **x == i)
                    .for_each(|x| *x = TMP_ID);
                lab.iter_mut().filter(|x| **x == hi).for_each(|x| *x = i);
                lab.iter_mut()
                    .filter(|x| **x == TMP_ID)
                    .for_each(|x| *x = hi);
            }
        }
        let mut mp = vec![vec![true; c]; r];
        for (&y, &x) in a.iter().zip(&b) {
            if (x as usize) < r && (y as usize) < c {
                mp[x as usize][y as usize] = false;
            }
        }
        mp.iter()
            .map(|row| row[h.len()..].iter().filter(|&&v| !v).count() as u64)
            .sum()
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn ns_matches_literal_on_random_masks() {
        let mut seed = 7u64;
        for t in 0..24 {
            let r = 1 + (lcg(&mut seed) % 260) as usize;
            let c = 1 + (lcg(&mut seed) % 260) as usize;
            let density = lcg(&mut seed) % 100;
            let keep: Vec<Vec<bool>> = (0..r)
                .map(|_| (0..c).map(|_| lcg(&mut seed) % 100 < density).collect())
                .collect();
            let bytes: Vec<u8> = keep.iter().flatten().map(|&k| k as u8).collect();
            let view = MaskView::new(&bytes[..], Dtype::BOOL, r, c).unwrap();
            let deg = view.column_degrees();
            for ratio in [0.1, 0.3, 0.5, 0.7] {
                let h = dense_columns(&deg, r, ratio, RefFloat::F64);
                assert_eq!(
                    count_ns(&view, &deg, &h),
                    literal_ns(&keep, &h),
                    "case {t}: {r}x{c} density {density} ratio {ratio}"
                );
            }
        }
    }

    #[test]
    fn relabel_merges_id_200() {
        // h = [5, 300]: step 0 sends 0 and 200 both to 5.
        let rl = relabel(&[5, 300], 400);
        assert_eq!(rl.f[0], 5);
        assert_eq!(rl.f[200], 5);
        assert_eq!(rl.f[5], 0);
        assert_eq!(rl.f[300], 1);
        assert_eq!(rl.f[1], 300);
        assert_eq!(rl.classes.len(), 1);
    }

    #[test]
    fn dense_baselines() {
        let p = RefParams::default();
        assert_eq!(dense_baseline(4096, &p), 4096);
        let down: u64 = chunks(4096, 11008, true)
            .iter()
            .map(|[b, e]| dense_baseline((e - b) as u64, &p))
            .sum();
        assert_eq!(down, 10128);
    }
}
