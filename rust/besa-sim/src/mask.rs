//! A read-only view of a 2-D weight (or mask) as a keep-mask: `keep = (W != 0)`.
//!
//! The view borrows the raw little-endian bytes (a memory map or a numpy buffer), so nothing is
//! copied: the engine only needs column degrees (one parallel pass) and, for the rare labels
//! touched by the relabel quirk, a few rows and columns, read straight from the bytes.

use std::borrow::Cow;

use besa_sparse::{Error, Result};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

/// Element encoding of the bytes of a view; `-0.0` is zero, NaN is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// One byte, kept when non-zero (bool / uint8 masks).
    Byte,
    /// 8-bit floats (F8_E4M3, F8_E5M2): kept when `b & 0x7f != 0`.
    F8,
    /// F16 or BF16: kept when `u16 & 0x7fff != 0`.
    Half,
    /// F32: kept when `u32 & 0x7fff_ffff != 0`.
    F32,
    /// F64: kept when `u64 & 0x7fff_ffff_ffff_ffff != 0`.
    F64,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::Byte | Elem::F8 => 1,
            Elem::Half => 2,
            Elem::F32 => 4,
            Elem::F64 => 8,
        }
    }

    /// The element encoding of a safetensors dtype; integer and unknown dtypes are refused.
    pub fn from_dtype(dtype: Dtype, what: &str) -> Result<Self> {
        Ok(match dtype {
            Dtype::BOOL => Elem::Byte,
            Dtype::F8_E4M3 | Dtype::F8_E5M2 => Elem::F8,
            Dtype::F16 | Dtype::BF16 => Elem::Half,
            Dtype::F32 => Elem::F32,
            Dtype::F64 => Elem::F64,
            other => {
                return Err(Error::dtype(format!(
                    "{what}: dtype {other:?} is not supported by the simulator (expected a float \
                     weight F64/F32/F16/BF16/F8 or a BOOL mask)"
                )))
            }
        })
    }

    #[inline]
    fn kept_at(self, b: &[u8]) -> bool {
        match self {
            Elem::Byte => b[0] != 0,
            Elem::F8 => b[0] & 0x7f != 0,
            Elem::Half => u16::from_le_bytes([b[0], b[1]]) & 0x7fff != 0,
            Elem::F32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff != 0,
            Elem::F64 => {
                u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) & 0x7fff_ffff_ffff_ffff != 0
            }
        }
    }
}

/// A (possibly column-sliced) row-major matrix of `rows x cols` elements whose rows are
/// `row_stride` elements apart, starting `col_offset` elements into each row.
#[derive(Debug, Clone)]
pub struct MaskView<'a> {
    data: Cow<'a, [u8]>,
    elem: Elem,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_offset: usize,
}

impl<'a> MaskView<'a> {
    /// A full C-contiguous matrix over `data`; the byte length must match the shape.
    pub fn new(
        data: impl Into<Cow<'a, [u8]>>,
        elem: Elem,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let data = data.into();
        let need = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(elem.size()))
            .ok_or_else(|| Error::shape(format!("shape [{rows}, {cols}] overflows")))?;
        if data.len() != need {
            return Err(Error::shape(format!(
                "buffer of {} bytes does not hold a [{rows}, {cols}] matrix of {}-byte elements",
                data.len(),
                elem.size()
            )));
        }
        Ok(Self {
            data,
            elem,
            rows,
            cols,
            row_stride: cols,
            col_offset: 0,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn elem(&self) -> Elem {
        self.elem
    }

    /// Columns `begin..begin + width` of this view (no copy).
    pub fn columns(&self, begin: usize, width: usize) -> MaskView<'_> {
        assert!(begin + width <= self.cols, "column slice out of range");
        MaskView {
            data: Cow::Borrowed(&self.data),
            elem: self.elem,
            rows: self.rows,
            cols: width,
            row_stride: self.row_stride,
            col_offset: self.col_offset + begin,
        }
    }

    /// The bytes of row `i` of this view.
    #[inline]
    pub fn row_bytes(&self, i: usize) -> &[u8] {
        let s = self.elem.size();
        let start = (i * self.row_stride + self.col_offset) * s;
        &self.data[start..start + self.cols * s]
    }

    #[inline]
    pub fn is_kept(&self, i: usize, j: usize) -> bool {
        let s = self.elem.size();
        let at = (i * self.row_stride + self.col_offset + j) * s;
        self.elem.kept_at(&self.data[at..at + s])
    }

    /// Calls `f(j)` for each kept column `j` of row `i`, ascending.
    pub fn for_each_kept_in_row(&self, i: usize, mut f: impl FnMut(usize)) {
        let s = self.elem.size();
        for (j, b) in self.row_bytes(i).chunks_exact(s).enumerate() {
            if self.elem.kept_at(b) {
                f(j);
            }
        }
    }

    /// Kept weights per column (one parallel pass over the bytes).
    pub fn column_degrees(&self) -> Vec<u32> {
        let cols = self.cols;
        if self.rows == 0 || cols == 0 {
            return vec![0; cols];
        }
        // u16 partial counts per block of at most 65535 rows, widened at the end: narrow lanes
        // make the inner loop several times faster than u32 accumulators.
        let block = 1024usize;
        let nblocks = self.rows.div_ceil(block);
        (0..nblocks)
            .into_par_iter()
            .fold(
                || (vec![0u32; cols], vec![0u16; cols]),
                |(mut total, mut part), b| {
                    part.iter_mut().for_each(|p| *p = 0);
                    for i in b * block..((b + 1) * block).min(self.rows) {
                        add_row(self.elem, &mut part, self.row_bytes(i));
                    }
                    for (t, p) in total.iter_mut().zip(&part) {
                        *t += *p as u32;
                    }
                    (total, part)
                },
            )
            .map(|(total, _)| total)
            .reduce(
                || vec![0u32; cols],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += *y;
                    }
                    a
                },
            )
    }

    /// True when every group of `m` consecutive weights of each row (groups start at column 0;
    /// a last partial group counts as a group) keeps at most `n`.
    pub fn is_n_of_m(&self, n: usize, m: usize) -> bool {
        (0..self.rows).into_par_iter().all(|i| {
            let row = self.row_bytes(i);
            let s = self.elem.size();
            row.chunks(m * s)
                .all(|g| g.chunks_exact(s).filter(|b| self.elem.kept_at(b)).count() <= n)
        })
    }
}

#[inline]
fn add_row(elem: Elem, part: &mut [u16], row: &[u8]) {
    match elem {
        Elem::Byte => {
            for (p, &b) in part.iter_mut().zip(row) {
                *p += (b != 0) as u16;
            }
        }
        Elem::F8 => {
            for (p, &b) in part.iter_mut().zip(row) {
                *p += (b & 0x7f != 0) as u16;
            }
        }
        Elem::Half => {
            for (p, b) in part.iter_mut().zip(row.chunks_exact(2)) {
                *p += (u16::from_le_bytes([b[0], b[1]]) & 0x7fff != 0) as u16;
            }
        }
        Elem::F32 => {
            for (p, b) in part.iter_mut().zip(row.chunks_exact(4)) {
                *p += (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff != 0) as u16;
            }
        }
        Elem::F64 => {
            for (p, b) in part.iter_mut().zip(row.chunks_exact(8)) {
                let v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                *p += (v & 0x7fff_ffff_ffff_ffff != 0) as u16;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rules_per_dtype() {
        let f32s: Vec<u8> = [0.0f32, -0.0, 1.0, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v = MaskView::new(&f32s[..], Elem::F32, 2, 2).unwrap();
        assert!(!v.is_kept(0, 0) && !v.is_kept(0, 1) && v.is_kept(1, 0) && v.is_kept(1, 1));
        let halves: Vec<u8> = [0x0000u16, 0x8000, 0x3c00, 0x7fc0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v = MaskView::new(&halves[..], Elem::Half, 1, 4).unwrap();
        assert_eq!(v.column_degrees(), vec![0, 0, 1, 1]);
        let f64s: Vec<u8> = [0.0f64, -0.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v = MaskView::new(&f64s[..], Elem::F64, 3, 1).unwrap();
        assert_eq!(v.column_degrees(), vec![1]);
        let f8 = [0x00u8, 0x80, 0x01, 0x7f];
        let v = MaskView::new(&f8[..], Elem::F8, 2, 2).unwrap();
        assert_eq!(v.column_degrees(), vec![1, 1]);
        assert!(MaskView::new(&f8[..], Elem::F8, 3, 2).is_err());
    }

    #[test]
    fn degrees_and_column_slices() {
        let rows = 2500;
        let cols = 7;
        let bytes: Vec<u8> = (0..rows * cols).map(|k| (k % 3 == 0) as u8).collect();
        let v = MaskView::new(&bytes[..], Elem::Byte, rows, cols).unwrap();
        let deg = v.column_degrees();
        for (j, &d) in deg.iter().enumerate() {
            let want = (0..rows).filter(|i| (i * cols + j) % 3 == 0).count() as u32;
            assert_eq!(d, want);
        }
        let s = v.columns(2, 4);
        assert_eq!(s.column_degrees(), deg[2..6].to_vec());
        assert_eq!(s.is_kept(1, 0), v.is_kept(1, 2));
        let mut seen = vec![];
        s.for_each_kept_in_row(0, |j| seen.push(j));
        let want: Vec<usize> = (0..4).filter(|&j| v.is_kept(0, j + 2)).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn n_of_m() {
        let bytes = [1u8, 1, 0, 0, 0, 1, 0, 1, 1, 1];
        let v = MaskView::new(&bytes[..], Elem::Byte, 1, 10).unwrap();
        assert!(v.is_n_of_m(2, 4));
        let bytes = [1u8, 1, 1, 0];
        let v = MaskView::new(&bytes[..], Elem::Byte, 1, 4).unwrap();
        assert!(!v.is_n_of_m(2, 4));
    }
}
