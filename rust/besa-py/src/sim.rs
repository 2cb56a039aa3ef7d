//! Bindings of `besa_sim`: a model source (mmap'd, simulated in Rust batches) and single arrays
//! (zero-copy numpy buffers). Reports cross the boundary as JSON strings.

use std::path::PathBuf;

use besa_sim::model::{
    open_source, plan, simulate_names, simulate_view, summarize, MatrixReport, MatrixSource,
    SimParams, TensorMeta,
};
use besa_sim::reference::{chunks, dense_baseline, RefParams};
use besa_sim::{Elem, MaskView};
use besa_sparse::Error;
use numpy::{PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{run, to_py};

fn params(json: &str) -> Result<SimParams, Error> {
    serde_json::from_str(json).map_err(|e| Error::config(format!("simulator parameters: {e}")))
}

macro_rules! to_json {
    ($v:expr) => {
        serde_json::to_string($v).expect("reports serialize")
    };
}

/// A model opened for simulation (safetensors file or directory; the mmap stays open).
#[pyclass(frozen, module = "besa_rs._native")]
struct SimSource {
    inner: Box<dyn MatrixSource>,
}

#[pymethods]
impl SimSource {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = run(py, move || open_source(&path))?;
        Ok(Self { inner })
    }

    /// The path shown in reports.
    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// `{"path", "tensors": [...], "planned": [...], "skipped": [...]}` as JSON.
    fn plan_json(&self) -> String {
        let tensors = self.inner.tensors();
        let (planned, skipped) = plan(&tensors);
        to_json!(&serde_json::json!({
            "path": self.inner.describe(),
            "tensors": tensors,
            "planned": planned,
            "skipped": skipped,
        }))
    }

    /// Simulates the named 2-D tensors (in parallel); a JSON list of matrix reports.
    fn simulate_json(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        params_json: &str,
    ) -> PyResult<String> {
        let src = self.inner.as_ref();
        run(py, move || {
            let p = params(params_json)?;
            Ok(to_json!(&simulate_names(src, &names, &p)?))
        })
    }
}

/// The bytes of a C-contiguous 2-D array of 1/2/4/8-byte elements, and its shape.
fn array_bytes<'py>(arr: &Bound<'py, PyAny>) -> PyResult<(Vec<usize>, ArrayBytes<'py>)> {
    macro_rules! try_kind {
        ($t:ty, $variant:ident) => {
            if let Ok(a) = arr.extract::<PyReadonlyArray2<'py, $t>>() {
                if !a.is_c_contiguous() {
                    return Err(to_py(
                        arr.py(),
                        Error::shape(
                            "the array must be C-contiguous (use numpy.ascontiguousarray)",
                        ),
                    ));
                }
                return Ok((a.shape().to_vec(), ArrayBytes::$variant(a)));
            }
        };
    }
    try_kind!(u8, U8);
    try_kind!(bool, Bool);
    try_kind!(u16, U16);
    try_kind!(u32, U32);
    try_kind!(u64, U64);
    Err(to_py(
        arr.py(),
        Error::dtype("expected a 2-D numpy array of bool/uint8/uint16/uint32/uint64 (float views)"),
    ))
}

enum ArrayBytes<'py> {
    U8(PyReadonlyArray2<'py, u8>),
    Bool(PyReadonlyArray2<'py, bool>),
    U16(PyReadonlyArray2<'py, u16>),
    U32(PyReadonlyArray2<'py, u32>),
    U64(PyReadonlyArray2<'py, u64>),
}

fn raw<T>(s: &[T]) -> &[u8] {
    // SAFETY: u8/bool/u16/u32/u64 have no padding and every byte pattern is a valid u8; the
    // slice covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

impl ArrayBytes<'_> {
    fn bytes(&self) -> &[u8] {
        let contiguous = "C-contiguous checked";
        match self {
            ArrayBytes::U8(a) => raw(a.as_slice().expect(contiguous)),
            ArrayBytes::Bool(a) => raw(a.as_slice().expect(contiguous)),
            ArrayBytes::U16(a) => raw(a.as_slice().expect(contiguous)),
            ArrayBytes::U32(a) => raw(a.as_slice().expect(contiguous)),
            ArrayBytes::U64(a) => raw(a.as_slice().expect(contiguous)),
        }
    }
}

/// Simulates one matrix given as a numpy array (float data passed as an unsigned view of the
/// same bytes with `elem` naming the float type); a JSON matrix report.
#[pyfunction]
#[pyo3(signature = (array, elem, name, kind, dtype, params_json))]
fn simulate_array_json(
    py: Python<'_>,
    array: &Bound<'_, PyAny>,
    elem: &str,
    name: &str,
    kind: &str,
    dtype: &str,
    params_json: &str,
) -> PyResult<String> {
    let (shape, data) = array_bytes(array)?;
    let bytes = data.bytes();
    run(py, move || {
        let p = params(params_json)?;
        let elem = Elem::from_name(elem)?;
        if bytes.len() != shape[0] * shape[1] * elem.size() {
            return Err(Error::dtype(format!(
                "{name}: a {elem:?} matrix needs {}-byte elements",
                elem.size()
            )));
        }
        let view = MaskView::new(bytes, elem, shape[0], shape[1])?;
        if let Some(f) = &p.full {
            f.validate()?;
        }
        if p.reference.pe_width == 0 || p.reference.pe_height == 0 {
            return Err(Error::config("the PE array must be at least 1 x 1"));
        }
        Ok(to_json!(&simulate_view(&view, name, kind, dtype, &p)))
    })
}

/// `{"planned": [...], "skipped": [...]}` for a JSON list of `{"name", "shape", "dtype"}`.
#[pyfunction]
fn plan_json(py: Python<'_>, tensors_json: &str) -> PyResult<String> {
    run(py, move || {
        let ts: Vec<TensorMeta> = serde_json::from_str(tensors_json)
            .map_err(|e| Error::format(format!("tensor list: {e}")))?;
        let (planned, skipped) = plan(&ts);
        Ok(to_json!(
            &serde_json::json!({"planned": planned, "skipped": skipped})
        ))
    })
}

/// `{"summary": {...}, "totals": {...}}` of a JSON list of matrix reports.
#[pyfunction]
fn summarize_json(py: Python<'_>, matrices_json: &str) -> PyResult<String> {
    run(py, move || {
        let ms: Vec<MatrixReport> = serde_json::from_str(matrices_json)
            .map_err(|e| Error::format(format!("matrix reports: {e}")))?;
        let (summary, totals) = summarize(&ms);
        Ok(to_json!(
            &serde_json::json!({"summary": summary, "totals": totals})
        ))
    })
}

/// The default simulator parameters as JSON.
#[pyfunction]
fn default_params_json() -> String {
    let p = SimParams {
        full: Some(Default::default()),
        ..Default::default()
    };
    to_json!(&p)
}

/// Dense-baseline cycles of a `rows x cols` weight: `ceil(c^2 / (W*H))` per (chunk of) matrix,
/// chunks of width `rows` when `chunk` and `cols > rows`.
#[pyfunction]
#[pyo3(signature = (rows, cols, chunk=false, pe_width=64, pe_height=64))]
fn dense_baseline_cycles(
    rows: usize,
    cols: usize,
    chunk: bool,
    pe_width: u64,
    pe_height: u64,
) -> PyResult<u64> {
    if pe_width == 0 || pe_height == 0 {
        return Err(PyErr::new::<pyo3::exceptions::PyValueError, _>(
            "the PE array must be at least 1 x 1",
        ));
    }
    let p = RefParams {
        pe_width,
        pe_height,
        ..RefParams::default()
    };
    Ok(chunks(rows, cols, chunk)
        .iter()
        .map(|[b, e]| dense_baseline((e - b) as u64, &p))
        .sum())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SimSource>()?;
    m.add_function(wrap_pyfunction!(simulate_array_json, m)?)?;
    m.add_function(wrap_pyfunction!(summarize_json, m)?)?;
    m.add_function(wrap_pyfunction!(plan_json, m)?)?;
    m.add_function(wrap_pyfunction!(default_params_json, m)?)?;
    m.add_function(wrap_pyfunction!(dense_baseline_cycles, m)?)?;
    Ok(())
}
