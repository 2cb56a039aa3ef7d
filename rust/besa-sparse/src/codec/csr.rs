//! besa-rs CSR: `shape` (I64 [2]), `crow_indices` (I64 [rows + 1]), `col_indices` (I32 [nnz],
//! sorted and unique within a row), `values` ([nnz]), as scipy / torch CSR.

use std::ops::Range;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::kernels::{check_dense_len, rows_per_task, split_lengths};
use super::{write_shape, Admission, Codec, EncodeOptions, Layout, Matrix};
use super::{PartInfo, PartSpec, Stored};
use crate::dispatch_itemsize as dispatch;
use crate::dtype::{float_itemsize, magnitude as key, name as dtype_name};
use crate::error::Result;
use crate::{bail, ensure};

pub struct Csr;

impl Codec for Csr {
    fn name(&self) -> &'static str {
        "csr"
    }
    fn config_name(&self) -> &'static str {
        "besa-csr"
    }
    fn config_method(&self) -> (&'static str, &'static str) {
        ("besa-rs", "unstructured")
    }
    fn parts(&self) -> &'static [&'static str] {
        &["shape", "crow_indices", "col_indices", "values"]
    }
    fn anchor(&self) -> &'static str {
        "crow_indices"
    }
    fn values_part(&self) -> usize {
        3
    }

    fn check_layout(
        &self,
        rows: usize,
        cols: usize,
        parts: &[PartInfo<'_>],
        _quant: Option<super::QuantParams>,
    ) -> Result<Layout> {
        let [_, crow, ci, vals] = parts else {
            bail!(format, "CSR module needs 4 parts, found {}", parts.len());
        };
        ensure!(
            vals.shape.len() == 1,
            format,
            "values must be 1-D, found {:?}",
            vals.shape
        );
        let nnz = vals.shape[0];
        let numel = rows * cols;
        ensure!(
            nnz <= numel,
            format,
            "{nnz} values exceed shape [{rows}, {cols}]"
        );
        ensure!(
            crow.dtype == Dtype::I64 && crow.shape == [rows + 1],
            format,
            "crow_indices is {} {:?}, expected I64 [{}]",
            dtype_name(crow.dtype),
            crow.shape,
            rows + 1
        );
        // CSR stores nothing for empty rows, so a tiny file could claim a huge dense matrix:
        // refuse shapes the stored bytes do not justify (a 1 : 65536 ratio is far beyond any
        // real all-zero weight).
        let stored = (crow.nbytes + vals.nbytes) as u128;
        let dense = numel as u128 * crate::dtype::itemsize(vals.dtype) as u128;
        ensure!(
            dense <= (stored * 65536).max(1 << 20),
            format,
            "shape [{rows}, {cols}] ({dense} dense bytes) is not justified by {stored} stored bytes"
        );
        ensure!(
            ci.dtype == Dtype::I32 && ci.shape == [nnz],
            format,
            "col_indices is {} {:?}, expected I32 [{nnz}]",
            dtype_name(ci.dtype),
            ci.shape
        );
        Ok(Layout {
            dtype: vals.dtype,
            nnz,
        })
    }

    fn admit(&self, m: Matrix<'_>, counts: &[u64], _opts: EncodeOptions) -> Result<Admission> {
        ensure!(
            m.cols <= i32::MAX as usize,
            shape,
            "has {} columns: CSR stores 32-bit column indices",
            m.cols
        );
        Ok(Admission::Pack {
            stored_nnz: counts.iter().sum(),
            dropped: 0,
        })
    }

    fn plan(
        &self,
        dtype: Dtype,
        rows: usize,
        _cols: usize,
        nnz: usize,
        _quant: Option<super::QuantParams>,
    ) -> Vec<PartSpec> {
        vec![
            PartSpec {
                suffix: "shape",
                dtype: Dtype::I64,
                shape: vec![2],
            },
            PartSpec {
                suffix: "crow_indices",
                dtype: Dtype::I64,
                shape: vec![rows + 1],
            },
            PartSpec {
                suffix: "col_indices",
                dtype: Dtype::I32,
                shape: vec![nnz],
            },
            PartSpec {
                suffix: "values",
                dtype,
                shape: vec![nnz],
            },
        ]
    }

    fn encode(&self, m: Matrix<'_>, counts: &[u64], out: &mut [&mut [u8]]) -> Result<()> {
        let [shape, crow, col, vals] = out else {
            bail!(shape, "CSR encode needs 4 output parts");
        };
        write_shape(shape, m.rows, m.cols);
        csr_encode(m.dtype, m.data, m.rows, m.cols, counts, crow, col, vals)
    }

    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>> {
        csr_check(s.parts[1], s.parts[2], s.rows, s.cols, s.nnz)
    }

    fn decode(
        &self,
        s: &Stored<'_>,
        counts: &[u64],
        rows: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        let n = s.itemsize;
        let row_bytes = s.cols * n;
        ensure!(
            matches!(n, 1 | 2 | 4 | 8)
                && rows.end <= counts.len()
                && out.len() == rows.len() * row_bytes,
            format,
            "CSR decode: sizes disagree"
        );
        if rows.is_empty() || s.cols == 0 {
            return Ok(());
        }
        let start = counts[..rows.start].iter().sum::<u64>() as usize;
        let counts = &counts[rows];
        let rpt = rows_per_task(s.cols, n);
        let tasks = csr_tasks(s, start, counts, rpt);
        out.par_chunks_mut(rpt * row_bytes)
            .zip(tasks.into_par_iter())
            .for_each(|(o, (cnt, c, v))| {
                o.fill(0);
                let mut k = 0usize;
                for (orow, &m) in o.chunks_exact_mut(row_bytes).zip(cnt) {
                    for _ in 0..m {
                        let j = col_at(c, k);
                        orow[j * n..(j + 1) * n].copy_from_slice(&v[k * n..(k + 1) * n]);
                        k += 1;
                    }
                }
            });
        Ok(())
    }

    fn keep_mask(&self, s: &Stored<'_>, counts: &[u64], out: &mut [u8]) -> Result<()> {
        let n = s.itemsize;
        ensure!(
            out.len() == s.rows * s.cols,
            format,
            "CSR keep-mask: output size disagrees"
        );
        if s.cols == 0 || s.rows == 0 {
            return Ok(());
        }
        let rpt = rows_per_task(s.cols, n);
        let tasks = csr_tasks(s, 0, counts, rpt);
        out.par_chunks_mut(rpt * s.cols)
            .zip(tasks.into_par_iter())
            .for_each(|(o, (cnt, c, v))| {
                o.fill(0);
                let mut k = 0usize;
                for (orow, &m) in o.chunks_exact_mut(s.cols).zip(cnt) {
                    for _ in 0..m {
                        orow[col_at(c, k)] =
                            u8::from(!crate::dtype::is_zero(&v[k * n..(k + 1) * n]));
                        k += 1;
                    }
                }
            });
        Ok(())
    }
}

#[inline]
fn col_at(col: &[u8], k: usize) -> usize {
    i32::from_le_bytes(col[k * 4..k * 4 + 4].try_into().expect("4 bytes")) as usize
}

/// Per task of `rpt` rows: (row counts, its column indices, its values), starting at stored
/// value `start`.
fn csr_tasks<'a>(
    s: &Stored<'a>,
    start: usize,
    counts: &'a [u64],
    rpt: usize,
) -> Vec<(&'a [u64], &'a [u8], &'a [u8])> {
    let n = s.itemsize;
    let (mut c_rest, mut v_rest) = (&s.parts[2][start * 4..], &s.parts[3][start * n..]);
    let mut tasks = Vec::with_capacity(counts.len().div_ceil(rpt));
    for c in counts.chunks(rpt) {
        let k = c.iter().sum::<u64>() as usize;
        let (ca, cb) = c_rest.split_at(k * 4);
        let (va, vb) = v_rest.split_at(k * n);
        tasks.push((c, ca, va));
        c_rest = cb;
        v_rest = vb;
    }
    tasks
}

#[allow(clippy::too_many_arguments)]
/// Encodes CSR from per-row counts: `crow` (rows+1 I64 LE bytes), `col` (nnz I32 LE),
/// `values` (nnz * itemsize).
pub fn csr_encode(
    dtype: Dtype,
    data: &[u8],
    rows: usize,
    cols: usize,
    counts: &[u64],
    crow: &mut [u8],
    col: &mut [u8],
    values: &mut [u8],
) -> Result<()> {
    let n = float_itemsize(dtype)?;
    check_dense_len(data, rows, cols, n)?;
    ensure!(
        cols <= i32::MAX as usize,
        shape,
        "CSR stores 32-bit column indices; {cols} columns is too many"
    );
    let total: u64 = counts.iter().sum();
    ensure!(
        counts.len() == rows
            && crow.len() == (rows + 1) * 8
            && col.len() as u64 == total * 4
            && values.len() as u64 == total * n as u64,
        shape,
        "CSR encode: output buffers do not match the counts"
    );
    let mut acc = 0i64;
    crow[..8].copy_from_slice(&0i64.to_le_bytes());
    for (r, &c) in counts.iter().enumerate() {
        acc += c as i64;
        crow[(r + 1) * 8..(r + 2) * 8].copy_from_slice(&acc.to_le_bytes());
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(cols, n);
    let per_task: Vec<usize> = counts
        .chunks(rpt)
        .map(|c| c.iter().sum::<u64>() as usize)
        .collect();
    let cols_t = split_lengths(col, per_task.iter().map(|x| x * 4));
    let vals_t = split_lengths(values, per_task.iter().map(|x| x * n));
    data.par_chunks(rpt * cols * n)
        .zip(counts.par_chunks(rpt))
        .zip(cols_t.into_par_iter())
        .zip(vals_t.into_par_iter())
        .for_each(|(((d, k), c), v)| dispatch!(n, csr_rows::<N>(d, cols, k, c, v)));
    Ok(())
}

/// Row by row, as the bitmask encoder: while a later kept value exists in this task's slice,
/// every element is written at the cursor, which advances only for kept ones (no unpredictable
/// branch; a dropped element is overwritten by the next kept one). The task's last non-empty
/// rows take the branchy loop so nothing is written past the slice.
fn csr_rows<const N: usize>(
    data: &[u8],
    cols: usize,
    counts: &[u64],
    col: &mut [u8],
    values: &mut [u8],
) {
    let len = values.len() / N;
    let mut k = 0usize;
    for (row, &cnt) in data.chunks_exact(cols * N).zip(counts) {
        let row_end = k + cnt as usize;
        if row_end < len {
            for (j, e) in row.chunks_exact(N).enumerate() {
                col[k * 4..k * 4 + 4].copy_from_slice(&(j as i32).to_le_bytes());
                values[k * N..k * N + N].copy_from_slice(e);
                k += usize::from(key::<N>(e) != 0);
            }
        } else {
            for (j, e) in row.chunks_exact(N).enumerate() {
                if key::<N>(e) != 0 {
                    col[k * 4..k * 4 + 4].copy_from_slice(&(j as i32).to_le_bytes());
                    values[k * N..k * N + N].copy_from_slice(e);
                    k += 1;
                }
            }
        }
        debug_assert_eq!(k, row_end);
    }
}

/// Validates CSR index arrays the way scipy/torch do and returns per-row counts.
pub fn csr_check(
    crow: &[u8],
    col: &[u8],
    rows: usize,
    cols: usize,
    nnz: usize,
) -> Result<Vec<u64>> {
    ensure!(
        crow.len() == (rows + 1) * 8 && col.len() == nnz * 4,
        format,
        "CSR arrays have wrong lengths for {rows} rows and {nnz} values"
    );
    let crow: Vec<i64> = crow
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
        .collect();
    ensure!(
        crow[0] == 0 && crow[rows] == nnz as i64,
        format,
        "crow_indices must start at 0 and end at nnz={nnz}, got {} .. {}",
        crow[0],
        crow[rows]
    );
    if let Some(r) = (0..rows).find(|&r| crow[r + 1] < crow[r]) {
        bail!(format, "crow_indices decrease at row {r}");
    }
    let bad = (0..rows).into_par_iter().find_first(|&r| {
        let (a, b) = (crow[r] as usize, crow[r + 1] as usize);
        let mut prev: i64 = -1;
        for c in col[a * 4..b * 4].chunks_exact(4) {
            let c = i32::from_le_bytes(c.try_into().expect("4")) as i64;
            if c <= prev || c >= cols as i64 {
                return true;
            }
            prev = c;
        }
        false
    });
    if let Some(r) = bad {
        bail!(
            format,
            "col_indices of row {r} are out of range [0, {cols}) or not sorted and unique"
        );
    }
    Ok((0..rows).map(|r| (crow[r + 1] - crow[r]) as u64).collect())
}
