//! Finding the packed modules of a checkpoint, for every codec: which format each module is
//! stored in (from its parts, cross-checked with what config.json and the file metadata
//! declare), the layout check of its parts, and the completeness checks of a checkpoint
//! declared packed.

use std::collections::{HashMap, HashSet};

use safetensors::tensor::Dtype;

use super::{Loc, LogicalTensor, PackedParts, Storage, META_CRC_PREFIX, META_FORMAT};
use crate::codec::{self, PackFormat, PartInfo};
use crate::dtype::name as dtype_name;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::st::{StFile, TensorEntry};
use crate::{bail, ensure};

/// The format a file's besa-rs metadata declares, if any (and if it names a known format).
pub(super) fn file_format(f: &StFile) -> Option<PackFormat> {
    f.metadata()
        .get(META_FORMAT)
        .and_then(|n| codec::by_name(n))
}

/// Everything [`find_module`] needs to know about the checkpoint.
pub(super) struct Ctx<'a> {
    pub model: &'a Model,
    pub loc_of: HashMap<&'a str, Loc>,
    /// The format config.json declares.
    pub config: Option<PackFormat>,
    /// The quantization scheme config.json declares (quantized formats).
    pub quant: Option<crate::codec::QuantParams>,
    /// Whether config.json or any file's metadata declares the checkpoint packed.
    pub declared: bool,
}

impl Ctx<'_> {
    fn entry(&self, l: Loc) -> &TensorEntry {
        &self.model.files()[l.0].tensors()[l.1]
    }
}

/// Which format a module anchored at `prefix` is stored in, and where its parts are; `None`
/// when the parts found are no complete module and the checkpoint is not declared packed.
pub(super) fn find_module(
    ctx: &Ctx<'_>,
    f: &StFile,
    prefix: &str,
    candidates: &[PackFormat],
) -> Result<Option<(PackFormat, Vec<Loc>)>> {
    let locs = |fmt: PackFormat| -> Vec<Option<Loc>> {
        fmt.parts()
            .iter()
            .map(|s| ctx.loc_of.get(format!("{prefix}.{s}").as_str()).copied())
            .collect()
    };
    let missing = |fmt: PackFormat| -> Vec<&'static str> {
        fmt.parts()
            .iter()
            .zip(locs(fmt))
            .filter(|(_, l)| l.is_none())
            .map(|(s, _)| *s)
            .collect()
    };
    // What this file or config.json says the module must be stored as.
    let wanted = ctx
        .config
        .or_else(|| file_format(f))
        .filter(|w| candidates.contains(w));
    let complete = candidates
        .iter()
        .copied()
        .filter(|c| missing(*c).is_empty())
        .max_by_key(|c| c.parts().len());
    let incomplete = match (wanted, complete) {
        (Some(w), _) if !missing(w).is_empty() => Some(w),
        (_, None) => candidates
            .iter()
            .copied()
            .min_by_key(|c| (missing(*c).len(), c.parts().len())),
        _ => None,
    };
    if let Some(fmt) = incomplete {
        if !ctx.declared {
            return Ok(None);
        }
        let missing = missing(fmt);
        bail!(
            integrity,
            "{}: packed module {prefix:?} is incomplete: its {} part{} missing",
            f.path().display(),
            missing.join(" and "),
            if missing.len() == 1 { " is" } else { "s are" }
        );
    }
    let fmt = complete.expect("a complete candidate");
    if let Some(cf) = ctx.config {
        ensure!(
            cf == fmt,
            format,
            "{}: packed module {prefix:?} is stored as {} but config.json declares {}",
            f.path().display(),
            fmt.config_name(),
            cf.config_name()
        );
    }
    Ok(Some((fmt, locs(fmt).into_iter().flatten().collect())))
}

/// Checks names, dtypes and shapes of a module's parts; returns the logical tensor.
pub(super) fn check_module(
    ctx: &Ctx<'_>,
    format: PackFormat,
    prefix: &str,
    parts: Vec<Loc>,
) -> Result<LogicalTensor> {
    let file = ctx.model.files()[parts[format.shape_part()].0]
        .path()
        .display()
        .to_string();
    let err = |e: Error| Error::format(format!("{file}: packed tensor {prefix:?}: {}", e.message));
    let (rows, cols) = read_shape_part(ctx, parts[format.shape_part()]).map_err(err)?;
    let infos: Vec<PartInfo<'_>> = parts
        .iter()
        .map(|&l| {
            let e = ctx.entry(l);
            PartInfo {
                dtype: e.dtype,
                shape: &e.shape,
                nbytes: e.nbytes(),
            }
        })
        .collect();
    let layout = format
        .check_layout(rows, cols, &infos, ctx.quant)
        .map_err(err)?;
    let dtype = layout.dtype;
    if !matches!(dtype.bitsize(), 8 | 16 | 32 | 64) || dtype == Dtype::BOOL {
        return Err(err(Error::format(format!(
            "values dtype {} is not supported",
            dtype_name(dtype)
        ))));
    }
    let module = prefix.strip_suffix(".weight").unwrap_or(prefix);
    Ok(LogicalTensor {
        name: format!("{module}.weight"),
        dtype,
        shape: vec![rows, cols],
        storage: Storage::Packed(PackedParts {
            format,
            prefix: prefix.to_string(),
            rows,
            cols,
            nnz: layout.nnz,
            parts,
            crc32: None,
        }),
    })
}

/// The dense shape stored in a module's `shape` part (I64, 2 elements).
fn read_shape_part(ctx: &Ctx<'_>, l: Loc) -> Result<(usize, usize)> {
    let e = ctx.entry(l);
    ensure!(
        e.dtype == Dtype::I64 && (e.shape == [2] || e.shape == [2, 1] || e.shape == [1, 2]),
        format,
        "\"shape\" must be I64 with 2 elements, found {} {:?}",
        dtype_name(e.dtype),
        e.shape
    );
    let dims: Vec<i64> = ctx.model.files()[l.0]
        .data(e)
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    ensure!(
        dims.iter().all(|d| (0..=(1i64 << 40)).contains(d)),
        format,
        "\"shape\" holds invalid dimensions {dims:?}"
    );
    let (rows, cols) = (dims[0] as usize, dims[1] as usize);
    ensure!(
        rows.checked_mul(cols).is_some_and(|n| n <= 1usize << 48),
        format,
        "shape [{rows}, {cols}] is too large"
    );
    Ok((rows, cols))
}

/// Whether a dense tensor named `<prefix>.<suffix>` in a declared-packed file is a stray part
/// of a module; returns the anchor part its module lacks.
fn stray_part(
    t: &LogicalTensor,
    suffix: &str,
    declared: Option<PackFormat>,
) -> Option<&'static str> {
    let owners: Vec<PackFormat> = codec::all()
        .iter()
        .copied()
        .filter(|c| c.parts().contains(&suffix) || c.anchor() == suffix)
        .collect();
    let owner = declared
        .filter(|d| owners.contains(d))
        .or_else(|| owners.first().copied())?;
    // `values` and `shape` are plausible names of plain tensors; they are parts only when they
    // look like one (a `shape` is I64 with two entries; `values` only where the declared format
    // stores a part of that name).
    let looks_like_part = match suffix {
        "shape" => t.dtype == Dtype::I64 && t.numel() == 2,
        "values" => declared.is_some_and(|d| d.parts().contains(&"values")),
        _ => true,
    };
    looks_like_part.then(|| owner.anchor())
}

/// In a checkpoint declared packed (config.json or besa-rs file metadata), every module that
/// the declaration names must be complete: a stored part whose anchor is gone, a checksum
/// without its module, or a module of `sparsity_config.targets` stored nowhere is an
/// `Integrity` error (the module's weight would otherwise silently disappear).
pub(super) fn check_nothing_orphaned(
    ctx: &Ctx<'_>,
    logical: &[(Loc, LogicalTensor)],
) -> Result<()> {
    let packed: HashSet<&str> = logical
        .iter()
        .filter_map(|(_, t)| match &t.storage {
            Storage::Packed(p) => Some(p.module()),
            Storage::Dense(_) => None,
        })
        .collect();
    for (_, t) in logical {
        let Storage::Dense((fi, _)) = t.storage else {
            continue;
        };
        let f = &ctx.model.files()[fi];
        if ctx.config.is_none() && !f.metadata().contains_key(META_FORMAT) {
            continue;
        }
        let Some((prefix, suffix)) = t.name.rsplit_once('.') else {
            continue;
        };
        if let Some(anchor) = stray_part(t, suffix, ctx.config.or_else(|| file_format(f))) {
            let module = prefix.strip_suffix(".weight").unwrap_or(prefix);
            bail!(
                integrity,
                "{}: packed module {module:?} is incomplete: tensor {:?} is stored but its {anchor} part is missing",
                f.path().display(),
                t.name
            );
        }
    }
    for f in ctx.model.files() {
        for key in f.metadata().keys() {
            if let Some(module) = key.strip_prefix(META_CRC_PREFIX) {
                ensure!(
                    packed.contains(module),
                    integrity,
                    "{}: the metadata holds checksum {key:?} but no part of packed module {module:?} is stored",
                    f.path().display()
                );
            }
        }
    }
    check_targets(ctx, &packed)
}

/// Every module path of `sparsity_config.targets` must be stored packed.
fn check_targets(ctx: &Ctx<'_>, packed: &HashSet<&str>) -> Result<()> {
    let targets = ctx
        .model
        .config()
        .and_then(|c| c.get("quantization_config"))
        .and_then(|q| q.get("sparsity_config"))
        .and_then(|s| s.get("targets"))
        .and_then(|t| t.as_array());
    let (Some(targets), Some(_)) = (targets, ctx.config) else {
        return Ok(());
    };
    for t in targets.iter().filter_map(|t| t.as_str()) {
        // Module paths only: compressed-tensors also uses class names ("Linear") and regular
        // expressions ("re:...") here.
        let is_path = t.contains('.')
            && !t.starts_with("re:")
            && t.chars()
                .all(|c| c.is_alphanumeric() || c == '.' || c == '_');
        ensure!(
            !is_path || packed.contains(t),
            integrity,
            "{}: config.json lists {t:?} as packed (sparsity_config.targets) but no packed part of it is stored",
            ctx.model.root().display()
        );
    }
    Ok(())
}

/// The checksum a file's metadata holds for a module: `Ok(None)` when there is none and the
/// file was not written by besa-rs.
pub(super) fn checksum_of(f: &StFile, module: &str, tensor: &str) -> Result<Option<u32>> {
    let key = format!("{META_CRC_PREFIX}{module}");
    match f.metadata().get(&key) {
        Some(v) => {
            let c = (v.len() == 8)
                .then(|| u32::from_str_radix(v, 16).ok())
                .flatten();
            match c {
                Some(c) => Ok(Some(c)),
                None => bail!(
                    format,
                    "{}: checksum {key:?} = {v:?} is not 8 hex digits",
                    f.path().display()
                ),
            }
        }
        None if f.metadata().contains_key(META_FORMAT) => bail!(
            integrity,
            "{}: tensor {tensor:?}: the file was written by besa-rs but has no checksum {key:?}",
            f.path().display()
        ),
        None => Ok(None),
    }
}
