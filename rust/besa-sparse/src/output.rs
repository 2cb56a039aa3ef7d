//! What pack and unpack share: checks of the output path, the reports, the one shard loop
//! that writes a checkpoint (groups of tensors into size-bounded shards, each file written
//! through [`ShardWriter`], the index when there are several), and the atomic output
//! directory ([`AtomicDir`]) with the model's tokenizer and generation files copied along.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ensure;
use crate::error::{Error, Result};
use crate::model::INDEX_NAME;
use crate::packed::PackedModel;
use crate::writer::{
    align_order, crash_point, plan_shards, recover_leftovers, shard_name, AtomicDir, PlannedTensor,
    ShardWriter,
};

/// Default shard size (bytes of tensor data per file), as `save_pretrained`'s "5GB".
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Per tensor line of a pack/unpack report.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    /// "packed" or "copied".
    pub action: String,
    pub format: Option<String>,
    /// Why a candidate was copied instead of packed.
    pub reason: Option<String>,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub nnz: Option<u64>,
    pub sparsity: Option<f64>,
    pub dense_bytes: u64,
    pub stored_bytes: u64,
    /// stored / dense.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub tensors: usize,
    pub packed: usize,
    pub copied: usize,
    /// Tensor bytes of the dense model.
    pub dense_bytes: u64,
    /// Tensor bytes stored in the output.
    pub stored_bytes: u64,
    /// Sizes of the safetensors files read and written (headers included).
    pub input_file_bytes: u64,
    pub output_file_bytes: u64,
    /// output_file_bytes / input_file_bytes.
    pub ratio: f64,
    /// The format's ideal size (packed matrices without the `shape` tensors) + copied tensors.
    pub ideal_bytes: u64,
    pub weights_dropped_by_force_24: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub out: String,
    pub format: String,
    pub files: Vec<FileReport>,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
    pub warnings: Vec<String>,
}

/// Files of a model directory copied unchanged into the output (tokenizer, generation, chat
/// template, ...). Weights, the index and config.json are written by pack/unpack themselves.
pub fn is_aux_file(name: &str) -> bool {
    const EXACT: [&str; 7] = [
        "generation_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "preprocessor_config.json",
        "spiece.model",
        "README.md",
    ];
    EXACT.contains(&name)
        || name.starts_with("tokenizer")
        || name.starts_with("vocab")
        || name.starts_with("chat_template")
        || name.ends_with(".tiktoken")
}

fn copy_aux_files(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    if !src.is_dir() {
        return Ok(copied);
    }
    let mut names: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| Error::io(src, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_aux_file(n))
        .collect();
    names.sort();
    for n in names {
        std::fs::copy(src.join(&n), dst.join(&n)).map_err(|e| Error::io(&src.join(&n), e))?;
        copied.push(n);
    }
    Ok(copied)
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("json serialises");
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

impl Totals {
    /// Totals of a pack/unpack report from its per-tensor rows and the file sizes (in, out).
    pub fn of(
        reports: &[TensorReport],
        packed_n: usize,
        (input_file_bytes, output_file_bytes): (u64, u64),
        ideal_bytes: u64,
        weights_dropped_by_force_24: u64,
    ) -> Self {
        Totals {
            tensors: reports.len(),
            packed: packed_n,
            copied: reports.len() - packed_n,
            dense_bytes: reports.iter().map(|r| r.dense_bytes).sum(),
            stored_bytes: reports.iter().map(|r| r.stored_bytes).sum(),
            input_file_bytes,
            output_file_bytes,
            ratio: output_file_bytes as f64 / input_file_bytes.max(1) as f64,
            ideal_bytes,
            weights_dropped_by_force_24,
        }
    }
}

/// First step of pack and unpack: checks the output settings, then opens the input.
pub fn open_for_output(
    src: &Path,
    out: &Path,
    shard_size: u64,
    overwrite: bool,
) -> Result<(PackedModel, Vec<String>)> {
    ensure!(shard_size > 0, config, "shard_size must be positive");
    check_out(src, out)?;
    // Killed runs' leftovers first, so that a previous output moved aside is back in place
    // before deciding anything about it.
    let notes = recover_leftovers(out)?;
    if out.exists() && !overwrite {
        let mut msg = format!(
            "output directory {} already exists (pass --overwrite to replace it)",
            out.display()
        );
        for n in &notes {
            msg.push_str("; ");
            msg.push_str(n);
        }
        return Err(Error::config(msg));
    }
    if overwrite {
        check_replaceable(out)?;
    }
    Ok((PackedModel::open(src)?, notes))
}

/// Last step of pack and unpack: copies the tokenizer/generation files next to the written
/// shards, measures the shards, and renames the directory into place.
pub fn finish_output(
    dir: AtomicDir,
    src: &Path,
    files: &[String],
    sync: bool,
) -> Result<Vec<FileReport>> {
    if let Some(d) = model_dir(src) {
        copy_aux_files(&d, dir.path())?;
    }
    crash_point("pack-before-commit");
    let out_files = files
        .iter()
        .map(|n| FileReport {
            name: n.clone(),
            bytes: std::fs::metadata(dir.path().join(n))
                .map(|m| m.len())
                .unwrap_or(0),
        })
        .collect();
    dir.commit(sync)?;
    Ok(out_files)
}

fn model_dir(src: &Path) -> Option<PathBuf> {
    if src.is_dir() {
        Some(src.to_path_buf())
    } else {
        src.parent().map(|p| p.to_path_buf())
    }
}

/// `p` with symlinks resolved, also when it does not exist yet (its nearest existing
/// ancestor is resolved and the rest appended).
pub fn resolve_lenient(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(Path::new("."), e))?
            .join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return Ok(out);
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Refuses an output that is the input, inside it or contains it (symlinks resolved), whether
/// or not the output exists yet.
pub fn check_out(src: &Path, out: &Path) -> Result<()> {
    let s = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
    let o = resolve_lenient(out)?;
    ensure!(
        !(o == s || s.starts_with(&o) || o.starts_with(&s)),
        config,
        "output {} overlaps the input {} (it is the input, inside it or contains it): choose an output outside the input",
        out.display(),
        src.display()
    );
    Ok(())
}

/// With `--overwrite`, an existing output directory is replaced only when everything in it is
/// something pack/unpack writes (safetensors shards, their index, config.json, tokenizer and
/// generation files): a directory holding anything else was not made by besa-rs and is refused.
fn check_replaceable(out: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    ensure!(
        meta.is_dir(),
        config,
        "output {} exists and is not a directory",
        out.display()
    );
    let rd = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(out, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        let ours = is_file
            && (name.ends_with(".safetensors")
                || name == INDEX_NAME
                || name == "config.json"
                || is_aux_file(&name));
        ensure!(
            ours,
            config,
            "refusing to replace {}: it holds {name:?}, which pack/unpack does not write (not a besa-rs output?); move it away or choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// Appends the notes not already in `warnings` (leftovers are looked at twice: before the
/// input is read and when the output directory is created).
pub fn add_notes(warnings: &mut Vec<String>, notes: &[String]) {
    for n in notes {
        if !warnings.contains(n) {
            warnings.push(n.clone());
        }
    }
}

/// Writes one group of the output into its shard; returns metadata values to store in the
/// shard's header (fixed-width placeholders planned in [`OutGroup::meta`]).
pub type WriteGroup<'a> = Box<dyn Fn(&mut ShardWriter) -> Result<Vec<(String, String)>> + 'a>;

/// Tensors written together into one shard: a copied or decoded tensor, or a packed module.
pub struct OutGroup<'a> {
    pub tensors: Vec<PlannedTensor>,
    /// `__metadata__` entries of the shard holding this group (placeholders for values the
    /// write returns).
    pub meta: Vec<(String, String)>,
    pub write: WriteGroup<'a>,
}

/// The shard loop of pack and unpack: plans shards of about `shard_size` bytes of tensor data,
/// writes each file (planned header first, then every group), and the index when there are
/// several shards. Returns the file names.
pub fn write_shards(
    dir: &Path,
    groups: &[OutGroup<'_>],
    shard_size: u64,
    sync: bool,
) -> Result<Vec<String>> {
    let sizes: Vec<usize> = groups
        .iter()
        .map(|g| g.tensors.iter().map(|t| t.nbytes()).sum())
        .collect();
    let shards = plan_shards(&sizes, shard_size);
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::with_capacity(shards.len());
    let mut total = 0u64;
    for (k, members) in shards.iter().enumerate() {
        let name = shard_name(k, shards.len());
        let mut md: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let mut plan = Vec::new();
        for &g in members {
            plan.extend(groups[g].tensors.iter().cloned());
            md.extend(groups[g].meta.iter().cloned());
        }
        align_order(&mut plan);
        for p in &plan {
            weight_map.insert(p.name.clone(), name.clone());
            total += p.nbytes() as u64;
        }
        let mut w = ShardWriter::create(&dir.join(&name), &plan, Some(&md))?;
        let mut rewrite = false;
        for &g in members {
            let values = (groups[g].write)(&mut w)?;
            rewrite |= !values.is_empty();
            md.extend(values);
        }
        if rewrite {
            w.rewrite_metadata(&plan, &md)?;
        }
        w.finish(sync)?;
        files.push(name);
    }
    if shards.len() > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_NAME), &index)?;
    }
    Ok(files)
}

/// Sizes of the safetensors files read and written.
pub fn file_bytes(pm: &PackedModel, out_files: &[FileReport]) -> (u64, u64) {
    let input: u64 = pm.model().files().iter().map(|f| f.file_len() as u64).sum();
    (input, out_files.iter().map(|f| f.bytes).sum())
}
