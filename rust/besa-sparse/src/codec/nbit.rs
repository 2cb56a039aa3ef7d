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
/// (padding) is zeroed. Values must be < 2^bits.
pub fn pack_stream(values: impl IntoIterator<Item = u8>, bits: u32, out: &mut [u8]) {
    if bits == 8 || bits == 4 {
        let mut pos = 0usize;
        let mut it = values.into_iter();
        if bits == 8 {
            for v in it {
                out[pos] = v;
                pos += 1;
            }
        } else {
            while let Some(lo) = it.next() {
                out[pos] = lo | it.next().map_or(0, |hi| hi << 4);
                pos += 1;
            }
        }
        out[pos..].fill(0);
        return;
    }
    let mut acc: u64 = 0;
    let mut nacc = 0u32;
    let mut pos = 0usize;
    for v in values {
        acc |= u64::from(v) << nacc;
        nacc += bits;
        while nacc >= 8 {
            out[pos] = acc as u8;
            pos += 1;
            acc >>= 8;
            nacc -= 8;
        }
    }
    if nacc > 0 {
        out[pos] = acc as u8;
        pos += 1;
    }
    out[pos..].fill(0);
}

/// Field `i` of an LSB-first stream of `bits`-bit fields (the caller checked the length).
#[inline]
pub fn field(data: &[u8], bits: u32, i: usize) -> u8 {
    let off = i * bits as usize;
    let b = off / 8;
    let lo = u16::from(data[b]);
    let hi = data.get(b + 1).map_or(0, |&x| u16::from(x));
    (((lo | (hi << 8)) >> (off % 8)) & ((1u16 << bits) - 1)) as u8
}

/// Fields `start .. start + out.len()` of a stream into `out`.
pub fn unpack_stream(data: &[u8], bits: u32, start: usize, out: &mut [u8]) {
    if bits == 8 {
        out.copy_from_slice(&data[start..start + out.len()]);
        return;
    }
    if bits == 4 && start % 2 == 1 && !out.is_empty() {
        out[0] = data[start / 2] >> 4;
        unpack_stream(data, bits, start + 1, &mut out[1..]);
        return;
    }
    if bits == 4 {
        let src = &data[start / 2..];
        let half_len = out.len() / 2;
        let mut pairs = out.chunks_exact_mut(2);
        for (o, &b) in (&mut pairs).zip(src) {
            o[0] = b & 15;
            o[1] = b >> 4;
        }
        let rest = pairs.into_remainder();
        if let Some(o) = rest.first_mut() {
            *o = src[half_len] & 15;
        }
        return;
    }
    let mask = (1u64 << bits) - 1;
    let off = start * bits as usize;
    let mut acc: u64 = 0;
    let mut nacc = 0u32;
    let mut pos = off / 8;
    if off % 8 != 0 {
        acc = u64::from(data[pos]) >> (off % 8);
        nacc = 8 - (off % 8) as u32;
        pos += 1;
    }
    for o in out.iter_mut() {
        while nacc < bits {
            acc |= u64::from(data.get(pos).copied().unwrap_or(0)) << nacc;
            pos += 1;
            nacc += 8;
        }
        *o = (acc & mask) as u8;
        acc >>= bits;
        nacc -= bits;
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

/// Dequantizes one row: `out[c] = (codes[c] - zero[c / width]) * scale[c / width]`, in the
/// scale dtype with one rounding (F16/BF16: the exact F32 product rounded to nearest-even).
/// Groups are computed through a table of their (at most 256) possible values when that is
/// cheaper than converting every weight.
pub fn dequantize_row(
    dtype: Dtype,
    codes: &[u8],
    zero: &[u8],
    scale: &[u8],
    width: usize,
    out: &mut [u8],
) {
    let n = crate::dtype::itemsize(dtype);
    for (g, (cs, os)) in codes
        .chunks(width)
        .zip(out.chunks_mut(width * n))
        .enumerate()
    {
        let z = i32::from(zero[g]);
        let sb = &scale[g * n..(g + 1) * n];
        match dtype {
            Dtype::F16 | Dtype::BF16 => {
                let s = scale_f64(dtype, sb) as f32;
                let one = |q: u8| -> u16 {
                    let p = (i32::from(q) - z) as f32 * s;
                    if dtype == Dtype::F16 {
                        f16::from_f32(p).to_bits()
                    } else {
                        bf16::from_f32(p).to_bits()
                    }
                };
                group_through_table(cs, os, one);
            }
            Dtype::F32 => {
                let s = f32::from_le_bytes(sb.try_into().expect("4 bytes"));
                group_through_table(cs, os, |q| ((i32::from(q) - z) as f32 * s).to_bits());
            }
            _ => {
                let s = f64::from_le_bytes(sb.try_into().expect("8 bytes"));
                for (&q, o) in cs.iter().zip(os.chunks_exact_mut(8)) {
                    o.copy_from_slice(&(f64::from(i32::from(q) - z) * s).to_le_bytes());
                }
            }
        }
    }
}

/// Little-endian bytes of an unsigned word (u16 or u32).
trait LeWord: Copy + Default {
    const N: usize;
    fn put(self, out: &mut [u8]);
}
impl LeWord for u16 {
    const N: usize = 2;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}
impl LeWord for u32 {
    const N: usize = 4;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

/// Writes `value(q)` of every code of a group, through a table of the codes' values when the
/// group is wider than the range of its codes.
fn group_through_table<W: LeWord>(cs: &[u8], os: &mut [u8], value: impl Fn(u8) -> W) {
    let hi = cs.iter().copied().max().unwrap_or(0) as usize;
    if hi < cs.len() {
        let mut table = [W::default(); 256];
        for (q, t) in table.iter_mut().enumerate().take(hi + 1) {
            *t = value(q as u8);
        }
        for (&q, o) in cs.iter().zip(os.chunks_exact_mut(W::N)) {
            table[q as usize].put(o);
        }
    } else {
        for (&q, o) in cs.iter().zip(os.chunks_exact_mut(W::N)) {
            value(q).put(o);
        }
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
