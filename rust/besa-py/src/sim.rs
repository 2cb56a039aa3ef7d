//! Bindings of `besa_sim`: one call per simulation (a model path, a set of in-memory arrays, or
//! one matrix) with parameters checked once (`sim_params.rs`), reports returned as Python dicts
//! (built from the Rust report structs by `pythonize`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use besa_sim::full;
use besa_sim::model::{
    nothing_selected, open_source, plan, projection_type, simulate_in_memory, simulate_names_with,
    simulate_view, InMemory, MatrixReport, OnMatrix, Planned, Report, TensorMeta,
};
use besa_sim::options::{self, FULL_OPTIONS};
use besa_sim::reference::{chunks, dense_baseline, RefParams};
use besa_sim::MaskView;
use besa_sparse::dtype;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pythonize::pythonize;

use crate::arrays::array_data;
use crate::errors::{panic_to_py, run, to_py};
use crate::sim_params::Params;

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
                    besa_sparse::ensure!(
                        !stop.load(Ordering::Relaxed),
                        config,
                        "stopped: an exception was raised"
                    );
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
            held.push((name.as_str(), array_data(&arr, &dtype, name)?));
        }
        let items = held
            .iter()
            .map(|(name, a)| {
                let [rows, cols] = a.shape;
                Ok(InMemory {
                    name: name.to_string(),
                    dtype: dtype::name(a.dtype),
                    view: MaskView::new(a.data.bytes(), a.dtype, rows, cols)
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

/// Simulates one 2-D weight or mask (a numpy array of the safetensors dtype `dtype`, read in
/// place); `kind` defaults to the projection type of `name`.
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
    let (bytes, [rows, cols], dt) = (data.data.bytes(), data.shape, data.dtype);
    let report = run(py, || {
        p.validate()?;
        let view = MaskView::new(bytes, dt, rows, cols).map_err(|e| e.context(name))?;
        Ok(simulate_view(&view, name, &kind, &dtype::name(dt), p))
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
    let formats = full::formats();
    let names = formats.iter().map(|f| f.name());
    m.add("SIM_FORMATS", PyTuple::new(m.py(), names)?)?;
    m.add_function(wrap_pyfunction!(simulate_path, m)?)?;
    m.add_function(wrap_pyfunction!(simulate_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(simulate_matrix, m)?)?;
    m.add_function(wrap_pyfunction!(dense_baseline_cycles, m)?)?;
    Ok(())
}
