//! One error type for the crate: a kind (mapped to a Python exception class in `besa-py`)
//! and a one-line message that names the file / tensor / argument at fault.

use std::fmt;
use std::path::Path;

/// What went wrong, coarse enough to pick an exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A file or directory that should exist does not.
    NotFound,
    /// An operating-system I/O failure (permissions, disk full, ...).
    Io,
    /// Bytes on disk that do not follow the format (corrupt or hostile files).
    Format,
    /// A stored checksum does not match the data.
    Integrity,
    /// A tensor whose shape is not what the operation needs.
    Shape,
    /// A tensor whose dtype is not supported by the operation.
    Dtype,
    /// An impossible or contradictory setting.
    Config,
}

/// Error of every fallible operation in `besa-sparse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Format, message)
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, message)
    }
    pub fn dtype(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Dtype, message)
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    pub fn integrity(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Integrity, message)
    }
    /// Wraps an I/O error with the path it concerns; a missing file becomes `NotFound`.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        Self::new(kind, format!("{}: {}", path.display(), err))
    }
    /// Prefixes the message with more context (e.g. the file name).
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Returns early with an [`Error`] of the given kind (`format`, `shape`, `dtype`, `config`,
/// `integrity`) and a `format!` message: `bail!(shape, "{n} columns")`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)+) => {
        return Err($crate::Error::$kind(format!($($arg)+)))
    };
}

/// [`bail!`] unless the condition holds: `ensure!(cols % 4 == 0, shape, "{cols} columns")`;
/// or returns a ready-made [`Error`]: `ensure!(found, not_found_error(name))`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($arg:tt)+) => {
        if !$cond {
            $crate::bail!($kind, $($arg)+);
        }
    };
    ($cond:expr, $err:expr $(,)?) => {
        if !$cond {
            return Err($err);
        }
    };
}
