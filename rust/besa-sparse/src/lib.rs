//! besa-sparse: pure-Rust reading of safetensors models (mmap, strict validation), statistics,
//! and sparse checkpoint formats. No Python here; `besa-py` binds it.

pub mod error;
pub mod inspect;
pub mod model;
pub mod st;
pub mod stats;

pub use error::{Error, ErrorKind, Result};
pub use model::Model;
