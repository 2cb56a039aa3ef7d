//! A read-only view of a 2-D weight (or mask) as a keep-mask: `keep = (W != 0)`.
//!
//! The view borrows the raw little-endian bytes (a memory map or a numpy buffer), so nothing is
//! copied: the engine only needs column degrees (one parallel pass) and, for the rare labels
//! touched by the relabel quirk, a few rows and columns, read straight from the bytes.

use std::borrow::Cow;

use besa_sparse::dtype::{self, magnitude, FloatBits};
use besa_sparse::{dispatch_itemsize, ensure, Error, Result};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

/// Whether the simulator reads weights or masks of `dtype`: the float weight dtypes (F8 too)
/// and BOOL masks. A weight is kept when it is not a zero under `besa_sparse::dtype`'s zero
/// rule (`-0.0` is a zero, NaN is kept).
pub fn check_dtype(dtype: Dtype) -> Result<()> {
    ensure!(
        dtype::is_float(dtype) || matches!(dtype, Dtype::BOOL | Dtype::F8_E4M3 | Dtype::F8_E5M2),
        dtype,
        "dtype {dtype:?} is not supported by the simulator (expected a float weight \
         F64/F32/F16/BF16/F8 or a BOOL mask)"
    );
    Ok(())
}

#[inline(always)]
fn kept<const N: usize>(b: &[u8]) -> bool {
    magnitude::<N>(b) != 0
}

/// A (possibly column-sliced) row-major matrix of `rows x cols` elements whose rows are
/// `row_stride` elements apart, starting `col_offset` elements into each row.
#[derive(Debug, Clone)]
pub struct MaskView<'a> {
    data: Cow<'a, [u8]>,
    dtype: Dtype,
    /// Bytes per element.
    size: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_offset: usize,
}

impl<'a> MaskView<'a> {
    /// A full C-contiguous matrix of `dtype` (see [`check_dtype`]) over `data`; the byte
    /// length must match the shape.
    pub fn new(
        data: impl Into<Cow<'a, [u8]>>,
        dtype: Dtype,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        check_dtype(dtype)?;
        let data = data.into();
        let size = dtype::itemsize(dtype);
        let need = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(size))
            .ok_or_else(|| Error::shape(format!("shape [{rows}, {cols}] overflows")))?;
        ensure!(
            data.len() == need,
            shape,
            "buffer of {} bytes does not hold a [{rows}, {cols}] {dtype:?} matrix",
            data.len()
        );
        Ok(Self {
            data,
            dtype,
            size,
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
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Columns `begin..begin + width` of this view (no copy).
    pub fn columns(&self, begin: usize, width: usize) -> MaskView<'_> {
        assert!(begin + width <= self.cols, "column slice out of range");
        MaskView {
            data: Cow::Borrowed(&self.data),
            dtype: self.dtype,
            size: self.size,
            rows: self.rows,
            cols: width,
            row_stride: self.row_stride,
            col_offset: self.col_offset + begin,
        }
    }

    /// The bytes of row `i` of this view.
    #[inline]
    pub fn row_bytes(&self, i: usize) -> &[u8] {
        let s = self.size;
        let start = (i * self.row_stride + self.col_offset) * s;
        &self.data[start..start + self.cols * s]
    }

    #[inline]
    pub fn is_kept(&self, i: usize, j: usize) -> bool {
        let s = self.size;
        let at = (i * self.row_stride + self.col_offset + j) * s;
        !dtype::is_zero(&self.data[at..at + s])
    }

    /// Calls `f(j)` for each kept column `j` of row `i`, ascending.
    pub fn for_each_kept_in_row(&self, i: usize, mut f: impl FnMut(usize)) {
        fn each<const N: usize>(row: &[u8], f: &mut dyn FnMut(usize)) {
            for (j, b) in row.chunks_exact(N).enumerate() {
                if kept::<N>(b) {
                    f(j);
                }
            }
        }
        dispatch_itemsize!(self.size, each::<N>(self.row_bytes(i), &mut f))
    }

    /// Kept weights per column (one parallel pass over the bytes).
    pub fn column_degrees(&self) -> Vec<u32> {
        // Narrow partial counts per block of rows, widened at the end: narrow lanes make the
        // inner loop several times faster than u32 accumulators (u8 for 1-byte elements, at
        // most 255 rows a block; u16 otherwise).
        match self.size {
            1 => self.degrees::<u8, u8>(255),
            2 => self.degrees::<u16, u16>(1024),
            4 => self.degrees::<u32, u16>(1024),
            _ => self.degrees::<u64, u16>(1024),
        }
    }

    /// [`Self::column_degrees`] reading elements as words `W`, counting in `C` per block of
    /// `block` rows.
    fn degrees<W, C>(&self, block: usize) -> Vec<u32>
    where
        W: FloatBits + bytemuck::Pod,
        C: Copy + Default + Send + From<bool> + Into<u32> + std::ops::AddAssign,
    {
        let cols = self.cols;
        if self.rows == 0 || cols == 0 {
            return vec![0; cols];
        }
        let nblocks = self.rows.div_ceil(block);
        (0..nblocks)
            .into_par_iter()
            .fold(
                || (vec![0u32; cols], vec![C::default(); cols]),
                |(mut total, mut part), b| {
                    part.iter_mut().for_each(|p| *p = C::default());
                    for i in b * block..((b + 1) * block).min(self.rows) {
                        add_row::<W, C>(self.row_bytes(i), &mut part);
                    }
                    for (t, &p) in total.iter_mut().zip(&part) {
                        *t += p.into();
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
        fn fits<const N: usize>(row: &[u8], n: usize, m: usize) -> bool {
            row.chunks(m * N)
                .all(|g| g.chunks_exact(N).filter(|b| kept::<N>(b)).count() <= n)
        }
        (0..self.rows)
            .into_par_iter()
            .all(|i| dispatch_itemsize!(self.size, fits::<N>(self.row_bytes(i), n, m)))
    }
}

/// Adds the kept weights of one row to the per-column counts `part`, the row read as words
/// `W` of the element size (a loop the compiler vectorises: about 7x faster than element by
/// element on 11008 x 4096 BF16); a row that is not aligned for `W` (a numpy view at an odd
/// offset) is read element by element.
#[inline]
fn add_row<W, C>(row: &[u8], part: &mut [C])
where
    W: FloatBits + bytemuck::Pod,
    C: Copy + From<bool> + std::ops::AddAssign,
{
    match bytemuck::try_cast_slice::<u8, W>(row) {
        Ok(words) => {
            for (p, &w) in part.iter_mut().zip(words) {
                *p += C::from(!w.is_zero());
            }
        }
        Err(_) => {
            for (p, b) in part.iter_mut().zip(row.chunks_exact(size_of::<W>())) {
                *p += C::from(!dtype::is_zero(b));
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
        let v = MaskView::new(&f32s[..], Dtype::F32, 2, 2).unwrap();
        assert!(!v.is_kept(0, 0) && !v.is_kept(0, 1) && v.is_kept(1, 0) && v.is_kept(1, 1));
        let halves: Vec<u8> = [0x0000u16, 0x8000, 0x3c00, 0x7fc0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v = MaskView::new(&halves[..], Dtype::BF16, 1, 4).unwrap();
        assert_eq!(v.column_degrees(), vec![0, 0, 1, 1]);
        let f64s: Vec<u8> = [0.0f64, -0.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let v = MaskView::new(&f64s[..], Dtype::F64, 3, 1).unwrap();
        assert_eq!(v.column_degrees(), vec![1]);
        let f8 = [0x00u8, 0x80, 0x01, 0x7f];
        let v = MaskView::new(&f8[..], Dtype::F8_E4M3, 2, 2).unwrap();
        assert_eq!(v.column_degrees(), vec![1, 1]);
        assert!(MaskView::new(&f8[..], Dtype::F8_E4M3, 3, 2).is_err());
        let e = MaskView::new(&f32s[..], Dtype::I32, 2, 2).unwrap_err();
        assert_eq!(e.kind, besa_sparse::ErrorKind::Dtype);
        assert!(e.message.contains("I32"), "{e}");
        // -0.0 and NaN in every reader: degrees, row walks, n:m groups.
        let v = MaskView::new(&f32s[..], Dtype::F32, 1, 4).unwrap();
        let mut seen = vec![];
        v.for_each_kept_in_row(0, |j| seen.push(j));
        assert_eq!(seen, [2, 3]);
        assert!(v.is_n_of_m(2, 4) && !v.is_n_of_m(1, 4));
    }

    #[test]
    fn degrees_and_column_slices() {
        let rows = 2500;
        let cols = 7;
        let bytes: Vec<u8> = (0..rows * cols).map(|k| (k % 3 == 0) as u8).collect();
        let v = MaskView::new(&bytes[..], Dtype::BOOL, rows, cols).unwrap();
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
    fn unaligned_rows_count_like_aligned_ones() {
        let (rows, cols) = (37, 29);
        let vals: Vec<u32> = (0..rows * cols)
            .map(|k| match k % 5 {
                0 => 0,
                1 => 0x8000_0000,
                2 => 0x7fc0_0000,
                _ => k as u32,
            })
            .collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let aligned = MaskView::new(&bytes[..], Dtype::F32, rows, cols).unwrap();
        let odd = MaskView::new(&shifted[1..], Dtype::F32, rows, cols).unwrap();
        let want: Vec<u32> = (0..cols)
            .map(|j| {
                (0..rows)
                    .filter(|i| !matches!((i * cols + j) % 5, 0 | 1))
                    .count() as u32
            })
            .collect();
        assert_eq!(aligned.column_degrees(), want);
        assert_eq!(odd.column_degrees(), want);
    }

    #[test]
    fn n_of_m() {
        let bytes = [1u8, 1, 0, 0, 0, 1, 0, 1, 1, 1];
        let v = MaskView::new(&bytes[..], Dtype::BOOL, 1, 10).unwrap();
        assert!(v.is_n_of_m(2, 4));
        let bytes = [1u8, 1, 1, 0];
        let v = MaskView::new(&bytes[..], Dtype::BOOL, 1, 4).unwrap();
        assert!(!v.is_n_of_m(2, 4));
    }
}
