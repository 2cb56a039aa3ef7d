//! compressed-tensors "sparse-bitmask": `shape` (I64 [2]), `compressed` (the kept values in
//! row-major order, 1-D), `bitmask` (U8 [rows, ceil(cols/8)], bit j of byte b of a row is
//! column 8b + j, LSB first, padding bits clear), `row_offsets` (I64 [rows], kept values
//! before each row).

use std::ops::Range;

use safetensors::tensor::Dtype;

use super::kernels::prefix_offsets;
use super::kernels::{bitmask_decode, bitmask_encode, bitmask_keep_mask, bitmask_row_counts};
use super::{bitmask_row_bytes, write_shape, Codec, Layout, Matrix};
use super::{PartInfo, PartSpec, Stored};
use crate::dtype::name as dtype_name;
use crate::error::Result;
use crate::{bail, ensure};

pub struct Bitmask;

/// Checks the `bitmask` part of bitmask and 2:4 modules.
pub(super) fn check_bitmask_part(rows: usize, cols: usize, idx: &PartInfo<'_>) -> Result<()> {
    let wb = bitmask_row_bytes(cols);
    ensure!(
        idx.dtype == Dtype::U8 && idx.shape == [rows, wb],
        format,
        "bitmask is {} {:?}, shape [{rows}, {cols}] needs U8 [{rows}, {wb}]",
        dtype_name(idx.dtype),
        idx.shape
    );
    Ok(())
}

impl Codec for Bitmask {
    fn name(&self) -> &'static str {
        "bitmask"
    }
    fn config_name(&self) -> &'static str {
        "sparse-bitmask"
    }
    fn config_method(&self) -> (&'static str, &'static str) {
        ("compressed-tensors", "unstructured")
    }
    fn parts(&self) -> &'static [&'static str] {
        &["shape", "compressed", "bitmask", "row_offsets"]
    }
    fn anchor(&self) -> &'static str {
        "bitmask"
    }
    fn values_part(&self) -> usize {
        1
    }

    fn check_layout(
        &self,
        rows: usize,
        cols: usize,
        parts: &[PartInfo<'_>],
        _quant: Option<super::QuantParams>,
    ) -> Result<Layout> {
        let [_, vals, idx, ro] = parts else {
            bail!(
                format,
                "bitmask module needs 4 parts, found {}",
                parts.len()
            );
        };
        check_bitmask_part(rows, cols, idx)?;
        ensure!(
            vals.shape.len() == 1,
            format,
            "compressed must be 1-D, found {:?}",
            vals.shape
        );
        let nnz = vals.shape[0];
        ensure!(
            nnz <= rows * cols,
            format,
            "compressed holds {nnz} values, more than the {} of shape [{rows}, {cols}]",
            rows * cols
        );
        ensure!(
            ro.dtype == Dtype::I64 && ro.shape == [rows],
            format,
            "row_offsets is {} {:?}, expected I64 [{rows}]",
            dtype_name(ro.dtype),
            ro.shape
        );
        Ok(Layout {
            dtype: vals.dtype,
            nnz,
        })
    }

    fn plan(
        &self,
        dtype: Dtype,
        rows: usize,
        cols: usize,
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
                suffix: "compressed",
                dtype,
                shape: vec![nnz],
            },
            PartSpec {
                suffix: "bitmask",
                dtype: Dtype::U8,
                shape: vec![rows, bitmask_row_bytes(cols)],
            },
            PartSpec {
                suffix: "row_offsets",
                dtype: Dtype::I64,
                shape: vec![rows],
            },
        ]
    }

    fn encode(&self, m: Matrix<'_>, counts: &[u64], out: &mut [&mut [u8]]) -> Result<()> {
        let [shape, vals, mask, ro] = out else {
            bail!(shape, "bitmask encode needs 4 output parts");
        };
        write_shape(shape, m.rows, m.cols);
        bitmask_encode(m.dtype, m.data, m.rows, m.cols, counts, mask, vals)?;
        let (offs, _) = prefix_offsets(counts);
        for (c, o) in ro.chunks_exact_mut(8).zip(&offs) {
            c.copy_from_slice(&(*o as i64).to_le_bytes());
        }
        Ok(())
    }

    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>> {
        let counts = bitmask_row_counts(s.parts[2], s.rows, s.cols)?;
        let total: u64 = counts.iter().sum();
        ensure!(
            total == s.nnz as u64,
            format,
            "bitmask popcount {total} disagrees with compressed length {}",
            s.nnz
        );
        let mut acc = 0u64;
        for (r, (c, &n)) in s.parts[3].chunks_exact(8).zip(&counts).enumerate() {
            let got = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            ensure!(
                got == acc as i64,
                format,
                "row_offsets[{r}] = {got} but the bitmask gives {acc}"
            );
            acc += n;
        }
        Ok(counts)
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
