//! PyO3 glue: the only crate that touches Python. Heavy work releases the GIL; every Rust error
//! and panic becomes a `besa_rs.errors` exception in one place (`errors.rs`).

use pyo3::prelude::*;

mod arrays;
mod errors;
mod inspect;
mod memory;
mod sim;
mod sim_params;
mod sparse;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    inspect::register(m)?;
    memory::register(m)?;
    sim::register(m)?;
    sparse::register(m)?;
    Ok(())
}
