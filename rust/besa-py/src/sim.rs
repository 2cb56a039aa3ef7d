//! Bindings of `besa_sim`: parameters checked once into a `SimParams` object, one call per
//! simulation (a model path, a set of in-memory arrays, or one matrix), reports returned as
//! Python dicts (built from the Rust report structs by `pythonize`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use besa_sim::model::{
    nothing_selected, open_source, plan, projection_type, simulate_in_memory, simulate_names_with,
    simulate_view, InMemory, MatrixReport, OnMatrix, Planned, Report, TensorMeta,
};
use besa_sim::options::{self, Mode, SimOptions, FULL_OPTIONS};
use besa_sim::reference::{chunks, dense_baseline, RefParams};
use besa_sim::{Elem, MaskView};
use besa_sparse::Error;
use bytemuck::NoUninit;
use numpy::{Element, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pythonize::pythonize;

use crate::errors::{panic_to_py, run, to_py, ConfigError};

/// Simulator parameters, checked once (by `besa_sim::options`) when constructed.
#[pyclass(frozen, name = "SimParams", module = "besa_rs._native")]
struct Params {
    inner: besa_sim::SimParams,
}

/// `what` as `T`, or a `ConfigError` naming the option and the expected type.
fn typed<'py, T: FromPyObjectOwned<'py>>(
    key: &str,
    v: &Bound<'py, PyAny>,
    expected: &str,
) -> PyResult<T> {
    v.extract().map_err(|_| {
        let got = v
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        ConfigError::new_err(format!("{key} must be {expected}, got {got}"))
    })
}

fn int(key: &str, v: &Bound<'_, PyAny>) -> PyResult<i64> {
    typed(key, v, "an integer")
}

fn float(key: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    typed(key, v, "a number")
}

fn text(key: &str, v: &Bound<'_, PyAny>) -> PyResult<String> {
    typed(key, v, "a string")
}

#[pymethods]
impl Params {
    /// `mode`: "reference" or "full"; keywords: `pe_width`, `pe_height`, `start_ratio`,
    /// `float_mode` ("f32" | "f64"), `chunk_kinds`, and in full mode `clock_mhz`,
    /// `bandwidth_gbs`, `value_bits`, `act_bits`, `index_bits`, `format` ("bitmask" | "csr" |
    /// "2:4"), `prefill_tokens`, `weight_buffer_kb`, `index_buffer_kb`, `input_buffer_kb`,
    /// `output_buffer_kb` (`None` = default).
    #[new]
    #[pyo3(signature = (mode = None, **options))]
    fn new(mode: Option<&Bound<'_, PyAny>>, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut o = SimOptions::default();
        if let Some(m) = mode {
            o.mode = Mode::parse(&text("mode", m)?).map_err(to_py)?;
        }
        let mut unknown = Vec::new();
        for (k, v) in options.into_iter().flat_map(|d| d.iter()) {
            let key: String = k.extract()?;
            let f = &mut o.full;
            if v.is_none() && FULL_OPTIONS.contains(&key.as_str()) {
                continue; // unset: the default
            }
            match key.as_str() {
                "pe_width" => o.pe_width = int(&key, &v)?,
                "pe_height" => o.pe_height = int(&key, &v)?,
                "start_ratio" => o.start_ratio = float(&key, &v)?,
                "float_mode" => o.float = options::parse_float(&text(&key, &v)?).map_err(to_py)?,
                "chunk_kinds" => o.chunk_kinds = typed(&key, &v, "a list of strings")?,
                "clock_mhz" => f.clock_mhz = Some(float(&key, &v)?),
                "bandwidth_gbs" => f.bandwidth_gbs = Some(float(&key, &v)?),
                "value_bits" => f.value_bits = Some(int(&key, &v)?),
                "act_bits" => f.act_bits = Some(int(&key, &v)?),
                "index_bits" => f.index_bits = Some(int(&key, &v)?),
                "prefill_tokens" => f.prefill_tokens = Some(int(&key, &v)?),
                "format" => {
                    f.format = Some(options::parse_format(&text(&key, &v)?).map_err(to_py)?)
                }
                "weight_buffer_kb" => f.weight_buffer_kb = Some(float(&key, &v)?),
                "index_buffer_kb" => f.index_buffer_kb = Some(float(&key, &v)?),
                "input_buffer_kb" => f.input_buffer_kb = Some(float(&key, &v)?),
                "output_buffer_kb" => f.output_buffer_kb = Some(float(&key, &v)?),
                _ => unknown.push(key),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ConfigError::new_err(format!(
                "unknown simulator option(s): {}",
                unknown.join(", ")
            )));
        }
        Ok(Self {
            inner: o.params().map_err(to_py)?,
        })
    }

    /// "reference" or "full".
    #[getter]
    fn mode(&self) -> &'static str {
        self.inner.mode().name()
    }

    /// The engine's parameters (Hz, bytes/s, bytes), as stored in reports.
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pythonize(py, &self.inner)?)
    }

    fn __repr__(&self) -> String {
        format!("SimParams({:?})", self.inner)
    }
}

/// Runs `work` with the GIL released, while this thread, for each finished report, checks for
/// Ctrl-C and calls `on_matrix` (when given) with the report (a dict) and `total`. An exception
/// there (KeyboardInterrupt included) stops the run and is raised.
fn run_reporting<F>(
    py: Python<'_>,
    on_matrix: Option<&Bound<'_, PyAny>>,
    total: usize,
    work: F,
) -> PyResult<Vec<MatrixReport>>
where
    F: FnOnce(&OnMatrix<'_>) -> besa_sparse::Result<Vec<MatrixReport>> + Send,
{
    let callback = on_matrix.map(|c| c.clone().unbind());
    let (tx, rx) = mpsc::channel::<MatrixReport>();
    let stop = &AtomicBool::new(false);
    let mut raised: Option<PyErr> = None;
    let outcome = py.detach(|| {
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let send = move |m: &MatrixReport| {
                    if stop.load(Ordering::Relaxed) {
                        return Err(Error::config("stopped: an exception was raised"));
                    }
                    // The receiver only goes away after the worker ends.
                    let _ = tx.send(m.clone());
                    Ok(())
                };
                catch_unwind(AssertUnwindSafe(|| work(&send)))
            });
            // Ends when the worker ends (its sender is dropped with it).
            for m in rx {
                if raised.is_some() {
                    continue;
                }
                let called = Python::attach(|py| -> PyResult<()> {
                    py.check_signals()?;
                    if let Some(cb) = &callback {
                        cb.bind(py).call1((pythonize(py, &m)?, total))?;
                    }
                    Ok(())
                });
                if let Err(e) = called {
                    raised = Some(e);
                    stop.store(true, Ordering::Relaxed);
                }
            }
            worker.join()
        })
    });
    if let Some(e) = raised {
        return Err(e);
    }
    match outcome {
        Ok(Ok(r)) => r.map_err(to_py),
        Ok(Err(panic)) | Err(panic) => Err(panic_to_py(panic)),
    }
}

/// The names to simulate: the default plan, or every 2-D tensor whose name the compiled
/// regular expression `layers` finds (`layers.search(name)`).
fn select(
    tensors: &[TensorMeta],
    planned: &[Planned],
    layers: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<String>> {
    let Some(rx) = layers else {
        return Ok(planned.iter().map(|p| p.name.clone()).collect());
    };
    let mut names = Vec::new();
    for t in tensors.iter().filter(|t| t.shape.len() == 2) {
        if rx.call_method1("search", (&t.name,))?.is_truthy()? {
            names.push(t.name.clone());
        }
    }
    Ok(names)
}

fn nothing(path: &str, layers: Option<&Bound<'_, PyAny>>) -> PyResult<PyErr> {
    let pattern = match layers {
        Some(rx) => Some(rx.getattr("pattern")?.str()?.to_string()),
        None => None,
    };
    Ok(to_py(nothing_selected(path, pattern.as_deref())))
}

/// Simulates a model path (safetensors file or directory, packed or not) in one call.
#[pyfunction]
#[pyo3(signature = (path, params, layers=None, on_matrix=None))]
fn simulate_path<'py>(
    py: Python<'py>,
    path: PathBuf,
    params: &Params,
    layers: Option<&Bound<'py, PyAny>>,
    on_matrix: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let p = &params.inner;
    let src = run(py, || open_source(&path))?;
    let tensors = src.tensors();
    let (planned, skipped) = plan(&tensors);
    let names = select(&tensors, &planned, layers)?;
    if names.is_empty() {
        return Err(nothing(&src.describe(), layers)?);
    }
    let source = src.as_ref();
    let matrices = run_reporting(py, on_matrix, names.len(), |cb| {
        simulate_names_with(source, &names, p, cb)
    })?;
    let report = Report::new(src.describe(), p, matrices, skipped);
    Ok(pythonize(py, &report)?)
}

/// The bytes of an array, read in place (C-contiguous) or copied in row-major order.
trait AsBytes {
    fn bytes(&self) -> &[u8];
}

impl<T: Element + NoUninit> AsBytes for PyReadonlyArray2<'_, T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self.as_slice().expect("C-contiguous checked"))
    }
}

impl<T: NoUninit> AsBytes for Vec<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

/// A 2-D weight or mask handed over from Python.
struct ArrayData<'py> {
    data: Box<dyn AsBytes + 'py>,
    shape: [usize; 2],
    elem: Elem,
}

/// The array as a `T` matrix; `None` when its dtype is not `T`.
fn typed_array<'py, T: Element + NoUninit>(
    arr: &Bound<'py, PyAny>,
) -> Option<Box<dyn AsBytes + 'py>> {
    let a = arr.extract::<PyReadonlyArray2<'py, T>>().ok()?;
    if a.is_c_contiguous() {
        Some(Box::new(a))
    } else {
        Some(Box::new(a.as_array().iter().copied().collect::<Vec<T>>()))
    }
}

/// Reads `arr` (a numpy array) as a 2-D matrix of dtype `dtype` (`"bfloat16"`: the bits in a
/// uint16 array).
fn array_data<'py>(arr: &Bound<'py, PyAny>, dtype: &str, name: &str) -> PyResult<ArrayData<'py>> {
    let untyped = arr.cast::<PyUntypedArray>().map_err(|_| {
        to_py(Error::dtype(format!(
            "{name}: expected a numpy array, got {}",
            arr.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )))
    })?;
    let shape = untyped.shape().to_vec();
    if shape.len() != 2 {
        return Err(to_py(Error::shape(format!(
            "{name}: expected a 2-D weight or mask, got shape {shape:?}"
        ))));
    }
    let (elem, data) = match dtype {
        "bool" => (Elem::Byte, typed_array::<bool>(arr)),
        "float16" => (Elem::Half, typed_array::<half::f16>(arr)),
        "bfloat16" => (Elem::Half, typed_array::<u16>(arr)),
        "float32" => (Elem::F32, typed_array::<f32>(arr)),
        "float64" => (Elem::F64, typed_array::<f64>(arr)),
        other => {
            return Err(to_py(Error::dtype(format!(
                "{name}: dtype {other} is not supported (expected bool, float16, bfloat16, \
                 float32 or float64)"
            ))))
        }
    };
    let data = data.ok_or_else(|| {
        let got = untyped
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_default();
        to_py(Error::dtype(format!(
            "{name}: the {dtype} weight came as a numpy array of dtype {got}"
        )))
    })?;
    Ok(ArrayData {
        data,
        shape: [shape[0], shape[1]],
        elem,
    })
}

/// Simulates in-memory tensors (a state dict) in one call: `tensors` lists every tensor
/// (`name`, `shape`, `dtype`) for the plan; `fetch(name)` returns the `(array, dtype)` of a
/// selected one, called `batch` at a time (default: twice the worker threads), so only a batch
/// is held at once.
#[pyfunction]
#[pyo3(signature = (label, tensors, fetch, params, layers=None, on_matrix=None, batch=None))]
#[allow(clippy::too_many_arguments)]
fn simulate_arrays<'py>(
    py: Python<'py>,
    label: String,
    tensors: Vec<(String, Vec<usize>, String)>,
    fetch: &Bound<'py, PyAny>,
    params: &Params,
    layers: Option<&Bound<'py, PyAny>>,
    on_matrix: Option<&Bound<'py, PyAny>>,
    batch: Option<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let p = &params.inner;
    let metas: Vec<TensorMeta> = tensors
        .into_iter()
        .map(|(name, shape, dtype)| TensorMeta { name, shape, dtype })
        .collect();
    let (planned, skipped) = plan(&metas);
    let names = select(&metas, &planned, layers)?;
    if names.is_empty() {
        return Err(nothing(&label, layers)?);
    }
    let step = batch.unwrap_or(2 * rayon::current_num_threads()).max(1);
    let mut matrices = Vec::with_capacity(names.len());
    for group in names.chunks(step) {
        let mut held = Vec::with_capacity(group.len());
        for name in group {
            let (arr, dtype): (Bound<'py, PyAny>, String) = fetch.call1((name,))?.extract()?;
            let data = array_data(&arr, &dtype, name)?;
            held.push((name.as_str(), dtype, data));
        }
        let items = held
            .iter()
            .map(|(name, dtype, a)| {
                let [rows, cols] = a.shape;
                Ok(InMemory {
                    name: name.to_string(),
                    dtype: dtype.clone(),
                    view: MaskView::new(a.data.bytes(), a.elem, rows, cols)
                        .map_err(|e| to_py(e.context(name)))?,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let got = run_reporting(py, on_matrix, names.len(), |cb| {
            simulate_in_memory(&items, p, cb)
        })?;
        matrices.extend(got);
    }
    let report = Report::new(label, p, matrices, skipped);
    Ok(pythonize(py, &report)?)
}

/// Simulates one 2-D weight or mask (a numpy array of dtype `dtype`, read in place); `kind`
/// defaults to the projection type of `name`.
#[pyfunction]
#[pyo3(signature = (array, dtype, params, name="matrix", kind=None))]
fn simulate_matrix<'py>(
    py: Python<'py>,
    array: &Bound<'py, PyAny>,
    dtype: &str,
    params: &Params,
    name: &str,
    kind: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let data = array_data(array, dtype, name)?;
    let kind = kind.map_or_else(|| projection_type(name), str::to_string);
    let p = &params.inner;
    let (bytes, [rows, cols], elem) = (data.data.bytes(), data.shape, data.elem);
    let report = run(py, || {
        p.validate()?;
        let view = MaskView::new(bytes, elem, rows, cols).map_err(|e| e.context(name))?;
        Ok(simulate_view(&view, name, &kind, dtype, p))
    })?;
    Ok(pythonize(py, &report)?)
}

/// Dense-baseline cycles of a `rows x cols` weight: `ceil(c^2 / (W*H))` per (chunk of) matrix,
/// chunks of width `rows` when `chunk` and `cols > rows`.
#[pyfunction]
#[pyo3(signature = (rows, cols, chunk=false, pe_width=64, pe_height=64))]
fn dense_baseline_cycles(
    rows: usize,
    cols: usize,
    chunk: bool,
    pe_width: i64,
    pe_height: i64,
) -> PyResult<u64> {
    let (pe_width, pe_height) = options::pe_array(pe_width, pe_height).map_err(to_py)?;
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
    m.add_class::<Params>()?;
    m.add("SIM_FULL_OPTIONS", PyTuple::new(m.py(), FULL_OPTIONS)?)?;
    m.add_function(wrap_pyfunction!(simulate_path, m)?)?;
    m.add_function(wrap_pyfunction!(simulate_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(simulate_matrix, m)?)?;
    m.add_function(wrap_pyfunction!(dense_baseline_cycles, m)?)?;
    Ok(())
}
