//! Encoding and decoding kernels of the sparse formats (bitmask, 2:4, CSR) over raw
//! little-endian bytes. Everything here is independent of files: callers hand in the dense
//! bytes of a `[rows, cols]` matrix and pre-sized output buffers.
//!
//! Zero policy (shared by every format): an element is a zero when all its bits other than the
//! sign bit are clear, so `-0.0` is a zero (it comes back as `+0.0`); NaN and every other value
//! is kept bit for bit.

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::error::{Error, Result};

/// Target bytes of dense input per parallel task.
const TASK_BYTES: usize = 1 << 18;

/// The packed formats, a closed set (names from files are matched against these, never looked
/// up anywhere else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackFormat {
    /// compressed-tensors "sparse-bitmask": values + bitmask + row_offsets.
    Bitmask,
    /// compressed-tensors "sparse-24-bitmask": exactly 2 of every 4 kept, values [R, C/2].
    TwoFour,
    /// CSR: crow_indices (I64), col_indices (I32), values.
    Csr,
}

impl PackFormat {
    pub const ALL: [PackFormat; 3] = [PackFormat::Bitmask, PackFormat::TwoFour, PackFormat::Csr];

    /// Short name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            PackFormat::Bitmask => "bitmask",
            PackFormat::TwoFour => "2:4",
            PackFormat::Csr => "csr",
        }
    }
    /// `quantization_config.sparsity_config.format` in config.json.
    pub fn config_name(self) -> &'static str {
        match self {
            PackFormat::Bitmask => "sparse-bitmask",
            PackFormat::TwoFour => "sparse-24-bitmask",
            PackFormat::Csr => "besa-csr",
        }
    }
    /// Parses a command-line name (`bitmask`, `2:4`, `csr`; the config names are accepted too).
    pub fn parse(name: &str) -> Result<Self> {
        for f in Self::ALL {
            if name == f.name() || name == f.config_name() {
                return Ok(f);
            }
        }
        match name {
            "24" | "2_4" | "sparse-24" => Ok(PackFormat::TwoFour),
            _ => Err(Error::config(format!(
                "unknown pack format {name:?} (expected one of: bitmask, 2:4, csr)"
            ))),
        }
    }
    /// Parses a config.json format name; only the closed set is accepted.
    pub fn from_config_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.config_name() == name)
    }
}

/// Bytes of the bitmask of one row of `cols` columns.
pub fn bitmask_row_bytes(cols: usize) -> usize {
    cols.div_ceil(8)
}

/// True for the float dtypes the packers accept.
pub fn is_packable_dtype(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// Sizes in bytes of the stored parts of a packed matrix, including the `shape` tensor.
pub fn packed_size(
    format: PackFormat,
    rows: usize,
    cols: usize,
    nnz: usize,
    itemsize: usize,
) -> usize {
    match format {
        PackFormat::Bitmask => 16 + nnz * itemsize + rows * bitmask_row_bytes(cols) + rows * 8,
        PackFormat::TwoFour => 16 + rows * (cols / 2) * itemsize + rows * bitmask_row_bytes(cols),
        PackFormat::Csr => 16 + (rows + 1) * 8 + nnz * 4 + nnz * itemsize,
    }
}

// ---------------------------------------------------------------------------------------------
// Element access: `N` bytes little-endian; the key is the magnitude bits (sign cleared), which
// order IEEE values by magnitude with NaN above infinity, and is 0 exactly for +-0.

#[inline(always)]
fn key<const N: usize>(b: &[u8]) -> u64 {
    match N {
        2 => (u16::from_le_bytes([b[0], b[1]]) & 0x7fff) as u64,
        4 => (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff) as u64,
        8 => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) & (u64::MAX >> 1),
        _ => unreachable!("unsupported item size"),
    }
}

fn float_itemsize(dtype: Dtype) -> Result<usize> {
    if is_packable_dtype(dtype) {
        Ok(dtype.bitsize() / 8)
    } else {
        Err(Error::dtype(format!(
            "dtype {dtype:?} cannot be packed (only F16, BF16, F32, F64)"
        )))
    }
}

macro_rules! dispatch {
    ($n:expr, $f:ident ::<N>($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            4 => $f::<4>($($arg),*),
            8 => $f::<8>($($arg),*),
            other => unreachable!("item size {other}"),
        }
    };
}

fn rows_per_task(cols: usize, itemsize: usize) -> usize {
    (TASK_BYTES / (cols * itemsize).max(1)).max(1)
}

/// Splits `buf` into consecutive mutable pieces of the given lengths.
fn split_lengths<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
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
    if N == 2 && simd16::available() {
        return data
            .par_chunks(cols * N)
            // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
            .map(|row| unsafe { simd16::count_row(row) })
            .collect();
    }
    data.par_chunks(cols * N)
        .map(|row| row.chunks_exact(N).filter(|e| key::<N>(e) != 0).count() as u64)
        .collect()
}

fn check_dense_len(data: &[u8], rows: usize, cols: usize, itemsize: usize) -> Result<()> {
    let want = rows
        .checked_mul(cols)
        .and_then(|x| x.checked_mul(itemsize))
        .ok_or_else(|| Error::shape(format!("shape [{rows}, {cols}] overflows")))?;
    if data.len() != want {
        return Err(Error::shape(format!(
            "dense buffer has {} bytes, shape [{rows}, {cols}] x {itemsize} needs {want}",
            data.len()
        )));
    }
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
// Bitmask.

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
    if counts.len() != rows || bitmask.len() != rows * wb || values.len() as u64 != total * n as u64
    {
        return Err(Error::shape(
            "bitmask_encode: output buffers do not match the counts",
        ));
    }
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
    if N == 2 && simd16::available() {
        // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
        unsafe { simd16::encode_rows(data, cols, counts, mask, values) };
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
    if bitmask.len() != rows.saturating_mul(wb) {
        return Err(Error::format(format!(
            "bitmask has {} bytes, shape [{rows}, {cols}] needs {rows} x {wb}",
            bitmask.len()
        )));
    }
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
        return Err(Error::format(format!(
            "bitmask row {r} has bits set beyond column {cols} (bitmask width does not match the shape)"
        )));
    }
    Ok(bitmask
        .par_chunks(wb)
        .map(|r| r.iter().map(|b| b.count_ones() as u64).sum())
        .collect())
}

/// Decodes bitmask + values into a dense buffer (`rows * cols * itemsize` bytes). The caller
/// validated the bitmask with [`bitmask_row_counts`] and passes those counts.
pub fn bitmask_decode(
    itemsize: usize,
    bitmask: &[u8],
    values: &[u8],
    rows: usize,
    cols: usize,
    counts: &[u64],
    out: &mut [u8],
) -> Result<()> {
    let wb = bitmask_row_bytes(cols);
    let total: u64 = counts.iter().sum();
    if !matches!(itemsize, 1 | 2 | 4 | 8)
        || counts.len() != rows
        || bitmask.len() != rows * wb
        || values.len() as u64 != total * itemsize as u64
        || out.len() != rows * cols * itemsize
    {
        return Err(Error::format(
            "bitmask_decode: values / bitmask / output sizes disagree",
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(cols, itemsize);
    let mut vals = Vec::new();
    let mut rest = values;
    for c in counts.chunks(rpt) {
        let (a, b) = rest.split_at(c.iter().sum::<u64>() as usize * itemsize);
        vals.push(a);
        rest = b;
    }
    out.par_chunks_mut(rpt * cols * itemsize)
        .zip(bitmask.par_chunks(rpt * wb))
        .zip(vals.into_par_iter())
        .for_each(|((o, m), v)| dispatch!(itemsize, decode_rows::<N>(o, cols, m, v)));
    Ok(())
}

fn decode_rows<const N: usize>(out: &mut [u8], cols: usize, mask: &[u8], values: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if N == 2 && simd16::available() {
        // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
        unsafe { simd16::decode_rows(out, cols, mask, values) };
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

/// SSSE3 kernels for 16-bit items (F16/BF16): 8 items per mask byte; a 256-entry shuffle table
/// compresses the kept items of a 16-byte load (encode) or expands packed items into their
/// positions with zeros elsewhere (decode).
#[cfg(target_arch = "x86_64")]
mod simd16 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::bitmask_row_bytes;

    struct Tables {
        compress: [[u8; 16]; 256],
        expand: [[u8; 16]; 256],
    }

    fn tables() -> &'static Tables {
        static T: OnceLock<Tables> = OnceLock::new();
        T.get_or_init(|| {
            let mut compress = [[0x80u8; 16]; 256];
            let mut expand = [[0x80u8; 16]; 256];
            for (m, (c, e)) in compress.iter_mut().zip(expand.iter_mut()).enumerate() {
                let mut k = 0usize;
                for j in 0..8 {
                    if (m >> j) & 1 == 1 {
                        c[2 * k] = 2 * j as u8;
                        c[2 * k + 1] = 2 * j as u8 + 1;
                        e[2 * j] = 2 * k as u8;
                        e[2 * j + 1] = 2 * k as u8 + 1;
                        k += 1;
                    }
                }
            }
            Tables { compress, expand }
        })
    }

    pub fn available() -> bool {
        static A: OnceLock<bool> = OnceLock::new();
        *A.get_or_init(|| is_x86_feature_detected!("ssse3") && is_x86_feature_detected!("popcnt"))
    }

    /// Same contract as `encode_rows_w::<u16>`. A 16-byte store at slot k is only done when
    /// slots k..k+8 are inside `values`; its lanes past the kept count are overwritten by later
    /// stores (slots are filled in increasing order), so the result is exact.
    #[target_feature(enable = "ssse3,popcnt")]
    pub unsafe fn encode_rows(
        data: &[u8],
        cols: usize,
        counts: &[u64],
        mask: &mut [u8],
        values: &mut [u8],
    ) {
        let t = tables();
        let wb = bitmask_row_bytes(cols);
        let len = values.len() / 2;
        let full = cols / 8;
        let magnitude = _mm_set1_epi16(0x7fff);
        let zero = _mm_setzero_si128();
        let mut k = 0usize;
        for ((row, mrow), &_cnt) in data
            .chunks_exact(cols * 2)
            .zip(mask.chunks_exact_mut(wb))
            .zip(counts)
        {
            for g in 0..full {
                let grp = &row[g * 16..g * 16 + 16];
                let v = _mm_loadu_si128(grp.as_ptr() as *const __m128i);
                let z = _mm_cmpeq_epi16(_mm_and_si128(v, magnitude), zero);
                let zm = (_mm_movemask_epi8(_mm_packs_epi16(z, z)) & 0xff) as u8;
                let m = !zm;
                mrow[g] = m;
                if k + 8 <= len {
                    let sh = _mm_loadu_si128(t.compress[m as usize].as_ptr() as *const __m128i);
                    let dst = values[k * 2..k * 2 + 16].as_mut_ptr() as *mut __m128i;
                    _mm_storeu_si128(dst, _mm_shuffle_epi8(v, sh));
                } else {
                    let mut b = m;
                    let mut kk = k;
                    while b != 0 {
                        let j = b.trailing_zeros() as usize;
                        values[kk * 2..kk * 2 + 2].copy_from_slice(&grp[2 * j..2 * j + 2]);
                        kk += 1;
                        b &= b - 1;
                    }
                }
                k += m.count_ones() as usize;
            }
            if cols % 8 != 0 {
                let grp = &row[full * 16..];
                let mut bits = 0u8;
                for (j, e) in grp.chunks_exact(2).enumerate() {
                    if u16::from_le_bytes([e[0], e[1]]) & 0x7fff != 0 {
                        bits |= 1 << j;
                        values[k * 2..k * 2 + 2].copy_from_slice(e);
                        k += 1;
                    }
                }
                mrow[full] = bits;
            }
        }
        debug_assert_eq!(k, len);
    }

    /// Non-zero 16-bit items of one row.
    #[target_feature(enable = "ssse3,popcnt")]
    pub unsafe fn count_row(row: &[u8]) -> u64 {
        let magnitude = _mm_set1_epi16(0x7fff);
        let zero = _mm_setzero_si128();
        let mut zeros = 0u64;
        let chunks = row.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            let v = _mm_loadu_si128(c.as_ptr() as *const __m128i);
            let z = _mm_cmpeq_epi16(_mm_and_si128(v, magnitude), zero);
            zeros += (_mm_movemask_epi8(z) as u32).count_ones() as u64 / 2;
        }
        let tail_kept = tail
            .chunks_exact(2)
            .filter(|e| u16::from_le_bytes([e[0], e[1]]) & 0x7fff != 0)
            .count() as u64;
        (row.len() - tail.len()) as u64 / 2 - zeros + tail_kept
    }

    /// Same contract as `decode_rows_w::<u16>`: every output item is written.
    #[target_feature(enable = "ssse3,popcnt")]
    pub unsafe fn decode_rows(out: &mut [u8], cols: usize, mask: &[u8], values: &[u8]) {
        let t = tables();
        let wb = bitmask_row_bytes(cols);
        let len = values.len() / 2;
        let full = cols / 8;
        let mut k = 0usize;
        for (orow, mrow) in out.chunks_exact_mut(cols * 2).zip(mask.chunks_exact(wb)) {
            for g in 0..full {
                let m = mrow[g];
                let dst = &mut orow[g * 16..g * 16 + 16];
                if k + 8 <= len {
                    let v = _mm_loadu_si128(values[k * 2..k * 2 + 16].as_ptr() as *const __m128i);
                    let sh = _mm_loadu_si128(t.expand[m as usize].as_ptr() as *const __m128i);
                    _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm_shuffle_epi8(v, sh));
                    k += m.count_ones() as usize;
                } else {
                    for (j, o) in dst.chunks_exact_mut(2).enumerate() {
                        if (m >> j) & 1 == 1 {
                            o.copy_from_slice(&values[k * 2..k * 2 + 2]);
                            k += 1;
                        } else {
                            o.fill(0);
                        }
                    }
                }
            }
            if cols % 8 != 0 {
                let m = mrow[full];
                for (j, o) in orow[full * 16..].chunks_exact_mut(2).enumerate() {
                    if (m >> j) & 1 == 1 {
                        o.copy_from_slice(&values[k * 2..k * 2 + 2]);
                        k += 1;
                    } else {
                        o.fill(0);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2:4.

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
    if cols % 4 != 0 {
        return Err(Error::shape(format!(
            "2:4 needs a column count divisible by 4, got {cols}"
        )));
    }
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
    if cols % 4 != 0 || bitmask.len() != rows * wb || values.len() != rows * (cols / 2) * n {
        return Err(Error::shape(
            "encode_24: output buffers do not match the shape",
        ));
    }
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
    if cols % 4 != 0 {
        return Err(Error::format(format!(
            "2:4 shape [{rows}, {cols}] has a column count not divisible by 4"
        )));
    }
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

// ---------------------------------------------------------------------------------------------
// CSR.

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
    if cols > i32::MAX as usize {
        return Err(Error::shape(format!(
            "CSR stores 32-bit column indices; {cols} columns is too many"
        )));
    }
    let total: u64 = counts.iter().sum();
    if counts.len() != rows
        || crow.len() != (rows + 1) * 8
        || col.len() as u64 != total * 4
        || values.len() as u64 != total * n as u64
    {
        return Err(Error::shape(
            "csr_encode: output buffers do not match the counts",
        ));
    }
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
        .zip(cols_t.into_par_iter())
        .zip(vals_t.into_par_iter())
        .for_each(|((d, c), v)| dispatch!(n, csr_rows::<N>(d, cols, c, v)));
    Ok(())
}

fn csr_rows<const N: usize>(data: &[u8], cols: usize, col: &mut [u8], values: &mut [u8]) {
    let mut k = 0usize;
    for row in data.chunks_exact(cols * N) {
        for (j, e) in row.chunks_exact(N).enumerate() {
            if key::<N>(e) != 0 {
                col[k * 4..k * 4 + 4].copy_from_slice(&(j as i32).to_le_bytes());
                values[k * N..k * N + N].copy_from_slice(e);
                k += 1;
            }
        }
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
    if crow.len() != (rows + 1) * 8 || col.len() != nnz * 4 {
        return Err(Error::format(format!(
            "CSR arrays have wrong lengths for {rows} rows and {nnz} values"
        )));
    }
    let crow: Vec<i64> = crow
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
        .collect();
    if crow[0] != 0 || crow[rows] != nnz as i64 {
        return Err(Error::format(format!(
            "crow_indices must start at 0 and end at nnz={nnz}, got {} .. {}",
            crow[0], crow[rows]
        )));
    }
    if let Some(r) = (0..rows).find(|&r| crow[r + 1] < crow[r]) {
        return Err(Error::format(format!("crow_indices decrease at row {r}")));
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
        return Err(Error::format(format!(
            "col_indices of row {r} are out of range [0, {cols}) or not sorted and unique"
        )));
    }
    Ok((0..rows).map(|r| (crow[r + 1] - crow[r]) as u64).collect())
}

/// Decodes validated CSR (see [`csr_check`]) into a dense buffer.
pub fn csr_decode(
    itemsize: usize,
    col: &[u8],
    values: &[u8],
    rows: usize,
    cols: usize,
    counts: &[u64],
    out: &mut [u8],
) -> Result<()> {
    let total: u64 = counts.iter().sum();
    if !matches!(itemsize, 1 | 2 | 4 | 8)
        || col.len() as u64 != total * 4
        || values.len() as u64 != total * itemsize as u64
        || out.len() != rows * cols * itemsize
    {
        return Err(Error::format("csr_decode: sizes disagree"));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let rpt = rows_per_task(cols, itemsize);
    let mut tasks = Vec::new();
    let (mut c_rest, mut v_rest) = (col, values);
    for c in counts.chunks(rpt) {
        let k = c.iter().sum::<u64>() as usize;
        let (ca, cb) = c_rest.split_at(k * 4);
        let (va, vb) = v_rest.split_at(k * itemsize);
        tasks.push((c, ca, va));
        c_rest = cb;
        v_rest = vb;
    }
    out.par_chunks_mut(rpt * cols * itemsize)
        .zip(tasks.into_par_iter())
        .for_each(|(o, (cnt, c, v))| {
            o.fill(0);
            let mut k = 0usize;
            for (r, &n) in cnt.iter().enumerate() {
                let orow = &mut o[r * cols * itemsize..(r + 1) * cols * itemsize];
                for _ in 0..n {
                    let j = i32::from_le_bytes(c[k * 4..k * 4 + 4].try_into().expect("4")) as usize;
                    orow[j * itemsize..(j + 1) * itemsize]
                        .copy_from_slice(&v[k * itemsize..(k + 1) * itemsize]);
                    k += 1;
                }
            }
        });
    Ok(())
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

/// The keep-bitmask (`rows x ceil(cols/8)`, LSB first) of a dense float matrix.
pub fn bitmask_of_dense(dtype: Dtype, data: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let n = float_itemsize(dtype)?;
    check_dense_len(data, rows, cols, n)?;
    let wb = bitmask_row_bytes(cols);
    let mut out = vec![0u8; rows * wb];
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(wb)
        .zip(data.par_chunks(cols * n))
        .for_each(|(m, row)| {
            for (b, grp) in m.iter_mut().zip(row.chunks(8 * n)) {
                let mut bits = 0u8;
                for (j, e) in grp.chunks_exact(n).enumerate() {
                    bits |= ((dispatch!(n, key::<N>(e)) != 0) as u8) << j;
                }
                *b = bits;
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn worked_example_of_the_spec() {
        let w: Vec<f32> = [
            [1.5, -2., 0., 0., 0., 0., 0., 0., 0., 3.],
            [0.; 10],
            [0., 4., 0., 0., 0., 0., 0., 0., 5., 0.],
        ]
        .concat();
        let data = f32s(&w);
        let counts = row_nnz(Dtype::F32, &data, 3, 10).unwrap();
        assert_eq!(counts, [3, 0, 2]);
        assert_eq!(prefix_offsets(&counts), (vec![0, 3, 3], 5));
        let mut mask = vec![0u8; 6];
        let mut vals = vec![0u8; 20];
        bitmask_encode(Dtype::F32, &data, 3, 10, &counts, &mut mask, &mut vals).unwrap();
        assert_eq!(mask, [3, 2, 0, 0, 2, 1]);
        assert_eq!(vals, f32s(&[1.5, -2., 3., 4., 5.]));
        let mut out = vec![0xffu8; data.len()];
        let c2 = bitmask_row_counts(&mask, 3, 10).unwrap();
        bitmask_decode(4, &mask, &vals, 3, 10, &c2, &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(
            packed_size(PackFormat::Bitmask, 3, 10, 5, 4),
            16 + 20 + 6 + 24
        );
    }

    #[test]
    fn signed_zero_is_zero_and_nan_is_kept() {
        let data = f32s(&[-0.0, f32::NAN, 0.0, 1.0]);
        let counts = row_nnz(Dtype::F32, &data, 1, 4).unwrap();
        assert_eq!(counts, [2]);
        let (mut m, mut v) = (vec![0u8; 1], vec![0u8; 8]);
        bitmask_encode(Dtype::F32, &data, 1, 4, &counts, &mut m, &mut v).unwrap();
        let mut out = vec![0u8; 16];
        bitmask_decode(4, &m, &v, 1, 4, &counts, &mut out).unwrap();
        let mut want = data.clone();
        canonical_zeros(Dtype::F32, &mut want).unwrap();
        assert_eq!(out, want);
        assert_eq!(&out[..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn padding_bits_refused() {
        assert!(bitmask_row_counts(&[0b1000_0000], 1, 7).is_err());
        assert_eq!(bitmask_row_counts(&[0b0100_0000], 1, 7).unwrap(), [1]);
        assert!(bitmask_row_counts(&[0, 0], 1, 7).is_err());
    }

    #[test]
    fn two_four_selection_and_check() {
        let data = f32s(&[1., 0., 3., 0., 5., -6., 7., 0.]);
        assert_eq!(
            check_24(Dtype::F32, &data, 1, 8).unwrap(),
            (
                Some(Not24 {
                    row: 0,
                    col: 4,
                    kept: 3
                }),
                1
            )
        );
        let (mut m, mut v) = (vec![0u8; 1], vec![0u8; 16]);
        encode_24(Dtype::F32, &data, 1, 8, &mut m, &mut v).unwrap();
        assert_eq!(m, [0b0110_0101]);
        assert_eq!(v, f32s(&[1., 3., -6., 7.]));
        check_24_bitmask(&m, 1, 8).unwrap();
        assert!(check_24_bitmask(&[0b1110_0101], 1, 8).is_err());
        // fewer than 2 kept: zero fillers (stored +0), first zero positions
        let data = f32s(&[0., -0.0, 0., 2.]);
        let (mut m, mut v) = (vec![0u8; 1], vec![0u8; 8]);
        encode_24(Dtype::F32, &data, 1, 4, &mut m, &mut v).unwrap();
        assert_eq!(m, [0b1001]);
        assert_eq!(v, f32s(&[0., 2.]));
    }

    #[test]
    fn csr_checks() {
        let crow: Vec<u8> = [0i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let col = |v: &[i32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert_eq!(csr_check(&crow, &col(&[1, 3, 0]), 2, 5, 3).unwrap(), [2, 1]);
        assert!(csr_check(&crow, &col(&[3, 1, 0]), 2, 5, 3).is_err());
        assert!(csr_check(&crow, &col(&[1, 1, 0]), 2, 5, 3).is_err());
        assert!(csr_check(&crow, &col(&[1, 5, 0]), 2, 5, 3).is_err());
        assert!(csr_check(&crow, &col(&[1, 2]), 2, 5, 2).is_err());
    }

    fn matrix() -> impl Strategy<Value = (usize, usize, usize, Vec<u8>)> {
        (
            0usize..12,
            0usize..40,
            prop::sample::select(vec![2usize, 4, 8]),
            0u8..=10,
        )
            .prop_flat_map(|(r, c, n, density)| {
                let elem = prop_oneof![
                    (10 - density as u32) => Just(vec![0u8; 8]),
                    1 => Just({ let mut z = vec![0u8; 8]; z[7] = 0x80; z }),
                    (density as u32) => prop::collection::vec(any::<u8>(), 8),
                ];
                (
                    Just(r),
                    Just(c),
                    Just(n),
                    prop::collection::vec(elem, r * c),
                )
                    .prop_map(move |(r, c, n, els)| {
                        let bytes = els
                            .into_iter()
                            .flat_map(|mut e| {
                                // keep the sign byte at the element's last byte
                                let sign = e[7];
                                e.truncate(n);
                                e[n - 1] = (e[n - 1] & 0x7f) | (sign & 0x80);
                                e
                            })
                            .collect();
                        (r, c, n, bytes)
                    })
            })
    }

    fn dtype_of(n: usize) -> Dtype {
        match n {
            2 => Dtype::BF16,
            4 => Dtype::F32,
            _ => Dtype::F64,
        }
    }

    proptest! {
        #[test]
        fn bitmask_and_csr_roundtrip((r, c, n, data) in matrix()) {
            let dt = dtype_of(n);
            let mut want = data.clone();
            canonical_zeros(dt, &mut want).unwrap();
            let counts = row_nnz(dt, &data, r, c).unwrap();
            let nnz: u64 = counts.iter().sum();
            let (mut m, mut v) = (vec![0u8; r * c.div_ceil(8)], vec![0u8; nnz as usize * n]);
            bitmask_encode(dt, &data, r, c, &counts, &mut m, &mut v).unwrap();
            prop_assert_eq!(&bitmask_of_dense(dt, &data, r, c).unwrap(), &m);
            let c2 = bitmask_row_counts(&m, r, c).unwrap();
            prop_assert_eq!(&c2, &counts);
            let mut out = vec![0xaa; data.len()];
            bitmask_decode(n, &m, &v, r, c, &c2, &mut out).unwrap();
            prop_assert_eq!(&out, &want);

            let (mut crow, mut col, mut vals) = (vec![0u8; (r + 1) * 8], vec![0u8; nnz as usize * 4], vec![0u8; nnz as usize * n]);
            csr_encode(dt, &data, r, c, &counts, &mut crow, &mut col, &mut vals).unwrap();
            prop_assert_eq!(&vals, &v);
            let c3 = csr_check(&crow, &col, r, c, nnz as usize).unwrap();
            let mut out = vec![0x55; data.len()];
            csr_decode(n, &col, &vals, r, c, &c3, &mut out).unwrap();
            prop_assert_eq!(&out, &want);
        }

        #[test]
        fn two_four_roundtrip_of_24_matrices((r, c, n, mut data) in matrix()) {
            let c4 = c - c % 4;
            data.truncate(r * c4 * n);
            let dt = dtype_of(n);
            // zero the last two of every group -> 2:4
            for g in data.chunks_mut(4 * n) { g[2 * n..].fill(0); }
            prop_assert_eq!(check_24(dt, &data, r, c4).unwrap().0, None);
            let (mut m, mut v) = (vec![0u8; r * c4.div_ceil(8)], vec![0u8; r * c4 / 2 * n]);
            encode_24(dt, &data, r, c4, &mut m, &mut v).unwrap();
            check_24_bitmask(&m, r, c4).unwrap();
            let mut out = vec![1u8; data.len()];
            bitmask_decode(n, &m, &v, r, c4, &vec![(c4 / 2) as u64; r], &mut out).unwrap();
            let mut want = data.clone();
            canonical_zeros(dt, &mut want).unwrap();
            prop_assert_eq!(out, want);
        }

        #[test]
        fn decoders_never_panic_on_garbage(mask in prop::collection::vec(any::<u8>(), 0..40), r in 0usize..6, c in 0usize..40, nv in 0usize..64) {
            if let Ok(counts) = bitmask_row_counts(&mask, r, c) {
                let total: u64 = counts.iter().sum();
                let vals = vec![7u8; nv * 2];
                let mut out = vec![0u8; r * c * 2];
                let res = bitmask_decode(2, &mask, &vals, r, c, &counts, &mut out);
                prop_assert_eq!(res.is_ok(), total as usize == nv);
            }
        }
    }
}
