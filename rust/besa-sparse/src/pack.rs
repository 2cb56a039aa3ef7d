//! `pack`: a dense checkpoint -> a packed one (bitmask, 2:4 or CSR); `unpack`: back to a
//! plain Hugging Face checkpoint. Both read through memory maps, write each shard in place
//! through a memory map, hold at most one tensor's per-row counts in memory, and build the
//! output directory under a temporary name that is renamed into place only when complete.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::formats::{self, bitmask_row_bytes, PackFormat};
use crate::inspect::in_numbered_block;
use crate::model::{read_json, INDEX_NAME};
use crate::packed::{PackedModel, Storage, META_CRC_PREFIX, META_FORMAT};
use crate::st::{dtype_itemsize, dtype_name};
use crate::writer::{
    align_order, crash_point, plan_shards, recover_leftovers, shard_name, AtomicDir, PlannedTensor,
    ShardWriter,
};

/// Default shard size (bytes of tensor data per file), as `save_pretrained`'s "5GB".
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;
/// Version string written into `quantization_config.version`.
pub const COMPRESSED_TENSORS_VERSION: &str = "0.14.0";

/// Options of [`pack`].
#[derive(Debug, Clone)]
pub struct PackOptions {
    pub format: PackFormat,
    /// Candidates with a smaller zero fraction are copied through dense.
    pub min_sparsity: f64,
    pub shard_size: u64,
    pub overwrite: bool,
    /// 2:4 only: re-prune groups keeping more than 2 by magnitude instead of failing.
    pub force_24: bool,
    /// Pack exactly these tensors (each must be a 2-D float `.weight`) instead of the default
    /// selection (2-D float `.weight` tensors inside numbered blocks).
    pub tensors: Option<Vec<String>>,
    /// fsync files and directories before the final rename.
    pub sync: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            format: PackFormat::Bitmask,
            min_sparsity: 0.25,
            shard_size: DEFAULT_SHARD_SIZE,
            overwrite: false,
            force_24: false,
            tensors: None,
            sync: true,
        }
    }
}

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

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("json serialises");
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

impl Totals {
    /// Totals of a pack/unpack report from its per-tensor rows and the file sizes (in, out).
    fn of(
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
fn open_for_output(
    src: &Path,
    out: &Path,
    shard_size: u64,
    overwrite: bool,
) -> Result<(PackedModel, Vec<String>)> {
    if shard_size == 0 {
        return Err(Error::config("shard_size must be positive"));
    }
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
fn finish_output(
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
    if o == s || s.starts_with(&o) || o.starts_with(&s) {
        return Err(Error::config(format!(
            "output {} overlaps the input {} (it is the input, inside it or contains it): choose an output outside the input",
            out.display(),
            src.display()
        )));
    }
    Ok(())
}

/// With `--overwrite`, an existing output directory is replaced only when everything in it is
/// something pack/unpack writes (safetensors shards, their index, config.json, tokenizer and
/// generation files): a directory holding anything else was not made by besa-rs and is refused.
fn check_replaceable(out: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(Error::config(format!(
            "output {} exists and is not a directory",
            out.display()
        )));
    }
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
        if !ours {
            return Err(Error::config(format!(
                "refusing to replace {}: it holds {name:?}, which pack/unpack does not write (not a besa-rs output?); move it away or choose another --out",
                out.display()
            )));
        }
    }
    Ok(())
}

/// Appends the notes not already in `warnings` (leftovers are looked at twice: before the
/// input is read and when the output directory is created).
fn add_notes(warnings: &mut Vec<String>, notes: &[String]) {
    for n in notes {
        if !warnings.contains(n) {
            warnings.push(n.clone());
        }
    }
}

/// One group of the output: a dense tensor copied, or a packed module's parts.
enum Job {
    Copy {
        src_idx: usize,
    },
    Pack {
        src_idx: usize,
        module: String,
        counts: Vec<u64>,
        nnz: u64,
    },
}

fn part_plan(
    format: PackFormat,
    module: &str,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    nnz: usize,
) -> Vec<PlannedTensor> {
    let wb = bitmask_row_bytes(cols);
    let p = |s: &str, d: Dtype, shape: Vec<usize>| {
        PlannedTensor::new(format!("{module}.{s}"), d, shape)
    };
    match format {
        PackFormat::Bitmask => vec![
            p("shape", Dtype::I64, vec![2]),
            p("compressed", dtype, vec![nnz]),
            p("bitmask", Dtype::U8, vec![rows, wb]),
            p("row_offsets", Dtype::I64, vec![rows]),
        ],
        PackFormat::TwoFour => vec![
            p("shape", Dtype::I64, vec![2, 1]),
            p("compressed", dtype, vec![rows, cols / 2]),
            p("bitmask", Dtype::U8, vec![rows, wb]),
        ],
        PackFormat::Csr => vec![
            p("shape", Dtype::I64, vec![2]),
            p("crow_indices", Dtype::I64, vec![rows + 1]),
            p("col_indices", Dtype::I32, vec![nnz]),
            p("values", dtype, vec![nnz]),
        ],
    }
}

/// Packs the checkpoint at `src` into the directory `out`.
pub fn pack(src: &Path, out: &Path, opts: &PackOptions) -> Result<Report> {
    if !(0.0..=1.0).contains(&opts.min_sparsity) {
        return Err(Error::config(format!(
            "min_sparsity must be in [0, 1], got {}",
            opts.min_sparsity
        )));
    }
    if opts.force_24 && opts.format != PackFormat::TwoFour {
        return Err(Error::config("--force-24 only applies to --format 2:4"));
    }
    let (pm, notes) = open_for_output(src, out, opts.shard_size, opts.overwrite)?;
    if pm.is_packed() {
        return Err(Error::format(format!(
            "{} is already a packed checkpoint (unpack it first)",
            src.display()
        )));
    }
    let config = pm.model().config().cloned();
    if let Some(q) = config.as_ref().and_then(|c| c.get("quantization_config")) {
        if !q.is_null() {
            return Err(Error::config(format!(
                "{}: config.json already has a quantization_config; packing quantized checkpoints is not supported",
                src.display()
            )));
        }
    }
    let tensors = pm.tensors();
    let file_of = |i: usize| -> String {
        match &tensors[i].storage {
            Storage::Dense(l) => pm.model().files()[l.0].path().display().to_string(),
            Storage::Packed(_) => unreachable!("plain checkpoint"),
        }
    };
    let data_of = |i: usize| -> &[u8] {
        match &tensors[i].storage {
            Storage::Dense(l) => pm.part_data(*l),
            Storage::Packed(_) => unreachable!("plain checkpoint"),
        }
    };

    // Which tensors are asked for.
    let explicit: Option<HashSet<&str>> = opts
        .tensors
        .as_ref()
        .map(|v| v.iter().map(|s| s.as_str()).collect());
    if let Some(ex) = &explicit {
        for n in ex {
            if pm.get(n).is_none() {
                return Err(Error::config(format!(
                    "tensor {n:?} asked to be packed is not in {}",
                    src.display()
                )));
            }
        }
    }
    let all_names: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();

    let mut jobs = Vec::with_capacity(tensors.len());
    let mut reports = Vec::with_capacity(tensors.len());
    let mut warnings = Vec::new();
    let mut dropped_total = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let asked = explicit.as_ref().map(|ex| ex.contains(t.name.as_str()));
        let is_candidate = match asked {
            Some(true) => {
                let where_ = format!("{}: tensor {:?}", file_of(i), t.name);
                if t.shape.len() != 2 {
                    return Err(Error::format(format!(
                        "{where_} has shape {:?}; only 2-D tensors can be packed",
                        t.shape
                    )));
                }
                if !formats::is_packable_dtype(t.dtype) {
                    return Err(Error::dtype(format!(
                        "{where_} has dtype {}; only F16, BF16, F32, F64 can be packed",
                        dtype_name(t.dtype)
                    )));
                }
                if !t.name.ends_with(".weight") {
                    return Err(Error::format(format!(
                        "{where_}: only tensors named <module>.weight can be packed"
                    )));
                }
                true
            }
            Some(false) => false,
            None => {
                t.shape.len() == 2
                    && formats::is_packable_dtype(t.dtype)
                    && t.name.ends_with(".weight")
                    && in_numbered_block(&t.name)
            }
        };
        let dense_bytes = t.nbytes() as u64;
        let mut rep = TensorReport {
            name: t.name.clone(),
            action: "copied".into(),
            format: None,
            reason: None,
            dtype: dtype_name(t.dtype),
            shape: t.shape.clone(),
            nnz: None,
            sparsity: None,
            dense_bytes,
            stored_bytes: dense_bytes,
            ratio: 1.0,
        };
        if !is_candidate {
            jobs.push(Job::Copy { src_idx: i });
            reports.push(rep);
            continue;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let data = data_of(i);
        let counts = formats::row_nnz(t.dtype, data, rows, cols)
            .map_err(|e| e.context(format!("{}: tensor {:?}", file_of(i), t.name)))?;
        let nnz: u64 = counts.iter().sum();
        let numel = (rows * cols) as u64;
        let sparsity = if numel == 0 {
            0.0
        } else {
            1.0 - nnz as f64 / numel as f64
        };
        rep.nnz = Some(nnz);
        rep.sparsity = Some(sparsity);
        let module = t.name.strip_suffix(".weight").expect("checked").to_string();
        let mut reason = None;
        if sparsity < opts.min_sparsity {
            reason = Some(format!(
                "sparsity {:.4} below min_sparsity {}",
                sparsity, opts.min_sparsity
            ));
        }
        let mut stored_nnz = nnz;
        if reason.is_none() && opts.format == PackFormat::TwoFour {
            if cols % 4 != 0 {
                if asked == Some(true) {
                    return Err(Error::shape(format!(
                        "{}: tensor {:?} has {cols} columns, not divisible by 4: cannot be 2:4",
                        file_of(i),
                        t.name
                    )));
                }
                reason = Some(format!("{cols} columns not divisible by 4"));
            } else {
                let (first, dropped) = formats::check_24(t.dtype, data, rows, cols)?;
                if let Some(bad) = first {
                    if !opts.force_24 {
                        return Err(Error::shape(format!(
                            "{}: tensor {:?} is not 2:4 sparse: row {}, columns {}..{} keep {} of 4 (pass --force-24 to re-prune by magnitude)",
                            file_of(i),
                            t.name,
                            bad.row,
                            bad.col,
                            bad.col + 3,
                            bad.kept
                        )));
                    }
                    warnings.push(format!(
                        "--force-24: re-pruned {:?} by magnitude, dropping {dropped} non-zero weights ({:.2}% of the tensor)",
                        t.name,
                        100.0 * dropped as f64 / numel.max(1) as f64
                    ));
                    dropped_total += dropped;
                }
                stored_nnz = (rows * cols / 2) as u64;
            }
        }
        if reason.is_none() {
            let planned = part_plan(
                opts.format,
                &module,
                t.dtype,
                rows,
                cols,
                stored_nnz as usize,
            );
            for p in &planned {
                if all_names.contains(p.name.as_str()) {
                    return Err(Error::format(format!(
                        "{}: packing tensor {:?} would write {:?}, which already exists in the model",
                        file_of(i),
                        t.name,
                        p.name
                    )));
                }
            }
            let size: usize = planned.iter().map(|p| p.nbytes()).sum();
            if size as u64 >= dense_bytes {
                reason = Some(format!(
                    "{} would take {size} bytes, not smaller than dense ({dense_bytes})",
                    opts.format.name()
                ));
            } else {
                rep.action = "packed".into();
                rep.format = Some(opts.format.name().into());
                rep.stored_bytes = size as u64;
                rep.ratio = size as f64 / dense_bytes.max(1) as f64;
                jobs.push(Job::Pack {
                    src_idx: i,
                    module,
                    counts,
                    nnz: stored_nnz,
                });
                reports.push(rep);
                continue;
            }
        }
        rep.reason = reason;
        jobs.push(Job::Copy { src_idx: i });
        reports.push(rep);
    }

    // Plan shards.
    let group_bytes: Vec<usize> = reports.iter().map(|r| r.stored_bytes as usize).collect();
    let shards = plan_shards(&group_bytes, opts.shard_size);
    let n_shards = shards.len();
    let dir = AtomicDir::new(out, opts.overwrite)?;
    warnings.extend(notes);
    add_notes(&mut warnings, dir.notes());
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    let mut total_stored = 0u64;
    for (k, groups) in shards.iter().enumerate() {
        let name = shard_name(k, n_shards);
        let path = dir.path().join(&name);
        let mut plan = Vec::new();
        let mut md: BTreeMap<String, String> = BTreeMap::new();
        md.insert("format".into(), "pt".into());
        for &g in groups {
            match &jobs[g] {
                Job::Copy { src_idx } => {
                    let t = &tensors[*src_idx];
                    plan.push(PlannedTensor::new(t.name.clone(), t.dtype, t.shape.clone()));
                }
                Job::Pack {
                    src_idx,
                    module,
                    nnz,
                    ..
                } => {
                    let t = &tensors[*src_idx];
                    plan.extend(part_plan(
                        opts.format,
                        module,
                        t.dtype,
                        t.shape[0],
                        t.shape[1],
                        *nnz as usize,
                    ));
                    md.insert(format!("{META_CRC_PREFIX}{module}"), "00000000".into());
                }
            }
        }
        if groups.iter().any(|&g| matches!(jobs[g], Job::Pack { .. })) {
            md.insert(META_FORMAT.into(), opts.format.name().into());
        }
        align_order(&mut plan);
        for p in &plan {
            weight_map.insert(p.name.clone(), name.clone());
            total_stored += p.nbytes() as u64;
        }
        let mut w = ShardWriter::create(&path, &plan, Some(&md))?;
        for &g in groups {
            match &jobs[g] {
                Job::Copy { src_idx } => {
                    let t = &tensors[*src_idx];
                    w.write_tensor(&t.name, data_of(*src_idx))?;
                }
                Job::Pack {
                    src_idx,
                    module,
                    counts,
                    nnz,
                } => {
                    let t = &tensors[*src_idx];
                    let crc = encode_into(
                        &mut w,
                        opts.format,
                        module,
                        t.dtype,
                        data_of(*src_idx),
                        t.shape[0],
                        t.shape[1],
                        counts,
                        *nnz,
                    )
                    .map_err(|e| {
                        e.context(format!("{}: tensor {:?}", file_of(*src_idx), t.name))
                    })?;
                    md.insert(format!("{META_CRC_PREFIX}{module}"), format!("{crc:08x}"));
                }
            }
        }
        w.rewrite_metadata(&plan, &md)?;
        w.finish(opts.sync)?;
        files.push(name);
    }
    if n_shards > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_stored},
            "weight_map": weight_map,
        });
        write_json(&dir.path().join(INDEX_NAME), &index)?;
    }

    // config.json
    if let Some(mut cfg) = config {
        let packed: Vec<String> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Pack { module, .. } => Some(module.clone()),
                _ => None,
            })
            .collect();
        let (mut z, mut n) = (0u64, 0u64);
        for r in &reports {
            if let (Some(nnz), true) = (r.nnz, r.shape.len() == 2) {
                let numel = (r.shape[0] * r.shape[1]) as u64;
                n += numel;
                z += numel - nnz.min(numel);
            }
        }
        let global = if n == 0 { 0.0 } else { z as f64 / n as f64 };
        let (method, structure) = match opts.format {
            PackFormat::TwoFour => ("compressed-tensors", "2:4"),
            PackFormat::Bitmask => ("compressed-tensors", "unstructured"),
            PackFormat::Csr => ("besa-rs", "unstructured"),
        };
        let qc = serde_json::json!({
            "quant_method": method,
            "version": COMPRESSED_TENSORS_VERSION,
            "sparsity_config": {
                "format": opts.format.config_name(),
                "global_sparsity": global,
                "sparsity_structure": structure,
                "targets": packed,
                "ignore": ["lm_head"],
                "registry_requires_subclass": false,
            }
        });
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert("quantization_config".into(), qc);
        }
        write_json(&dir.path().join("config.json"), &cfg)?;
    }
    let out_files = finish_output(dir, src, &files, opts.sync)?;

    let input_file_bytes: u64 = pm.model().files().iter().map(|f| f.file_len() as u64).sum();
    let output_file_bytes: u64 = out_files.iter().map(|f| f.bytes).sum();
    let ideal: u64 = reports
        .iter()
        .map(|r| {
            if r.action == "packed" {
                r.stored_bytes - 16
            } else {
                r.dense_bytes
            }
        })
        .sum();
    let packed_n = reports.iter().filter(|r| r.action == "packed").count();
    Ok(Report {
        source: src.display().to_string(),
        out: out.display().to_string(),
        format: opts.format.name().into(),
        files: out_files,
        totals: Totals::of(
            &reports,
            packed_n,
            (input_file_bytes, output_file_bytes),
            ideal,
            dropped_total,
        ),
        tensors: reports,
        warnings,
    })
}

/// Encodes one matrix into its planned parts in `w`; returns the CRC-32 of the parts.
#[allow(clippy::too_many_arguments)]
fn encode_into(
    w: &mut ShardWriter,
    format: PackFormat,
    module: &str,
    dtype: Dtype,
    data: &[u8],
    rows: usize,
    cols: usize,
    counts: &[u64],
    _nnz: u64,
) -> Result<u32> {
    let shape_bytes: Vec<u8> = [rows as i64, cols as i64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let n = |s: &str| format!("{module}.{s}");
    let mut h = crc32fast::Hasher::new();
    match format {
        PackFormat::Bitmask => {
            let names = [n("shape"), n("compressed"), n("bitmask"), n("row_offsets")];
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            w.fill_tensors(&refs, |bufs| {
                let [shape, vals, mask, ro] = bufs else {
                    unreachable!()
                };
                shape.copy_from_slice(&shape_bytes);
                formats::bitmask_encode(dtype, data, rows, cols, counts, mask, vals)?;
                let (offs, _) = formats::prefix_offsets(counts);
                for (c, o) in ro.chunks_exact_mut(8).zip(&offs) {
                    c.copy_from_slice(&(*o as i64).to_le_bytes());
                }
                for b in [&**shape, &**vals, &**mask, &**ro] {
                    h.update(b);
                }
                Ok(())
            })?;
        }
        PackFormat::TwoFour => {
            let names = [n("shape"), n("compressed"), n("bitmask")];
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            w.fill_tensors(&refs, |bufs| {
                let [shape, vals, mask] = bufs else {
                    unreachable!()
                };
                shape.copy_from_slice(&shape_bytes);
                formats::encode_24(dtype, data, rows, cols, mask, vals)?;
                for b in [&**shape, &**vals, &**mask] {
                    h.update(b);
                }
                Ok(())
            })?;
        }
        PackFormat::Csr => {
            let names = [n("shape"), n("crow_indices"), n("col_indices"), n("values")];
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            w.fill_tensors(&refs, |bufs| {
                let [shape, crow, col, vals] = bufs else {
                    unreachable!()
                };
                shape.copy_from_slice(&shape_bytes);
                formats::csr_encode(dtype, data, rows, cols, counts, crow, col, vals)?;
                for b in [&**shape, &**crow, &**col, &**vals] {
                    h.update(b);
                }
                Ok(())
            })?;
        }
    }
    Ok(h.finalize())
}

/// Options of [`unpack`].
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    pub shard_size: u64,
    pub overwrite: bool,
    pub sync: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            shard_size: DEFAULT_SHARD_SIZE,
            overwrite: false,
            sync: true,
        }
    }
}

/// Unpacks a packed checkpoint at `src` into a plain Hugging Face checkpoint at `out`.
pub fn unpack(src: &Path, out: &Path, opts: &UnpackOptions) -> Result<Report> {
    let (pm, notes) = open_for_output(src, out, opts.shard_size, opts.overwrite)?;
    let tensors = pm.tensors();
    let bytes: Vec<usize> = tensors.iter().map(|t| t.nbytes()).collect();
    let shards = plan_shards(&bytes, opts.shard_size);
    let n_shards = shards.len();
    let dir = AtomicDir::new(out, opts.overwrite)?;
    let mut warnings = notes;
    add_notes(&mut warnings, dir.notes());
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    let mut total = 0u64;
    let md: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (k, group) in shards.iter().enumerate() {
        let name = shard_name(k, n_shards);
        let mut plan: Vec<PlannedTensor> = group
            .iter()
            .map(|&i| {
                PlannedTensor::new(
                    tensors[i].name.clone(),
                    tensors[i].dtype,
                    tensors[i].shape.clone(),
                )
            })
            .collect();
        align_order(&mut plan);
        let mut w = ShardWriter::create(&dir.path().join(&name), &plan, Some(&md))?;
        for &i in group {
            let t = &tensors[i];
            match &t.storage {
                Storage::Dense(l) => w.write_tensor(&t.name, pm.part_data(*l))?,
                Storage::Packed(_) => {
                    let name = t.name.clone();
                    w.fill_tensors(&[&name], |bufs| pm.read_into(t, &mut *bufs[0]))?
                }
            }
            weight_map.insert(t.name.clone(), name.clone());
            total += t.nbytes() as u64;
        }
        w.finish(opts.sync)?;
        files.push(name);
    }
    if n_shards > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.path().join(INDEX_NAME), &index)?;
    }
    if let Some(mut cfg) = pm.model().config().cloned() {
        strip_sparsity_config(&mut cfg);
        write_json(&dir.path().join("config.json"), &cfg)?;
    }
    let out_files = finish_output(dir, src, &files, opts.sync)?;
    let reports: Vec<TensorReport> = tensors
        .iter()
        .map(|t| {
            let stored = pm.stored_bytes(t) as u64;
            let (nnz, sp) = match &t.storage {
                Storage::Packed(p) => {
                    let numel = t.numel().max(1) as f64;
                    (Some(p.nnz as u64), Some(1.0 - p.nnz as f64 / numel))
                }
                Storage::Dense(_) => (None, None),
            };
            TensorReport {
                name: t.name.clone(),
                action: if t.format().is_some() {
                    "unpacked".into()
                } else {
                    "copied".into()
                },
                format: t.format().map(|f| f.name().to_string()),
                reason: None,
                dtype: dtype_name(t.dtype),
                shape: t.shape.clone(),
                nnz,
                sparsity: sp,
                dense_bytes: t.nbytes() as u64,
                stored_bytes: stored,
                ratio: stored as f64 / (t.nbytes().max(1)) as f64,
            }
        })
        .collect();
    let input_file_bytes: u64 = pm.model().files().iter().map(|f| f.file_len() as u64).sum();
    let output_file_bytes: u64 = out_files.iter().map(|f| f.bytes).sum();
    let packed_n = reports.iter().filter(|r| r.format.is_some()).count();
    Ok(Report {
        source: src.display().to_string(),
        out: out.display().to_string(),
        format: pm
            .declared_format()
            .or_else(|| tensors.iter().find_map(|t| t.format()))
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| "dense".into()),
        files: out_files,
        totals: Totals::of(
            &reports,
            packed_n,
            (input_file_bytes, output_file_bytes),
            reports.iter().map(|r| r.dense_bytes).sum(),
            0,
        ),
        tensors: reports,
        warnings,
    })
}

/// Removes a pack's sparsity config from a config.json value (and the whole
/// quantization_config when it holds nothing else).
pub fn strip_sparsity_config(cfg: &mut serde_json::Value) {
    let Some(obj) = cfg.as_object_mut() else {
        return;
    };
    let remove_all = match obj
        .get_mut("quantization_config")
        .and_then(|q| q.as_object_mut())
    {
        Some(q) => {
            q.remove("sparsity_config");
            let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
            let has_quant = q.get("config_groups").is_some_and(|g| !g.is_null());
            matches!(method, "compressed-tensors" | "besa-rs") && !has_quant
        }
        None => false,
    };
    if remove_all {
        obj.remove("quantization_config");
    }
}

/// Reads config.json of a directory (for callers that need it without opening tensors).
pub fn read_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join("config.json");
    if p.is_file() {
        Ok(Some(read_json(&p)?))
    } else {
        Ok(None)
    }
}

/// Bytes a dense tensor of this dtype and shape takes (helper for callers).
pub fn dense_nbytes(dtype: Dtype, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() * dtype_itemsize(dtype)
}
