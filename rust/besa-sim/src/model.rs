//! Simulating every selected matrix of a saved model, in parallel, straight from the files.

use std::collections::BTreeMap;
use std::path::Path;

use besa_sparse::{ensure, Error, PackedModel, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::full::{ratio, simulate_full, FullParams, FullResult};
use crate::mask::MaskView;
use crate::options::Mode;
pub use crate::packed_source::PackedSource;
use crate::reference::{simulate_matrix_with_degrees, ChunkResult, RefParams};

/// A tensor as listed by a source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Where the matrices come from. Implement this for a new checkpoint format and return it from
/// [`open_source`]; the rest of the simulator does not change.
pub trait MatrixSource: Send + Sync {
    /// The path (or description) shown in reports.
    fn describe(&self) -> String;
    /// Every tensor, in file order.
    fn tensors(&self) -> Vec<TensorMeta>;
    /// The keep-mask of a 2-D tensor (a view of the stored bytes, or a decoded buffer).
    fn mask(&self, name: &str) -> Result<MaskView<'_>>;
    /// Called when a matrix is done: a memory-mapped source drops its pages from the process
    /// (they stay in the page cache) so resident memory stays bounded by the matrices in flight.
    fn release(&self, _name: &str) {}
}

/// Opens a model for simulation: every checkpoint, plain or packed, is read through
/// besa-sparse's packed reader. Packed tensors are verified up front (checksums and
/// structure), so a corrupt file is refused before any matrix is simulated or any progress
/// reported.
pub fn open_source(path: &Path) -> Result<Box<dyn MatrixSource>> {
    let model = PackedModel::open(path)?;
    if model.is_packed() {
        model.verify_all()?;
    }
    Ok(Box::new(PackedSource { model }))
}

/// The projection type of a tensor name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`, `qkv`,
/// `gate_up`), or the layer kind (the name after the block index) when no pattern matches.
pub fn projection_type(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut end = parts.len();
    if end > 1 && parts[end - 1] == "weight" {
        end -= 1;
    }
    let module = parts[end - 1];
    let parent = if end >= 2 { parts[end - 2] } else { "" };
    let attn = matches!(
        parent,
        "attn" | "attention" | "self_attn" | "self_attention" | "mixer"
    );
    let t = match module {
        "q_proj" | "wq" | "query" | "q_lin" => "q",
        "k_proj" | "wk" | "key" | "k_lin" => "k",
        "v_proj" | "wv" | "value" | "v_lin" => "v",
        "o_proj" | "out_proj" | "wo" | "out_lin" => "o",
        "dense" | "c_proj" if attn => "o",
        "gate_proj" | "w1" => "gate",
        "up_proj" | "w3" | "fc1" | "c_fc" | "dense_h_to_4h" | "fc_in" | "lin1" => "up",
        "down_proj" | "w2" | "fc2" | "dense_4h_to_h" | "fc_out" | "lin2" | "c_proj" => "down",
        "query_key_value" | "qkv_proj" | "c_attn" | "Wqkv" | "qkv" => "qkv",
        "gate_up_proj" => "gate_up",
        _ => "",
    };
    if !t.is_empty() {
        return t.to_string();
    }
    let kind = besa_sparse::inspect::layer_kind(name);
    kind.strip_suffix(".weight").unwrap_or(&kind).to_string()
}

/// The block (layer) index of a name: its first all-digit component.
pub use besa_sparse::inspect::block_index as layer_index;

/// A matrix selected for simulation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Planned {
    pub name: String,
    pub shape: [usize; 2],
    pub dtype: String,
    pub kind: String,
    pub layer: Option<usize>,
}

/// A tensor left out, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// The default selection: 2-D `*weight` tensors inside numbered blocks (the decoder linears);
/// when a file has none (a bare matrix file), every 2-D tensor. Everything else is skipped with
/// a reason.
pub fn plan(tensors: &[TensorMeta]) -> (Vec<Planned>, Vec<Skipped>) {
    let in_block = |t: &TensorMeta| besa_sparse::inspect::is_block_linear(&t.name, &t.shape);
    let any_block = tensors.iter().any(in_block);
    let mut planned = Vec::new();
    let mut skipped = Vec::new();
    for t in tensors {
        if t.shape.len() != 2 {
            skipped.push(Skipped {
                name: t.name.clone(),
                reason: format!(
                    "{}-D tensor (only 2-D weights are simulated)",
                    t.shape.len()
                ),
            });
        } else if any_block && !in_block(t) {
            skipped.push(Skipped {
                name: t.name.clone(),
                reason: "not a weight of a decoder block".into(),
            });
        } else {
            planned.push(Planned {
                name: t.name.clone(),
                shape: [t.shape[0], t.shape[1]],
                dtype: t.dtype.clone(),
                kind: projection_type(&t.name),
                layer: layer_index(&t.name),
            });
        }
    }
    (planned, skipped)
}

/// Which simulation to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimParams {
    pub reference: RefParams,
    /// Also run the full model.
    pub full: Option<FullParams>,
    /// Projection types split into `R`-wide column chunks when `C > R` (the authors: down).
    pub chunk_kinds: Vec<String>,
}

impl SimParams {
    /// Checks what the engine relies on (a PE array of at least 1 x 1, a valid full model);
    /// [`crate::options::SimOptions::params`] builds parameters that pass.
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = &self.full {
            f.validate()?;
        }
        let r = &self.reference;
        ensure!(
            r.pe_width > 0 && r.pe_height > 0,
            config,
            "the PE array must be at least 1 x 1"
        );
        Ok(())
    }

    /// `"reference"` or `"full"`.
    pub fn mode(&self) -> Mode {
        if self.full.is_some() {
            Mode::Full
        } else {
            Mode::Reference
        }
    }
}

impl Default for SimParams {
    fn default() -> Self {
        Self {
            reference: RefParams::default(),
            full: None,
            chunk_kinds: vec!["down".into()],
        }
    }
}

/// Serializes a fixed-size array as a sequence (a list in Python and JSON, not a tuple).
pub(crate) fn as_list<S: serde::Serializer>(
    v: &[usize; 2],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v)
}

/// Everything reported for one matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatrixReport {
    pub name: String,
    pub kind: String,
    pub layer: Option<usize>,
    #[serde(serialize_with = "as_list")]
    pub shape: [usize; 2],
    pub dtype: String,
    pub sparsity: f64,
    pub kept: u64,
    pub cycles: u64,
    pub dense_cycles: u64,
    pub flops: u64,
    pub speedup: f64,
    /// Dense columns G (summed over chunks).
    pub dense_columns: u64,
    /// Threshold ratio and threshold (`ratio * R`) of the best evaluation, per chunk.
    pub threshold_ratios: Vec<f64>,
    pub thresholds: Vec<f64>,
    pub chunks: Vec<ChunkResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full: Option<FullResult>,
}

/// Simulates one matrix view.
pub fn simulate_view(
    view: &MaskView<'_>,
    name: &str,
    kind: &str,
    dtype: &str,
    p: &SimParams,
) -> MatrixReport {
    let chunk = p.chunk_kinds.iter().any(|k| k == kind);
    let deg = view.column_degrees();
    let chunks = simulate_matrix_with_degrees(view, &deg, chunk, &p.reference);
    let kept: u64 = chunks.iter().map(|c| c.best.e).sum();
    let numel = (view.rows() * view.cols()) as u64;
    let cycles: u64 = chunks.iter().map(|c| c.cycles).sum();
    let dense_cycles: u64 = chunks.iter().map(|c| c.dense_cycles).sum();
    let full = p.full.as_ref().map(|fp| simulate_full(view, &deg, fp));
    MatrixReport {
        name: name.to_string(),
        kind: kind.to_string(),
        layer: layer_index(name),
        shape: [view.rows(), view.cols()],
        dtype: dtype.to_string(),
        sparsity: if numel == 0 {
            0.0
        } else {
            1.0 - kept as f64 / numel as f64
        },
        kept,
        cycles,
        dense_cycles,
        flops: chunks.iter().map(|c| c.flops).sum(),
        speedup: ratio(dense_cycles, cycles),
        dense_columns: chunks.iter().map(|c| c.best.g).sum(),
        threshold_ratios: chunks.iter().map(|c| c.best.ratio).collect(),
        thresholds: chunks.iter().map(|c| c.best.threshold).collect(),
        chunks,
        full,
    }
}

/// Simulates the named matrices of a source, several at a time (rayon), each read from the
/// source when its turn comes: memory is bounded by the matrices in flight, not the model.
pub fn simulate_names(
    source: &dyn MatrixSource,
    names: &[String],
    p: &SimParams,
) -> Result<Vec<MatrixReport>> {
    simulate_names_with(source, names, p, &|_| Ok(()))
}

/// [`simulate_names`], calling `on_done` with each report as soon as it is ready (from the
/// worker threads, in completion order); an error from `on_done` stops the run.
pub fn simulate_names_with(
    source: &dyn MatrixSource,
    names: &[String],
    p: &SimParams,
    on_done: &OnMatrix<'_>,
) -> Result<Vec<MatrixReport>> {
    p.validate()?;
    let metas: BTreeMap<String, TensorMeta> = source
        .tensors()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    names
        .par_iter()
        .with_max_len(1)
        .map(|name| {
            let view = source.mask(name)?;
            let dtype = metas.get(name).map(|m| m.dtype.as_str()).unwrap_or("?");
            let report = simulate_view(&view, name, &projection_type(name), dtype, p);
            drop(view);
            source.release(name);
            on_done(&report)?;
            Ok(report)
        })
        .collect()
}

/// A callback that sees each matrix report as soon as it is ready.
pub type OnMatrix<'a> = dyn Fn(&MatrixReport) -> Result<()> + Sync + 'a;

/// A matrix held in memory (for example a numpy buffer): its name, dtype name and keep-mask.
pub struct InMemory<'a> {
    pub name: String,
    pub dtype: String,
    pub view: MaskView<'a>,
}

/// Simulates in-memory matrices in parallel, the projection type guessed from each name.
pub fn simulate_in_memory(
    items: &[InMemory<'_>],
    p: &SimParams,
    on_done: &OnMatrix<'_>,
) -> Result<Vec<MatrixReport>> {
    p.validate()?;
    items
        .par_iter()
        .with_max_len(1)
        .map(|m| {
            let kind = projection_type(&m.name);
            let report = simulate_view(&m.view, &m.name, &kind, &m.dtype, p);
            on_done(&report)?;
            Ok(report)
        })
        .collect()
}

/// The projection types in display order; other kinds follow alphabetically.
pub const TYPE_ORDER: [&str; 9] = ["q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down"];

fn type_key(kind: &str) -> (usize, &str) {
    let rank = TYPE_ORDER
        .iter()
        .position(|t| *t == kind)
        .unwrap_or(TYPE_ORDER.len());
    (rank, kind)
}

/// Per projection type: averages over its matrices (the paper's table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TypeSummary {
    pub matrices: usize,
    pub avg_cycles: f64,
    pub dense_cycles: f64,
    /// dense_cycles / avg_cycles.
    pub speedup: f64,
    pub avg_flops: f64,
    pub sparsity: f64,
    pub avg_dense_columns: f64,
    /// Full mode only (flattened into the same JSON object).
    #[serde(flatten)]
    pub full: FullAggregates,
}

/// Totals over every simulated matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Totals {
    pub matrices: usize,
    pub cycles: u64,
    pub dense_cycles: u64,
    pub speedup: f64,
    pub flops: u64,
    pub sparsity: f64,
    /// Full mode only (flattened into the same JSON object).
    #[serde(flatten)]
    pub full: FullAggregates,
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in xs {
        s += x;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Full-mode aggregates of a group of matrices (all `None` in reference mode).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FullAggregates {
    /// Sum of dense decode cycles over sum of decode cycles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_speedup: Option<f64>,
    /// The same for prefill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_speedup: Option<f64>,
    /// Dense bytes over stored bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bound: Option<f64>,
}

fn full_aggregates(ms: &[&MatrixReport]) -> FullAggregates {
    let fulls: Vec<&FullResult> = ms.iter().filter_map(|m| m.full.as_ref()).collect();
    if fulls.is_empty() || fulls.len() != ms.len() {
        return FullAggregates::default();
    }
    let sum = |f: &dyn Fn(&FullResult) -> u64| fulls.iter().map(|x| f(x)).sum::<u64>();
    FullAggregates {
        decode_speedup: Some(ratio(
            sum(&|x| x.decode.dense_cycles),
            sum(&|x| x.decode.cycles),
        )),
        prefill_speedup: Some(ratio(
            sum(&|x| x.prefill.dense_cycles),
            sum(&|x| x.prefill.cycles),
        )),
        bandwidth_bound: Some(ratio(
            sum(&|x| x.dense_bytes),
            sum(&|x| x.value_bytes + x.metadata_bytes),
        )),
    }
}

/// Per-type summaries in display order ([`TYPE_ORDER`], then alphabetical); a map when
/// serialized.
#[derive(Debug, Clone, Default)]
pub struct Summary(pub Vec<(String, TypeSummary)>);

impl Summary {
    pub fn get(&self, kind: &str) -> Option<&TypeSummary> {
        self.0.iter().find(|(k, _)| k == kind).map(|(_, s)| s)
    }
}

impl Serialize for Summary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// The per-type summary and totals of a list of matrix reports.
pub fn summarize(matrices: &[MatrixReport]) -> (Summary, Totals) {
    let mut groups: BTreeMap<String, Vec<&MatrixReport>> = BTreeMap::new();
    for m in matrices {
        groups.entry(m.kind.clone()).or_default().push(m);
    }
    let mut summary: Vec<(String, TypeSummary)> = groups
        .into_iter()
        .map(|(kind, ms)| {
            let avg_cycles = mean(ms.iter().map(|m| m.cycles as f64));
            let dense_cycles = mean(ms.iter().map(|m| m.dense_cycles as f64));
            let s = TypeSummary {
                matrices: ms.len(),
                avg_cycles,
                dense_cycles,
                speedup: if avg_cycles == 0.0 {
                    if dense_cycles == 0.0 {
                        1.0
                    } else {
                        f64::INFINITY
                    }
                } else {
                    dense_cycles / avg_cycles
                },
                avg_flops: mean(ms.iter().map(|m| m.flops as f64)),
                sparsity: mean(ms.iter().map(|m| m.sparsity)),
                avg_dense_columns: mean(ms.iter().map(|m| m.dense_columns as f64)),
                full: full_aggregates(&ms),
            };
            (kind, s)
        })
        .collect();
    summary.sort_by(|a, b| type_key(&a.0).cmp(&type_key(&b.0)));
    let summary = Summary(summary);
    let all: Vec<&MatrixReport> = matrices.iter().collect();
    let cycles = matrices.iter().map(|m| m.cycles).sum();
    let dense_cycles = matrices.iter().map(|m| m.dense_cycles).sum();
    let numel: u64 = matrices
        .iter()
        .map(|m| (m.shape[0] * m.shape[1]) as u64)
        .sum();
    let kept: u64 = matrices.iter().map(|m| m.kept).sum();
    let totals = Totals {
        matrices: matrices.len(),
        cycles,
        dense_cycles,
        speedup: ratio(dense_cycles, cycles),
        flops: matrices.iter().map(|m| m.flops).sum(),
        sparsity: if numel == 0 {
            0.0
        } else {
            1.0 - kept as f64 / numel as f64
        },
        full: full_aggregates(&all),
    };
    (summary, totals)
}

/// A whole-model report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub path: String,
    pub params: SimParams,
    pub matrices: Vec<MatrixReport>,
    pub summary: Summary,
    pub totals: Totals,
    pub skipped: Vec<Skipped>,
}

impl Report {
    /// The report of simulated matrices: sorted by layer (unnumbered last), projection type
    /// and name; summarized per type and in total.
    pub fn new(
        path: String,
        params: &SimParams,
        mut matrices: Vec<MatrixReport>,
        skipped: Vec<Skipped>,
    ) -> Self {
        matrices.sort_by(|a, b| {
            (a.layer.is_none(), a.layer, type_key(&a.kind), &a.name).cmp(&(
                b.layer.is_none(),
                b.layer,
                type_key(&b.kind),
                &b.name,
            ))
        });
        let (summary, totals) = summarize(&matrices);
        Report {
            mode: params.mode().name(),
            path,
            params: params.clone(),
            matrices,
            summary,
            totals,
            skipped,
        }
    }
}

/// The message when a selection is empty.
pub fn nothing_selected(path: &str, pattern: Option<&str>) -> Error {
    Error::config(match pattern {
        None => format!("{path}: no 2-D weight to simulate in this model"),
        Some(p) => format!("{path}: no 2-D tensor matches --layers {p:?}"),
    })
}

/// Simulates a model path with the default selection (every planned matrix).
pub fn simulate_path(path: &Path, p: &SimParams) -> Result<Report> {
    let source = open_source(path)?;
    let (planned, skipped) = plan(&source.tensors());
    ensure!(
        !planned.is_empty(),
        nothing_selected(&source.describe(), None)
    );
    let names: Vec<String> = planned.into_iter().map(|p| p.name).collect();
    let matrices = simulate_names(source.as_ref(), &names, p)?;
    Ok(Report::new(source.describe(), p, matrices, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_types() {
        for (name, t) in [
            ("model.layers.0.self_attn.q_proj.weight", "q"),
            ("model.layers.0.self_attn.o_proj.weight", "o"),
            ("model.layers.11.mlp.down_proj.weight", "down"),
            ("model.decoder.layers.3.fc1.weight", "up"),
            ("model.decoder.layers.3.self_attn.out_proj.weight", "o"),
            ("transformer.h.2.attn.c_proj.weight", "o"),
            ("transformer.h.2.mlp.c_proj.weight", "down"),
            ("gpt_neox.layers.1.attention.query_key_value.weight", "qkv"),
            ("gpt_neox.layers.1.attention.dense.weight", "o"),
            (
                "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                "down",
            ),
            (
                "model.layers.1.block_sparse_moe.gate.weight",
                "block_sparse_moe.gate",
            ),
        ] {
            assert_eq!(projection_type(name), t, "{name}");
        }
        assert_eq!(layer_index("model.layers.17.mlp.up_proj.weight"), Some(17));
        assert_eq!(layer_index("lm_head.weight"), None);
    }

    #[test]
    fn selection() {
        let t = |n: &str, s: &[usize]| TensorMeta {
            name: n.into(),
            shape: s.to_vec(),
            dtype: "F16".into(),
        };
        let (p, s) = plan(&[
            t("model.embed_tokens.weight", &[10, 4]),
            t("model.layers.0.input_layernorm.weight", &[4]),
            t("model.layers.0.self_attn.q_proj.weight", &[4, 4]),
        ]);
        assert_eq!(p.len(), 1);
        assert_eq!(s.len(), 2);
        let (p, _) = plan(&[t("mask", &[3, 3])]);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn reports_are_sorted_by_layer_then_type() {
        let keep = [1u8, 0, 1, 1];
        let view = MaskView::new(&keep[..], safetensors::tensor::Dtype::BOOL, 2, 2).unwrap();
        let p = SimParams::default();
        let items: Vec<InMemory<'_>> = [
            "lm.extra",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.aaa.weight",
        ]
        .iter()
        .map(|n| InMemory {
            name: n.to_string(),
            dtype: "bool".into(),
            view: view.clone(),
        })
        .collect();
        let seen = std::sync::atomic::AtomicUsize::new(0);
        let ms = simulate_in_memory(&items, &p, &|_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.into_inner(), 6);
        let r = Report::new("x".into(), &p, ms, vec![]);
        let names: Vec<&str> = r.matrices.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.0.mlp.aaa.weight",
                "model.layers.1.self_attn.q_proj.weight",
                "model.layers.1.mlp.down_proj.weight",
                "lm.extra",
            ]
        );
        let kinds: Vec<&str> = r.summary.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["q", "up", "down", "lm.extra", "mlp.aaa"]);
        assert_eq!(r.mode, "reference");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["summary"]["down"]["matrices"] == 2);
    }
}
