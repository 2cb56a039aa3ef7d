//! Bindings of `besa_sparse::memory`: in-memory compress / decompress of one dense matrix.
//!
//! Thin glue: the caller (`besa_rs.memory`) hands each input as a flat uint8 view of its
//! buffer (no copy) plus its dtype name and shape; outputs are uint8 numpy arrays allocated
//! here once, at their final size, and filled by the codec with the GIL released. Python
//! views them with the right dtype and shape (numpy or torch) without copying.

use besa_sparse::codec::{EncodeOptions, Matrix};
use besa_sparse::dtype::{name as dtype_name, parse as parse_dtype};
use besa_sparse::memory::{part_nbytes, plan_compress, plan_decompress, Part};
use besa_sparse::{Error, PackFormat};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::errors::run;

/// One part or dense matrix crossing the boundary: (name, dtype name, shape, flat uint8 array).
type Buf<'py> = (String, String, Vec<usize>, Bound<'py, PyArray1<u8>>);
/// A given part, borrowed: (name, dtype name, shape, bytes when contiguous).
type Given<'a> = (&'a str, &'a str, &'a [usize], Option<&'a [u8]>);

/// The bytes of a flat uint8 array, or a `Shape` error when it is not contiguous (checked in
/// the closures given to [`run`], the one place errors become Python exceptions).
fn contiguous<'a>(what: &str, bytes: Option<&'a [u8]>) -> Result<&'a [u8], Error> {
    bytes.ok_or_else(|| Error::shape(format!("{what} is not a contiguous buffer")))
}

/// Compresses a dense `rows x cols` matrix (`data`: its bytes, C order) into the parts of
/// `format`; returns them in the format's order as (name, dtype, shape, bytes).
#[pyfunction]
#[pyo3(signature = (data, dtype, rows, cols, format, force_24=false))]
fn compress_parts<'py>(
    py: Python<'py>,
    data: PyReadonlyArray1<'py, u8>,
    dtype: &str,
    rows: usize,
    cols: usize,
    format: &str,
    force_24: bool,
) -> PyResult<Vec<Buf<'py>>> {
    let bytes = data.as_slice().ok();
    let opts = EncodeOptions { force: force_24 };
    let (plan, m) = run(py, move || {
        let format = PackFormat::parse(format)?;
        let m = Matrix {
            dtype: parse_dtype(dtype)?,
            rows,
            cols,
            data: contiguous("the input tensor", bytes)?,
            quant: None,
        };
        let plan = plan_compress(format, m, opts).map_err(|e| {
            // The codec's hint names the command-line flag; this API's is `force_24=True`.
            Error::new(e.kind, e.message.replace("--force-24", "force_24=True"))
        })?;
        Ok((plan, m))
    })?;
    // Fresh arrays (zero pages: only what the codec writes is touched).
    let arrays: Vec<Bound<'py, PyArray1<u8>>> = plan
        .parts
        .iter()
        .map(|s| PyArray1::<u8>::zeros(py, part_nbytes(s), false))
        .collect();
    {
        let mut guards: Vec<PyReadwriteArray1<'_, u8>> =
            arrays.iter().map(|a| a.readwrite()).collect();
        let mut outs: Vec<&mut [u8]> = guards
            .iter_mut()
            .map(|g| g.as_slice_mut().expect("fresh arrays are contiguous"))
            .collect();
        let plan = &plan;
        run(py, move || plan.encode_into(m, &mut outs))?;
    }
    Ok(plan
        .parts
        .iter()
        .zip(arrays)
        .map(|(s, a)| {
            (
                s.suffix.to_string(),
                dtype_name(s.dtype),
                s.shape.clone(),
                a,
            )
        })
        .collect())
}

/// Decompresses parts given as (name, dtype, shape, bytes); the format is recognised from the
/// names unless given. Returns (format name, dense matrix as (name "dense", dtype, shape,
/// bytes)).
#[pyfunction]
#[pyo3(signature = (parts, format=None))]
fn decompress_parts<'py>(
    py: Python<'py>,
    parts: Vec<(String, String, Vec<usize>, PyReadonlyArray1<'py, u8>)>,
    format: Option<&str>,
) -> PyResult<(String, Buf<'py>)> {
    let given: Vec<Given<'_>> = parts
        .iter()
        .map(|(n, d, s, a)| (n.as_str(), d.as_str(), s.as_slice(), a.as_slice().ok()))
        .collect();
    let plan = run(py, move || {
        let format = format.map(PackFormat::parse).transpose()?;
        let given = given
            .into_iter()
            .map(|(name, dtype, shape, bytes)| {
                Ok(Part {
                    name,
                    dtype: parse_dtype(dtype)?,
                    shape,
                    data: contiguous(&format!("part {name:?}"), bytes)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        plan_decompress(format, &given)
    })?;
    let out = PyArray1::<u8>::zeros(py, plan.dense_nbytes(), false);
    {
        let mut guard = out.readwrite();
        let buf = guard.as_slice_mut().expect("a fresh array is contiguous");
        let plan = &plan;
        run(py, move || plan.decode_into(buf))?;
    }
    Ok((
        plan.format.name().to_string(),
        (
            "dense".to_string(),
            dtype_name(plan.dtype),
            vec![plan.rows, plan.cols],
            out,
        ),
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compress_parts, m)?)?;
    m.add_function(wrap_pyfunction!(decompress_parts, m)?)?;
    Ok(())
}
