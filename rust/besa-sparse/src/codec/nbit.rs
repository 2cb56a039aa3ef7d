//! Shared kernels of the quantized formats (docs/formats.md "Quantized formats"): the
//! quantization scheme of a checkpoint, LSB-first N-bit streams, and dequantization exactly as
//! compressed-tensors computes it (`(q - z)` in the scale's dtype times the scale, one
//! rounding).

use half::{bf16, f16};
use safetensors::tensor::Dtype;

use crate::dtype::name as dtype_name;
use crate::error::Result;
use crate::{bail, ensure};

/// The quantization scheme of a checkpoint: one bit width and one group size for every
/// quantized module (config.json `quantization_config.config_groups`, or the side file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    /// Bits per code, 1..=8.
    pub bits: u32,
    /// Columns per group; -1: one group per row ("channel").
    pub group_size: i64,
}

impl QuantParams {
    /// Largest code, `2^bits - 1`.
    pub fn qmax(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
    /// Groups per row of a matrix of `cols` columns, checking that the group size divides it.
    pub fn groups(&self, cols: usize) -> Result<usize> {
        if self.group_size == -1 {
            return Ok(1);
        }
        let g = self.group_size;
        ensure!(
            g > 0 && (g as usize) <= cols.max(1) && cols % g as usize == 0,
            format,
            "group_size {g} does not divide the {cols} columns"
        );
        Ok(cols / g as usize)
    }
}

/// The quantized input of one matrix (from the pruned directory's side file).
#[derive(Debug, Clone, Copy)]
pub struct QuantInput<'a> {
    pub params: QuantParams,
    /// Groups per row.
    pub groups: usize,
    /// U8 `[rows, cols]` codes.
    pub codes: &'a [u8],
    /// `[rows, groups]` scales in the matrix dtype (raw bytes).
    pub scale: &'a [u8],
    /// U8 `[rows, groups]` zero points.
    pub zero: &'a [u8],
}

/// Bytes of a stream of `n` fields of `bits` bits padded to `align` bits.
pub fn stream_bytes(n: usize, bits: u32, align: usize) -> usize {
    (n * bits as usize).div_ceil(align) * align / 8
}

/// Writes `values` as one LSB-first stream of `bits`-bit fields into `out`; the rest of `out`
/// (padding) is zeroed. Values must be < 2^bits. Eight fields make `bits` whole bytes, so the
/// body is written eight fields at a time.
pub fn pack_stream(values: &[u8], bits: u32, out: &mut [u8]) {
    let b = bits as usize;
    let full = values.len() / 8;
    let (body, rest) = out.split_at_mut(full * b);
    let (vbody, vtail) = values.split_at(full * 8);
    match bits {
        8 => body.copy_from_slice(vbody),
        4 => {
            for (o, v) in body.iter_mut().zip(vbody.chunks_exact(2)) {
                *o = v[0] | (v[1] << 4);
            }
        }
        _ => {
            for (o, v) in body.chunks_exact_mut(b).zip(vbody.chunks_exact(8)) {
                let mut acc = 0u64;
                for (j, &x) in v.iter().enumerate() {
                    acc |= u64::from(x) << (j * b);
                }
                o.copy_from_slice(&acc.to_le_bytes()[..b]);
            }
        }
    }
    // the last (< 8) fields, then zero padding
    let mut acc = 0u64;
    for (j, &x) in vtail.iter().enumerate() {
        acc |= u64::from(x) << (j * b);
    }
    let nb = (vtail.len() * b).div_ceil(8);
    rest[..nb].copy_from_slice(&acc.to_le_bytes()[..nb]);
    rest[nb..].fill(0);
}

/// Field `i` of an LSB-first stream of `bits`-bit fields (bytes past the end read as 0).
#[inline]
pub fn field(data: &[u8], bits: u32, i: usize) -> u8 {
    let off = i * bits as usize;
    let b = off / 8;
    let lo = u16::from(data.get(b).copied().unwrap_or(0));
    let hi = data.get(b + 1).map_or(0, |&x| u16::from(x));
    (((lo | (hi << 8)) >> (off % 8)) & ((1u16 << bits) - 1)) as u8
}

/// Fields `start .. start + out.len()` of a stream into `out` (bytes past the end read as 0).
/// Fields from a multiple of eight on are read eight at a time (`bits` whole bytes).
pub fn unpack_stream(data: &[u8], bits: u32, start: usize, out: &mut [u8]) {
    if bits == 8 {
        let have = data.len().saturating_sub(start).min(out.len());
        if have > 0 {
            out[..have].copy_from_slice(&data[start..start + have]);
        }
        out[have..].fill(0);
        return;
    }
    let b = bits as usize;
    let head = ((8 - start % 8) % 8).min(out.len());
    let (oh, body) = out.split_at_mut(head);
    for (k, o) in oh.iter_mut().enumerate() {
        *o = field(data, bits, start + k);
    }
    let first = start + head; // a multiple of 8 when body is not empty
    let src = data.get(first / 8 * b..).unwrap_or(&[]);
    let done = if bits == 4 {
        let pairs = (body.len() / 2).min(src.len());
        for (o, &x) in body[..2 * pairs].chunks_exact_mut(2).zip(src) {
            o[0] = x & 15;
            o[1] = x >> 4;
        }
        2 * pairs
    } else {
        let eights = (body.len() / 8).min(src.len() / b);
        let mask = (1u64 << b) - 1;
        for (o, w) in body[..8 * eights]
            .chunks_exact_mut(8)
            .zip(src.chunks_exact(b))
        {
            let mut buf = [0u8; 8];
            buf[..b].copy_from_slice(w);
            let acc = u64::from_le_bytes(buf);
            for (j, x) in o.iter_mut().enumerate() {
                *x = ((acc >> (j * b)) & mask) as u8;
            }
        }
        8 * eights
    };
    for (k, o) in body[done..].iter_mut().enumerate() {
        *o = field(data, bits, first + done + k);
    }
}

/// Checks that the bits of `data` after the first `n` fields are zero.
pub fn check_padding(data: &[u8], bits: u32, n: usize, what: &str) -> Result<()> {
    let used = n * bits as usize;
    let (b, r) = (used / 8, used % 8);
    let mut bad = r != 0 && data.get(b).is_some_and(|&x| x >> r != 0);
    let tail = if r != 0 { b + 1 } else { b };
    bad |= data.get(tail..).is_some_and(|t| t.iter().any(|&x| x != 0));
    ensure!(
        !bad,
        format,
        "{what}: padding bits after the last {bits}-bit field are not zero"
    );
    Ok(())
}

/// Checks that every field of `values` is < 2^bits; `what` names the values in the error.
pub fn check_range(values: &[u8], bits: u32, what: &str) -> Result<()> {
    let qmax = (1u32 << bits) - 1;
    if let Some(&v) = values.iter().find(|&&v| u32::from(v) > qmax) {
        bail!(format, "{what} {v} outside 0..{qmax} ({bits} bits)");
    }
    Ok(())
}

/// A scale as f64 (for checks) from its raw little-endian bytes.
fn scale_f64(dtype: Dtype, b: &[u8]) -> f64 {
    match dtype {
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        Dtype::F32 => f64::from(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        _ => f64::from_le_bytes(b.try_into().expect("8 bytes")),
    }
}

/// Checks that the dtype is a float dtype scales can have.
pub fn check_scale_dtype(dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F16 | Dtype::BF16 => Ok(2),
        Dtype::F32 => Ok(4),
        Dtype::F64 => Ok(8),
        d => bail!(
            dtype,
            "weight_scale has dtype {}; scales must be F16, BF16, F32 or F64",
            dtype_name(d)
        ),
    }
}

/// Checks that every scale is finite and > 0.
pub fn check_scales(dtype: Dtype, scale: &[u8]) -> Result<()> {
    let n = check_scale_dtype(dtype)?;
    for (i, b) in scale.chunks_exact(n).enumerate() {
        let s = scale_f64(dtype, b);
        ensure!(
            s.is_finite() && s > 0.0,
            format,
            "weight_scale[{i}] = {s} is not a finite positive scale"
        );
    }
    Ok(())
}

/// The dequantized value `(q - z) * s` of the codes of one group, as the bits of its
/// little-endian word, in the scale dtype with one rounding (F16/BF16: the exact F32 product
/// rounded to nearest-even).
#[inline]
fn value16(dtype: Dtype, z: u8, sb: &[u8]) -> impl Fn(u8) -> u16 {
    let bits = u16::from_le_bytes([sb[0], sb[1]]);
    let s = if dtype == Dtype::F16 {
        f16::from_bits(bits).to_f32()
    } else {
        f32::from_bits(u32::from(bits) << 16)
    };
    let z = i32::from(z);
    let is_f16 = dtype == Dtype::F16;
    move |q| {
        let p = (i32::from(q) - z) as f32 * s;
        if is_f16 {
            f16::from_f32(p).to_bits()
        } else {
            bf16::from_f32(p).to_bits()
        }
    }
}
#[inline]
fn value32(_dtype: Dtype, z: u8, sb: &[u8]) -> impl Fn(u8) -> u32 {
    let s = f32::from_le_bytes(sb.try_into().expect("4 bytes"));
    let z = i32::from(z);
    move |q| ((i32::from(q) - z) as f32 * s).to_bits()
}
#[inline]
fn value64(_dtype: Dtype, z: u8, sb: &[u8]) -> impl Fn(u8) -> u64 {
    let s = f64::from_le_bytes(sb.try_into().expect("8 bytes"));
    let z = i32::from(z);
    move |q| (f64::from(i32::from(q) - z) * s).to_bits()
}

/// Little-endian unsigned words of the float dtypes (u16, u32, u64).
trait LeWord: Copy + Default + PartialEq {
    const N: usize;
    fn put(self, out: &mut [u8]);
    fn get(b: &[u8]) -> Self;
    /// The low 16 bits (the whole word for u16).
    fn low16(self) -> u16;
}
macro_rules! le_word {
    ($t:ty, $n:expr) => {
        impl LeWord for $t {
            const N: usize = $n;
            #[inline(always)]
            fn put(self, out: &mut [u8]) {
                out[..$n].copy_from_slice(&self.to_le_bytes());
            }
            #[inline(always)]
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..$n].try_into().expect("word"))
            }
            #[inline(always)]
            fn low16(self) -> u16 {
                self as u16
            }
        }
    };
}
le_word!(u16, 2);
le_word!(u32, 4);
le_word!(u64, 8);

/// Runs `body` for every group `g` of a row (`cs`: its codes, `ws`: its bytes in the row of
/// words, split with `chunks` or `chunks_mut`), with `value` giving the dequantized word of a code of that group and `table` a
/// 256-word scratch table, for the row's dtype (`W`: u16, u32 or u64).
macro_rules! per_group {
    ($dtype:expr, $codes:expr, $zero:expr, $scale:expr, $width:expr, $words:expr, $chunks:ident,
     |$g:ident, $cs:ident, $ws:ident, $value:ident, $table:ident : $w:ident| $body:block) => {
        match $dtype {
            Dtype::F16 | Dtype::BF16 => per_group!(@word u16, value16, $dtype, $codes, $zero,
                $scale, $width, $words, $chunks, |$g, $cs, $ws, $value, $table: $w| $body),
            Dtype::F32 => per_group!(@word u32, value32, $dtype, $codes, $zero,
                $scale, $width, $words, $chunks, |$g, $cs, $ws, $value, $table: $w| $body),
            _ => per_group!(@word u64, value64, $dtype, $codes, $zero,
                $scale, $width, $words, $chunks, |$g, $cs, $ws, $value, $table: $w| $body),
        }
    };
    (@word $t:ty, $make:ident, $dtype:expr, $codes:expr, $zero:expr, $scale:expr, $width:expr,
     $words:expr, $chunks:ident,
     |$g:ident, $cs:ident, $ws:ident, $value:ident, $table:ident : $w:ident| $body:block) => {{
        type $w = $t;
        let n = std::mem::size_of::<$w>();
        let width = $width.max(1);
        let mut $table = [0 as $w; 256];
        for ($g, ($cs, $ws)) in $codes.chunks(width).zip($words.$chunks(width * n)).enumerate() {
            let $value = $make($dtype, $zero[$g], &$scale[$g * n..$g * n + n]);
            $body
        }
    }};
}

/// Fills `table[..=hi]` with the group's values when that is cheaper than converting each of
/// its `n` codes; returns whether it did.
#[inline(always)]
fn fill_table<W: LeWord>(table: &mut [W; 256], hi: u8, n: usize, value: impl Fn(u8) -> W) -> bool {
    let hi = usize::from(hi);
    if hi >= n {
        return false;
    }
    for (q, t) in table[..=hi].iter_mut().enumerate() {
        *t = value(q as u8);
    }
    true
}

/// Dequantizes one row: `out[c] = (codes[c] - zero[c / width]) * scale[c / width]`, in the
/// scale dtype with one rounding (F16/BF16: the exact F32 product rounded to nearest-even).
/// Groups are computed through a table of their possible values when that is cheaper than
/// converting every weight.
pub fn dequantize_row(
    dtype: Dtype,
    codes: &[u8],
    zero: &[u8],
    scale: &[u8],
    width: usize,
    out: &mut [u8],
) {
    per_group!(
        dtype,
        codes,
        zero,
        scale,
        width,
        out,
        chunks_mut,
        |g, cs, os, value, table: W| {
            let hi = cs.iter().copied().max().unwrap_or(0);
            #[allow(unused_mut)]
            let mut start = 0;
            #[cfg(target_arch = "x86_64")]
            if W::N == 2 && hi < 16 && cs.len() >= 16 && super::simd_quant::available() {
                let (lo, hb) = simd16_tables(dtype, zero[g], &scale[2 * g..2 * g + 2], hi, &value);
                // SAFETY: the CPU has SSSE3 (checked just above).
                start = unsafe { super::simd_quant::decode16(cs, os, &lo, &hb) };
            }
            let (cs, os) = (&cs[start..], &mut os[start * W::N..]);
            if fill_table(&mut table, hi, cs.len(), &value) {
                for (&q, o) in cs.iter().zip(os.chunks_exact_mut(W::N)) {
                    table[usize::from(q)].put(o);
                }
            } else {
                for (&q, o) in cs.iter().zip(os.chunks_exact_mut(W::N)) {
                    value(q).put(o);
                }
            }
        }
    );
}

/// The shuffle tables of a 16-bit group's values for codes `0..=hi` (`hi < 16`): computed
/// with SIMD for BF16 (`sb`: the scale bits), else code by code.
#[cfg(target_arch = "x86_64")]
#[inline]
fn simd16_tables<W: LeWord>(
    dtype: Dtype,
    z: u8,
    sb: &[u8],
    hi: u8,
    value: impl Fn(u8) -> W,
) -> ([u8; 16], [u8; 16]) {
    if dtype == Dtype::BF16 && super::simd_quant::available_bf16() {
        // SAFETY: the CPU has SSSE3 and SSE4.1 (checked just above).
        return unsafe { super::simd_quant::bf16_tables(z, u16::from_le_bytes([sb[0], sb[1]])) };
    }
    let mut vals = [0u16; 16];
    for (q, v) in vals.iter_mut().enumerate().take(usize::from(hi) + 1) {
        *v = value(q as u8).low16();
    }
    super::simd_quant::tables(&vals)
}

/// What [`check_row`] found in one row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCheck {
    /// Some code of the row is above `qmax`.
    pub out_of_range: bool,
    /// Some weight differs from the dequantized value of its code (codes in range).
    pub mismatch: bool,
    /// Codes that differ from their group's zero point (the kept weights).
    pub kept: u64,
}

/// One pass over a row of weights and their codes: whether every code is at most `qmax` (a
/// power of two minus one), whether every weight is bit for bit the dequantized value of its
/// code ([`dequantize_row`]), and how many codes differ from their zero point.
pub fn check_row(
    dtype: Dtype,
    codes: &[u8],
    zero: &[u8],
    scale: &[u8],
    width: usize,
    qmax: u8,
    weights: &[u8],
) -> RowCheck {
    let mut r = RowCheck::default();
    let mut any = 0u8;
    let qm = usize::from(qmax);
    per_group!(
        dtype,
        codes,
        zero,
        scale,
        width,
        weights,
        chunks,
        |g, cs, ws, value, table: W| {
            let z = zero[g];
            let mut differ = false;
            let mut kept = 0u32;
            #[allow(unused_mut)]
            let mut start = 0;
            #[cfg(target_arch = "x86_64")]
            if W::N == 2 && qmax < 16 && cs.len() >= 16 && super::simd_quant::available() {
                let sb = &scale[2 * g..2 * g + 2];
                let (lo, hb) = simd16_tables(dtype, zero[g], sb, qmax, &value);
                // SAFETY: the CPU has SSSE3 and POPCNT (checked just above).
                let (a, d, k, done) = unsafe { super::simd_quant::check16(cs, ws, &lo, &hb, z) };
                any |= a;
                differ |= d;
                kept += k;
                start = done;
            }
            let (cs, ws) = (&cs[start..], &ws[start * W::N..]);
            if fill_table(&mut table, qmax, cs.len(), &value) {
                for (&q, w) in cs.iter().zip(ws.chunks_exact(W::N)) {
                    any |= q;
                    differ |= table[usize::from(q) & qm] != W::get(w);
                    kept += u32::from(q != z);
                }
            } else {
                for (&q, w) in cs.iter().zip(ws.chunks_exact(W::N)) {
                    any |= q;
                    differ |= value(q) != W::get(w);
                    kept += u32::from(q != z);
                }
            }
            r.mismatch |= differ;
            r.kept += u64::from(kept);
        }
    );
    r.out_of_range = any & !qmax != 0;
    r
}

/// Codes of a row that differ from their group's zero point (`zero[c / width]`).
pub fn count_kept(codes: &[u8], zero: &[u8], width: usize) -> u64 {
    codes
        .chunks(width.max(1))
        .zip(zero)
        .map(|(cg, &z)| cg.iter().map(|&v| u32::from(v != z)).sum::<u32>() as u64)
        .sum()
}

/// Dequantizes rows `rows` of a matrix of `cols` columns from its full codes and zero points
/// (`d`) and its scales (`[rows, groups]` raw bytes) into `out`, rows in parallel.
pub fn dequantize_rows(
    dtype: Dtype,
    d: &super::QuantData,
    scale: &[u8],
    cols: usize,
    rows: std::ops::Range<usize>,
    out: &mut [u8],
) {
    use rayon::prelude::*;
    let n = crate::dtype::itemsize(dtype);
    let g = d.groups.max(1);
    if cols == 0 || rows.is_empty() {
        return;
    }
    let width = cols / g;
    out.par_chunks_mut(cols * n)
        .zip(rows.into_par_iter())
        .with_min_len(super::kernels::rows_per_task(cols, n))
        .for_each(|(o, r)| {
            dequantize_row(
                dtype,
                &d.codes[r * cols..(r + 1) * cols],
                &d.zero[r * g..(r + 1) * g],
                &scale[r * g * n..(r + 1) * g * n],
                width,
                o,
            );
        });
}

/// What [`check_matrix`] found in a matrix.
#[derive(Debug, Clone, Default)]
pub struct MatrixCheck {
    pub out_of_range: bool,
    pub mismatch: bool,
    /// Kept weights (codes that differ from their zero point) per row.
    pub counts: Vec<u64>,
}

/// [`check_row`] of every row of a `rows x cols` matrix of weights and its quantized input,
/// rows in parallel.
pub fn check_matrix(
    dtype: Dtype,
    qi: &QuantInput<'_>,
    rows: usize,
    cols: usize,
    weights: &[u8],
) -> MatrixCheck {
    use rayon::prelude::*;
    let g = qi.groups;
    let n = crate::dtype::itemsize(dtype);
    if rows == 0 || cols == 0 {
        return MatrixCheck {
            counts: vec![0; rows],
            ..MatrixCheck::default()
        };
    }
    let qmax = qi.params.qmax() as u8;
    let width = cols / g.max(1);
    let per_row: Vec<RowCheck> = (0..rows)
        .into_par_iter()
        .with_min_len(super::kernels::rows_per_task(cols, n))
        .map(|r| {
            check_row(
                dtype,
                &qi.codes[r * cols..(r + 1) * cols],
                &qi.zero[r * g..(r + 1) * g],
                &qi.scale[r * g * n..(r + 1) * g * n],
                width,
                qmax,
                &weights[r * cols * n..(r + 1) * cols * n],
            )
        })
        .collect();
    MatrixCheck {
        out_of_range: per_row.iter().any(|c| c.out_of_range),
        mismatch: per_row.iter().any(|c| c.mismatch),
        counts: per_row.iter().map(|c| c.kept).collect(),
    }
}

/// The bit width a stream of `n` fields occupying `nbytes` bytes (aligned to `align` bits)
/// was written with, for error messages (`None` when no width 1..=8 fits).
pub fn bits_of(n: usize, nbytes: usize, align: usize) -> Option<u32> {
    (1..=8).find(|&b| stream_bytes(n, b, align) == nbytes)
}

/// "is N-bit data" / "is not data of any bit width" for error messages.
pub fn describe_bits(n: usize, nbytes: usize, align: usize) -> String {
    match bits_of(n, nbytes, align) {
        Some(b) => format!("is {b}-bit data"),
        None => "fits no bit width".into(),
    }
}

/// The checkpoint's scheme, required by a quantized codec.
pub fn require(quant: Option<QuantParams>, format: &str) -> Result<QuantParams> {
    let Some(q) = quant else {
        bail!(
            format,
            "{format} data needs config.json's quantization_config (num_bits, group_size)"
        );
    };
    ensure!(
        (1..=8).contains(&q.bits),
        format,
        "num_bits = {} is not supported (1..8)",
        q.bits
    );
    Ok(q)
}

/// Checks the `weight_scale` part (float `[rows, groups]`) against the scheme; returns its
/// dtype and the groups per row.
pub fn check_scale_part(
    rows: usize,
    cols: usize,
    info: &super::PartInfo<'_>,
    q: QuantParams,
) -> Result<(Dtype, usize)> {
    check_scale_dtype(info.dtype)?;
    ensure!(
        info.shape.len() == 2 && info.shape[0] == rows && info.shape[1] >= 1,
        format,
        "weight_scale has shape {:?}, expected [{rows}, groups]",
        info.shape
    );
    let have = info.shape[1];
    let want = q.groups(cols).map_err(|e| {
        crate::Error::format(format!(
            "config.json says group_size = {}, but {}",
            q.group_size, e.message
        ))
    })?;
    if have != want {
        let is = if cols % have == 0 {
            format!("is groups of {}", cols / have)
        } else {
            "fits no group size".into()
        };
        bail!(
            format,
            "weight_scale: shape {:?} {is}, but config.json says group_size = {} (expects [{rows}, {want}])",
            info.shape,
            q.group_size
        );
    }
    Ok((info.dtype, want))
}
