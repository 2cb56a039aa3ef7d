//! In-memory conversion of one dense matrix to the parts of a packed format and back: the
//! library side of `besa_rs.compress` / `besa_rs.decompress`.
//!
//! Both directions are split in two so that the caller can allocate the outputs itself (numpy
//! arrays, torch tensors) and have them filled in place, with no intermediate copy:
//! - compress: [`plan_compress`] counts the kept weights per row, asks the codec whether it can
//!   hold the matrix and returns the parts to allocate ([`PartSpec`]: name, dtype, shape);
//!   [`Compression::encode_into`] then fills caller buffers of exactly those sizes.
//! - decompress: [`plan_decompress`] finds the format from the part names (or takes the one
//!   given), checks every part's dtype, shape and byte length, and validates the index bit by
//!   bit (the same checks as a packed file gets); [`Decompression::decode_into`] fills a dense
//!   buffer of `rows * cols * itemsize` bytes.
//!
//! Everything else (which weights are zeros, the byte layouts, validation) is the codec's
//! ([`crate::codec`]); the zero rule is [`crate::dtype::magnitude`] (`-0.0` is a zero).

use safetensors::tensor::Dtype;

use crate::codec::kernels::{check_dense_len, row_nnz};
use crate::codec::Stored;
use crate::codec::{self, Admission, EncodeOptions, Matrix, PackFormat, PartInfo, PartSpec};
use crate::dtype::{float_itemsize, itemsize, name as dtype_name};
use crate::error::Result;
use crate::{bail, ensure};

/// Bytes of one planned part.
pub fn part_nbytes(spec: &PartSpec) -> usize {
    spec.shape.iter().product::<usize>() * itemsize(spec.dtype)
}

/// A matrix planned for compression: the parts to allocate and what the encoder needs.
#[derive(Debug, Clone)]
pub struct Compression {
    pub format: PackFormat,
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    /// The parts, in the format's order ([`Codec::parts`]).
    pub parts: Vec<PartSpec>,
    /// Values stored (for 2:4 this includes the zero fillers).
    pub stored_nnz: u64,
    /// Non-zero weights re-pruned by [`EncodeOptions::force`] (2:4 only).
    pub dropped: u64,
    counts: Vec<u64>,
}

/// Plans the compression of `m` in `format`; refuses a matrix the format cannot hold with a
/// `Shape` error that says why (for 2:4: a group keeping more than 2 without `force`, or a
/// column count not divisible by 4).
pub fn plan_compress(
    format: PackFormat,
    m: Matrix<'_>,
    opts: EncodeOptions,
) -> Result<Compression> {
    refuse_quantized(format)?;
    let n = float_itemsize(m.dtype)?;
    check_dense_len(m.data, m.rows, m.cols, n)?;
    let counts = row_nnz(m.dtype, m.data, m.rows, m.cols)?;
    // The codecs word their refusals for a named tensor ("is not 2:4 sparse: ...").
    let admission = format
        .admit(m, &counts, opts)
        .map_err(|e| crate::Error::new(e.kind, format!("the matrix {}", e.message)))?;
    let (stored_nnz, dropped) = match admission {
        Admission::Pack {
            stored_nnz,
            dropped,
        } => (stored_nnz, dropped),
        Admission::Skip(why) => bail!(
            shape,
            "format {} cannot hold a [{}, {}] matrix: {why}",
            format.name(),
            m.rows,
            m.cols
        ),
    };
    let parts = format.plan(m.dtype, m.rows, m.cols, stored_nnz as usize, None);
    Ok(Compression {
        format,
        dtype: m.dtype,
        rows: m.rows,
        cols: m.cols,
        parts,
        stored_nnz,
        dropped,
        counts,
    })
}

impl Compression {
    /// Encodes `m` (the matrix this plan was made for) into `out`, one buffer per planned part
    /// of exactly [`part_nbytes`] bytes; every byte is written.
    pub fn encode_into(&self, m: Matrix<'_>, out: &mut [&mut [u8]]) -> Result<()> {
        ensure!(
            m.dtype == self.dtype && m.rows == self.rows && m.cols == self.cols,
            shape,
            "matrix {} [{}, {}] is not the {} [{}, {}] this compression was planned for",
            dtype_name(m.dtype),
            m.rows,
            m.cols,
            dtype_name(self.dtype),
            self.rows,
            self.cols
        );
        ensure!(
            out.len() == self.parts.len(),
            shape,
            "{} output buffers for the {} parts of format {}",
            out.len(),
            self.parts.len(),
            self.format.name()
        );
        for (spec, buf) in self.parts.iter().zip(out.iter()) {
            ensure!(
                buf.len() == part_nbytes(spec),
                shape,
                "output buffer of part {:?} has {} bytes, {} {:?} needs {}",
                spec.suffix,
                buf.len(),
                dtype_name(spec.dtype),
                spec.shape,
                part_nbytes(spec)
            );
        }
        self.format.encode(m, &self.counts, out)
    }
}

/// One part handed to [`plan_decompress`]: its name (`shape`, `compressed`, ...), dtype, shape
/// and raw little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Quantized formats are packed from a pruned directory (codes, scales and zero points come
/// from its side file), not from one dense matrix.
fn refuse_quantized(format: PackFormat) -> Result<()> {
    ensure!(
        !format.is_quantized(),
        config,
        "format {} needs the codes, scales and zero points of a quantized model: pack a pruned \
         directory with `besa-rs pack --format {}` instead of compressing one matrix",
        format.name(),
        format.name()
    );
    Ok(())
}

/// The format whose part names are exactly `names` (in any order).
pub fn detect(names: &[&str]) -> Result<PackFormat> {
    let same = |f: &PackFormat| {
        f.parts().len() == names.len() && f.parts().iter().all(|p| names.contains(p))
    };
    if let Some(f) = codec::all()
        .iter()
        .copied()
        .filter(|f| !f.is_quantized())
        .find(same)
    {
        return Ok(f);
    }
    let known: Vec<String> = codec::all()
        .iter()
        .map(|f| format!("{} ({})", f.name(), f.parts().join(", ")))
        .collect();
    let mut sorted = names.to_vec();
    sorted.sort_unstable();
    bail!(
        format,
        "parts [{}] are not the parts of any format; expected one of: {}",
        sorted.join(", "),
        known.join("; ")
    )
}

/// The dense `[rows, cols]` held by a `shape` part: I64 with 2 elements (`[2]`, `[2, 1]` as
/// compressed-tensors' 2:4 writes it, or `[1, 2]`), non-negative, of a sane size.
pub fn parse_shape_part(dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<(usize, usize)> {
    ensure!(
        dtype == Dtype::I64 && (shape == [2] || shape == [2, 1] || shape == [1, 2]),
        format,
        "part \"shape\" must be I64 with 2 elements, found {} {:?}",
        dtype_name(dtype),
        shape
    );
    ensure!(
        data.len() == 16,
        format,
        "part \"shape\" holds {} bytes, expected 16",
        data.len()
    );
    let d0 = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let d1 = i64::from_le_bytes(data[8..].try_into().expect("8 bytes"));
    let ok = |d: i64| (0..=(1i64 << 40)).contains(&d);
    ensure!(
        ok(d0) && ok(d1),
        format,
        "part \"shape\" holds invalid dimensions [{d0}, {d1}]"
    );
    let (rows, cols) = (d0 as usize, d1 as usize);
    ensure!(
        rows.checked_mul(cols).is_some_and(|n| n <= 1usize << 48),
        format,
        "shape [{rows}, {cols}] is too large"
    );
    Ok((rows, cols))
}

/// Validated parts of one matrix, ready to decode.
#[derive(Debug, Clone)]
pub struct Decompression<'a> {
    pub format: PackFormat,
    /// Dtype of the dense matrix (that of the stored values).
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    /// Values stored (for 2:4 this includes the zero fillers).
    pub nnz: usize,
    parts: Vec<&'a [u8]>,
    counts: Vec<u64>,
}

/// Checks the parts of one matrix: names (exactly the format's parts; the format is recognised
/// from the names when `format` is `None`), each part's byte length against its dtype and
/// shape, the codec's layout check (dtypes and shapes against the dense shape), the values
/// dtype (a float), and the codec's bit-level validation (popcounts, offsets, CSR indices).
/// Every failure is a `Format` error naming the part at fault (`Dtype` for non-float values).
pub fn plan_decompress<'a>(
    format: Option<PackFormat>,
    parts: &[Part<'a>],
) -> Result<Decompression<'a>> {
    let names: Vec<&str> = parts.iter().map(|p| p.name).collect();
    let format = match format {
        Some(f) => f,
        None => detect(&names)?,
    };
    refuse_quantized(format)?;
    for (i, p) in parts.iter().enumerate() {
        ensure!(
            format.parts().contains(&p.name),
            format,
            "unexpected part {:?}: format {} has parts {}",
            p.name,
            format.name(),
            format.parts().join(", ")
        );
        ensure!(
            !names[..i].contains(&p.name),
            format,
            "part {:?} given twice",
            p.name
        );
        let want = p
            .shape
            .iter()
            .try_fold(itemsize(p.dtype), |acc, &d| acc.checked_mul(d));
        ensure!(
            want == Some(p.data.len()),
            format,
            "part {:?} holds {} bytes, but {} {:?} needs {}",
            p.name,
            p.data.len(),
            dtype_name(p.dtype),
            p.shape,
            want.map_or_else(
                || "more than the address space".to_string(),
                |w| w.to_string()
            )
        );
    }
    let ordered: Vec<&Part<'a>> = format
        .parts()
        .iter()
        .map(|s| {
            parts.iter().find(|p| p.name == *s).ok_or_else(|| {
                crate::Error::format(format!(
                    "format {} needs part {s:?}, not given (parts: {})",
                    format.name(),
                    format.parts().join(", ")
                ))
            })
        })
        .collect::<Result<_>>()?;
    let (rows, cols) = parse_shape_part(ordered[0].dtype, ordered[0].shape, ordered[0].data)?;
    let infos: Vec<PartInfo<'_>> = ordered
        .iter()
        .map(|p| PartInfo {
            dtype: p.dtype,
            shape: p.shape,
            nbytes: p.data.len(),
        })
        .collect();
    let layout = format.check_layout(rows, cols, &infos, None)?;
    let n = float_itemsize(layout.dtype).map_err(|_| {
        crate::Error::dtype(format!(
            "part {:?} is {}, the values of a matrix must be F16, BF16, F32 or F64",
            format.parts()[format.values_part()],
            dtype_name(layout.dtype)
        ))
    })?;
    let datas: Vec<&'a [u8]> = ordered.iter().map(|p| p.data).collect();
    let counts = format.validate(&Stored {
        dtype: layout.dtype,
        rows,
        cols,
        itemsize: n,
        nnz: layout.nnz,
        parts: &datas,
        quant: None,
    })?;
    Ok(Decompression {
        format,
        dtype: layout.dtype,
        rows,
        cols,
        nnz: layout.nnz,
        parts: datas,
        counts,
    })
}

impl Decompression<'_> {
    /// Bytes of the dense matrix.
    pub fn dense_nbytes(&self) -> usize {
        self.rows * self.cols * itemsize(self.dtype)
    }

    /// Decodes the matrix into `out` (exactly [`Self::dense_nbytes`] bytes, every byte
    /// written).
    pub fn decode_into(&self, out: &mut [u8]) -> Result<()> {
        ensure!(
            out.len() == self.dense_nbytes(),
            shape,
            "output buffer has {} bytes, {} [{}, {}] needs {}",
            out.len(),
            dtype_name(self.dtype),
            self.rows,
            self.cols,
            self.dense_nbytes()
        );
        let stored = Stored {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            itemsize: itemsize(self.dtype),
            nnz: self.nnz,
            parts: &self.parts,
            quant: None,
        };
        self.format.decode(&stored, &self.counts, 0..self.rows, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{BITMASK, CSR, TWO_FOUR};
    use crate::ErrorKind;

    fn matrix_f32(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<u8> {
        (0..rows * cols)
            .flat_map(|i| f(i / cols, i % cols).to_le_bytes())
            .collect()
    }

    fn compress(format: PackFormat, m: Matrix<'_>) -> Result<Vec<(PartSpec, Vec<u8>)>> {
        let c = plan_compress(format, m, EncodeOptions::default())?;
        let mut bufs: Vec<Vec<u8>> = c.parts.iter().map(|s| vec![0xAA; part_nbytes(s)]).collect();
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        c.encode_into(m, &mut outs)?;
        Ok(c.parts.into_iter().zip(bufs).collect())
    }

    fn decompress(format: Option<PackFormat>, parts: &[(PartSpec, Vec<u8>)]) -> Result<Vec<u8>> {
        let ps: Vec<Part<'_>> = parts
            .iter()
            .map(|(s, d)| Part {
                name: s.suffix,
                dtype: s.dtype,
                shape: &s.shape,
                data: d,
            })
            .collect();
        let d = plan_decompress(format, &ps)?;
        let mut out = vec![0xAA; d.dense_nbytes()];
        d.decode_into(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trip_every_format_and_shape() {
        for (rows, cols) in [(1, 8), (8, 1), (0, 4), (3, 0), (5, 12), (17, 40)] {
            // 2:4-shaped: keep columns 0 and 2 of every group of 4 (and -0.0 elsewhere).
            let data = matrix_f32(rows, cols, |r, c| {
                if c % 4 == 0 || c % 4 == 2 {
                    (r * cols + c) as f32 + 1.0
                } else {
                    -0.0
                }
            });
            let m = Matrix {
                dtype: Dtype::F32,
                rows,
                cols,
                data: &data,
                quant: None,
            };
            let mut canon = data.clone();
            crate::codec::kernels::canonical_zeros(Dtype::F32, &mut canon).unwrap();
            for f in codec::all().iter().copied() {
                if f.is_quantized() {
                    let e = compress(f, m).unwrap_err();
                    assert_eq!(e.kind, ErrorKind::Config, "{e}");
                    continue;
                }
                if f == TWO_FOUR && cols % 4 != 0 {
                    let e = compress(f, m).unwrap_err();
                    assert_eq!(e.kind, ErrorKind::Shape, "{e}");
                    continue;
                }
                let parts = compress(f, m).unwrap();
                assert_eq!(
                    parts.iter().map(|p| p.0.suffix).collect::<Vec<_>>(),
                    f.parts()
                );
                assert_eq!(
                    decompress(None, &parts).unwrap(),
                    canon,
                    "{f} {rows}x{cols}"
                );
                assert_eq!(decompress(Some(f), &parts).unwrap(), canon);
            }
        }
    }

    #[test]
    fn hostile_parts_are_format_errors() {
        let data = matrix_f32(6, 16, |r, c| if (r + c) % 3 == 0 { 1.5 } else { 0.0 });
        let m = Matrix {
            dtype: Dtype::F32,
            rows: 6,
            cols: 16,
            data: &data,
            quant: None,
        };
        let good = compress(BITMASK, m).unwrap();
        let kind = |parts: &[(PartSpec, Vec<u8>)], f: Option<PackFormat>| {
            decompress(f, parts).unwrap_err().kind
        };
        // Unknown set of names, missing part, wrong format given.
        assert_eq!(kind(&good[..3], None), ErrorKind::Format);
        assert_eq!(kind(&good[..3], Some(BITMASK)), ErrorKind::Format);
        assert_eq!(kind(&good, Some(CSR)), ErrorKind::Format);
        // Truncated values.
        let mut p = good.clone();
        let n = p[1].1.len() - 4;
        p[1].1.truncate(n);
        assert_eq!(kind(&p, None), ErrorKind::Format);
        // Shape part claiming another matrix.
        let mut p = good.clone();
        p[0].1[..8].copy_from_slice(&7i64.to_le_bytes());
        assert_eq!(kind(&p, None), ErrorKind::Format);
        let mut p = good.clone();
        p[0].1[..8].copy_from_slice(&(-1i64).to_le_bytes());
        assert_eq!(kind(&p, None), ErrorKind::Format);
        // A bit flipped in the bitmask: popcount disagrees with the values.
        let mut p = good.clone();
        p[2].1[0] ^= 0x02;
        assert_eq!(kind(&p, None), ErrorKind::Format);
        // Row offsets off by one.
        let mut p = good.clone();
        p[3].1[8] ^= 1;
        assert_eq!(kind(&p, None), ErrorKind::Format);
        // Integer values.
        let mut p = good.clone();
        p[1].0.dtype = Dtype::I32;
        assert_eq!(kind(&p, None), ErrorKind::Dtype);
        // A part given twice.
        let mut p = good.clone();
        p.push(good[1].clone());
        assert_eq!(kind(&p, Some(BITMASK)), ErrorKind::Format);
    }

    #[test]
    fn refusals_of_compress() {
        let data = matrix_f32(2, 8, |_, _| 1.0);
        let m = Matrix {
            dtype: Dtype::F32,
            rows: 2,
            cols: 8,
            data: &data,
            quant: None,
        };
        // Dense 2:4 candidate without force, integer dtype, buffer not matching the shape.
        assert_eq!(compress(TWO_FOUR, m).unwrap_err().kind, ErrorKind::Shape);
        let forced = plan_compress(TWO_FOUR, m, EncodeOptions { force: true }).unwrap();
        assert_eq!(forced.dropped, 8);
        let int = Matrix {
            dtype: Dtype::I32,
            ..m
        };
        assert_eq!(compress(BITMASK, int).unwrap_err().kind, ErrorKind::Dtype);
        let short = Matrix {
            data: &data[..60],
            ..m
        };
        assert_eq!(compress(CSR, short).unwrap_err().kind, ErrorKind::Shape);
        // Output buffers of the wrong size.
        let c = plan_compress(BITMASK, m, EncodeOptions::default()).unwrap();
        let mut bufs: Vec<Vec<u8>> = c
            .parts
            .iter()
            .map(|s| vec![0; part_nbytes(s) + 1])
            .collect();
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        assert_eq!(
            c.encode_into(m, &mut outs).unwrap_err().kind,
            ErrorKind::Shape
        );
    }
}
