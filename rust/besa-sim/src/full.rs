//! Full mode: a corrected, parameterised model of a ViTCoD-like accelerator running an LLM
//! linear layer `y = W x` on `T` tokens (documented in docs/simulator.md).
//!
//! - compute: dense engine does `R x G` MACs per token (the reference charges `C x G`), sparse
//!   engine the kept weights outside the dense columns; the PE columns are split between the
//!   two engines in the best way (`wd` in `0..=W`), and the dense-column count `G` (a prefix of
//!   the columns sorted by kept count) is chosen to minimise compute cycles;
//! - data: weights (values + format metadata) and activations move over a DRAM link of
//!   `bandwidth` bytes/s; `data_cycles = ceil(bytes / bandwidth * clock)`, overlapped with
//!   compute as in ViTCoD: `cycles = max(data, compute)`;
//! - buffers: if the weights do not fit the on-chip weight + index buffers, either the weights
//!   are re-streamed once per token tile (as many tokens as the input/output buffers hold), or
//!   the weights are streamed once in buffer-sized tiles and the inputs are re-streamed per
//!   tile; the cheaper schedule is taken, for the sparse and the dense layer alike.

use serde::{Deserialize, Serialize};

use besa_sparse::codec::{self, BITMASK, CSR, TWO_FOUR};
use besa_sparse::{ensure, Result};

use crate::mask::MaskView;

/// Storage format of the sparse weights (what the metadata bytes are): a codec of
/// `besa_sparse::codec` (bitmask: one bit per position; CSR: a column index per kept value and
/// `R + 1` row pointers; 2:4: `C/2` values per row and a 2-bit position per stored value).
pub use besa_sparse::PackFormat as Format;

/// How full mode charges a format's index (its metadata bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Index {
    /// One bit per position.
    Bitmask,
    /// `index_bits` per kept value plus `R + 1` 32-bit row pointers.
    Csr,
    /// `C/2` values per row (padded) and a 2-bit position per stored value.
    TwoFour,
}

/// The codecs whose storage full mode models. A sparse codec added to `besa_sparse::codec`
/// becomes a choice of `--format` (and of the Python API) by a line here; codecs without a
/// sparse index (pack-quantized) are refused.
const MODELLED: [(Format, Index); 3] = [
    (BITMASK, Index::Bitmask),
    (TWO_FOUR, Index::TwoFour),
    (CSR, Index::Csr),
];

fn index_of(format: Format) -> Option<Index> {
    MODELLED
        .iter()
        .find(|(f, _)| *f == format)
        .map(|&(_, index)| index)
}

/// The storage formats full mode models, in the codecs' listing order.
pub fn formats() -> Vec<Format> {
    codec::all()
        .iter()
        .copied()
        .filter(|&f| index_of(f).is_some())
        .collect()
}

/// The storage format named `name` (a codec name, config name or alias), when full mode
/// models it.
pub fn parse_format(name: &str) -> Result<Format> {
    let format = Format::parse(name)?;
    check_format(format)?;
    Ok(format)
}

fn check_format(format: Format) -> Result<()> {
    let names: Vec<&str> = formats().iter().map(|f| f.name()).collect();
    ensure!(
        index_of(format).is_some(),
        config,
        "{format} has no sparse index that full mode models (expected one of: {})",
        names.join(", ")
    );
    Ok(())
}

/// Hardware and workload parameters of the full model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FullParams {
    pub pe_width: u64,
    pub pe_height: u64,
    /// Clock in Hz (500 MHz).
    pub clock_hz: f64,
    /// DRAM bandwidth in bytes/s (76.8 GB/s).
    pub bandwidth: f64,
    /// Bits per weight value (16: fp16/bf16 LLM weights; ViTCoD used 8).
    pub value_bits: u64,
    /// Bits per activation value.
    pub act_bits: u64,
    /// Bits per CSR column index.
    pub index_bits: u64,
    pub format: Format,
    /// Tokens of the prefill step (decode is 1 token).
    pub prefill_tokens: u64,
    /// On-chip buffers in bytes (ViTCoD: Q/K/V 53 KB each, index 20 KB, output 108 KB); the
    /// weights use the K and V buffers, the inputs the Q buffer.
    pub weight_buffer: u64,
    pub index_buffer: u64,
    pub input_buffer: u64,
    pub output_buffer: u64,
}

impl Default for FullParams {
    fn default() -> Self {
        Self {
            pe_width: 64,
            pe_height: 64,
            clock_hz: 500e6,
            bandwidth: 76.8e9,
            value_bits: 16,
            act_bits: 16,
            index_bits: 32,
            format: BITMASK,
            prefill_tokens: 2048,
            weight_buffer: 2 * 53 * 1024,
            index_buffer: 20 * 1024,
            input_buffer: 53 * 1024,
            output_buffer: 108 * 1024,
        }
    }
}

impl FullParams {
    pub fn validate(&self) -> Result<()> {
        let positive = |x: f64| x > 0.0 && x.is_finite();
        ensure!(
            self.pe_width > 0 && self.pe_height > 0,
            config,
            "full mode: the PE array must be at least 1 x 1"
        );
        ensure!(
            positive(self.clock_hz),
            config,
            "full mode: clock must be a positive number of Hz"
        );
        ensure!(
            positive(self.bandwidth),
            config,
            "full mode: bandwidth must be a positive number of bytes/s"
        );
        ensure!(
            self.value_bits > 0 && self.act_bits > 0 && self.index_bits > 0,
            config,
            "full mode: bits per value, activation and index must be positive"
        );
        ensure!(
            self.prefill_tokens > 0,
            config,
            "full mode: prefill tokens must be at least 1"
        );
        check_format(self.format).map_err(|e| e.context("full mode"))
    }
}

/// One workload (decode or prefill) of one matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub tokens: u64,
    pub cycles: u64,
    pub compute_cycles: u64,
    pub data_cycles: u64,
    pub dense_cycles: u64,
    pub dense_compute_cycles: u64,
    pub dense_data_cycles: u64,
    /// Dense columns and dense-engine PE columns of the best split.
    pub dense_columns: u64,
    pub dense_width: u64,
    pub speedup: f64,
    /// "memory" or "compute": what bounds the sparse layer.
    pub bound: String,
}

/// Full-mode result of one matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FullResult {
    pub format: Format,
    /// False when the format cannot store this mask (2:4 on a mask that is not 2:4); the
    /// numbers are then those of a bitmask.
    pub format_ok: bool,
    pub value_bytes: u64,
    pub metadata_bytes: u64,
    pub dense_bytes: u64,
    /// `dense_bytes / (value_bytes + metadata_bytes)`: the decode speed-up ceiling.
    pub bandwidth_bound: f64,
    pub decode: Step,
    pub prefill: Step,
}

fn bytes_of(bits: u64) -> u64 {
    bits.div_ceil(8)
}

/// Weight bytes (values, metadata) of the mask in a format.
fn storage(rows: u64, cols: u64, kept: u64, index: Index, p: &FullParams) -> (u64, u64) {
    match index {
        Index::Csr => (
            bytes_of(kept * p.value_bits),
            bytes_of(kept * p.index_bits) + (rows + 1) * 4,
        ),
        Index::TwoFour => {
            let stored = rows * cols.div_ceil(4) * 2;
            (bytes_of(stored * p.value_bits), bytes_of(stored * 2))
        }
        Index::Bitmask => (bytes_of(kept * p.value_bits), rows * cols.div_ceil(8)),
    }
}

/// Cycles to move `bytes` over the DRAM link.
fn transfer_cycles(bytes: u64, p: &FullParams) -> u64 {
    (bytes as f64 / p.bandwidth * p.clock_hz).ceil() as u64
}

/// Bytes moved for `t` tokens given the weight bytes, under the cheaper schedule.
fn traffic(rows: u64, cols: u64, weight_bytes: u64, t: u64, p: &FullParams) -> u64 {
    let ab = p.act_bits;
    let act_in = bytes_of(t * cols * ab);
    let act_out = bytes_of(t * rows * ab);
    let on_chip = p.weight_buffer + p.index_buffer;
    if weight_bytes <= on_chip {
        return weight_bytes + act_in + act_out;
    }
    let per_token = bytes_of(cols * ab).max(1);
    let per_token_out = bytes_of(rows * ab).max(1);
    let tile = (p.input_buffer / per_token)
        .min(p.output_buffer / per_token_out)
        .max(1);
    let restream_weights = t.div_ceil(tile) * weight_bytes + act_in + act_out;
    let tiles = weight_bytes.div_ceil(on_chip.max(1));
    let restream_inputs = weight_bytes + tiles * act_in + act_out;
    restream_weights.min(restream_inputs)
}

/// Best compute cycles for `t` tokens: over the dense-column prefix `g` and PE split `wd`.
fn best_compute(
    rows: u64,
    sorted_deg: &[u32],
    kept: u64,
    t: u64,
    p: &FullParams,
) -> (u64, u64, u64) {
    let (w, h) = (p.pe_width, p.pe_height);
    let mut best = (u64::MAX, 0, 0);
    let mut d = 0u64;
    for g in 0..=sorted_deg.len() {
        if g > 0 {
            d += sorted_deg[g - 1] as u64;
        }
        let dense = t * rows * g as u64;
        let sparse = t * (kept - d);
        for wd in 0..=w {
            let ws = w - wd;
            let cd = match (dense, wd) {
                (0, _) => 0,
                (_, 0) => continue,
                _ => dense.div_ceil(wd * h),
            };
            let cs = match (sparse, ws) {
                (0, _) => 0,
                (_, 0) => continue,
                _ => sparse.div_ceil(ws * h),
            };
            let c = cd.max(cs);
            if c < best.0 {
                best = (c, g as u64, wd);
            }
        }
    }
    best
}

/// The full model of one matrix, from its column degrees.
pub fn simulate_full(view: &MaskView<'_>, deg: &[u32], p: &FullParams) -> FullResult {
    let rows = view.rows() as u64;
    let cols = view.cols() as u64;
    let kept: u64 = deg.iter().map(|&d| d as u64).sum();
    // Parameters are validated before any matrix is simulated.
    let index = index_of(p.format).expect("a format full mode models");
    let format_ok = index != Index::TwoFour || view.is_n_of_m(2, 4);
    let index = if format_ok { index } else { Index::Bitmask };
    let (value_bytes, metadata_bytes) = storage(rows, cols, kept, index, p);
    let sparse_bytes = value_bytes + metadata_bytes;
    let dense_bytes = bytes_of(rows * cols * p.value_bits);
    let mut sorted: Vec<u32> = deg.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let step = |t: u64| {
        let (compute, g, wd) = best_compute(rows, &sorted, kept, t, p);
        let data = transfer_cycles(traffic(rows, cols, sparse_bytes, t, p), p);
        let dense_compute = (t * rows * cols).div_ceil(p.pe_width * p.pe_height);
        let dense_data = transfer_cycles(traffic(rows, cols, dense_bytes, t, p), p);
        let cycles = compute.max(data);
        let dense_cycles = dense_compute.max(dense_data);
        Step {
            tokens: t,
            cycles,
            compute_cycles: compute,
            data_cycles: data,
            dense_cycles,
            dense_compute_cycles: dense_compute,
            dense_data_cycles: dense_data,
            dense_columns: g,
            dense_width: wd,
            speedup: ratio(dense_cycles, cycles),
            bound: if data >= compute { "memory" } else { "compute" }.to_string(),
        }
    };
    FullResult {
        format: p.format,
        format_ok,
        value_bytes,
        metadata_bytes,
        dense_bytes,
        bandwidth_bound: ratio(dense_bytes, sparse_bytes),
        decode: step(1),
        prefill: step(p.prefill_tokens),
    }
}

/// `a / b`, with 0/0 = 1 (nothing to do either way) and x/0 = infinity.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::Dtype;

    #[test]
    fn bandwidth_bounds_of_the_spec() {
        // 50% in fp16: bitmask 1.78x, CSR with 32-bit indices 0.67x (row pointers aside).
        let (r, c) = (4096u64, 4096u64);
        let p = FullParams::default();
        let (v, m) = storage(r, c, r * c / 2, Index::Bitmask, &p);
        let b = (r * c * 2) as f64 / (v + m) as f64;
        assert!((b - 1.7778).abs() < 1e-3, "{b}");
        let (v, m) = storage(r, c, r * c / 2, Index::Csr, &p);
        let b = (r * c * 2) as f64 / (v + m) as f64;
        assert!((b - 0.6667).abs() < 1e-3, "{b}");
        let (v, m) = storage(r, c, r * c / 2, Index::TwoFour, &p);
        let b = (r * c * 2) as f64 / (v + m) as f64;
        assert!((b - 1.7778).abs() < 1e-3, "{b}");
    }

    #[test]
    fn dense_matrix_is_no_faster_and_empty_matrix_costs_only_activations() {
        let (r, c) = (64usize, 128usize);
        let ones = vec![1u8; r * c];
        let v = MaskView::new(&ones[..], Dtype::BOOL, r, c).unwrap();
        let res = simulate_full(&v, &v.column_degrees(), &FullParams::default());
        assert!(res.decode.speedup <= 1.0);
        assert!(res.prefill.speedup <= 1.0 + 1e-12);
        let zeros = vec![0u8; r * c];
        let v = MaskView::new(&zeros[..], Dtype::BOOL, r, c).unwrap();
        let res = simulate_full(&v, &v.column_degrees(), &FullParams::default());
        assert_eq!(res.decode.compute_cycles, 0);
        assert!(res.decode.speedup > 1.0);
    }

    #[test]
    fn formats_are_the_modelled_codecs() {
        let names: Vec<&str> = formats().iter().map(|f| f.name()).collect();
        assert_eq!(names, ["bitmask", "2:4", "csr"]);
        for f in codec::all() {
            let modelled = formats().contains(f);
            assert_eq!(parse_format(f.name()).is_ok(), modelled, "{f}");
            for alias in f.aliases() {
                assert_eq!(parse_format(alias).ok(), modelled.then_some(*f), "{alias}");
            }
            let p = FullParams {
                format: *f,
                ..FullParams::default()
            };
            assert_eq!(p.validate().is_ok(), modelled, "{f}");
        }
        let e = parse_format("pack-quantized").unwrap_err();
        assert!(
            e.message.contains("expected one of: bitmask, 2:4, csr"),
            "{e}"
        );
        assert!(parse_format("coo").is_err());
    }

    #[test]
    fn compute_charges_rows_times_dense_columns() {
        // All 16 columns dense, 8 rows, 1 token, 4x4 PEs: 128 MACs over 16 PEs = 8 cycles.
        let (c, _, _) = best_compute(
            8,
            &[8; 16],
            128,
            1,
            &FullParams {
                pe_width: 4,
                pe_height: 4,
                ..FullParams::default()
            },
        );
        assert_eq!(c, 8);
    }
}
