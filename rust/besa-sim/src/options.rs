//! The simulator's parameters as a user gives them (mode, PE array, full-mode hardware in MHz,
//! GB/s and KB), checked once and turned into the engine's [`SimParams`] (Hz, bytes/s, bytes).
//!
//! Every binding (Python keywords, CLI flags) fills [`SimOptions`] and calls
//! [`SimOptions::params`]; no binding repeats the layout or the units of [`SimParams`].

use besa_sparse::{bail, ensure, Result};

use crate::full::{Format, FullParams};
use crate::model::SimParams;
use crate::reference::{RefFloat, RefParams};

/// Which cycle model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The BESA authors' model, bit-for-bit.
    #[default]
    Reference,
    /// The reference numbers plus the corrected model (DRAM, formats, decode / prefill).
    Full,
}

impl Mode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "reference" => Ok(Mode::Reference),
            "full" => Ok(Mode::Full),
            other => bail!(config, "mode must be 'reference' or 'full', not {other:?}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Reference => "reference",
            Mode::Full => "full",
        }
    }
}

/// Parses the precision of the reference threshold search (`f32` or `f64`).
pub fn parse_float(name: &str) -> Result<RefFloat> {
    match name {
        "f32" => Ok(RefFloat::F32),
        "f64" => Ok(RefFloat::F64),
        other => bail!(
            config,
            "float_mode must be 'f32' (the authors' torch code) or 'f64', not {other:?}"
        ),
    }
}

/// Parses the storage format of the full model (`format`): one of [`crate::full::formats`].
pub fn parse_format(name: &str) -> Result<Format> {
    crate::full::parse_format(name).map_err(|e| e.context("format"))
}

/// Options of the full model, in user units; `None` keeps the default (see [`FullParams`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FullOptions {
    pub clock_mhz: Option<f64>,
    pub bandwidth_gbs: Option<f64>,
    pub value_bits: Option<i64>,
    pub act_bits: Option<i64>,
    pub index_bits: Option<i64>,
    pub format: Option<Format>,
    pub prefill_tokens: Option<i64>,
    pub weight_buffer_kb: Option<f64>,
    pub index_buffer_kb: Option<f64>,
    pub input_buffer_kb: Option<f64>,
    pub output_buffer_kb: Option<f64>,
}

/// The full-mode option names, in CLI help order (the keys of [`FullOptions`]).
pub const FULL_OPTIONS: [&str; 11] = [
    "clock_mhz",
    "bandwidth_gbs",
    "value_bits",
    "act_bits",
    "index_bits",
    "format",
    "prefill_tokens",
    "weight_buffer_kb",
    "index_buffer_kb",
    "input_buffer_kb",
    "output_buffer_kb",
];

impl FullOptions {
    /// The names of the options that are set.
    pub fn set_names(&self) -> Vec<&'static str> {
        let set = [
            self.clock_mhz.is_some(),
            self.bandwidth_gbs.is_some(),
            self.value_bits.is_some(),
            self.act_bits.is_some(),
            self.index_bits.is_some(),
            self.format.is_some(),
            self.prefill_tokens.is_some(),
            self.weight_buffer_kb.is_some(),
            self.index_buffer_kb.is_some(),
            self.input_buffer_kb.is_some(),
            self.output_buffer_kb.is_some(),
        ];
        FULL_OPTIONS
            .iter()
            .zip(set)
            .filter_map(|(n, s)| s.then_some(*n))
            .collect()
    }
}

/// Everything a user sets; [`SimOptions::params`] checks it and converts the units.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    pub mode: Mode,
    pub pe_width: i64,
    pub pe_height: i64,
    /// First threshold ratio of the reference search.
    pub start_ratio: f64,
    pub float: RefFloat,
    /// Projection types split into `R`-wide column chunks when wider than tall.
    pub chunk_kinds: Vec<String>,
    pub full: FullOptions,
}

impl Default for SimOptions {
    fn default() -> Self {
        let r = RefParams::default();
        Self {
            mode: Mode::Reference,
            pe_width: r.pe_width as i64,
            pe_height: r.pe_height as i64,
            start_ratio: r.start_ratio,
            float: r.float,
            chunk_kinds: SimParams::default().chunk_kinds,
            full: FullOptions::default(),
        }
    }
}

/// A count that must be at least 1.
fn positive(name: &str, v: i64) -> Result<u64> {
    ensure!(v >= 1, config, "{name} must be >= 1, got {v}");
    Ok(v as u64)
}

/// A rate that must be a positive finite number.
fn positive_rate(name: &str, v: f64) -> Result<f64> {
    ensure!(
        v > 0.0 && v.is_finite(),
        config,
        "{name} must be a positive number, got {v}"
    );
    Ok(v)
}

/// A buffer size in KB (KiB), as bytes.
fn buffer_bytes(name: &str, kb: f64) -> Result<u64> {
    ensure!(
        kb >= 0.0 && kb.is_finite() && kb * 1024.0 <= u64::MAX as f64,
        config,
        "{name} must be a non-negative number of KB, got {kb}"
    );
    Ok((kb * 1024.0) as u64)
}

/// The PE array `(width, height)`, each at least 1.
pub fn pe_array(width: i64, height: i64) -> Result<(u64, u64)> {
    Ok((positive("pe_width", width)?, positive("pe_height", height)?))
}

impl SimOptions {
    /// Checks every option (naming the first bad one) and returns the engine's parameters.
    pub fn params(&self) -> Result<SimParams> {
        let (pe_width, pe_height) = pe_array(self.pe_width, self.pe_height)?;
        let start = self.start_ratio;
        ensure!(
            start >= 0.0 && start.is_finite(),
            config,
            "start_ratio must be a non-negative number, got {start}"
        );
        let set = self.full.set_names();
        ensure!(
            self.mode == Mode::Full || set.is_empty(),
            config,
            "option(s) {} only apply to mode='full'",
            set.join(", ")
        );
        let reference = RefParams {
            pe_width,
            pe_height,
            start_ratio: self.start_ratio,
            float: self.float,
            ..RefParams::default()
        };
        let full = match self.mode {
            Mode::Reference => None,
            Mode::Full => Some(self.full_params(pe_width, pe_height)?),
        };
        Ok(SimParams {
            reference,
            full,
            chunk_kinds: self.chunk_kinds.clone(),
        })
    }

    fn full_params(&self, pe_width: u64, pe_height: u64) -> Result<FullParams> {
        let o = &self.full;
        let d = FullParams::default();
        let count = |name, v: Option<i64>, default| v.map_or(Ok(default), |v| positive(name, v));
        let buffer =
            |name, v: Option<f64>, default| v.map_or(Ok(default), |v| buffer_bytes(name, v));
        let p = FullParams {
            pe_width,
            pe_height,
            clock_hz: match o.clock_mhz {
                Some(v) => positive_rate("clock_mhz", v)? * 1e6,
                None => d.clock_hz,
            },
            bandwidth: match o.bandwidth_gbs {
                Some(v) => positive_rate("bandwidth_gbs", v)? * 1e9,
                None => d.bandwidth,
            },
            value_bits: count("value_bits", o.value_bits, d.value_bits)?,
            act_bits: count("act_bits", o.act_bits, d.act_bits)?,
            index_bits: count("index_bits", o.index_bits, d.index_bits)?,
            format: o.format.unwrap_or(d.format),
            prefill_tokens: count("prefill_tokens", o.prefill_tokens, d.prefill_tokens)?,
            weight_buffer: buffer("weight_buffer_kb", o.weight_buffer_kb, d.weight_buffer)?,
            index_buffer: buffer("index_buffer_kb", o.index_buffer_kb, d.index_buffer)?,
            input_buffer: buffer("input_buffer_kb", o.input_buffer_kb, d.input_buffer)?,
            output_buffer: buffer("output_buffer_kb", o.output_buffer_kb, d.output_buffer)?,
        };
        p.validate()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> SimOptions {
        SimOptions {
            mode: Mode::Full,
            ..SimOptions::default()
        }
    }

    #[test]
    fn defaults_are_the_engine_defaults() {
        let p = SimOptions::default().params().unwrap();
        assert!(p.full.is_none());
        assert_eq!(p.reference.pe_width, 64);
        assert_eq!(p.chunk_kinds, ["down"]);
        let f = full().params().unwrap().full.unwrap();
        let d = FullParams::default();
        assert_eq!(
            (f.clock_hz, f.bandwidth, f.weight_buffer),
            (d.clock_hz, d.bandwidth, d.weight_buffer)
        );
    }

    #[test]
    fn units_are_converted_once() {
        let mut o = full();
        o.pe_width = 32;
        o.full.clock_mhz = Some(250.0);
        o.full.bandwidth_gbs = Some(10.0);
        o.full.weight_buffer_kb = Some(1.5);
        o.full.format = Some(besa_sparse::codec::CSR);
        let f = o.params().unwrap().full.unwrap();
        assert_eq!(f.pe_width, 32);
        assert_eq!(f.clock_hz, 250e6);
        assert_eq!(f.bandwidth, 10e9);
        assert_eq!(f.weight_buffer, 1536);
        assert_eq!(f.format, besa_sparse::codec::CSR);
    }

    #[test]
    fn bad_values_name_the_option() {
        let msg = |o: SimOptions| o.params().unwrap_err().message;
        let o = SimOptions {
            pe_height: 0,
            ..SimOptions::default()
        };
        assert!(msg(o).contains("pe_height"));
        let o = SimOptions {
            start_ratio: f64::NAN,
            ..SimOptions::default()
        };
        assert!(msg(o).contains("start_ratio"));
        let mut o = SimOptions::default();
        o.full.bandwidth_gbs = Some(5.0);
        assert!(msg(o).contains("bandwidth_gbs only apply to mode='full'"));
        let mut o = full();
        o.full.clock_mhz = Some(-1.0);
        assert!(msg(o).contains("clock_mhz"));
        let mut o = full();
        o.full.prefill_tokens = Some(0);
        assert!(msg(o).contains("prefill_tokens"));
        let mut o = full();
        o.full.input_buffer_kb = Some(-2.0);
        assert!(msg(o).contains("input_buffer_kb"));
        assert!(Mode::parse("fast").unwrap_err().message.contains("mode"));
        assert!(parse_float("f16")
            .unwrap_err()
            .message
            .contains("float_mode"));
    }
}
