//! besa-sim: the ViTCoD sparse-accelerator cycle model (reference and full modes).
//!
//! - [`reference`]: the BESA authors' model, bit-for-bit (quirks included), fast;
//! - [`full`]: a corrected, parameterised model (DRAM traffic, formats, decode/prefill);
//! - [`model`]: every selected matrix of a saved model, read from the mmap, in parallel;
//! - [`options`]: the parameters as a user gives them, checked once;
//! - [`packed_source`]: every checkpoint (plain or packed, any codec) read through besa-sparse's
//!   packed reader; packed matrices' keep-masks come from their stored index.
//!
//! See docs/simulator.md.

pub mod full;
pub mod mask;
pub mod model;
pub mod options;
pub mod packed_source;
pub mod reference;

pub use mask::MaskView;
pub use model::{open_source, simulate_path, MatrixSource, Report, SimParams};
pub use options::{Mode, SimOptions};
pub use reference::{RefFloat, RefParams};
