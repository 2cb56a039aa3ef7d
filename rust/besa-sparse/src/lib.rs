//! besa-sparse: pure-Rust reading of safetensors models (mmap, strict validation), statistics,
//! and packed checkpoint formats (one codec per format, [`codec`]). No Python here; `besa-py`
//! binds it.

pub mod error;

pub mod atomic;
pub mod codec;
pub mod dtype;
pub mod inspect;
pub mod memory;
pub mod model;
pub mod output;
pub mod pack;
pub mod packed;
pub mod quant_file;
pub mod st;
pub mod stats;
pub mod unpack;
pub mod writer;

pub use codec::{Codec, PackFormat};
pub use error::{Error, ErrorKind, Result};
pub use model::Model;
pub use packed::PackedModel;
