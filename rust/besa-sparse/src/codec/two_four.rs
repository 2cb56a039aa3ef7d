//! compressed-tensors "sparse-24-bitmask": in every group of 4 columns exactly 2 values are
//! stored. Parts: `shape` (I64 [2, 1]), `compressed` ([rows, cols/2], zero fillers stored as
//! +0 where a group keeps fewer than 2), `bitmask` (as in the bitmask format, exactly two bits
//! per group of 4).

use std::ops::Range;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::bitmask::check_bitmask_part;
use super::kernels::{
    bitmask_decode, bitmask_keep_mask, bitmask_row_counts, check_dense_len, rows_per_task,
};
use super::{bitmask_row_bytes, write_shape, Admission, Codec, EncodeOptions, Layout, Matrix};
use super::{PartInfo, PartSpec, Stored};
use crate::dispatch_itemsize as dispatch;
use crate::dtype::{float_itemsize, magnitude as key};
use crate::error::{Error, Result};
use crate::{bail, ensure};

pub struct TwoFour;

impl Codec for TwoFour {
    fn name(&self) -> &'static str {
        "2:4"
    }
    fn config_name(&self) -> &'static str {
        "sparse-24-bitmask"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["24", "2_4", "2of4", "sparse-24"]
    }
    fn config_method(&self) -> (&'static str, &'static str) {
        ("compressed-tensors", "2:4")
    }
    fn parts(&self) -> &'static [&'static str] {
        &["shape", "compressed", "bitmask"]
    }
    fn anchor(&self) -> &'static str {
        "bitmask"
    }
    fn values_part(&self) -> usize {
        1
    }
    fn has_force(&self) -> bool {
        true
    }

    fn check_layout(
        &self,
        rows: usize,
        cols: usize,
        parts: &[PartInfo<'_>],
        _quant: Option<super::QuantParams>,
    ) -> Result<Layout> {
        let [_, vals, idx] = parts else {
            bail!(format, "2:4 module needs 3 parts, found {}", parts.len());
        };
        check_bitmask_part(rows, cols, idx)?;
        ensure!(
            cols % 4 == 0,
            format,
            "2:4 shape [{rows}, {cols}]: columns not divisible by 4"
        );
        ensure!(
            vals.shape == [rows, cols / 2] || vals.shape == [rows * cols / 2],
            format,
            "compressed is {:?}, 2:4 of [{rows}, {cols}] needs [{rows}, {}]",
            vals.shape,
            cols / 2
        );
        Ok(Layout {
            dtype: vals.dtype,
            nnz: rows * cols / 2,
        })
    }

    fn admit(&self, m: Matrix<'_>, _counts: &[u64], opts: EncodeOptions) -> Result<Admission> {
        let (rows, cols) = (m.rows, m.cols);
        if cols % 4 != 0 {
            return Ok(Admission::Skip(format!(
                "{cols} columns not divisible by 4"
            )));
        }
        let (first, dropped) = check_24(m.dtype, m.data, rows, cols)?;
        if let Some(bad) = first {
            ensure!(
                opts.force,
                shape,
                "is not 2:4 sparse: row {}, columns {}..{} keep {} of 4 (pass --force-24 to re-prune by magnitude)",
                bad.row,
                bad.col,
                bad.col + 3,
                bad.kept
            );
        }
        Ok(Admission::Pack {
            stored_nnz: (rows * cols / 2) as u64,
            dropped,
        })
    }

    fn plan(
        &self,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        _nnz: usize,
        _quant: Option<super::QuantParams>,
    ) -> Vec<PartSpec> {
        vec![
            PartSpec {
                suffix: "shape",
                dtype: Dtype::I64,
                shape: vec![2, 1],
            },
            PartSpec {
                suffix: "compressed",
                dtype,
                shape: vec![rows, cols / 2],
            },
            PartSpec {
                suffix: "bitmask",
                dtype: Dtype::U8,
                shape: vec![rows, bitmask_row_bytes(cols)],
            },
        ]
    }

    fn encode(&self, m: Matrix<'_>, _counts: &[u64], out: &mut [&mut [u8]]) -> Result<()> {
        let [shape, vals, mask] = out else {
            bail!(shape, "2:4 encode needs 3 output parts");
        };
        write_shape(shape, m.rows, m.cols);
        encode_24(m.dtype, m.data, m.rows, m.cols, mask, vals)
    }

    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>> {
        check_24_bitmask(s.parts[2], s.rows, s.cols)?;
        Ok(vec![(s.cols / 2) as u64; s.rows])
    }

    fn decode(
        &self,
        s: &Stored<'_>,
        counts: &[u64],
        rows: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        bitmask_decode(
            s.itemsize, s.parts[2], s.parts[1], s.cols, counts, rows, out,
        )
    }

    fn keep_mask(&self, s: &Stored<'_>, counts: &[u64], out: &mut [u8]) -> Result<()> {
        bitmask_keep_mask(s.itemsize, s.parts[2], s.parts[1], s.cols, counts, out)
    }
}

/// A group of 4 that keeps more than 2 weights: (row, first column of the group, kept count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Not24 {
    pub row: usize,
    pub col: usize,
    pub kept: usize,
}

/// Checks the 2:4 pattern: returns the first group (in row-major order) keeping more than 2,
/// and the number of non-zero weights that re-pruning by magnitude would drop.
pub fn check_24(
    dtype: Dtype,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Result<(Option<Not24>, u64)> {
    let n = float_itemsize(dtype)?;
    check_dense_len(data, rows, cols, n)?;
    ensure!(
        cols % 4 == 0,
        shape,
        "2:4 needs a column count divisible by 4, got {cols}"
    );
    if rows == 0 || cols == 0 {
        return Ok((None, 0));
    }
    Ok(dispatch!(n, check_24_n::<N>(data, cols)))
}

fn check_24_n<const N: usize>(data: &[u8], cols: usize) -> (Option<Not24>, u64) {
    let per_row: Vec<(Option<(usize, usize)>, u64)> = data
        .par_chunks(cols * N)
        .map(|row| {
            let mut first = None;
            let mut extra = 0u64;
            for (g, grp) in row.chunks_exact(4 * N).enumerate() {
                let kept = grp.chunks_exact(N).filter(|e| key::<N>(e) != 0).count();
                if kept > 2 {
                    extra += (kept - 2) as u64;
                    if first.is_none() {
                        first = Some((g * 4, kept));
                    }
                }
            }
            (first, extra)
        })
        .collect();
    let first = per_row
        .iter()
        .enumerate()
        .find_map(|(r, (f, _))| f.map(|(col, kept)| Not24 { row: r, col, kept }));
    (first, per_row.iter().map(|x| x.1).sum())
}

/// Encodes 2:4: in each group of 4 the two largest magnitudes are kept (ties: lower column
/// first), so a matrix that already is 2:4 keeps exactly its non-zeros plus zero fillers.
/// `bitmask` is `rows * ceil(cols/8)` bytes, `values` `rows * cols/2 * itemsize` bytes. Kept
/// zeros (fillers) are stored as +0.
pub fn encode_24(
    dtype: Dtype,
    data: &[u8],
    rows: usize,
    cols: usize,
    bitmask: &mut [u8],
    values: &mut [u8],
) -> Result<()> {
    let n = float_itemsize(dtype)?;
    check_dense_len(data, rows, cols, n)?;
    let wb = bitmask_row_bytes(cols);
    ensure!(
        cols % 4 == 0 && bitmask.len() == rows * wb && values.len() == rows * (cols / 2) * n,
        shape,
        "2:4 encode: output buffers do not match the shape"
    );
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(cols, n);
    data.par_chunks(rpt * cols * n)
        .zip(bitmask.par_chunks_mut(rpt * wb))
        .zip(values.par_chunks_mut(rpt * (cols / 2) * n))
        .for_each(|((d, m), v)| dispatch!(n, encode_24_rows::<N>(d, cols, m, v)));
    Ok(())
}

fn top2(k: [u64; 4]) -> u8 {
    // Best index: largest key, ties to the lower index.
    let mut a = 0;
    for i in 1..4 {
        if k[i] > k[a] {
            a = i;
        }
    }
    let mut b = if a == 0 { 1 } else { 0 };
    for i in 0..4 {
        if i != a && k[i] > k[b] {
            b = i;
        }
    }
    (1u8 << a) | (1u8 << b)
}

fn encode_24_rows<const N: usize>(data: &[u8], cols: usize, mask: &mut [u8], values: &mut [u8]) {
    let wb = bitmask_row_bytes(cols);
    let mut k = 0usize;
    for (row, mrow) in data.chunks_exact(cols * N).zip(mask.chunks_exact_mut(wb)) {
        mrow.fill(0);
        for (g, grp) in row.chunks_exact(4 * N).enumerate() {
            let keys = [
                key::<N>(&grp[0..]),
                key::<N>(&grp[N..]),
                key::<N>(&grp[2 * N..]),
                key::<N>(&grp[3 * N..]),
            ];
            let sel = top2(keys);
            let col = g * 4;
            mrow[col / 8] |= sel << (col % 8);
            for j in 0..4 {
                if sel & (1 << j) != 0 {
                    let dst = &mut values[k..k + N];
                    if keys[j] == 0 {
                        dst.fill(0);
                    } else {
                        dst.copy_from_slice(&grp[j * N..j * N + N]);
                    }
                    k += N;
                }
            }
        }
    }
}

/// Checks a 2:4 bitmask: padding clear and exactly two bits in every group of 4.
pub fn check_24_bitmask(bitmask: &[u8], rows: usize, cols: usize) -> Result<()> {
    ensure!(
        cols % 4 == 0,
        format,
        "2:4 shape [{rows}, {cols}] has a column count not divisible by 4"
    );
    bitmask_row_counts(bitmask, rows, cols)?;
    let wb = bitmask_row_bytes(cols);
    if wb == 0 {
        return Ok(());
    }
    let bad = bitmask.par_chunks(wb).position_first(|r| {
        (0..cols / 4).any(|g| ((r[g / 2] >> ((g % 2) * 4)) & 0xf).count_ones() != 2)
    });
    match bad {
        Some(r) => Err(Error::format(format!(
            "2:4 bitmask row {r} has a group of 4 that does not keep exactly 2"
        ))),
        None => Ok(()),
    }
}
