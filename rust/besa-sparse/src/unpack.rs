//! `unpack`: a packed checkpoint (any format of [`crate::codec`]) -> a plain Hugging Face
//! checkpoint, through the shard loop shared with pack. Packed tensors are validated, then
//! decoded a few MB of rows at a time straight into the output file's writes.

use std::cell::{Cell, RefCell};
use std::path::Path;

use crate::codec::{nbit, QuantParams};
use crate::dtype::{itemsize, name as dtype_name};
use crate::error::Result;
use crate::output::{
    add_notes, file_bytes, finish_output, open_for_output, write_json, write_shards, OutGroup,
    Report, TensorReport, Totals, DEFAULT_SHARD_SIZE,
};
use crate::packed::{LogicalTensor, PackedModel, Storage};
use crate::quant_file::{SideModule, SideWriter, QUANT_FILE};
use crate::writer::{AtomicDir, PlannedTensor};

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
    let dir = AtomicDir::new(out, opts.overwrite)?;
    let mut warnings = notes;
    add_notes(&mut warnings, dir.notes());
    // Written in the order safetensors' `save_file` uses (decreasing item size, then name), so
    // that unpacking a pack of a saved model gives its file back and packing that again gives
    // the same packed file.
    let tensors = pm.tensors();
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        (std::cmp::Reverse(itemsize(a.dtype)), &a.name)
            .cmp(&(std::cmp::Reverse(itemsize(b.dtype)), &b.name))
    });
    let quantized = pm.format().is_some_and(|f| f.is_quantized());
    // the regenerated side file is written module by module as they are decoded
    let side = RefCell::new(match (quantized, pm.quant()) {
        (true, Some(q)) => Some(SideWriter::create(
            &dir.path().join(QUANT_FILE),
            q,
            &side_modules(&pm, q)?,
        )?),
        _ => None,
    });
    // kept weights of the quantized tensors, counted while decoding
    let kept: Vec<Cell<Option<u64>>> = vec![Cell::new(None); tensors.len()];
    let groups: Vec<OutGroup<'_>> = order
        .iter()
        .map(|&i| out_group(&pm, &tensors[i], &side, &kept[i]))
        .collect();
    let files = write_shards(dir.path(), &groups, opts.shard_size, opts.sync)?;
    drop(groups);
    if let Some(w) = side.into_inner() {
        w.finish(opts.sync)?;
    }
    if let Some(mut cfg) = pm.model().config().cloned() {
        strip_sparsity_config(&mut cfg);
        if quantized {
            if let Some(obj) = cfg.as_object_mut() {
                obj.remove("quantization_config");
            }
        }
        write_json(&dir.path().join("config.json"), &cfg)?;
    }
    let out_files = finish_output(dir, src, &files, opts.sync)?;
    let reports: Vec<TensorReport> = tensors
        .iter()
        .zip(&kept)
        .map(|(t, k)| report(&pm, t, k.get()))
        .collect();
    let packed_n = reports.iter().filter(|r| r.format.is_some()).count();
    let dense: u64 = reports.iter().map(|r| r.dense_bytes).sum();
    let totals = Totals::of(&reports, packed_n, file_bytes(&pm, &out_files), dense, 0);
    Ok(Report {
        source: src.display().to_string(),
        out: out.display().to_string(),
        format: pm.format().map_or("dense", |f| f.name()).into(),
        files: out_files,
        tensors: reports,
        totals,
        warnings,
    })
}

/// One logical tensor written dense: copied, or validated and decoded chunk by chunk. A
/// quantized tensor's codes are decoded once (validated on the way), dequantized into the
/// output and written to the side file, and its kept weights counted into `kept`.
fn out_group<'a>(
    pm: &'a PackedModel,
    t: &'a LogicalTensor,
    side: &'a RefCell<Option<SideWriter>>,
    kept: &'a Cell<Option<u64>>,
) -> OutGroup<'a> {
    OutGroup {
        tensors: vec![PlannedTensor::new(t.name.clone(), t.dtype, t.shape.clone())],
        meta: Vec::new(),
        write: Box::new(move |w| {
            match &t.storage {
                Storage::Dense(l) => w.write_tensor(&t.name, pm.part_data(*l))?,
                Storage::Packed(p) if p.format.is_quantized() => {
                    let (counts, d, scale) = pm.validate_quant(t, p)?;
                    kept.set(Some(counts.iter().sum()));
                    let row_bytes = p.cols * itemsize(t.dtype);
                    w.fill_rows(&t.name, row_bytes, |rows, buf| {
                        nbit::dequantize_rows(t.dtype, &d, scale, p.cols, rows, buf);
                        Ok(())
                    })?;
                    if let Some(sw) = side.borrow_mut().as_mut() {
                        sw.write_module(p.module(), d.codes, scale, d.zero)?;
                    }
                }
                Storage::Packed(p) => {
                    let counts = pm.validate(t, p)?;
                    let row_bytes = p.cols * itemsize(t.dtype);
                    w.fill_rows(&t.name, row_bytes, |rows, buf| {
                        pm.decode_rows(t, p, &counts, rows, buf)
                    })?;
                }
            }
            Ok(Vec::new())
        }),
    }
}

/// A tensor's report line; `kept`: the kept weights counted while decoding a quantized tensor
/// (its layout only bounds them), else the values the layout stores.
fn report(pm: &PackedModel, t: &LogicalTensor, kept: Option<u64>) -> TensorReport {
    let stored = pm.stored_bytes(t) as u64;
    let (nnz, sparsity) = match &t.storage {
        Storage::Packed(p) => {
            let nnz = kept.unwrap_or(p.nnz as u64);
            let numel = t.numel().max(1) as f64;
            (Some(nnz), Some(1.0 - nnz as f64 / numel))
        }
        Storage::Dense(_) => (None, None),
    };
    TensorReport {
        name: t.name.clone(),
        action: if t.format().is_some() {
            "unpacked"
        } else {
            "copied"
        }
        .into(),
        format: t.format().map(|f| f.name().to_string()),
        reason: None,
        dtype: dtype_name(t.dtype),
        shape: t.shape.clone(),
        nnz,
        sparsity,
        dense_bytes: t.nbytes() as u64,
        stored_bytes: stored,
        ratio: stored as f64 / (t.nbytes().max(1)) as f64,
    }
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

/// The modules of the regenerated side file `quantization.safetensors` of a quantized packed
/// checkpoint (codes with the zero point at pruned positions, scales, zero points), in stored
/// order.
fn side_modules(pm: &PackedModel, q: QuantParams) -> Result<Vec<SideModule>> {
    let mut out = Vec::new();
    for t in pm.tensors() {
        let Storage::Packed(p) = &t.storage else {
            continue;
        };
        if !p.format.is_quantized() {
            continue;
        }
        out.push(SideModule {
            module: p.module().to_string(),
            rows: p.rows,
            cols: p.cols,
            dtype: t.dtype,
            // the layout check matched the scales to the scheme
            groups: q.groups(p.cols)?,
        });
    }
    Ok(out)
}
