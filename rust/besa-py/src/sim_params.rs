//! `SimParams`: the simulator's parameters given as Python keywords, converted at the boundary
//! (each value checked for its type, naming the keyword) and checked once by
//! `besa_sim::options` (naming the bad value).

use besa_sim::options::{self, Mode, SimOptions, FULL_OPTIONS};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pythonize::pythonize;

use crate::errors::{ensure, to_py, ConfigError};

/// Simulator parameters, checked once (by `besa_sim::options`) when constructed.
#[pyclass(frozen, name = "SimParams", module = "besa_rs._native")]
pub struct Params {
    pub inner: besa_sim::SimParams,
}

/// `v` as `T`, or a `ConfigError` naming the keyword and the expected type.
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
    /// `bandwidth_gbs`, `value_bits`, `act_bits`, `index_bits`, `format` (one of
    /// `SIM_FORMATS`), `prefill_tokens`, `weight_buffer_kb`, `index_buffer_kb`, `input_buffer_kb`,
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
        unknown.sort();
        ensure!(
            unknown.is_empty(),
            config,
            "unknown simulator option(s): {}",
            unknown.join(", ")
        );
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
