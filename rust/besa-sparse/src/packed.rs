//! Reading checkpoints, packed (any format of [`crate::codec`], as written by besa-rs or
//! compressed-tensors 0.14) or plain, through one interface: every logical tensor with its
//! dense name, dtype and shape, decodable into a dense buffer, with strict validation of every
//! packed part.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use safetensors::tensor::Dtype;
use serde::Serialize;

use crate::codec::{self, nbit, PackFormat, QuantParams, Stored};
use crate::dtype::{itemsize, name as dtype_name};
use crate::error::{Error, ErrorKind, Result};
use crate::model::Model;
use crate::st::TensorEntry;
use crate::{bail, ensure};

mod detect;

/// `__metadata__` key naming the besa-rs pack format of a file (files carrying it must carry
/// a checksum for every packed module they hold).
pub const META_FORMAT: &str = "besa_rs.format";
/// `__metadata__` key prefix of a packed module's CRC-32 (8 lowercase hex digits).
pub const META_CRC_PREFIX: &str = "besa_rs.crc32.";

/// Where one stored tensor lives: (file index, tensor index in that file).
pub type Loc = (usize, usize);

/// The stored parts of one packed matrix.
#[derive(Debug, Clone)]
pub struct PackedParts {
    pub format: PackFormat,
    /// Stored-name prefix of the parts (`<m>` or the older `<m>.weight`).
    pub prefix: String,
    pub rows: usize,
    pub cols: usize,
    /// Values stored (for 2:4 this includes zero fillers).
    pub nnz: usize,
    /// The parts, in the codec's [`codec::Codec::parts`] order (also the checksum order).
    pub parts: Vec<Loc>,
    /// Expected CRC-32 over the parts' bytes in `parts` order.
    pub crc32: Option<u32>,
}

impl PackedParts {
    /// The part holding the stored values.
    pub fn values(&self) -> Loc {
        self.parts[self.format.values_part()]
    }
    /// The module path (the prefix without a trailing `.weight`).
    pub fn module(&self) -> &str {
        self.prefix.strip_suffix(".weight").unwrap_or(&self.prefix)
    }
    fn anchor(&self) -> Loc {
        let i = self
            .format
            .parts()
            .iter()
            .position(|s| *s == self.format.anchor());
        self.parts[i.unwrap_or(0)]
    }
}

/// What a logical tensor is stored as.
#[derive(Debug, Clone)]
pub enum Storage {
    Dense(Loc),
    Packed(PackedParts),
}

/// A logical (dense) tensor of a checkpoint.
#[derive(Debug, Clone)]
pub struct LogicalTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub storage: Storage,
}

impl LogicalTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * itemsize(self.dtype)
    }
    pub fn format(&self) -> Option<PackFormat> {
        match &self.storage {
            Storage::Packed(p) => Some(p.format),
            Storage::Dense(_) => None,
        }
    }
}

/// A model directory or file, packed or not, seen as dense logical tensors.
#[derive(Debug)]
pub struct PackedModel {
    model: Model,
    format: Option<PackFormat>,
    /// The quantization scheme config.json declares for a quantized format.
    quant: Option<QuantParams>,
    tensors: Vec<LogicalTensor>,
    by_name: HashMap<String, usize>,
}

/// Per packed tensor facts for reports (`inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct PackedTensorInfo {
    pub name: String,
    pub format: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub nnz: u64,
    pub sparsity: f64,
    pub dense_bytes: u64,
    pub packed_bytes: u64,
    /// Quantized formats: bits per code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// Quantized formats: columns per group (-1: one group per row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
}

/// The sparsity format named by config.json (`quantization_config.sparsity_config.format`):
/// `Ok(None)` for no sparsity config or "dense"; an unknown name is a `Format` error.
pub fn config_format(
    config: Option<&serde_json::Value>,
    where_: &str,
) -> Result<Option<PackFormat>> {
    let qc = config.and_then(|c| c.get("quantization_config"));
    if let Some(f) = qc.and_then(|q| q.get("format")).filter(|f| !f.is_null()) {
        let Some(name) = f.as_str() else {
            bail!(
                format,
                "{where_}: quantization_config.format is not a string"
            );
        };
        if name != "dense" {
            let quantized: Vec<PackFormat> = codec::all()
                .iter()
                .copied()
                .filter(|f| f.is_quantized())
                .collect();
            match quantized.iter().find(|f| f.config_name() == name) {
                Some(f) => return Ok(Some(*f)),
                None => {
                    let known: Vec<&str> = quantized.iter().map(|f| f.config_name()).collect();
                    bail!(
                        format,
                        "{where_}: unknown quantization format {name:?} (known: {}, dense)",
                        known.join(", ")
                    )
                }
            }
        }
    }
    let Some(fmt) = qc
        .and_then(|q| q.get("sparsity_config"))
        .and_then(|s| s.get("format"))
    else {
        return Ok(None);
    };
    let Some(name) = fmt.as_str() else {
        bail!(format, "{where_}: sparsity_config.format is not a string");
    };
    if name == "dense" {
        return Ok(None);
    }
    match codec::by_config_name(name) {
        Some(f) => Ok(Some(f)),
        None => {
            let known: Vec<&str> = codec::all().iter().map(|f| f.config_name()).collect();
            bail!(
                format,
                "{where_}: unknown sparsity format {name:?} (known: {}, dense)",
                known.join(", ")
            )
        }
    }
}

/// The quantization scheme of config.json's `quantization_config` (one `config_groups` entry
/// of integer weights, strategy `group` or `channel`, asymmetric).
pub fn config_quant(config: Option<&serde_json::Value>, where_: &str) -> Result<QuantParams> {
    let qc = config.and_then(|c| c.get("quantization_config"));
    let groups = qc
        .and_then(|q| q.get("config_groups"))
        .and_then(|g| g.as_object());
    let Some(groups) = groups else {
        bail!(
            format,
            "{where_}: quantization_config has no config_groups (bit width and group size of the packed weights)"
        );
    };
    ensure!(
        groups.len() == 1,
        format,
        "{where_}: quantization_config.config_groups has {} entries; besa-rs reads one scheme per checkpoint",
        groups.len()
    );
    let w = groups.values().next().and_then(|g| g.get("weights"));
    let field = |k: &str| w.and_then(|w| w.get(k));
    ensure!(
        field("type").and_then(|t| t.as_str()) == Some("int"),
        format,
        "{where_}: config_groups weights.type must be \"int\""
    );
    let bits = field("num_bits").and_then(|b| b.as_u64()).unwrap_or(0);
    ensure!(
        (1..=8).contains(&bits),
        format,
        "{where_}: config_groups weights.num_bits = {} is not supported (1..8)",
        field("num_bits").map_or("missing".into(), |v| v.to_string())
    );
    ensure!(
        !field("symmetric")
            .and_then(|s| s.as_bool())
            .unwrap_or(false),
        format,
        "{where_}: symmetric quantization (no stored zero points) is not supported"
    );
    let group_size = match field("strategy").and_then(|s| s.as_str()) {
        Some("channel") => -1,
        Some("group") => match field("group_size").and_then(|g| g.as_i64()) {
            Some(g) if g > 0 => g,
            _ => bail!(
                format,
                "{where_}: config_groups weights.group_size must be a positive integer for strategy \"group\""
            ),
        },
        other => bail!(
            format,
            "{where_}: config_groups weights.strategy {other:?} is not supported (group, channel)"
        ),
    };
    Ok(QuantParams {
        bits: bits as u32,
        group_size,
    })
}

impl PackedModel {
    /// Opens and validates the layout of a checkpoint (file or directory). Every packed module
    /// is checked for part names, dtypes and shapes here; bit-level checks (popcounts,
    /// offsets, indices, checksums) happen when it is decoded.
    pub fn open(path: &Path) -> Result<Self> {
        let model = Model::open(path)?;
        let config_where = model.root().join("config.json").display().to_string();
        let format = config_format(model.config(), &config_where)?;
        let quant = match format {
            Some(f) if f.is_quantized() => Some(config_quant(model.config(), &config_where)?),
            _ => None,
        };
        let tensors = Self::logical_tensors(&model, format, quant)?;
        let mut by_name = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            ensure!(
                by_name.insert(t.name.clone(), i).is_none(),
                format,
                "{}: tensor {:?} is stored both packed and dense",
                model.root().display(),
                t.name
            );
        }
        Ok(Self {
            model,
            format,
            quant,
            tensors,
            by_name,
        })
    }

    /// The logical tensors of a model in stored order (by file, then by offset of the anchor
    /// part / tensor), packed modules checked and their checksums attached.
    fn logical_tensors(
        model: &Model,
        config: Option<PackFormat>,
        quant: Option<QuantParams>,
    ) -> Result<Vec<LogicalTensor>> {
        let mut loc_of = HashMap::new();
        for (fi, f) in model.files().iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                loc_of.insert(t.name.as_str(), (fi, ti));
            }
        }
        let declared = config.is_some()
            || model
                .files()
                .iter()
                .any(|f| f.metadata().contains_key(META_FORMAT));
        let ctx = detect::Ctx {
            model,
            loc_of,
            config,
            quant,
            declared,
        };
        let mut logical = Self::packed_modules(&ctx)?;
        let claimed: std::collections::HashSet<Loc> = logical
            .iter()
            .flat_map(|(_, t)| match &t.storage {
                Storage::Packed(p) => p.parts.clone(),
                Storage::Dense(_) => Vec::new(),
            })
            .collect();
        for (fi, f) in model.files().iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                if !claimed.contains(&(fi, ti)) {
                    let storage = Storage::Dense((fi, ti));
                    let (name, dtype, shape) = (t.name.clone(), t.dtype, t.shape.clone());
                    logical.push((
                        (fi, ti),
                        LogicalTensor {
                            name,
                            dtype,
                            shape,
                            storage,
                        },
                    ));
                }
            }
        }
        if declared {
            detect::check_nothing_orphaned(&ctx, &logical)?;
        }
        let entry = |l: Loc| -> &TensorEntry { &model.files()[l.0].tensors()[l.1] };
        logical.sort_by_key(|(l, _)| (l.0, entry(*l).data_offsets));
        let mut tensors: Vec<LogicalTensor> = logical.into_iter().map(|(_, t)| t).collect();
        for t in &mut tensors {
            if let Storage::Packed(p) = &mut t.storage {
                let f = &model.files()[p.values().0];
                p.crc32 = detect::checksum_of(f, p.module(), &t.name)?;
            }
        }
        Ok(tensors)
    }

    /// Every packed module, found by the anchor part of a codec.
    fn packed_modules(ctx: &detect::Ctx<'_>) -> Result<Vec<(Loc, LogicalTensor)>> {
        let mut out = Vec::new();
        for f in ctx.model.files() {
            for t in f.tensors() {
                let Some((prefix, suffix)) = t.name.rsplit_once('.') else {
                    continue;
                };
                let candidates: Vec<PackFormat> = codec::all()
                    .iter()
                    .copied()
                    .filter(|c| c.anchor() == suffix)
                    .collect();
                // a part of another format's module (bitmask-quantized stores a `bitmask`
                // too): that module is found through its own anchor
                let part_of_other = codec::all().iter().any(|c| {
                    c.anchor() != suffix
                        && c.parts().contains(&suffix)
                        && ctx
                            .loc_of
                            .contains_key(format!("{prefix}.{}", c.anchor()).as_str())
                });
                if candidates.is_empty() || part_of_other {
                    continue;
                }
                if let Some((fmt, parts)) = detect::find_module(ctx, f, prefix, &candidates)? {
                    let lt = detect::check_module(ctx, fmt, prefix, parts)?;
                    let Storage::Packed(p) = &lt.storage else {
                        unreachable!("check_module returns packed tensors")
                    };
                    out.push((p.anchor(), lt));
                }
            }
        }
        Ok(out)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    /// The quantization scheme config.json declares (quantized formats only).
    pub fn quant(&self) -> Option<QuantParams> {
        self.quant
    }
    /// The pack format declared in config.json, if any.
    pub fn declared_format(&self) -> Option<PackFormat> {
        self.format
    }
    /// The format of the checkpoint: declared in config.json, else that of its first packed
    /// tensor; `None` for a plain checkpoint.
    pub fn format(&self) -> Option<PackFormat> {
        self.format
            .or_else(|| self.tensors.iter().find_map(|t| t.format()))
    }
    /// True when at least one tensor is stored packed, or config.json declares a format.
    pub fn is_packed(&self) -> bool {
        self.format().is_some()
    }
    /// Logical tensors in stored order.
    pub fn tensors(&self) -> &[LogicalTensor] {
        &self.tensors
    }
    pub fn get(&self, name: &str) -> Option<&LogicalTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// [`Self::get`], a `NotFound` error naming the checkpoint when absent.
    pub fn require(&self, name: &str) -> Result<&LogicalTensor> {
        self.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("{}: no tensor {name:?}", self.model.root().display()),
            )
        })
    }
    /// Stored name of one part (e.g. `<m>.compressed`).
    pub fn part_name(&self, l: Loc) -> &str {
        &self.loc_entry(l).name
    }
    fn loc_entry(&self, l: Loc) -> &TensorEntry {
        &self.model.files()[l.0].tensors()[l.1]
    }
    /// Stored bytes of a part.
    pub fn part_data(&self, l: Loc) -> &[u8] {
        self.model.files()[l.0].data(self.loc_entry(l))
    }
    /// Bytes on disk of a logical tensor (sum of its parts).
    pub fn stored_bytes(&self, t: &LogicalTensor) -> usize {
        match &t.storage {
            Storage::Dense(l) => self.loc_entry(*l).nbytes(),
            Storage::Packed(p) => p.parts.iter().map(|l| self.loc_entry(*l).nbytes()).sum(),
        }
    }
    /// Hands the pages of a logical tensor's stored bytes back to the page cache (see
    /// [`crate::st::StFile::release`]); for consumers that read a model once, matrix by matrix.
    pub fn release(&self, t: &LogicalTensor) {
        let locs = match &t.storage {
            Storage::Dense(l) => vec![*l],
            Storage::Packed(p) => p.parts.clone(),
        };
        for l in locs {
            self.model.files()[l.0].release(self.loc_entry(l));
        }
    }
    fn where_(&self, t: &LogicalTensor, p: &PackedParts) -> String {
        let file = self.model.files()[p.anchor().0]
            .path()
            .display()
            .to_string();
        format!("{file}: tensor {:?}", t.name)
    }
    fn stored_data(&self, p: &PackedParts) -> Vec<&[u8]> {
        p.parts.iter().map(|l| self.part_data(*l)).collect()
    }

    /// Verifies a packed tensor's checksum and bit-level structure; returns the values stored
    /// per row. Errors name the file and tensor.
    pub fn validate(&self, t: &LogicalTensor, p: &PackedParts) -> Result<Vec<u64>> {
        let data = self.checked_data(t, p)?;
        p.format
            .validate(&self.stored(t, p, &data))
            .map_err(|e| self.checked_error(t, p, e))
    }

    /// [`Self::validate`] of a quantized packed tensor, keeping what it decodes: the kept
    /// weights per row (codes that differ from their zero point), the codes and zero points
    /// ([`codec::Codec::validate_quant`], one pass over the codes), and the scales.
    pub fn validate_quant(
        &self,
        t: &LogicalTensor,
        p: &PackedParts,
    ) -> Result<(Vec<u64>, codec::QuantData, &[u8])> {
        let data = self.checked_data(t, p)?;
        let (counts, d) = p
            .format
            .validate_quant(&self.stored(t, p, &data))
            .map_err(|e| self.checked_error(t, p, e))?;
        let scale = self.part_data(p.parts[d.scale_part]);
        Ok((counts, d, scale))
    }

    /// The stored parts of a packed tensor after its checksum is verified.
    fn checked_data(&self, t: &LogicalTensor, p: &PackedParts) -> Result<Vec<&[u8]>> {
        let data = self.stored_data(p);
        if let Some(want) = p.crc32 {
            let got = crc_of(&data);
            if got != want {
                return Err(self.checked_error(
                    t,
                    p,
                    Error::integrity(format!(
                        "checksum mismatch (stored {want:08x}, data {got:08x}): the file is corrupt"
                    )),
                ));
            }
        }
        Ok(data)
    }

    /// An error of the checks of a packed tensor, naming the file and tensor (integrity errors
    /// stay integrity errors, everything else is a format error).
    fn checked_error(&self, t: &LogicalTensor, p: &PackedParts, e: Error) -> Error {
        let kind = match e.kind {
            ErrorKind::Integrity => ErrorKind::Integrity,
            _ => ErrorKind::Format,
        };
        Error::new(kind, format!("{}: {}", self.where_(t, p), e.message))
    }

    fn stored<'a>(&self, t: &LogicalTensor, p: &PackedParts, data: &'a [&'a [u8]]) -> Stored<'a> {
        Stored {
            dtype: t.dtype,
            quant: self.quant,
            rows: p.rows,
            cols: p.cols,
            itemsize: itemsize(t.dtype),
            nnz: p.nnz,
            parts: data,
        }
    }

    /// Verifies every packed tensor (checksum and bit-level structure, as [`Self::validate`]);
    /// returns how many were verified and how many of them carried a checksum.
    pub fn verify_all(&self) -> Result<(usize, usize)> {
        let (mut n, mut crc) = (0, 0);
        for t in &self.tensors {
            if let Storage::Packed(p) = &t.storage {
                self.validate(t, p)?;
                n += 1;
                crc += usize::from(p.crc32.is_some());
            }
        }
        Ok((n, crc))
    }

    /// Decodes (or copies) the logical tensor `t` into `out` (`t.nbytes()` bytes).
    pub fn read_into(&self, t: &LogicalTensor, out: &mut [u8]) -> Result<()> {
        ensure!(
            out.len() == t.nbytes(),
            shape,
            "tensor {:?}: output buffer has {} bytes, needs {}",
            t.name,
            out.len(),
            t.nbytes()
        );
        match &t.storage {
            Storage::Dense(l) => {
                parallel_copy(self.part_data(*l), out);
                Ok(())
            }
            Storage::Packed(p) if p.format.is_quantized() => {
                let (_, d, scale) = self.validate_quant(t, p)?;
                nbit::dequantize_rows(t.dtype, &d, scale, p.cols, 0..p.rows, out);
                Ok(())
            }
            Storage::Packed(p) => {
                let counts = self.validate(t, p)?;
                self.decode_rows(t, p, &counts, 0..p.rows, out)
            }
        }
    }

    /// Decodes rows `rows` of a validated packed tensor (`counts` from [`Self::validate`]).
    pub fn decode_rows(
        &self,
        t: &LogicalTensor,
        p: &PackedParts,
        counts: &[u64],
        rows: Range<usize>,
        out: &mut [u8],
    ) -> Result<()> {
        let data = self.stored_data(p);
        p.format
            .decode(&self.stored(t, p, &data), counts, rows, out)
            .map_err(|e| e.context(self.where_(t, p)))
    }

    /// The keep-mask of a packed tensor, one byte per weight (1 = stored and non-zero), from
    /// its index and stored values; validated first.
    pub fn keep_mask(&self, t: &LogicalTensor, p: &PackedParts) -> Result<Vec<u8>> {
        let counts = self.validate(t, p)?;
        let data = self.stored_data(p);
        let mut out = vec![0u8; p.rows * p.cols];
        p.format
            .keep_mask(&self.stored(t, p, &data), &counts, &mut out)
            .map_err(|e| e.context(self.where_(t, p)))?;
        Ok(out)
    }

    /// Decodes a logical tensor into a new buffer.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.require(name)?;
        let mut out = vec![0u8; t.nbytes()];
        self.read_into(t, &mut out)?;
        Ok(out)
    }

    /// Per packed tensor: format, dense shape, nnz, sparsity, packed size (quantized formats:
    /// bits and group size, and nnz = codes that differ from their zero point, which needs the
    /// validated data).
    pub fn packed_info(&self) -> Result<Vec<PackedTensorInfo>> {
        let mut out = Vec::new();
        for t in &self.tensors {
            let Storage::Packed(p) = &t.storage else {
                continue;
            };
            let numel = t.numel() as u64;
            let (nnz, bits, group_size) = if p.format.is_quantized() {
                let nnz: u64 = self.validate(t, p)?.iter().sum();
                let q = self.quant;
                (nnz, q.map(|q| q.bits), q.map(|q| q.group_size))
            } else {
                (p.nnz as u64, None, None)
            };
            out.push(PackedTensorInfo {
                name: t.name.clone(),
                format: p.format.name().to_string(),
                dtype: dtype_name(t.dtype),
                shape: t.shape.clone(),
                nnz,
                sparsity: if numel == 0 {
                    0.0
                } else {
                    1.0 - nnz as f64 / numel as f64
                },
                dense_bytes: t.nbytes() as u64,
                packed_bytes: self.stored_bytes(t) as u64,
                bits,
                group_size,
            });
        }
        Ok(out)
    }
}

/// CRC-32 over the parts of a module, in order; large parts in pieces hashed in parallel
/// and combined in order.
pub fn crc_of(parts: &[&[u8]]) -> u32 {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 21;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = crc32fast::Hasher::new();
    if total <= 2 * PIECE || rayon::current_num_threads() == 1 {
        for p in parts {
            h.update(p);
        }
        return h.finalize();
    }
    let pieces: Vec<&[u8]> = parts.iter().flat_map(|p| p.chunks(PIECE)).collect();
    let hashes: Vec<crc32fast::Hasher> = pieces
        .par_iter()
        .map(|c| {
            let mut h = crc32fast::Hasher::new();
            h.update(c);
            h
        })
        .collect();
    for x in &hashes {
        h.combine(x);
    }
    h.finalize()
}

/// Copies `src` into `dst` (same length) with rayon for large buffers.
pub fn parallel_copy(src: &[u8], dst: &mut [u8]) {
    use rayon::prelude::*;
    const CH: usize = 1 << 22;
    if src.len() <= CH {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(CH)
            .zip(src.par_chunks(CH))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}
