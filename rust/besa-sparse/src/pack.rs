//! `pack`: a dense checkpoint -> a packed one, in any format of [`crate::codec`]. Reads
//! through memory maps, holds the candidates' per-row counts and at most two tensors' encoded
//! parts in memory (one being written in the background), writes through the shard loop
//! shared with unpack ([`crate::output::write_shards`]) into a directory renamed into place
//! only when complete.

use std::collections::HashSet;
use std::path::Path;

use crate::codec::{self, kernels, nbit, Admission, EncodeOptions, Matrix, PackFormat};
use crate::dtype::{self, name as dtype_name};
use crate::error::{Error, Result};
use crate::inspect::{in_numbered_block, is_block_linear};
use crate::output::{
    add_notes, file_bytes, finish_output, open_for_output, write_json, write_shards, OutGroup,
    Report, TensorReport, Totals,
};
use crate::packed::{crc_of, LogicalTensor, PackedModel, Storage, META_CRC_PREFIX, META_FORMAT};
use crate::quant_file::SideFile;
use crate::writer::PlannedTensor;
use crate::{bail, ensure};

pub use crate::output::{check_out, is_aux_file, resolve_lenient, DEFAULT_SHARD_SIZE};
pub use crate::unpack::{strip_sparsity_config, unpack, UnpackOptions};

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
    /// selection (the prunable block linears, [`is_block_linear`]).
    pub tensors: Option<Vec<String>>,
    /// fsync files and directories before the final rename.
    pub sync: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            format: codec::BITMASK,
            min_sparsity: 0.25,
            shard_size: DEFAULT_SHARD_SIZE,
            overwrite: false,
            force_24: false,
            tensors: None,
            sync: true,
        }
    }
}

/// What pack does with one input tensor.
enum Job {
    Copy,
    Pack {
        module: String,
        counts: Vec<u64>,
        stored_nnz: usize,
    },
}

/// A tensor's job, its report line, and what `--force-24` dropped from it.
struct Decision {
    job: Job,
    report: TensorReport,
    dropped: u64,
}

/// Packs the checkpoint at `src` into the directory `out`.
pub fn pack(src: &Path, out: &Path, opts: &PackOptions) -> Result<Report> {
    ensure!(
        (0.0..=1.0).contains(&opts.min_sparsity),
        config,
        "min_sparsity must be in [0, 1], got {}",
        opts.min_sparsity
    );
    ensure!(
        !opts.force_24 || opts.format.has_force(),
        config,
        "--force-24 only applies to --format 2:4"
    );
    let (pm, notes) = open_for_output(src, out, opts.shard_size, opts.overwrite)?;
    let config = check_plain_input(&pm, src)?;
    let side = if opts.format.is_quantized() {
        let dir = if src.is_dir() {
            src.to_path_buf()
        } else {
            src.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        Some(SideFile::open(&dir)?)
    } else {
        None
    };
    let asked = asked_tensors(&pm, src, opts)?;
    if let (Some(side), Some(names)) = (&side, &asked) {
        for n in names {
            ensure!(
                side.layers.contains_key(*n),
                config,
                "tensor {n:?} asked to be packed as {} is not quantized ({} does not list it)",
                opts.format.name(),
                side.path().display()
            );
        }
    }
    if let Some(side) = &side {
        for n in side.layers.keys() {
            ensure!(
                pm.get(n).is_some(),
                format,
                "{}: lists {n:?}, which is not in {}",
                side.path().display(),
                src.display()
            );
        }
    }
    let all_names: HashSet<&str> = pm.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut decisions = Vec::with_capacity(pm.tensors().len());
    let mut warnings = Vec::new();
    for t in pm.tensors() {
        let want = asked.as_ref().map(|a| a.contains(t.name.as_str()));
        let d = match &side {
            Some(side) => decide_quantized(&pm, t, want, side, &all_names, opts)?,
            None => decide(&pm, t, want, &all_names, opts)?,
        };
        if d.dropped > 0 {
            warnings.push(format!(
                "--force-24: re-pruned {:?} by magnitude, dropping {} non-zero weights ({:.2}% of the tensor)",
                t.name,
                d.dropped,
                100.0 * d.dropped as f64 / t.numel().max(1) as f64
            ));
        }
        decisions.push(d);
    }
    let dir = crate::writer::AtomicDir::new(out, opts.overwrite)?;
    warnings.extend(notes);
    add_notes(&mut warnings, dir.notes());
    let groups: Vec<OutGroup<'_>> = pm
        .tensors()
        .iter()
        .zip(&decisions)
        .map(|(t, d)| out_group(&pm, t, &d.job, opts.format, side.as_ref()))
        .collect();
    let files = write_shards(dir.path(), &groups, opts.shard_size, opts.sync)?;
    drop(groups);
    if let Some(mut cfg) = config {
        match &side {
            Some(side) => add_quant_config(&mut cfg, &pm, &decisions, opts.format, side),
            None => add_sparsity_config(&mut cfg, &decisions, opts.format),
        }
        write_json(&dir.path().join("config.json"), &cfg)?;
    }
    let out_files = finish_output(dir, src, &files, opts.sync)?;
    let reports: Vec<TensorReport> = decisions.iter().map(|d| d.report.clone()).collect();
    let ideal = reports
        .iter()
        .map(|r| match r.action.as_str() {
            "packed" => r.stored_bytes - 16,
            _ => r.dense_bytes,
        })
        .sum();
    let packed_n = reports.iter().filter(|r| r.action == "packed").count();
    let dropped = decisions.iter().map(|d| d.dropped).sum();
    let totals = Totals::of(
        &reports,
        packed_n,
        file_bytes(&pm, &out_files),
        ideal,
        dropped,
    );
    Ok(Report {
        source: src.display().to_string(),
        out: out.display().to_string(),
        format: opts.format.name().into(),
        files: out_files,
        tensors: reports,
        totals,
        warnings,
    })
}

/// Refuses a packed or quantized input; returns its config.json.
fn check_plain_input(pm: &PackedModel, src: &Path) -> Result<Option<serde_json::Value>> {
    ensure!(
        !pm.is_packed(),
        format,
        "{} is already a packed checkpoint (unpack it first)",
        src.display()
    );
    let config = pm.model().config().cloned();
    if let Some(q) = config.as_ref().and_then(|c| c.get("quantization_config")) {
        ensure!(
            q.is_null(),
            config,
            "{}: config.json already has a quantization_config; packing quantized checkpoints is not supported",
            src.display()
        );
    }
    Ok(config)
}

/// The tensors asked for by name (each must exist), or `None` for the default selection.
fn asked_tensors<'a>(
    pm: &PackedModel,
    src: &Path,
    opts: &'a PackOptions,
) -> Result<Option<HashSet<&'a str>>> {
    let Some(names) = &opts.tensors else {
        return Ok(None);
    };
    for n in names {
        ensure!(
            pm.get(n).is_some(),
            config,
            "tensor {n:?} asked to be packed is not in {}",
            src.display()
        );
    }
    Ok(Some(names.iter().map(|s| s.as_str()).collect()))
}

/// "<file>: tensor <name>" of a plain input tensor.
fn where_(pm: &PackedModel, t: &LogicalTensor) -> String {
    let Storage::Dense(l) = t.storage else {
        unreachable!("pack reads plain checkpoints")
    };
    format!(
        "{}: tensor {:?}",
        pm.model().files()[l.0].path().display(),
        t.name
    )
}

fn dense_data<'a>(pm: &'a PackedModel, t: &LogicalTensor) -> &'a [u8] {
    let Storage::Dense(l) = t.storage else {
        unreachable!("pack reads plain checkpoints")
    };
    pm.part_data(l)
}

/// Whether `t` is a candidate: asked for by name (then it must be packable), or, without a
/// list, a prunable block linear of a float dtype.
fn is_candidate(pm: &PackedModel, t: &LogicalTensor, asked: Option<bool>) -> Result<bool> {
    match asked {
        Some(false) => Ok(false),
        None => Ok(is_block_linear(&t.name, &t.shape) && dtype::is_float(t.dtype)),
        Some(true) => {
            let w = where_(pm, t);
            ensure!(
                t.shape.len() == 2,
                format,
                "{w} has shape {:?}; only 2-D tensors can be packed",
                t.shape
            );
            ensure!(
                dtype::is_float(t.dtype),
                dtype,
                "{w} has dtype {}; only F16, BF16, F32, F64 can be packed",
                dtype_name(t.dtype)
            );
            ensure!(
                t.name.ends_with(".weight"),
                format,
                "{w}: only tensors named <module>.weight can be packed"
            );
            Ok(true)
        }
    }
}

fn copy_report(t: &LogicalTensor) -> TensorReport {
    let dense_bytes = t.nbytes() as u64;
    TensorReport {
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
    }
}

/// Decides whether `t` is packed (and how) or copied.
fn decide(
    pm: &PackedModel,
    t: &LogicalTensor,
    asked: Option<bool>,
    all_names: &HashSet<&str>,
    opts: &PackOptions,
) -> Result<Decision> {
    let mut report = copy_report(t);
    let copy = |report| Decision {
        job: Job::Copy,
        report,
        dropped: 0,
    };
    if !is_candidate(pm, t, asked)? {
        return Ok(copy(report));
    }
    let m = Matrix {
        dtype: t.dtype,
        rows: t.shape[0],
        cols: t.shape[1],
        data: dense_data(pm, t),
        quant: None,
    };
    let w = where_(pm, t);
    let counts = kernels::row_nnz(m.dtype, m.data, m.rows, m.cols).map_err(|e| e.context(&w))?;
    let nnz: u64 = counts.iter().sum();
    let numel = (m.rows * m.cols) as u64;
    let sparsity = if numel == 0 {
        0.0
    } else {
        1.0 - nnz as f64 / numel as f64
    };
    report.nnz = Some(nnz);
    report.sparsity = Some(sparsity);
    if sparsity < opts.min_sparsity {
        report.reason = Some(format!(
            "sparsity {sparsity:.4} below min_sparsity {}",
            opts.min_sparsity
        ));
        return Ok(copy(report));
    }
    let fmt = opts.format;
    let enc = EncodeOptions {
        force: opts.force_24,
    };
    let admission = fmt
        .admit(m, &counts, enc)
        .map_err(|e| Error::new(e.kind, format!("{w} {}", e.message)))?;
    let (stored_nnz, dropped) = match admission {
        Admission::Pack {
            stored_nnz,
            dropped,
        } => (stored_nnz as usize, dropped),
        Admission::Skip(reason) if asked == Some(true) => {
            bail!(shape, "{w} cannot be stored as {}: {reason}", fmt.name())
        }
        Admission::Skip(reason) => {
            report.reason = Some(reason);
            return Ok(copy(report));
        }
    };
    let module = t.name.strip_suffix(".weight").expect("checked").to_string();
    let size = planned_size(fmt, t, &module, stored_nnz, None, all_names, &w)?;
    if size as u64 >= report.dense_bytes {
        report.reason = Some(format!(
            "{} would take {size} bytes, not smaller than dense ({})",
            fmt.name(),
            report.dense_bytes
        ));
        return Ok(copy(report));
    }
    report.action = "packed".into();
    report.format = Some(fmt.name().into());
    report.stored_bytes = size as u64;
    report.ratio = size as f64 / report.dense_bytes.max(1) as f64;
    Ok(Decision {
        job: Job::Pack {
            module,
            counts,
            stored_nnz,
        },
        report,
        dropped,
    })
}

/// Bytes the parts of a packed module take; refuses part names the model already uses.
fn planned_size(
    fmt: PackFormat,
    t: &LogicalTensor,
    module: &str,
    stored_nnz: usize,
    quant: Option<codec::QuantParams>,
    all_names: &HashSet<&str>,
    w: &str,
) -> Result<usize> {
    let planned = fmt.plan(t.dtype, t.shape[0], t.shape[1], stored_nnz, quant);
    for p in &planned {
        let name = format!("{module}.{}", p.suffix);
        ensure!(
            !all_names.contains(name.as_str()),
            format,
            "{}: packing tensor {:?} would write {name:?}, which already exists in the model",
            w.rsplit_once(": tensor").map_or(w, |x| x.0),
            t.name
        );
    }
    Ok(planned
        .iter()
        .map(|p| p.shape.iter().product::<usize>() * dtype::itemsize(p.dtype))
        .sum())
}

/// The output group of one input tensor: copied bytes, or the encoded parts of its module
/// with the module's checksum in the shard's metadata.
fn out_group<'a>(
    pm: &'a PackedModel,
    t: &'a LogicalTensor,
    job: &'a Job,
    fmt: PackFormat,
    side: Option<&'a SideFile>,
) -> OutGroup<'a> {
    let Job::Pack {
        module,
        counts,
        stored_nnz,
    } = job
    else {
        return OutGroup {
            tensors: vec![PlannedTensor::new(t.name.clone(), t.dtype, t.shape.clone())],
            meta: Vec::new(),
            write: Box::new(move |w| {
                w.write_tensor(&t.name, dense_data(pm, t))?;
                Ok(Vec::new())
            }),
        };
    };
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let tensors: Vec<PlannedTensor> = fmt
        .plan(t.dtype, rows, cols, *stored_nnz, side.map(|s| s.params))
        .into_iter()
        .map(|p| PlannedTensor::new(format!("{module}.{}", p.suffix), p.dtype, p.shape))
        .collect();
    let crc_key = format!("{META_CRC_PREFIX}{module}");
    let names: Vec<String> = tensors.iter().map(|p| p.name.clone()).collect();
    OutGroup {
        tensors,
        meta: vec![
            (crc_key.clone(), "00000000".into()),
            (META_FORMAT.into(), fmt.name().into()),
        ],
        write: Box::new(move |w| {
            // values checked when deciding (decide_quantized)
            let quant = side
                .map(|s| s.parts(module, t.dtype, rows, cols))
                .transpose()?;
            let m = Matrix {
                dtype: t.dtype,
                rows,
                cols,
                data: dense_data(pm, t),
                quant,
            };
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let crc = w
                .fill_tensors(&refs, |bufs| {
                    fmt.encode(m, counts, bufs)?;
                    let parts: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
                    Ok(crc_of(&parts))
                })
                .map_err(|e| e.context(where_(pm, t)))?;
            Ok(vec![(crc_key.clone(), format!("{crc:08x}"))])
        }),
    }
}

/// Adds the compressed-tensors `quantization_config` block of a pack to config.json.
fn add_sparsity_config(cfg: &mut serde_json::Value, decisions: &[Decision], fmt: PackFormat) {
    let packed: Vec<&str> = decisions
        .iter()
        .filter_map(|d| match &d.job {
            Job::Pack { module, .. } => Some(module.as_str()),
            Job::Copy => None,
        })
        .collect();
    let (mut zeros, mut numel) = (0u64, 0u64);
    for r in decisions.iter().map(|d| &d.report) {
        if let (Some(nnz), true) = (r.nnz, r.shape.len() == 2) {
            let n = (r.shape[0] * r.shape[1]) as u64;
            numel += n;
            zeros += n - nnz.min(n);
        }
    }
    let global = if numel == 0 {
        0.0
    } else {
        zeros as f64 / numel as f64
    };
    let (method, structure) = fmt.config_method();
    let qc = serde_json::json!({
        "quant_method": method,
        "version": COMPRESSED_TENSORS_VERSION,
        "sparsity_config": {
            "format": fmt.config_name(),
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
}

/// [`decide`] for the quantized formats: the tensors listed in the side file are packed
/// whatever their sparsity, after checking their codes, zero points and scales and that the
/// model holds exactly their dequantized values.
fn decide_quantized(
    pm: &PackedModel,
    t: &LogicalTensor,
    asked: Option<bool>,
    side: &SideFile,
    all_names: &HashSet<&str>,
    opts: &PackOptions,
) -> Result<Decision> {
    let mut report = copy_report(t);
    let listed = side.layers.contains_key(&t.name);
    if !listed || asked == Some(false) {
        return Ok(Decision {
            job: Job::Copy,
            report,
            dropped: 0,
        });
    }
    is_candidate(pm, t, Some(true))?;
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let module = t.name.strip_suffix(".weight").expect("checked").to_string();
    let w = where_(pm, t);
    let qi = side.parts(&module, t.dtype, rows, cols)?;
    // one pass: codes in range, weights equal to their dequantized codes, kept counts
    let check = nbit::check_matrix(t.dtype, &qi, rows, cols, dense_data(pm, t));
    side.check_values(&module, t.dtype, &qi, !check.out_of_range)?;
    ensure!(
        !check.mismatch,
        format,
        "{w}: not the dequantized values of {} (weights edited after prune?)",
        side.path().display()
    );
    let counts = check.counts;
    let nnz: u64 = counts.iter().sum();
    let numel = (rows * cols) as u64;
    report.nnz = Some(nnz);
    report.sparsity = Some(if numel == 0 {
        0.0
    } else {
        1.0 - nnz as f64 / numel as f64
    });
    let fmt = opts.format;
    let size = planned_size(
        fmt,
        t,
        &module,
        nnz as usize,
        Some(side.params),
        all_names,
        &w,
    )?;
    report.action = "packed".into();
    report.format = Some(fmt.name().into());
    report.stored_bytes = size as u64;
    report.ratio = size as f64 / report.dense_bytes.max(1) as f64;
    Ok(Decision {
        job: Job::Pack {
            module,
            counts,
            stored_nnz: nnz as usize,
        },
        report,
        dropped: 0,
    })
}

/// Adds the `quantization_config` block of a quantized pack (docs/formats.md): the block
/// compressed-tensors 0.20.1 writes for the scheme; besa-rs formats add their sparsity config.
fn add_quant_config(
    cfg: &mut serde_json::Value,
    pm: &PackedModel,
    decisions: &[Decision],
    fmt: PackFormat,
    side: &SideFile,
) {
    let q = side.params;
    let packed: Vec<&str> = decisions
        .iter()
        .filter_map(|d| match &d.job {
            Job::Pack { module, .. } => Some(module.as_str()),
            Job::Copy => None,
        })
        .collect();
    let mut ignore = vec!["lm_head".to_string()];
    for t in pm.tensors() {
        if t.shape.len() == 2 && in_numbered_block(&t.name) && !side.layers.contains_key(&t.name) {
            if let Some(m) = t.name.strip_suffix(".weight") {
                ignore.push(m.to_string());
            }
        }
    }
    let (group_size, strategy) = if q.group_size == -1 {
        (serde_json::Value::Null, "channel")
    } else {
        (q.group_size.into(), "group")
    };
    let mut qc = serde_json::json!({
        "config_groups": {"group_0": {
            "format": null, "input_activations": null, "output_activations": null,
            "targets": ["Linear"],
            "weights": {"dynamic": false, "group_size": group_size, "num_bits": q.bits,
                        "strategy": strategy, "symmetric": false, "type": "int"}}},
        "format": fmt.config_name(),
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "moe_sparsity_config": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.1",
    });
    let (method, structure) = fmt.config_method();
    if method != "compressed-tensors" {
        let (mut zeros, mut numel) = (0u64, 0u64);
        for r in decisions
            .iter()
            .filter(|d| matches!(d.job, Job::Pack { .. }))
        {
            let n = r.report.shape.iter().product::<usize>() as u64;
            numel += n;
            zeros += n - r.report.nnz.unwrap_or(n).min(n);
        }
        let global = if numel == 0 {
            0.0
        } else {
            zeros as f64 / numel as f64
        };
        let mut targets = packed.clone();
        targets.sort_unstable();
        qc["quant_method"] = method.into();
        qc["version"] = "1".into();
        qc["sparsity_config"] = serde_json::json!({
            "format": fmt.config_name(),
            "global_sparsity": global,
            "sparsity_structure": structure,
            "targets": targets,
            "ignore": ["lm_head"],
        });
    }
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert("quantization_config".into(), qc);
    }
}
