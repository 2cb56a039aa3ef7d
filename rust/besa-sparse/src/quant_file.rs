//! The side file `quantization.safetensors` of a quantized model directory (written by
//! `besa_rs.pruning.quant.write_quant_file`, docs/formats.md "Quantized formats"): per
//! quantized `<m>.weight` its U8 codes, scales (model dtype) and U8 zero points, with
//! `format = besa-rs-quant`, `version = 1` and the `layers` JSON in the metadata. Pack reads
//! it; unpack regenerates it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;

use crate::codec::nbit::{self, QuantInput, QuantParams};
use crate::dtype::name as dtype_name;
use crate::error::{Error, Result};
use crate::st::{StFile, TensorEntry};
use crate::writer::{PlannedTensor, ShardWriter};
use crate::{bail, ensure};

/// File name of the side file in a model directory.
pub const QUANT_FILE: &str = "quantization.safetensors";
/// `format` of its metadata.
pub const FORMAT_NAME: &str = "besa-rs-quant";

/// An opened side file.
#[derive(Debug)]
pub struct SideFile {
    file: StFile,
    pub params: QuantParams,
    /// `<m>.weight` -> `[rows, cols]`.
    pub layers: BTreeMap<String, (usize, usize)>,
}

impl SideFile {
    /// Opens the side file of the model directory `dir` and checks its metadata.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(QUANT_FILE);
        ensure!(
            path.is_file(),
            format,
            "{}: no quantization parameters (the model was not quantized); quantize with `besa-rs prune --wbits N`",
            path.display()
        );
        let file = StFile::open(&path)?;
        let meta = file.metadata();
        let here = path.display();
        ensure!(
            meta.get("format").map(String::as_str) == Some(FORMAT_NAME)
                && meta.get("version").map(String::as_str) == Some("1"),
            format,
            "{here}: not a {FORMAT_NAME} version 1 file"
        );
        let layers: serde_json::Value = meta
            .get("layers")
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| Error::format(format!("{here}: metadata \"layers\" is not JSON")))?;
        let Some(layers) = layers.as_object() else {
            bail!(format, "{here}: metadata \"layers\" is not a JSON object");
        };
        let mut schemes = std::collections::BTreeSet::new();
        let mut out = BTreeMap::new();
        for (name, li) in layers {
            let num = |k: &str| li.get(k).and_then(|v| v.as_i64());
            let shape: Option<Vec<usize>> = li.get("shape").and_then(|s| {
                s.as_array()?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            });
            let (Some(bits), Some(gs), Some(shape)) = (num("bits"), num("group_size"), shape)
            else {
                bail!(
                    format,
                    "{here}: layers entry {name:?} lacks bits, group_size or shape"
                );
            };
            ensure!(
                shape.len() == 2 && name.ends_with(".weight"),
                format,
                "{here}: layers entry {name:?} is not a 2-D <module>.weight"
            );
            schemes.insert((bits, gs));
            out.insert(name.clone(), (shape[0], shape[1]));
        }
        ensure!(!out.is_empty(), format, "{here}: no quantized layers");
        if schemes.len() > 1 {
            let list: Vec<String> = schemes
                .iter()
                .map(|(b, g)| format!("{b} bits, group size {g}"))
                .collect();
            bail!(
                config,
                "{here}: layers use different bit widths or group sizes ({}); besa-rs packs one scheme per checkpoint",
                list.join("; ")
            );
        }
        let (bits, group_size) = *schemes.iter().next().expect("one scheme");
        ensure!(
            (2..=8).contains(&bits),
            format,
            "{here}: bits = {bits} outside 2..8"
        );
        ensure!(
            group_size == -1 || group_size > 0,
            format,
            "{here}: group_size = {group_size} is neither -1 nor positive"
        );
        Ok(Self {
            file,
            params: QuantParams {
                bits: bits as u32,
                group_size,
            },
            layers: out,
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    fn tensor(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&[u8]> {
        let here = self.path().display();
        let Some(e): Option<&TensorEntry> = self.file.get(name) else {
            bail!(format, "{here}: tensor {name:?} is missing");
        };
        ensure!(
            e.dtype == dtype && e.shape == shape,
            format,
            "{here}: tensor {name:?} is {} {:?}, expected {} {shape:?}",
            dtype_name(e.dtype),
            e.shape,
            dtype_name(dtype)
        );
        Ok(self.file.data(e))
    }

    /// The checked codes, scales and zero points of `<module>.weight` (`dtype`, `[rows,
    /// cols]` in the model): shapes agree, codes and zero points are in range, scales are
    /// finite and positive.
    pub fn input(
        &self,
        module: &str,
        dtype: Dtype,
        rows: usize,
        cols: usize,
    ) -> Result<QuantInput<'_>> {
        let qi = self.parts(module, dtype, rows, cols)?;
        self.check_values(module, dtype, &qi, false)?;
        Ok(qi)
    }

    /// The codes, scales and zero points of `<module>.weight` with their shapes checked, not
    /// their values ([`Self::check_values`]).
    pub fn parts(
        &self,
        module: &str,
        dtype: Dtype,
        rows: usize,
        cols: usize,
    ) -> Result<QuantInput<'_>> {
        let here = self.path().display();
        let wname = format!("{module}.weight");
        let want = self.layers.get(&wname).copied();
        ensure!(
            want == Some((rows, cols)),
            format,
            "{here}: layers gives {wname:?} shape {want:?}, the model [{rows}, {cols}]"
        );
        let q = self.params;
        let groups = q
            .groups(cols)
            .map_err(|e| e.context(format!("{here}: {wname:?}")))?;
        let codes = self.tensor(&format!("{module}.weight_codes"), Dtype::U8, &[rows, cols])?;
        let scale = self.tensor(&format!("{module}.weight_scale"), dtype, &[rows, groups])?;
        let zero = self.tensor(
            &format!("{module}.weight_zero_point"),
            Dtype::U8,
            &[rows, groups],
        )?;
        Ok(QuantInput {
            params: q,
            groups,
            codes,
            scale,
            zero,
        })
    }

    /// Checks the values of [`Self::parts`]: codes (unless `codes_in_range`, already known)
    /// and zero points within the bit width, scales finite and positive.
    pub fn check_values(
        &self,
        module: &str,
        dtype: Dtype,
        qi: &QuantInput<'_>,
        codes_in_range: bool,
    ) -> Result<()> {
        let here = self.path().display();
        let bits = qi.params.bits;
        let ctx = |part: &str| format!("{here}: tensor \"{module}.{part}\"");
        if !codes_in_range {
            nbit::check_range(qi.codes, bits, "code")
                .map_err(|e| e.context(ctx("weight_codes")))?;
        }
        nbit::check_range(qi.zero, bits, "zero point")
            .map_err(|e| e.context(ctx("weight_zero_point")))?;
        nbit::check_scales(dtype, qi.scale).map_err(|e| e.context(ctx("weight_scale")))
    }
}

/// One module of a regenerated side file.
pub struct SideEntry<'a> {
    pub module: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: Dtype,
    pub groups: usize,
    pub codes: Vec<u8>,
    pub scale: &'a [u8],
    pub zero: Vec<u8>,
}

/// The shape of one module of a side file being written.
#[derive(Debug, Clone)]
pub struct SideModule {
    pub module: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: Dtype,
    pub groups: usize,
}

/// A side file written module by module (tensors and metadata keys as besa-rs' prune writes
/// them): planned from the modules' shapes, each module's codes, scales and zero points
/// written at their offsets when they are known.
pub struct SideWriter {
    w: ShardWriter,
}

impl SideWriter {
    /// Creates the file at `path` (which must not exist) for `modules`, in this order.
    pub fn create(path: &Path, params: QuantParams, modules: &[SideModule]) -> Result<Self> {
        let mut plan = Vec::with_capacity(3 * modules.len());
        let mut layers = serde_json::Map::new();
        for e in modules {
            let m = &e.module;
            let (r, c, g) = (e.rows, e.cols, e.groups);
            plan.push(PlannedTensor::new(
                format!("{m}.weight_codes"),
                Dtype::U8,
                vec![r, c],
            ));
            plan.push(PlannedTensor::new(
                format!("{m}.weight_scale"),
                e.dtype,
                vec![r, g],
            ));
            plan.push(PlannedTensor::new(
                format!("{m}.weight_zero_point"),
                Dtype::U8,
                vec![r, g],
            ));
            layers.insert(
                format!("{m}.weight"),
                serde_json::json!({"bits": params.bits, "group_size": params.group_size, "shape": [r, c]}),
            );
        }
        let meta: BTreeMap<String, String> = [
            ("format", FORMAT_NAME.to_string()),
            ("version", "1".into()),
            ("bits", params.bits.to_string()),
            ("group_size", params.group_size.to_string()),
            ("symmetric", "false".into()),
            ("layers", serde_json::Value::Object(layers).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(Self {
            w: ShardWriter::create(path, &plan, Some(&meta))?,
        })
    }

    /// Writes the codes, scales and zero points of `module` (planned lengths); the codes and
    /// zero points are written in the background.
    pub fn write_module(
        &mut self,
        module: &str,
        codes: Vec<u8>,
        scale: &[u8],
        zero: Vec<u8>,
    ) -> Result<()> {
        self.w
            .write_tensor(&format!("{module}.weight_scale"), scale)?;
        self.w
            .write_owned(&format!("{module}.weight_codes"), codes)?;
        self.w
            .write_owned(&format!("{module}.weight_zero_point"), zero)
    }

    /// Waits for the background writes, then closes the file, fsyncing it first when `sync`.
    pub fn finish(self, sync: bool) -> Result<()> {
        self.w.finish(sync)
    }
}

/// Writes a side file at `path` (tensors and metadata keys as besa-rs' prune writes them).
pub fn write(path: &Path, params: QuantParams, entries: &[SideEntry<'_>]) -> Result<PathBuf> {
    let modules: Vec<SideModule> = entries
        .iter()
        .map(|e| SideModule {
            module: e.module.clone(),
            rows: e.rows,
            cols: e.cols,
            dtype: e.dtype,
            groups: e.groups,
        })
        .collect();
    let mut w = SideWriter::create(path, params, &modules)?;
    for e in entries {
        w.write_module(&e.module, e.codes.clone(), e.scale, e.zero.clone())?;
    }
    w.finish(false)?;
    Ok(path.to_path_buf())
}
