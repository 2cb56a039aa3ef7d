//! `besa-rs inspect`: per-tensor dtype/shape/size/zero fraction, per-layer-type summary, totals.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;
use crate::model::Model;
use crate::packed::{PackedModel, PackedTensorInfo, Storage};
use crate::st::dtype_name;
use crate::stats::count_zeros;

#[derive(Debug, Clone, Serialize)]
pub struct TensorStats {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub numel: u64,
    pub nbytes: u64,
    /// Exact zeros (float dtypes only).
    pub zeros: Option<u64>,
    /// zeros / numel (float dtypes only; 0 for empty tensors).
    pub sparsity: Option<f64>,
    pub file: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStats {
    /// Layer type: the name with the block index and everything before it removed
    /// (`model.layers.3.mlp.down_proj.weight` -> `mlp.down_proj.weight`).
    pub kind: String,
    pub tensors: usize,
    pub numel: u64,
    pub nbytes: u64,
    pub zeros: u64,
    pub sparsity: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub tensors: usize,
    pub numel: u64,
    pub nbytes: u64,
    pub file_bytes: u64,
    pub zeros: u64,
    /// Zero fraction over all float tensors.
    pub sparsity: f64,
    /// Zero fraction over 2-D float weights inside numbered blocks (the prunable linears).
    pub block_linear_sparsity: f64,
    pub block_linear_numel: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub format: String,
    pub files: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorStats>,
    pub groups: Vec<GroupStats>,
    pub totals: Totals,
    /// Packed checkpoints only: per packed tensor, format, dense shape, nnz, sparsity, size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packed: Option<Vec<PackedTensorInfo>>,
    /// Packed checkpoints only: what was verified (`None` when verification was skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verified>,
}

/// Result of verifying every packed tensor of a checkpoint (checksums and structure).
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    /// Packed tensors whose structure (popcounts, offsets, indices) was checked.
    pub packed_tensors: usize,
    /// Of those, the ones whose CRC-32 was checked (files written by besa-rs carry one each).
    pub checksums: usize,
}

/// Whether a component of a dotted tensor name is a block index (all digits).
fn is_index(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())
}

/// The block index of a tensor name: its first all-digit component.
pub fn block_index(name: &str) -> Option<usize> {
    name.split('.')
        .find(|p| is_index(p))
        .and_then(|p| p.parse().ok())
}

/// The layer type of a tensor name: the components after the last all-digit component.
pub fn layer_kind(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.iter().rposition(|p| is_index(p)) {
        Some(i) if i + 1 < parts.len() => parts[i + 1..].join("."),
        _ => name.to_string(),
    }
}

/// The prunable block linear rule (pack's default selection, the simulator's selection and
/// inspect's block-linear sparsity): a 2-D `<module>.weight` inside a numbered block.
pub fn is_block_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && in_numbered_block(name)
}

/// True for names inside a numbered block (`...layers.<i>....`).
pub fn in_numbered_block(name: &str) -> bool {
    name.split('.').any(is_index)
}

/// Inspects a model path (file or directory), plain or packed. For a packed checkpoint the
/// per-tensor list shows the stored parts, `packed` lists the packed matrices, and the
/// block-linear sparsity counts packed matrices by their dense shape and kept count.
///
/// Every packed tensor is verified (checksum and structure, an `IntegrityError` /
/// `FormatError` on any defect); [`inspect_with`] with `verify = false` skips that.
pub fn inspect(path: &Path) -> Result<InspectReport> {
    inspect_with(path, true)
}

/// [`inspect`], verifying packed tensors only when `verify`.
pub fn inspect_with(path: &Path, verify: bool) -> Result<InspectReport> {
    let pm = PackedModel::open(path)?;
    let verified = if verify && pm.is_packed() {
        let (packed_tensors, checksums) = pm.verify_all()?;
        Some(Verified {
            packed_tensors,
            checksums,
        })
    } else {
        None
    };
    let mut report = inspect_model(pm.model());
    if pm.is_packed() {
        let info = pm.packed_info()?;
        let info_nnz: BTreeMap<&str, u64> = info.iter().map(|i| (i.name.as_str(), i.nnz)).collect();
        let fmt = pm.format().map(|f| f.name()).unwrap_or("dense");
        report.format = format!("safetensors (packed: {fmt})");
        let zeros_of: BTreeMap<&str, Option<u64>> = report
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.zeros))
            .collect();
        let (mut lin_numel, mut lin_zeros) = (0u64, 0u64);
        for t in pm.tensors() {
            if !is_block_linear(&t.name, &t.shape) {
                continue;
            }
            let numel = t.numel() as u64;
            match &t.storage {
                Storage::Packed(p) => {
                    // kept = stored values that are not zero: 2:4 stores zero fillers in groups
                    // that keep fewer than two weights
                    let stored_zeros = zeros_of
                        .get(pm.part_name(p.values()))
                        .copied()
                        .flatten()
                        .unwrap_or(0);
                    let kept = if p.format.is_quantized() {
                        info_nnz.get(t.name.as_str()).copied().unwrap_or(0)
                    } else {
                        (p.nnz as u64).saturating_sub(stored_zeros).min(numel)
                    };
                    lin_numel += numel;
                    lin_zeros += numel - kept;
                }
                Storage::Dense(_) => {
                    if let Some(Some(z)) = zeros_of.get(t.name.as_str()) {
                        lin_numel += numel;
                        lin_zeros += z;
                    }
                }
            }
        }
        report.totals.block_linear_numel = lin_numel;
        report.totals.block_linear_sparsity = ratio(lin_zeros, lin_numel);
        report.packed = Some(info);
    }
    report.verified = verified;
    Ok(report)
}

pub fn inspect_model(model: &Model) -> InspectReport {
    let refs: Vec<_> = model.tensors().collect();
    let tensors: Vec<TensorStats> = refs
        .par_iter()
        .map(|t| {
            let zeros = count_zeros(t.entry.dtype, model.data(*t));
            let numel = t.entry.numel() as u64;
            TensorStats {
                name: t.entry.name.clone(),
                dtype: dtype_name(t.entry.dtype),
                shape: t.entry.shape.clone(),
                numel,
                nbytes: t.entry.nbytes() as u64,
                zeros,
                sparsity: zeros.map(|z| {
                    if numel == 0 {
                        0.0
                    } else {
                        z as f64 / numel as f64
                    }
                }),
                file: model.files()[t.file]
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            }
        })
        .collect();
    summarize(model, tensors)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn summarize(model: &Model, tensors: Vec<TensorStats>) -> InspectReport {
    let mut groups: BTreeMap<String, GroupStats> = BTreeMap::new();
    let (mut numel, mut nbytes, mut zeros, mut float_numel) = (0u64, 0u64, 0u64, 0u64);
    let (mut lin_numel, mut lin_zeros) = (0u64, 0u64);
    for t in &tensors {
        numel += t.numel;
        nbytes += t.nbytes;
        let kind = layer_kind(&t.name);
        let g = groups.entry(kind.clone()).or_insert(GroupStats {
            kind,
            tensors: 0,
            numel: 0,
            nbytes: 0,
            zeros: 0,
            sparsity: 0.0,
        });
        g.tensors += 1;
        g.numel += t.numel;
        g.nbytes += t.nbytes;
        if let Some(z) = t.zeros {
            zeros += z;
            float_numel += t.numel;
            g.zeros += z;
            if is_block_linear(&t.name, &t.shape) {
                lin_numel += t.numel;
                lin_zeros += z;
            }
        }
    }
    let groups = groups
        .into_values()
        .map(|mut g| {
            g.sparsity = ratio(g.zeros, g.numel);
            g
        })
        .collect();
    InspectReport {
        path: model.root().display().to_string(),
        format: "safetensors".into(),
        files: model
            .files()
            .iter()
            .map(|f| f.path().display().to_string())
            .collect(),
        metadata: model.metadata(),
        totals: Totals {
            tensors: tensors.len(),
            numel,
            nbytes,
            file_bytes: model.files().iter().map(|f| f.file_len() as u64).sum(),
            zeros,
            sparsity: ratio(zeros, float_numel),
            block_linear_sparsity: ratio(lin_zeros, lin_numel),
            block_linear_numel: lin_numel,
        },
        tensors,
        groups,
        packed: None,
        verified: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_kinds() {
        assert_eq!(
            layer_kind("model.layers.3.mlp.down_proj.weight"),
            "mlp.down_proj.weight"
        );
        assert_eq!(
            layer_kind("model.embed_tokens.weight"),
            "model.embed_tokens.weight"
        );
        assert_eq!(layer_kind("h.12"), "h.12");
        assert!(in_numbered_block("model.layers.0.self_attn.q_proj.weight"));
        assert!(!in_numbered_block("lm_head.weight"));
    }
}
