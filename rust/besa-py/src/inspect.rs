//! Bindings of `besa_sparse::inspect`.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::errors::run;

/// Inspects a safetensors file or model directory; returns the report as a JSON string.
/// With `verify` (default) every packed tensor's checksum and structure are verified.
#[pyfunction]
#[pyo3(signature = (path, verify=true))]
fn inspect_json(py: Python<'_>, path: PathBuf, verify: bool) -> PyResult<String> {
    run(py, move || {
        let report = besa_sparse::inspect::inspect_with(&path, verify)?;
        Ok(serde_json::to_string(&report).expect("report serializes"))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inspect_json, m)?)?;
    Ok(())
}
