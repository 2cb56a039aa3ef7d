//! Bindings of `besa_sparse::{pack, packed}`: pack/unpack a checkpoint, and a reader that
//! decodes packed (or plain) tensors straight into caller-provided numpy buffers.

use std::path::PathBuf;

use besa_sparse::dtype::{self, name as dtype_name};
use besa_sparse::pack::{PackOptions, UnpackOptions};
use besa_sparse::packed::PackedModel;
use besa_sparse::{codec, PackFormat};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pythonize::pythonize;

use crate::errors::{bail, run, to_py};

/// Packs a checkpoint; returns the report (a dict built from the Rust report struct).
#[pyfunction]
#[pyo3(signature = (src, out, format="bitmask", min_sparsity=0.25, shard_size=5_000_000_000, overwrite=false, force_24=false, tensors=None, sync=true))]
#[allow(clippy::too_many_arguments)]
fn pack<'py>(
    py: Python<'py>,
    src: PathBuf,
    out: PathBuf,
    format: &str,
    min_sparsity: f64,
    shard_size: u64,
    overwrite: bool,
    force_24: bool,
    tensors: Option<Vec<String>>,
    sync: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let format = PackFormat::parse(format).map_err(to_py)?;
    let opts = PackOptions {
        format,
        min_sparsity,
        shard_size,
        overwrite,
        force_24,
        tensors,
        sync,
    };
    let r = run(py, move || besa_sparse::pack::pack(&src, &out, &opts))?;
    Ok(pythonize(py, &r)?)
}

/// Unpacks a packed checkpoint into a plain one; returns the report (a dict).
#[pyfunction]
#[pyo3(signature = (src, out, shard_size=5_000_000_000, overwrite=false, sync=true))]
fn unpack<'py>(
    py: Python<'py>,
    src: PathBuf,
    out: PathBuf,
    shard_size: u64,
    overwrite: bool,
    sync: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = UnpackOptions {
        shard_size,
        overwrite,
        sync,
    };
    let r = run(py, move || besa_sparse::pack::unpack(&src, &out, &opts))?;
    Ok(pythonize(py, &r)?)
}

/// (name, dtype, shape, format or None, nbytes) of a logical tensor.
type TensorRow = (String, String, Vec<usize>, Option<String>, usize);

/// A checkpoint (packed or plain) opened for reading dense tensors.
#[pyclass(frozen, module = "besa_rs._native")]
struct PackedReader {
    inner: PackedModel,
}

#[pymethods]
impl PackedReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = run(py, move || PackedModel::open(&path))?;
        Ok(Self { inner })
    }

    /// Logical tensors: list of (name, dtype, shape, format or None, nbytes).
    fn tensors(&self) -> Vec<TensorRow> {
        self.inner
            .tensors()
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    dtype_name(t.dtype),
                    t.shape.clone(),
                    t.format().map(|f| f.name().to_string()),
                    t.nbytes(),
                )
            })
            .collect()
    }

    /// The sparsity format declared by config.json ("bitmask", "2:4", "csr") or None.
    fn declared_format(&self) -> Option<String> {
        self.inner.declared_format().map(|f| f.name().to_string())
    }

    /// Whether any tensor is stored packed.
    fn is_packed(&self) -> bool {
        self.inner.is_packed()
    }

    /// Decodes tensor `name` into `out`, a writable contiguous uint8 array of exactly its
    /// dense byte size. Validates structure and checksum first.
    fn read_into(&self, py: Python<'_>, name: &str, out: &Bound<'_, PyArray1<u8>>) -> PyResult<()> {
        let t = self.inner.require(name).map_err(to_py)?;
        let mut rw = out.readwrite();
        let slice = match rw.as_slice_mut() {
            Ok(slice) => slice,
            Err(e) => bail!(shape, "output buffer for {name:?} is not contiguous: {e}"),
        };
        let inner = &self.inner;
        run(py, move || inner.read_into(t, slice))
    }

    /// Per packed tensor info (format, bits / group size where quantized, sizes, nnz).
    fn packed_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = &self.inner;
        let info = run(py, move || inner.packed_info())?;
        Ok(pythonize(py, &info)?)
    }
}

/// The safetensors names of the float dtypes (weights that are packed and simulated).
fn float_dtypes() -> Vec<String> {
    dtype::FLOATS.iter().map(|&d| dtype::name(d)).collect()
}

/// The packed formats: (name, config.json name, other accepted names), in listing order.
#[pyfunction]
fn formats() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    codec::all()
        .iter()
        .map(|f| (f.name(), f.config_name(), f.aliases().to_vec()))
        .collect()
}

/// Repairs leftovers of killed runs next to output directory `out` (restores a previous output
/// moved aside, deletes partial directories of dead processes); returns one line per action.
#[pyfunction]
fn recover_leftovers(py: Python<'_>, out: PathBuf) -> PyResult<Vec<String>> {
    run(py, move || besa_sparse::writer::recover_leftovers(&out))
}

/// Creates a fresh `.NAME.partial-PID-N` directory next to `out`; returns its path.
#[pyfunction]
fn make_partial_dir(py: Python<'_>, out: PathBuf) -> PyResult<PathBuf> {
    run(py, move || besa_sparse::writer::make_partial_dir(&out))
}

/// Moves the complete directory `tmp` onto `out` (atomic swap with an existing `out` when
/// `overwrite`; refused when `out` exists and not `overwrite`).
#[pyfunction]
#[pyo3(signature = (tmp, out, overwrite=false, sync=true))]
fn commit_dir(
    py: Python<'_>,
    tmp: PathBuf,
    out: PathBuf,
    overwrite: bool,
    sync: bool,
) -> PyResult<()> {
    run(py, move || {
        besa_sparse::writer::commit_dir(&tmp, &out, overwrite, sync)
    })
}

/// Test-only crash hook shared with the Rust code (see `besa_sparse::writer::crash_point`).
#[pyfunction]
fn crash_point(step: &str) {
    besa_sparse::writer::crash_point(step)
}

/// Refuses an output path that is the input, inside it or contains it (symlinks resolved).
#[pyfunction]
fn check_out(py: Python<'_>, src: PathBuf, out: PathBuf) -> PyResult<()> {
    run(py, move || besa_sparse::pack::check_out(&src, &out))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(formats, m)?)?;
    m.add("FLOAT_DTYPES", PyTuple::new(m.py(), float_dtypes())?)?;
    m.add_function(wrap_pyfunction!(recover_leftovers, m)?)?;
    m.add_function(wrap_pyfunction!(make_partial_dir, m)?)?;
    m.add_function(wrap_pyfunction!(commit_dir, m)?)?;
    m.add_function(wrap_pyfunction!(crash_point, m)?)?;
    m.add_function(wrap_pyfunction!(check_out, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(unpack, m)?)?;
    m.add_class::<PackedReader>()?;
    Ok(())
}
