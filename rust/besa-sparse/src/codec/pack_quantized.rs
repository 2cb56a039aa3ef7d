//! compressed-tensors "pack-quantized" (0.20.1 layout): `weight_packed` (I32 `[rows,
//! ceil(cols N / 32)]`, each row the N-bit codes as one LSB-first stream), `weight_scale`
//! (float `[rows, groups]`), `weight_zero_point` (I32 `[ceil(rows N / 32), groups]`, each
//! column the N-bit zero points of the rows as one stream), `weight_shape` (I64 `[2]`).
//! Codes and zero points are stored unsigned (compressed-tensors' signed values plus
//! 2^(N-1)).

use std::ops::Range;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::nbit::{self, QuantParams};
use super::{write_shape, Codec, Layout, Matrix, PartInfo, PartSpec};
use super::{QuantData, Stored};
use crate::dtype::name as dtype_name;
use crate::error::Result;
use crate::{bail, ensure};

pub struct PackQuantized;

const NAME: &str = "pack-quantized";

/// Int32 words of one row of `n` fields.
fn words(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// The zero points `[rows, groups]` from the column streams of `weight_zero_point`, each
/// stream's padding checked.
fn zero_matrix(zp: &[u8], rows: usize, groups: usize, bits: u32) -> Result<Vec<u8>> {
    let wz = words(rows, bits);
    let mut col = vec![0u8; wz * 4];
    let mut out = vec![0u8; rows * groups];
    let mut vals = vec![0u8; rows];
    for k in 0..groups {
        for w in 0..wz {
            let at = (w * groups + k) * 4;
            col[w * 4..w * 4 + 4].copy_from_slice(&zp[at..at + 4]);
        }
        nbit::check_padding(&col, bits, rows, "weight_zero_point")?;
        nbit::unpack_stream(&col, bits, 0, &mut vals);
        for (r, &v) in vals.iter().enumerate() {
            out[r * groups + k] = v;
        }
    }
    Ok(out)
}

fn params(s: &Stored<'_>) -> Result<(QuantParams, usize)> {
    let q = nbit::require(s.quant, NAME)?;
    let groups = s.parts[1].len() / (s.rows.max(1) * s.itemsize);
    Ok((q, groups.max(1)))
}

impl Codec for PackQuantized {
    fn name(&self) -> &'static str {
        NAME
    }
    fn config_name(&self) -> &'static str {
        NAME
    }
    fn config_method(&self) -> (&'static str, &'static str) {
        ("compressed-tensors", "unstructured")
    }
    fn parts(&self) -> &'static [&'static str] {
        &[
            "weight_packed",
            "weight_scale",
            "weight_zero_point",
            "weight_shape",
        ]
    }
    fn shape_part(&self) -> usize {
        3
    }
    fn is_quantized(&self) -> bool {
        true
    }
    fn anchor(&self) -> &'static str {
        "weight_packed"
    }
    fn values_part(&self) -> usize {
        0
    }

    fn check_layout(
        &self,
        rows: usize,
        cols: usize,
        parts: &[PartInfo<'_>],
        quant: Option<QuantParams>,
    ) -> Result<Layout> {
        let [packed, scale, zp, _] = parts else {
            bail!(format, "{NAME} module needs 4 parts, found {}", parts.len());
        };
        let q = nbit::require(quant, NAME)?;
        let wr = words(cols, q.bits);
        ensure!(
            packed.dtype == Dtype::I32 && packed.shape.len() == 2 && packed.shape[0] == rows,
            format,
            "weight_packed is {} {:?}, expected I32 [{rows}, {wr}]",
            dtype_name(packed.dtype),
            packed.shape
        );
        if packed.shape[1] != wr {
            bail!(
                format,
                "weight_packed: shape {:?} {}, but config.json says num_bits = {} (expects [{rows}, {wr}])",
                packed.shape,
                nbit::describe_bits(cols, packed.shape[1] * 4, 32),
                q.bits
            );
        }
        let (dtype, groups) = nbit::check_scale_part(rows, cols, scale, q)?;
        let wz = words(rows, q.bits);
        ensure!(
            zp.dtype == Dtype::I32 && zp.shape.len() == 2 && zp.shape[1] == groups,
            format,
            "weight_zero_point is {} {:?}, expected I32 [{wz}, {groups}]",
            dtype_name(zp.dtype),
            zp.shape
        );
        if zp.shape[0] != wz {
            bail!(
                format,
                "weight_zero_point: shape {:?} {}, but config.json says num_bits = {} (expects [{wz}, {groups}])",
                zp.shape,
                nbit::describe_bits(rows, zp.shape[0] * 4, 32),
                q.bits
            );
        }
        Ok(Layout {
            dtype,
            nnz: rows * cols,
        })
    }

    fn plan(
        &self,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        _nnz: usize,
        quant: Option<QuantParams>,
    ) -> Vec<PartSpec> {
        let q = quant.expect("pack-quantized is planned with quantization parameters");
        let groups = q.groups(cols).unwrap_or(1);
        vec![
            PartSpec {
                suffix: "weight_packed",
                dtype: Dtype::I32,
                shape: vec![rows, words(cols, q.bits)],
            },
            PartSpec {
                suffix: "weight_scale",
                dtype,
                shape: vec![rows, groups],
            },
            PartSpec {
                suffix: "weight_zero_point",
                dtype: Dtype::I32,
                shape: vec![words(rows, q.bits), groups],
            },
            PartSpec {
                suffix: "weight_shape",
                dtype: Dtype::I64,
                shape: vec![2],
            },
        ]
    }

    fn encode(&self, m: Matrix<'_>, _counts: &[u64], out: &mut [&mut [u8]]) -> Result<()> {
        let [packed, scale, zp, shape] = out else {
            bail!(shape, "{NAME} encode needs 4 output parts");
        };
        let Some(qi) = m.quant else {
            bail!(
                format,
                "{NAME} needs the matrix's codes, scales and zero points"
            );
        };
        let bits = qi.params.bits;
        let rb = words(m.cols, bits) * 4;
        if m.cols > 0 {
            packed
                .par_chunks_mut(rb)
                .zip(qi.codes.par_chunks(m.cols))
                .for_each(|(o, c)| nbit::pack_stream(c, bits, o));
        } else {
            packed.fill(0);
        }
        scale.copy_from_slice(qi.scale);
        let wz = words(m.rows, bits);
        let mut col = vec![0u8; wz * 4];
        let mut vals = vec![0u8; m.rows];
        for k in 0..qi.groups {
            for (r, v) in vals.iter_mut().enumerate() {
                *v = qi.zero[r * qi.groups + k];
            }
            nbit::pack_stream(&vals, bits, &mut col);
            for w in 0..wz {
                let at = (w * qi.groups + k) * 4;
                zp[at..at + 4].copy_from_slice(&col[w * 4..w * 4 + 4]);
            }
        }
        write_shape(shape, m.rows, m.cols);
        Ok(())
    }

    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>> {
        self.validate_quant(s).map(|(counts, _)| counts)
    }

    fn validate_quant(&self, s: &Stored<'_>) -> Result<(Vec<u64>, QuantData)> {
        let (q, groups) = params(s)?;
        nbit::check_scales(s.dtype, s.parts[1])?;
        let zero = zero_matrix(s.parts[2], s.rows, groups, q.bits)?;
        let rb = words(s.cols, q.bits) * 4;
        let width = s.cols / groups;
        let mut codes = vec![0u8; s.rows * s.cols];
        let counts = if s.cols == 0 {
            vec![0; s.rows]
        } else {
            codes
                .par_chunks_mut(s.cols)
                .zip(s.parts[0].par_chunks(rb))
                .zip(zero.par_chunks(groups))
                .map(|((c, row), z)| {
                    nbit::check_padding(row, q.bits, s.cols, "weight_packed")?;
                    nbit::unpack_stream(row, q.bits, 0, c);
                    Ok(nbit::count_kept(c, z, width))
                })
                .collect::<Result<Vec<u64>>>()?
        };
        let d = QuantData {
            codes,
            zero,
            scale_part: 1,
            groups,
        };
        Ok((counts, d))
    }

    fn decode(
        &self,
        s: &Stored<'_>,
        _counts: &[u64],
        rows: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        let (q, groups) = params(s)?;
        if s.cols == 0 || rows.is_empty() {
            return Ok(());
        }
        let zero = zero_matrix(s.parts[2], s.rows, groups, q.bits)?;
        let rb = words(s.cols, q.bits) * 4;
        let width = s.cols / groups;
        let dtype = s.dtype;
        let sb = groups * s.itemsize;
        out.par_chunks_mut(s.cols * s.itemsize)
            .zip(rows.into_par_iter())
            .for_each_init(
                || vec![0u8; s.cols],
                |codes, (o, r)| {
                    nbit::unpack_stream(&s.parts[0][r * rb..(r + 1) * rb], q.bits, 0, codes);
                    let z = &zero[r * groups..(r + 1) * groups];
                    let sc = &s.parts[1][r * sb..(r + 1) * sb];
                    nbit::dequantize_row(dtype, codes, z, sc, width, o);
                },
            );
        Ok(())
    }

    fn keep_mask(&self, s: &Stored<'_>, _counts: &[u64], out: &mut [u8]) -> Result<()> {
        let d = self.quant_data(s, _counts)?;
        let width = s.cols / d.groups.max(1);
        for (r, (o, c)) in out
            .chunks_mut(s.cols.max(1))
            .zip(d.codes.chunks(s.cols.max(1)))
            .enumerate()
        {
            let z = &d.zero[r * d.groups..(r + 1) * d.groups];
            for ((og, cg), &zg) in o
                .chunks_mut(width.max(1))
                .zip(c.chunks(width.max(1)))
                .zip(z)
            {
                for (o, &v) in og.iter_mut().zip(cg) {
                    *o = u8::from(v != zg);
                }
            }
        }
        Ok(())
    }

    fn quant_data(&self, s: &Stored<'_>, _counts: &[u64]) -> Result<QuantData> {
        let (q, groups) = params(s)?;
        let zero = zero_matrix(s.parts[2], s.rows, groups, q.bits)?;
        let mut codes = vec![0u8; s.rows * s.cols];
        let rb = words(s.cols, q.bits) * 4;
        if s.cols > 0 {
            codes
                .par_chunks_mut(s.cols)
                .zip(s.parts[0].par_chunks(rb))
                .for_each(|(c, row)| nbit::unpack_stream(row, q.bits, 0, c));
        }
        Ok(QuantData {
            codes,
            zero,
            scale_part: 1,
            groups,
        })
    }
}
