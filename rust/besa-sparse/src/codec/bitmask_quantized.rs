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
use super::kernels::{bitmask_row_counts, prefix_offsets};
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
    // one spare field so that the branch-free loop below may read one past the last code
    stored.resize(n + 1, 0);
    nbit::unpack_stream(s.parts[2], bits, first, &mut stored[..n]);
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

    fn encode(&self, m: Matrix<'_>, _counts: &[u64], out: &mut [&mut [u8]]) -> Result<()> {
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
        let width = m.cols / qi.groups.max(1);
        let wb = bitmask_row_bytes(m.cols);
        mask.fill(0);
        if m.cols > 0 {
            mask.par_chunks_mut(wb)
                .zip(qi.codes.par_chunks(m.cols))
                .zip(qi.zero.par_chunks(qi.groups))
                .for_each(|((o, c), z)| {
                    for (g, (cg, &zg)) in c.chunks(width.max(1)).zip(z).enumerate() {
                        for (j, &v) in cg.iter().enumerate() {
                            let c = g * width + j;
                            o[c / 8] |= u8::from(v != zg) << (c % 8);
                        }
                    }
                });
        }
        // the kept codes, compacted without branches (one spare slot for the last write)
        let mut kept = vec![0u8; qi.codes.len() + 1];
        let mut k = 0usize;
        if m.cols > 0 {
            for (c, z) in qi.codes.chunks(m.cols).zip(qi.zero.chunks(qi.groups)) {
                for (cg, &zg) in c.chunks(width.max(1)).zip(z) {
                    for &v in cg {
                        kept[k] = v;
                        k += usize::from(v != zg);
                    }
                }
            }
        }
        kept.truncate(k);
        nbit::pack_stream(kept, bits, codes);
        scale.copy_from_slice(qi.scale);
        nbit::pack_stream(qi.zero.iter().copied(), bits, zp);
        Ok(())
    }

    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>> {
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
        (0..s.rows).into_par_iter().try_for_each_init(
            || (Vec::new(), vec![0u8; s.cols]),
            |(stored, codes), r| {
                let z = &zero[r * groups..(r + 1) * groups];
                if !row_codes(s, q.bits, z, r, offs[r] as usize, stored, codes) {
                    return Ok(());
                }
                let mrow = &s.parts[1][r * wb..(r + 1) * wb];
                // a stored code equal to its zero point: bit set and code == zero
                for (g, cg) in codes.chunks(width.max(1)).enumerate() {
                    let bad = cg.iter().enumerate().position(|(j, &v)| {
                        let c = g * width + j;
                        (mrow[c / 8] >> (c % 8)) & 1 == 1 && v == z[g]
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
            },
        )?;
        Ok(counts)
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
