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

use crate::errors::{run, to_py};

/// One part or dense matrix crossing the boundary: (name, dtype name, shape, flat uint8 array).
type Buf<'py> = (String, String, Vec<usize>, Bound<'py, PyArray1<u8>>);

fn slice<'a>(py: Python<'_>, what: &str, a: &'a PyReadonlyArray1<'_, u8>) -> PyResult<&'a [u8]> {
    a.as_slice().map_err(|_| {
        to_py(
            py,
            Error::shape(format!("{what} is not a contiguous buffer")),
        )
    })
}

/// Fresh uint8 arrays of these sizes (zero pages: only what the codec writes is touched).
fn alloc<'py>(py: Python<'py>, sizes: &[usize]) -> Vec<Bound<'py, PyArray1<u8>>> {
    sizes
        .iter()
        .map(|&n| PyArray1::<u8>::zeros(py, n, false))
        .collect()
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
    let format = PackFormat::parse(format).map_err(|e| to_py(py, e))?;
    let dtype = parse_dtype(dtype).map_err(|e| to_py(py, e))?;
    let m = Matrix {
        dtype,
        rows,
        cols,
        data: slice(py, "the input tensor", &data)?,
    };
    let opts = EncodeOptions { force: force_24 };
    let plan = run(py, move || {
        plan_compress(format, m, opts).map_err(|e| {
            // The codec's hint names the command-line flag; this API's is `force_24=True`.
            let message = e.message.replace("--force-24", "force_24=True");
            Error::new(e.kind, message)
        })
    })?;
    let sizes: Vec<usize> = plan.parts.iter().map(part_nbytes).collect();
    let arrays = alloc(py, &sizes);
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
    let format = format
        .map(PackFormat::parse)
        .transpose()
        .map_err(|e| to_py(py, e))?;
    let mut given = Vec::with_capacity(parts.len());
    for (name, dtype, shape, data) in &parts {
        given.push(Part {
            name,
            dtype: parse_dtype(dtype).map_err(|e| to_py(py, e))?,
            shape,
            data: slice(py, &format!("part {name:?}"), data)?,
        });
    }
    let plan = run(py, move || plan_decompress(format, &given))?;
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
