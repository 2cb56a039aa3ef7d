//! The one place where Rust errors (and panics) become Python exceptions.
//!
//! Exception classes live in `besa_rs.errors` (pure Python, so users can subclass and catch
//! them without importing the extension); `import_exception!` ties each Rust error kind to its
//! class at compile time (a renamed class fails loudly on first use, never falls back).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use besa_sparse::{Error, ErrorKind};
use pyo3::prelude::*;

pyo3::import_exception!(besa_rs.errors, BesaError);
pyo3::import_exception!(besa_rs.errors, BesaIOError);
pyo3::import_exception!(besa_rs.errors, ConfigError);
pyo3::import_exception!(besa_rs.errors, DtypeError);
pyo3::import_exception!(besa_rs.errors, FormatError);
pyo3::import_exception!(besa_rs.errors, IntegrityError);
pyo3::import_exception!(besa_rs.errors, MissingFileError);
pyo3::import_exception!(besa_rs.errors, ShapeError);

/// Converts a `besa-sparse` error into the matching `besa_rs.errors` exception.
pub fn to_py(err: Error) -> PyErr {
    let msg = err.message;
    match err.kind {
        ErrorKind::NotFound => MissingFileError::new_err(msg),
        ErrorKind::Io => BesaIOError::new_err(msg),
        ErrorKind::Format => FormatError::new_err(msg),
        ErrorKind::Integrity => IntegrityError::new_err(msg),
        ErrorKind::Shape => ShapeError::new_err(msg),
        ErrorKind::Dtype => DtypeError::new_err(msg),
        ErrorKind::Config => ConfigError::new_err(msg),
    }
}

/// A `BesaError` ("internal error") for a caught panic.
pub fn panic_to_py(panic: Box<dyn Any + Send>) -> PyErr {
    let what = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    BesaError::new_err(format!("internal error in besa-rs (please report): {what}"))
}

/// Runs `f` without the GIL and without unwinding: its panic as a payload, its error as is.
pub fn detached<T, F>(py: Python<'_>, f: F) -> Result<Result<T, Error>, Box<dyn Any + Send>>
where
    T: Send,
    F: FnOnce() -> Result<T, Error> + Send,
{
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
}

/// Runs `f` with the GIL released, turning errors into Python exceptions and panics into a
/// `BesaError` ("internal error"), so no panic ever crosses into Python.
pub fn run<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> Result<T, Error> + Send,
{
    match detached(py, f) {
        Ok(r) => r.map_err(to_py),
        Err(panic) => Err(panic_to_py(panic)),
    }
}

/// Returns early with the `besa_rs.errors` exception of an error kind (`format`, `shape`,
/// `dtype`, `config`, `integrity`) and a `format!` message: `bail!(dtype, "{name}: ...")`.
macro_rules! bail {
    ($kind:ident, $($arg:tt)+) => {
        return Err($crate::errors::to_py(besa_sparse::Error::$kind(format!($($arg)+))))
    };
}

/// [`bail!`] unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($arg:tt)+) => {
        if !$cond {
            $crate::errors::bail!($kind, $($arg)+);
        }
    };
}

pub(crate) use {bail, ensure};
