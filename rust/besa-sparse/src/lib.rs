//! besa-sparse: pure-Rust reading of safetensors models (mmap, strict validation), statistics,
//! and sparse checkpoint formats. No Python here; `besa-py` binds it.

pub mod error;
pub mod formats;
pub mod inspect;
pub mod model;
pub mod pack;
pub mod packed;
pub mod st;
pub mod stats;
pub mod writer;

pub use error::{Error, ErrorKind, Result};
pub use formats::PackFormat;
pub use model::Model;
pub use packed::{for_each_weight_2d, PackedModel, Weight2d, WeightData};
