//! The one place where Rust errors (and panics) become Python exceptions.
//!
//! Exception classes live in `besa_rs.errors` (pure Python, so users can subclass and catch
//! them without importing the extension); this module looks them up by name.

use std::panic::{catch_unwind, AssertUnwindSafe};

use besa_sparse::{Error, ErrorKind};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// The `besa_rs.errors` class for an error kind.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "MissingFileError",
        ErrorKind::Io => "BesaIOError",
        ErrorKind::Format => "FormatError",
        ErrorKind::Integrity => "IntegrityError",
        ErrorKind::Shape => "ShapeError",
        ErrorKind::Dtype => "DtypeError",
        ErrorKind::Config => "ConfigError",
    }
}

fn raise(py: Python<'_>, class: &str, message: String) -> PyErr {
    let cls = py
        .import("besa_rs.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
    match cls {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// Converts a `besa-sparse` error into the matching Python exception.
pub fn to_py(py: Python<'_>, err: Error) -> PyErr {
    raise(py, class_name(err.kind), err.message)
}

/// Runs `f` with the GIL released, turning errors into Python exceptions and panics into a
/// `BesaError` ("internal error"), so no panic ever crosses into Python.
pub fn run<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> Result<T, Error> + Send,
{
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(raise(
                py,
                "BesaError",
                format!("internal error in besa-rs (please report): {what}"),
            ))
        }
    }
}
