//! Bindings of `besa_sparse::inspect`.

use std::path::PathBuf;

use pyo3::prelude::*;
use pythonize::pythonize;

use crate::errors::run;

/// Inspects a safetensors file or model directory; returns the report as a dict.
/// With `verify` (default) every packed tensor's checksum and structure are verified.
#[pyfunction]
#[pyo3(signature = (path, verify=true))]
fn inspect(py: Python<'_>, path: PathBuf, verify: bool) -> PyResult<Bound<'_, PyAny>> {
    let report = run(py, move || {
        besa_sparse::inspect::inspect_with(&path, verify)
    })?;
    Ok(pythonize(py, &report)?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    Ok(())
}
