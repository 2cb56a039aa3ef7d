//! besa-rs "bitmask-quantized": `shape` (I64 `[2]`), `bitmask` (U8 `[rows, ceil(cols/8)]`,
//! bit set = code differs from its group's zero point, as the bitmask format), `codes` (U8,
//! the N-bit codes of the set bits in row-major order as one LSB-first stream),
//! `weight_scale` (float `[rows, groups]`), `weight_zero_point` (U8, the `[rows, groups]` zero
//! points row-major as one N-bit stream). Canonical: padding bits zero, no stored code equal
//! to its zero point, scales finite and positive.

use std::ops::Range;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::bitmask::check_bitmask_part;
use super::kernels::{bitmask_row_counts, prefix_offsets, rows_per_task, split_lengths};
use super::nbit::{self, QuantParams};
use super::{bitmask_row_bytes, write_shape, Codec, Layout, Matrix};
use super::{PartInfo, PartSpec, QuantData, Stored};
use crate::dtype::name as dtype_name;
use crate::error::Result;
use crate::{bail, ensure};

pub struct BitmaskQuantized;

const NAME: &str = "bitmask-quantized";

fn params(s: &Stored<'_>) -> Result<(QuantParams, usize)> {
    let q = nbit::require(s.quant, NAME)?;
    let groups = s.parts[3].len() / (s.rows.max(1) * s.itemsize);
    Ok((q, groups.max(1)))
}

/// Whether bit `c` of a bitmask row is set.
#[inline]
fn bit(row: &[u8], c: usize) -> bool {
    row[c / 8] >> (c % 8) & 1 == 1
}

/// The full codes of row `r` (clear bits: the group's zero point `zero[c / width]`) from its
/// stored codes, the first of which is field `first` of the stream. Returns whether a stored
/// code equals its group's zero point (not canonical).
fn row_codes(
    s: &Stored<'_>,
    bits: u32,
    zero: &[u8],
    r: usize,
    first: usize,
    stored: &mut Vec<u8>,
    out: &mut [u8],
) -> bool {
    let width = s.cols / zero.len().max(1);
    let wb = bitmask_row_bytes(s.cols);
    let mrow = &s.parts[1][r * wb..(r + 1) * wb];
    let n = mrow.iter().map(|b| b.count_ones() as usize).sum::<usize>();
    // spare fields: the branch-free loop below may read one past the last code, the SIMD one
    // loads 16 bytes from the next code
    stored.resize(n + 16, 0);
    nbit::unpack_stream(s.parts[2], bits, first, &mut stored[..n]);
    #[cfg(target_arch = "x86_64")]
    if width % 8 == 0 && width > 0 && super::simd_quant::available() {
        // SAFETY: the CPU has SSSE3 (checked just above); `stored` has 16 spare bytes.
        return unsafe { super::simd_quant::expand_row(mrow, stored, zero, width, out) };
    }
    let mut k = 0;
    let mut equal = false;
    for (g, og) in out.chunks_mut(width.max(1)).enumerate() {
        let zg = zero[g];
        for (j, o) in og.iter_mut().enumerate() {
            let c = g * width + j;
            let b = (mrow[c / 8] >> (c % 8)) & 1;
            let v = stored[k];
            equal |= (b == 1) & (v == zg);
            *o = if b == 1 { v } else { zg };
            k += b as usize;
        }
    }
    equal
}

/// Encodes one row: its bitmask bytes (`mrow`, bit set = code differs from its group's zero
/// point) and its kept codes compacted into `tmp` (`cols + 16` bytes: the branch-free loops
/// write past the last kept code); `keep` is `cols` bytes of scratch. Returns the number of
/// kept codes.
fn encode_row(
    codes: &[u8],
    zero: &[u8],
    width: usize,
    keep: &mut [u8],
    tmp: &mut [u8],
    mrow: &mut [u8],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if width % 8 == 0 && width > 0 && super::simd_quant::available() {
        // SAFETY: the CPU has SSSE3 and POPCNT (checked just above); `tmp` has `cols + 16`
        // bytes.
        return unsafe { super::simd_quant::compress_row(codes, zero, width, mrow, tmp) };
    }
    let mut k = 0usize;
    for ((cg, kg), &zg) in codes
        .chunks(width.max(1))
        .zip(keep.chunks_mut(width.max(1)))
        .zip(zero)
    {
        for (&v, kb) in cg.iter().zip(kg.iter_mut()) {
            *kb = u8::from(v != zg);
            tmp[k] = v;
            k += usize::from(*kb);
        }
    }
    // eight 0/1 bytes -> one mask byte, LSB first (each byte lands on its own bit of the top
    // byte of the product, without carries)
    let mut eights = keep.chunks_exact(8);
    for (m, k8) in mrow.iter_mut().zip(&mut eights) {
        let x = u64::from_le_bytes(k8.try_into().expect("8 bytes"));
        *m = (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8;
    }
    let rest = eights.remainder();
    if !rest.is_empty() {
        let last = mrow.last_mut().expect("a byte for the last columns");
        *last = rest
            .iter()
            .enumerate()
            .fold(0u8, |acc, (j, &b)| acc | (b << j));
    }
    k
}

impl Codec for BitmaskQuantized {
    fn name(&self) -> &'static str {
        NAME
    }
    fn config_name(&self) -> &'static str {
        NAME
    }
    fn config_method(&self) -> (&'static str, &'static str) {
        ("besa-rs", "unstructured")
    }
    fn parts(&self) -> &'static [&'static str] {
        &[
            "shape",
            "bitmask",
            "codes",
            "weight_scale",
            "weight_zero_point",
        ]
    }
    fn is_quantized(&self) -> bool {
        true
    }
    fn anchor(&self) -> &'static str {
        "codes"
    }
    fn values_part(&self) -> usize {
        2
    }

    fn check_layout(
        &self,
        rows: usize,
        cols: usize,
        parts: &[PartInfo<'_>],
        quant: Option<QuantParams>,
    ) -> Result<Layout> {
        let [_, mask, codes, scale, zp] = parts else {
            bail!(format, "{NAME} module needs 5 parts, found {}", parts.len());
        };
        let q = nbit::require(quant, NAME)?;
        check_bitmask_part(rows, cols, mask)?;
        ensure!(
            codes.dtype == Dtype::U8 && codes.shape.len() == 1,
            format,
            "codes is {} {:?}, expected U8 1-D",
            dtype_name(codes.dtype),
            codes.shape
        );
        let (dtype, groups) = nbit::check_scale_part(rows, cols, scale, q)?;
        let want = nbit::stream_bytes(rows * groups, q.bits, 8);
        ensure!(
            zp.dtype == Dtype::U8 && zp.shape.len() == 1,
            format,
            "weight_zero_point is {} {:?}, expected U8 [{want}]",
            dtype_name(zp.dtype),
            zp.shape
        );
        if zp.shape[0] != want {
            bail!(
                format,
                "weight_zero_point: {} bytes {}, but config.json says num_bits = {} (expects {want})",
                zp.shape[0],
                nbit::describe_bits(rows * groups, zp.shape[0], 8),
                q.bits
            );
        }
        ensure!(
            codes.shape[0] <= nbit::stream_bytes(rows * cols, q.bits, 8),
            format,
            "codes holds {} bytes, more than {rows} x {cols} {}-bit codes",
            codes.shape[0],
            q.bits
        );
        Ok(Layout {
            dtype,
            nnz: (codes.shape[0] * 8 / q.bits as usize).min(rows * cols),
        })
    }

    fn plan(
        &self,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        nnz: usize,
        quant: Option<QuantParams>,
    ) -> Vec<PartSpec> {
        let q = quant.expect("bitmask-quantized is planned with quantization parameters");
        let groups = q.groups(cols).unwrap_or(1);
        vec![
            PartSpec {
                suffix: "shape",
                dtype: Dtype::I64,
                shape: vec![2],
            },
            PartSpec {
                suffix: "bitmask",
                dtype: Dtype::U8,
                shape: vec![rows, bitmask_row_bytes(cols)],
            },
            PartSpec {
                suffix: "codes",
                dtype: Dtype::U8,
                shape: vec![nbit::stream_bytes(nnz, q.bits, 8)],
            },
            PartSpec {
                suffix: "weight_scale",
                dtype,
                shape: vec![rows, groups],
            },
            PartSpec {
                suffix: "weight_zero_point",
                dtype: Dtype::U8,
                shape: vec![nbit::stream_bytes(rows * groups, q.bits, 8)],
            },
        ]
    }

    fn encode(&self, m: Matrix<'_>, counts: &[u64], out: &mut [&mut [u8]]) -> Result<()> {
        let [shape, mask, codes, scale, zp] = out else {
            bail!(shape, "{NAME} encode needs 5 output parts");
        };
        let Some(qi) = m.quant else {
            bail!(
                format,
                "{NAME} needs the matrix's codes, scales and zero points"
            );
        };
        let bits = qi.params.bits;
        write_shape(shape, m.rows, m.cols);
        scale.copy_from_slice(qi.scale);
        nbit::pack_stream(qi.zero, bits, zp);
        let nnz: u64 = counts.iter().sum();
        ensure!(
            counts.len() == m.rows && codes.len() == nbit::stream_bytes(nnz as usize, bits, 8),
            shape,
            "{NAME} encode: the codes part does not match the counts"
        );
        if m.cols == 0 || m.rows == 0 {
            mask.fill(0);
            codes.fill(0);
            return Ok(());
        }
        // rows in tasks: each writes its rows' bitmask bytes and compacts their kept codes into
        // its own piece of `kept` (counts from the side file, checked by pack)
        let width = m.cols / qi.groups.max(1);
        let wb = bitmask_row_bytes(m.cols);
        let rpt = rows_per_task(m.cols, 1);
        let mut kept = vec![0u8; nnz as usize];
        let pieces = split_lengths(
            &mut kept[..],
            counts.chunks(rpt).map(|c| c.iter().sum::<u64>() as usize),
        );
        mask.par_chunks_mut(rpt * wb)
            .zip(qi.codes.par_chunks(rpt * m.cols))
            .zip(qi.zero.par_chunks(rpt * qi.groups))
            .zip(pieces.into_par_iter())
            .try_for_each_init(
                || (vec![0u8; m.cols], vec![0u8; m.cols + 16]),
                |(keep, tmp), (((mrows, crows), zrows), piece)| {
                    let mut at = 0;
                    for ((mrow, c), z) in mrows
                        .chunks_mut(wb)
                        .zip(crows.chunks(m.cols))
                        .zip(zrows.chunks(qi.groups))
                    {
                        let k = encode_row(c, z, width, keep, tmp, mrow);
                        ensure!(
                            at + k <= piece.len(),
                            shape,
                            "{NAME} encode: a row keeps more codes than its count"
                        );
                        piece[at..at + k].copy_from_slice(&tmp[..k]);
                        at += k;
                    }
                    ensure!(
                        at == piece.len(),
                        shape,
                        "{NAME} encode: the rows keep fewer codes than their counts"
                    );
                    Ok(())
                },
            )?;
        // eight fields are `bits` whole bytes: the stream is packed in parallel pieces
        const FIELDS: usize = 1 << 16;
        codes
            .par_chunks_mut(FIELDS / 8 * bits as usize)
            .zip(kept.par_chunks(FIELDS))
            .for_each(|(o, v)| nbit::pack_stream(v, bits, o));
        Ok(())
    }

    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>> {
        self.validate_quant(s).map(|(counts, _)| counts)
    }

    fn validate_quant(&self, s: &Stored<'_>) -> Result<(Vec<u64>, QuantData)> {
        let (q, groups) = params(s)?;
        let counts = bitmask_row_counts(s.parts[1], s.rows, s.cols)?;
        let nnz: u64 = counts.iter().sum();
        let want = nbit::stream_bytes(nnz as usize, q.bits, 8);
        if s.parts[2].len() != want {
            bail!(
                format,
                "codes: {} bytes {}, but the bitmask keeps {nnz} weights and config.json says num_bits = {} (expects {want})",
                s.parts[2].len(),
                nbit::describe_bits(nnz as usize, s.parts[2].len(), 8),
                q.bits
            );
        }
        nbit::check_padding(s.parts[2], q.bits, nnz as usize, "codes")?;
        nbit::check_padding(s.parts[4], q.bits, s.rows * groups, "weight_zero_point")?;
        nbit::check_scales(s.dtype, s.parts[3])?;
        let mut zero = vec![0u8; s.rows * groups];
        nbit::unpack_stream(s.parts[4], q.bits, 0, &mut zero);
        let (offs, _) = prefix_offsets(&counts);
        let width = s.cols / groups;
        let wb = bitmask_row_bytes(s.cols);
        let mut codes = vec![0u8; s.rows * s.cols];
        if s.cols > 0 {
            codes
                .par_chunks_mut(s.cols)
                .enumerate()
                .with_min_len(rows_per_task(s.cols, 1))
                .try_for_each_init(Vec::new, |stored, (r, c)| {
                    let z = &zero[r * groups..(r + 1) * groups];
                    if !row_codes(s, q.bits, z, r, offs[r] as usize, stored, c) {
                        return Ok(());
                    }
                    let mrow = &s.parts[1][r * wb..(r + 1) * wb];
                    // a stored code equal to its zero point: bit set and code == zero
                    for (g, cg) in c.chunks(width.max(1)).enumerate() {
                        let bad = cg.iter().enumerate().position(|(j, &v)| {
                            let col = g * width + j;
                            bit(mrow, col) && v == z[g]
                        });
                        if let Some(j) = bad {
                            bail!(
                                format,
                                "codes: the stored code of [{r}, {}] equals its zero point {} (its bitmask bit must be clear)",
                                g * width + j,
                                z[g]
                            );
                        }
                    }
                    Ok(())
                })?;
        }
        let d = QuantData {
            codes,
            zero,
            scale_part: 3,
            groups,
        };
        Ok((counts, d))
    }

    fn decode(
        &self,
        s: &Stored<'_>,
        counts: &[u64],
        rows: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        let (q, groups) = params(s)?;
        if s.cols == 0 || rows.is_empty() {
            return Ok(());
        }
        let mut zero = vec![0u8; s.rows * groups];
        nbit::unpack_stream(s.parts[4], q.bits, 0, &mut zero);
        let (offs, _) = prefix_offsets(counts);
        let width = s.cols / groups;
        let sb = groups * s.itemsize;
        out.par_chunks_mut(s.cols * s.itemsize)
            .zip(rows.into_par_iter())
            .for_each_init(
                || (Vec::new(), vec![0u8; s.cols]),
                |(stored, codes), (o, r)| {
                    let z = &zero[r * groups..(r + 1) * groups];
                    let _ = row_codes(s, q.bits, z, r, offs[r] as usize, stored, codes);
                    let sc = &s.parts[3][r * sb..(r + 1) * sb];
                    nbit::dequantize_row(s.dtype, codes, z, sc, width, o);
                },
            );
        Ok(())
    }

    fn keep_mask(&self, s: &Stored<'_>, _counts: &[u64], out: &mut [u8]) -> Result<()> {
        let wb = bitmask_row_bytes(s.cols);
        for (o, mrow) in out
            .chunks_mut(s.cols.max(1))
            .zip(s.parts[1].chunks(wb.max(1)))
        {
            for (c, o) in o.iter_mut().enumerate() {
                *o = u8::from(bit(mrow, c));
            }
        }
        Ok(())
    }

    fn quant_data(&self, s: &Stored<'_>, counts: &[u64]) -> Result<QuantData> {
        let (q, groups) = params(s)?;
        let own;
        let counts = if counts.len() == s.rows {
            counts
        } else {
            own = bitmask_row_counts(s.parts[1], s.rows, s.cols)?;
            &own
        };
        let mut zero = vec![0u8; s.rows * groups];
        nbit::unpack_stream(s.parts[4], q.bits, 0, &mut zero);
        let (offs, _) = prefix_offsets(counts);
        let mut codes = vec![0u8; s.rows * s.cols];
        if s.cols > 0 {
            codes
                .par_chunks_mut(s.cols)
                .enumerate()
                .for_each_init(Vec::new, |stored, (r, c)| {
                    let z = &zero[r * groups..(r + 1) * groups];
                    let _ = row_codes(s, q.bits, z, r, offs[r] as usize, stored, c);
                });
        }
        Ok(QuantData {
            codes,
            zero,
            scale_part: 3,
            groups,
        })
    }
}
