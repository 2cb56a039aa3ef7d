//! Kernels shared by the codecs, over raw little-endian bytes: per-row kept counts, the
//! bitmask encoder / decoder (bitmask and 2:4 store the same index), bitmask row checks and
//! the keep-mask of a bitmask index. Rows are split into tasks of about [`TASK_BYTES`] of dense
//! data run in parallel (rayon). The zero rule is [`crate::dtype::magnitude`].

use std::ops::Range;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::bitmask_row_bytes;
use crate::dispatch_itemsize as dispatch;
use crate::dtype::{float_itemsize, magnitude as key};
use crate::error::Result;

/// Target bytes of dense input per parallel task.
pub const TASK_BYTES: usize = 1 << 18;

pub fn rows_per_task(cols: usize, itemsize: usize) -> usize {
    (TASK_BYTES / (cols * itemsize).max(1)).max(1)
}

/// Splits `buf` into consecutive mutable pieces of the given lengths.
pub fn split_lengths<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for l in lens {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(l);
        out.push(a);
        buf = b;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Counting.

/// Number of kept (non-zero) elements in each row of a dense float matrix.
pub fn row_nnz(dtype: Dtype, data: &[u8], rows: usize, cols: usize) -> Result<Vec<u64>> {
    let n = float_itemsize(dtype)?;
    check_dense_len(data, rows, cols, n)?;
    if cols == 0 {
        return Ok(vec![0; rows]);
    }
    Ok(dispatch!(n, row_nnz_n::<N>(data, rows, cols)))
}

fn row_nnz_n<const N: usize>(data: &[u8], _rows: usize, cols: usize) -> Vec<u64> {
    #[cfg(target_arch = "x86_64")]
    if N == 2 && super::simd16::available() {
        return data
            .par_chunks(cols * N)
            // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
            .map(|row| unsafe { super::simd16::count_row(row) })
            .collect();
    }
    data.par_chunks(cols * N)
        .map(|row| row.chunks_exact(N).filter(|e| key::<N>(e) != 0).count() as u64)
        .collect()
}

pub fn check_dense_len(data: &[u8], rows: usize, cols: usize, itemsize: usize) -> Result<()> {
    let want = rows
        .checked_mul(cols)
        .and_then(|x| x.checked_mul(itemsize))
        .ok_or_else(|| crate::Error::shape(format!("shape [{rows}, {cols}] overflows")))?;
    crate::ensure!(
        data.len() == want,
        shape,
        "dense buffer has {} bytes, shape [{rows}, {cols}] x {itemsize} needs {want}",
        data.len()
    );
    Ok(())
}

/// Prefix sums: `offsets[r]` = kept elements before row `r`; returns (offsets, total).
pub fn prefix_offsets(counts: &[u64]) -> (Vec<u64>, u64) {
    let mut acc = 0u64;
    let offs = counts
        .iter()
        .map(|&c| {
            let o = acc;
            acc += c;
            o
        })
        .collect();
    (offs, acc)
}

// ---------------------------------------------------------------------------------------------
// Bitmask index (bitmask and 2:4).

/// Encodes a dense matrix as bitmask + values. `counts` are the per-row kept counts from
/// [`row_nnz`]; `bitmask` must be `rows * ceil(cols/8)` bytes and `values` `sum(counts) *
/// itemsize` bytes.
pub fn bitmask_encode(
    dtype: Dtype,
    data: &[u8],
    rows: usize,
    cols: usize,
    counts: &[u64],
    bitmask: &mut [u8],
    values: &mut [u8],
) -> Result<()> {
    let n = float_itemsize(dtype)?;
    check_dense_len(data, rows, cols, n)?;
    let wb = bitmask_row_bytes(cols);
    let total: u64 = counts.iter().sum();
    crate::ensure!(
        counts.len() == rows
            && bitmask.len() == rows * wb
            && values.len() as u64 == total * n as u64,
        shape,
        "bitmask encode: output buffers do not match the counts"
    );
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(cols, n);
    let task_lens: Vec<usize> = counts
        .chunks(rpt)
        .map(|c| c.iter().sum::<u64>() as usize * n)
        .collect();
    let vals = split_lengths(values, task_lens.into_iter());
    data.par_chunks(rpt * cols * n)
        .zip(counts.par_chunks(rpt))
        .zip(bitmask.par_chunks_mut(rpt * wb))
        .zip(vals.into_par_iter())
        .for_each(|(((d, c), m), v)| dispatch!(n, encode_rows::<N>(d, cols, c, m, v)));
    Ok(())
}

/// Machine words of each item size, for branchless kernels.
trait Word: Copy {
    fn load(b: &[u8]) -> Self;
    fn store(self, b: &mut [u8]);
    fn nonzero(self) -> bool;
    /// `self` when `bit` is 1, zero when 0 (no branch).
    fn keep_if(self, bit: u8) -> Self;
}

macro_rules! word {
    ($t:ty, $n:expr, $mag:expr) => {
        impl Word for $t {
            #[inline(always)]
            fn load(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..$n].try_into().expect("item"))
            }
            #[inline(always)]
            fn store(self, b: &mut [u8]) {
                b[..$n].copy_from_slice(&self.to_le_bytes());
            }
            #[inline(always)]
            fn nonzero(self) -> bool {
                self & $mag != 0
            }
            #[inline(always)]
            fn keep_if(self, bit: u8) -> Self {
                self & (0 as $t).wrapping_sub(bit as $t)
            }
        }
    };
}
word!(u8, 1, 0x7f);
word!(u16, 2, 0x7fff);
word!(u32, 4, 0x7fff_ffff);
word!(u64, 8, u64::MAX >> 1);

fn encode_rows<const N: usize>(
    data: &[u8],
    cols: usize,
    counts: &[u64],
    mask: &mut [u8],
    values: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if N == 2 && super::simd16::available() {
        // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
        unsafe { super::simd16::encode_rows(data, cols, counts, mask, values) };
        return;
    }
    match N {
        2 => encode_rows_w::<u16>(data, cols, counts, mask, values),
        4 => encode_rows_w::<u32>(data, cols, counts, mask, values),
        8 => encode_rows_w::<u64>(data, cols, counts, mask, values),
        _ => encode_rows_w::<u8>(data, cols, counts, mask, values),
    }
}

/// Row by row: while a later kept value exists in this task's slice, every element is stored
/// at the write cursor and the cursor advances only for kept ones (no unpredictable branch; a
/// dropped element is overwritten later). The task's last non-empty row uses a bit loop so
/// nothing is written past the slice.
fn encode_rows_w<W: Word>(
    data: &[u8],
    cols: usize,
    counts: &[u64],
    mask: &mut [u8],
    values: &mut [u8],
) {
    let n = std::mem::size_of::<W>();
    let wb = bitmask_row_bytes(cols);
    let mut k = 0usize; // in elements
    let len = values.len() / n;
    for ((row, mrow), &cnt) in data
        .chunks_exact(cols * n)
        .zip(mask.chunks_exact_mut(wb))
        .zip(counts)
    {
        let row_end = k + cnt as usize;
        if row_end < len {
            for (grp, mb) in row.chunks(8 * n).zip(mrow.iter_mut()) {
                let mut bits = 0u8;
                for (j, e) in grp.chunks_exact(n).enumerate() {
                    let v = W::load(e);
                    let keep = v.nonzero();
                    v.store(&mut values[k * n..]);
                    k += keep as usize;
                    bits |= (keep as u8) << j;
                }
                *mb = bits;
            }
        } else {
            for (grp, mb) in row.chunks(8 * n).zip(mrow.iter_mut()) {
                let mut bits = 0u8;
                for (j, e) in grp.chunks_exact(n).enumerate() {
                    bits |= (W::load(e).nonzero() as u8) << j;
                }
                *mb = bits;
                let mut b = bits;
                while b != 0 {
                    let j = b.trailing_zeros() as usize;
                    values[k * n..k * n + n].copy_from_slice(&grp[j * n..j * n + n]);
                    k += 1;
                    b &= b - 1;
                }
            }
        }
        debug_assert_eq!(k, row_end);
    }
}

/// Checks a bitmask of `rows x ceil(cols/8)` bytes (padding bits of each row must be clear)
/// and returns the popcount of each row.
pub fn bitmask_row_counts(bitmask: &[u8], rows: usize, cols: usize) -> Result<Vec<u64>> {
    let wb = bitmask_row_bytes(cols);
    crate::ensure!(
        bitmask.len() == rows.saturating_mul(wb),
        format,
        "bitmask has {} bytes, shape [{rows}, {cols}] needs {rows} x {wb}",
        bitmask.len()
    );
    if wb == 0 {
        return Ok(vec![0; rows]);
    }
    let pad_mask: u8 = if cols % 8 == 0 {
        0
    } else {
        !((1u8 << (cols % 8)) - 1)
    };
    let bad = bitmask
        .par_chunks(wb)
        .position_first(|r| r[wb - 1] & pad_mask != 0);
    if let Some(r) = bad {
        return Err(crate::Error::format(format!(
            "bitmask row {r} has bits set beyond column {cols} (bitmask width does not match the shape)"
        )));
    }
    Ok(bitmask
        .par_chunks(wb)
        .map(|r| r.iter().map(|b| b.count_ones() as u64).sum())
        .collect())
}

/// Decodes rows `rows` of a validated bitmask index + values (see [`bitmask_row_counts`],
/// whose counts are passed) into `out` (`rows.len() * cols * itemsize` bytes).
pub fn bitmask_decode(
    itemsize: usize,
    bitmask: &[u8],
    values: &[u8],
    cols: usize,
    counts: &[u64],
    rows: Range<usize>,
    out: &mut [u8],
) -> Result<()> {
    let wb = bitmask_row_bytes(cols);
    let total: u64 = counts.iter().sum();
    crate::ensure!(
        matches!(itemsize, 1 | 2 | 4 | 8)
            && rows.end <= counts.len()
            && bitmask.len() == counts.len() * wb
            && values.len() as u64 == total * itemsize as u64
            && out.len() == rows.len() * cols * itemsize,
        format,
        "bitmask decode: values / bitmask / output sizes disagree"
    );
    if rows.is_empty() || cols == 0 {
        return Ok(());
    }
    let start: u64 = counts[..rows.start].iter().sum();
    let values = &values[start as usize * itemsize..];
    let counts = &counts[rows.clone()];
    let bitmask = &bitmask[rows.start * wb..rows.end * wb];
    let rpt = rows_per_task(cols, itemsize);
    let vals = split_by_counts(values, counts, rpt, itemsize);
    out.par_chunks_mut(rpt * cols * itemsize)
        .zip(bitmask.par_chunks(rpt * wb))
        .zip(vals.into_par_iter())
        .for_each(|((o, m), v)| dispatch!(itemsize, decode_rows::<N>(o, cols, m, v)));
    Ok(())
}

/// Consecutive slices of `values` holding the items of each task of `rpt` rows.
pub fn split_by_counts<'a>(
    mut values: &'a [u8],
    counts: &[u64],
    rpt: usize,
    itemsize: usize,
) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(counts.len().div_ceil(rpt.max(1)));
    for c in counts.chunks(rpt) {
        let (a, b) = values.split_at(c.iter().sum::<u64>() as usize * itemsize);
        out.push(a);
        values = b;
    }
    out
}

/// Keep-mask (one byte per weight: 1 = stored and non-zero) of a validated bitmask index.
pub fn bitmask_keep_mask(
    itemsize: usize,
    bitmask: &[u8],
    values: &[u8],
    cols: usize,
    counts: &[u64],
    out: &mut [u8],
) -> Result<()> {
    let wb = bitmask_row_bytes(cols);
    let total: u64 = counts.iter().sum();
    crate::ensure!(
        bitmask.len() == counts.len() * wb
            && values.len() as u64 == total * itemsize as u64
            && out.len() == counts.len() * cols,
        format,
        "keep-mask: values / bitmask / output sizes disagree"
    );
    if cols == 0 || counts.is_empty() {
        return Ok(());
    }
    let rpt = rows_per_task(cols, itemsize);
    let vals = split_by_counts(values, counts, rpt, itemsize);
    out.par_chunks_mut(rpt * cols)
        .zip(bitmask.par_chunks(rpt * wb))
        .zip(vals.into_par_iter())
        .for_each(|((o, m), v)| {
            let mut vals = v.chunks_exact(itemsize);
            for (row, mrow) in o.chunks_exact_mut(cols).zip(m.chunks_exact(wb)) {
                row.fill(0);
                for (b, &byte) in mrow.iter().enumerate() {
                    let mut bits = byte;
                    while bits != 0 {
                        let j = 8 * b + bits.trailing_zeros() as usize;
                        let e = vals.next().expect("validated count");
                        row[j] = u8::from(!crate::dtype::is_zero(e));
                        bits &= bits - 1;
                    }
                }
            }
        });
    Ok(())
}

fn decode_rows<const N: usize>(out: &mut [u8], cols: usize, mask: &[u8], values: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if N == 2 && super::simd16::available() {
        // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
        unsafe { super::simd16::decode_rows(out, cols, mask, values) };
        return;
    }
    match N {
        2 => decode_rows_w::<u16>(out, cols, mask, values),
        4 => decode_rows_w::<u32>(out, cols, mask, values),
        8 => decode_rows_w::<u64>(out, cols, mask, values),
        _ => decode_rows_w::<u8>(out, cols, mask, values),
    }
}

/// Branchless: every output element is written, from the value at the read cursor (clamped to
/// the slice) when its bit is set, else zero; the cursor advances by the bit.
fn decode_rows_w<W: Word>(out: &mut [u8], cols: usize, mask: &[u8], values: &[u8]) {
    let n = std::mem::size_of::<W>();
    let wb = bitmask_row_bytes(cols);
    let len = values.len() / n;
    if len == 0 {
        out.fill(0);
        return;
    }
    let last = len - 1;
    let vp = values.as_ptr() as *const W;
    let mut k = 0usize;
    for (orow, mrow) in out.chunks_exact_mut(cols * n).zip(mask.chunks_exact(wb)) {
        let op = orow.as_mut_ptr() as *mut W;
        for j in 0..cols {
            let bit = (mrow[j >> 3] >> (j & 7)) & 1;
            // SAFETY: k.min(last) < len = values.len() / n, and j < cols, so both accesses
            // stay inside `values` and this row of `out`; unaligned reads/writes are used.
            let v = unsafe { vp.add(k.min(last)).read_unaligned() };
            unsafe { op.add(j).write_unaligned(v.keep_if(bit)) };
            k += bit as usize;
        }
    }
}

/// Normalises a dense float buffer the way a pack/unpack round trip does: every -0.0 becomes
/// +0.0; all other bits are untouched. (Used by tests and by callers comparing round trips.)
pub fn canonical_zeros(dtype: Dtype, data: &mut [u8]) -> Result<()> {
    let n = float_itemsize(dtype)?;
    for e in data.chunks_exact_mut(n) {
        if dispatch!(n, key::<N>(e)) == 0 {
            e.fill(0);
        }
    }
    Ok(())
}
