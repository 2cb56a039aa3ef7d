//! Reading packed checkpoints (bitmask, 2:4, CSR; as written by besa-rs or compressed-tensors
//! 0.14) and plain ones through one interface: every logical tensor with its dense name, dtype
//! and shape, decodable into a dense buffer, with strict validation of every packed part.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::Dtype;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::formats::{self, bitmask_row_bytes, PackFormat};
use crate::model::Model;
use crate::st::{dtype_itemsize, dtype_name, TensorEntry};

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
    /// Kept values stored (for 2:4 this includes zero fillers).
    pub nnz: usize,
    pub shape: Loc,
    /// `compressed` (bitmask, 2:4) or `values` (CSR).
    pub values: Loc,
    /// `bitmask` (bitmask, 2:4) or `crow_indices` (CSR).
    pub index: Loc,
    /// `row_offsets` (bitmask) or `col_indices` (CSR); none for 2:4.
    pub extra: Option<Loc>,
    /// Expected CRC-32 over the parts' bytes in [`PackedParts::parts`] order.
    pub crc32: Option<u32>,
}

impl PackedParts {
    /// Parts in checksum order.
    pub fn parts(&self) -> Vec<Loc> {
        match self.format {
            PackFormat::Csr => vec![
                self.shape,
                self.index,
                self.extra.expect("csr"),
                self.values,
            ],
            _ => {
                let mut v = vec![self.shape, self.values, self.index];
                v.extend(self.extra);
                v
            }
        }
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
        self.numel() * dtype_itemsize(self.dtype)
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
}

fn read_i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// The sparsity format named by config.json (`quantization_config.sparsity_config.format`):
/// `Ok(None)` for no sparsity config or "dense"; an unknown name is a `Format` error.
pub fn config_format(
    config: Option<&serde_json::Value>,
    where_: &str,
) -> Result<Option<PackFormat>> {
    let Some(fmt) = config
        .and_then(|c| c.get("quantization_config"))
        .and_then(|q| q.get("sparsity_config"))
        .and_then(|s| s.get("format"))
    else {
        return Ok(None);
    };
    let name = fmt.as_str().ok_or_else(|| {
        Error::format(format!("{where_}: sparsity_config.format is not a string"))
    })?;
    if name == "dense" {
        return Ok(None);
    }
    PackFormat::from_config_name(name).map(Some).ok_or_else(|| {
        Error::format(format!(
            "{where_}: unknown sparsity format {name:?} (known: sparse-bitmask, sparse-24-bitmask, besa-csr, dense)"
        ))
    })
}

impl PackedModel {
    /// Opens and validates the layout of a checkpoint (file or directory). Every packed module
    /// is checked for part names, dtypes and shapes here; bit-level checks (popcounts,
    /// row_offsets, CSR indices, checksums) happen when it is decoded.
    pub fn open(path: &Path) -> Result<Self> {
        let model = Model::open(path)?;
        let config_where = model.root().join("config.json").display().to_string();
        let format = config_format(model.config(), &config_where)?;
        let declared = format.is_some()
            || model
                .files()
                .iter()
                .any(|f| f.metadata().contains_key(META_FORMAT));

        let mut loc_of: HashMap<&str, Loc> = HashMap::new();
        for (fi, f) in model.files().iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                loc_of.insert(t.name.as_str(), (fi, ti));
            }
        }
        let entry = |l: Loc| -> &TensorEntry { &model.files()[l.0].tensors()[l.1] };

        // Find packed modules: anchors `<p>.bitmask` / `<p>.crow_indices`.
        let mut claimed: HashMap<Loc, usize> = HashMap::new(); // part -> logical index
        let mut logical: Vec<(Loc, LogicalTensor)> = Vec::new(); // (sort key, tensor)
        for (fi, f) in model.files().iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                let (prefix, csr) = if let Some(p) = t.name.strip_suffix(".bitmask") {
                    (p, false)
                } else if let Some(p) = t.name.strip_suffix(".crow_indices") {
                    (p, true)
                } else {
                    continue;
                };
                let part = |s: &str| loc_of.get(format!("{prefix}.{s}").as_str()).copied();
                let (values, extra) = if csr {
                    (part("values"), part("col_indices"))
                } else {
                    (part("compressed"), part("row_offsets"))
                };
                let shape = part("shape");
                // What this file or config.json says the module must be stored as.
                let file_format = f
                    .metadata()
                    .get(META_FORMAT)
                    .and_then(|n| PackFormat::parse(n).ok());
                let want_bitmask = !csr
                    && (format == Some(PackFormat::Bitmask)
                        || file_format == Some(PackFormat::Bitmask));
                let mut missing: Vec<&str> = Vec::new();
                if shape.is_none() {
                    missing.push("shape");
                }
                if values.is_none() {
                    missing.push(if csr { "values" } else { "compressed" });
                }
                if extra.is_none() && (csr || want_bitmask) {
                    missing.push(if csr { "col_indices" } else { "row_offsets" });
                }
                if !missing.is_empty() {
                    if declared {
                        return Err(Error::integrity(format!(
                            "{}: packed module {prefix:?} is incomplete: its {} part{} missing",
                            f.path().display(),
                            missing.join(" and "),
                            if missing.len() == 1 { " is" } else { "s are" }
                        )));
                    }
                    continue;
                }
                let fmt = if csr {
                    PackFormat::Csr
                } else if extra.is_some() {
                    PackFormat::Bitmask
                } else {
                    PackFormat::TwoFour
                };
                if let Some(cf) = format {
                    if cf != fmt {
                        return Err(Error::format(format!(
                            "{}: packed module {prefix:?} is stored as {} but config.json declares {}",
                            f.path().display(),
                            fmt.config_name(),
                            cf.config_name()
                        )));
                    }
                }
                let mut parts = PackedParts {
                    format: fmt,
                    prefix: prefix.to_string(),
                    rows: 0,
                    cols: 0,
                    nnz: 0,
                    shape: shape.expect("complete"),
                    values: values.expect("complete"),
                    index: (fi, ti),
                    extra,
                    crc32: None,
                };
                let dtype = Self::check_parts(&model, &mut parts)?;
                let module = prefix.strip_suffix(".weight").unwrap_or(prefix);
                let name = format!("{module}.weight");
                let idx = logical.len();
                for p in parts.parts() {
                    claimed.insert(p, idx);
                }
                logical.push((
                    (fi, ti),
                    LogicalTensor {
                        name,
                        dtype,
                        shape: vec![parts.rows, parts.cols],
                        storage: Storage::Packed(parts),
                    },
                ));
            }
        }
        for (fi, f) in model.files().iter().enumerate() {
            for (ti, t) in f.tensors().iter().enumerate() {
                if claimed.contains_key(&(fi, ti)) {
                    continue;
                }
                logical.push((
                    (fi, ti),
                    LogicalTensor {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        storage: Storage::Dense((fi, ti)),
                    },
                ));
            }
        }
        if declared {
            check_nothing_orphaned(&model, &logical, format)?;
        }
        // Stored order: by file, then by offset of the anchor / tensor.
        logical.sort_by_key(|(l, _)| (l.0, entry(*l).data_offsets));
        let tensors: Vec<LogicalTensor> = logical.into_iter().map(|(_, t)| t).collect();
        let mut by_name = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::format(format!(
                    "{}: tensor {:?} is stored both packed and dense",
                    model.root().display(),
                    t.name
                )));
            }
        }
        // Checksums.
        let mut tensors = tensors;
        for t in &mut tensors {
            if let Storage::Packed(p) = &mut t.storage {
                let f = &model.files()[p.values.0];
                let module = p.prefix.strip_suffix(".weight").unwrap_or(&p.prefix);
                let key = format!("{META_CRC_PREFIX}{module}");
                match f.metadata().get(&key) {
                    Some(v) => {
                        let c = (v.len() == 8)
                            .then(|| u32::from_str_radix(v, 16).ok())
                            .flatten()
                            .ok_or_else(|| {
                                Error::format(format!(
                                    "{}: checksum {key:?} = {v:?} is not 8 hex digits",
                                    f.path().display()
                                ))
                            })?;
                        p.crc32 = Some(c);
                    }
                    None if f.metadata().contains_key(META_FORMAT) => {
                        return Err(Error::integrity(format!(
                            "{}: tensor {:?}: the file was written by besa-rs but has no checksum {key:?}",
                            f.path().display(),
                            t.name
                        )));
                    }
                    None => {}
                }
            }
        }
        Ok(Self {
            model,
            format,
            tensors,
            by_name,
        })
    }

    /// Checks names/dtypes/shapes of a module's parts; fills rows/cols/nnz; returns the dtype.
    fn check_parts(model: &Model, p: &mut PackedParts) -> Result<Dtype> {
        let e = |l: Loc| -> &TensorEntry { &model.files()[l.0].tensors()[l.1] };
        let file = model.files()[p.index.0].path().display().to_string();
        let err =
            |what: String| Error::format(format!("{file}: packed tensor {:?}: {what}", p.prefix));
        let shape_e = e(p.shape);
        let shape_ok = shape_e.dtype == Dtype::I64
            && (shape_e.shape == [2] || shape_e.shape == [2, 1] || shape_e.shape == [1, 2]);
        if !shape_ok {
            return Err(err(format!(
                "\"shape\" must be I64 with 2 elements, found {} {:?}",
                dtype_name(shape_e.dtype),
                shape_e.shape
            )));
        }
        let dims = read_i64s(model.files()[p.shape.0].data(shape_e));
        if dims.iter().any(|d| !(0..=(1i64 << 40)).contains(d)) {
            return Err(err(format!("\"shape\" holds invalid dimensions {dims:?}")));
        }
        let (rows, cols) = (dims[0] as usize, dims[1] as usize);
        let numel = rows
            .checked_mul(cols)
            .filter(|n| *n <= (1usize << 48))
            .ok_or_else(|| err(format!("shape [{rows}, {cols}] is too large")))?;
        p.rows = rows;
        p.cols = cols;
        let vals = e(p.values);
        let dtype = vals.dtype;
        if !matches!(dtype.bitsize(), 8 | 16 | 32 | 64) || dtype == Dtype::BOOL {
            return Err(err(format!(
                "values dtype {} is not supported",
                dtype_name(dtype)
            )));
        }
        let idx = e(p.index);
        match p.format {
            PackFormat::Bitmask | PackFormat::TwoFour => {
                if idx.dtype != Dtype::U8 || idx.shape != [rows, bitmask_row_bytes(cols)] {
                    return Err(err(format!(
                        "bitmask is {} {:?}, shape [{rows}, {cols}] needs U8 [{rows}, {}]",
                        dtype_name(idx.dtype),
                        idx.shape,
                        bitmask_row_bytes(cols)
                    )));
                }
                if p.format == PackFormat::Bitmask {
                    if vals.shape.len() != 1 {
                        return Err(err(format!(
                            "compressed must be 1-D, found {:?}",
                            vals.shape
                        )));
                    }
                    p.nnz = vals.shape[0];
                    if p.nnz > numel {
                        return Err(err(format!(
                            "compressed holds {} values, more than the {numel} of shape [{rows}, {cols}]",
                            p.nnz
                        )));
                    }
                    let ro = e(p.extra.expect("bitmask"));
                    if ro.dtype != Dtype::I64 || ro.shape != [rows] {
                        return Err(err(format!(
                            "row_offsets is {} {:?}, expected I64 [{rows}]",
                            dtype_name(ro.dtype),
                            ro.shape
                        )));
                    }
                } else {
                    if cols % 4 != 0 {
                        return Err(err(format!(
                            "2:4 shape [{rows}, {cols}]: columns not divisible by 4"
                        )));
                    }
                    if vals.shape != [rows, cols / 2] && vals.shape != [rows * cols / 2] {
                        return Err(err(format!(
                            "compressed is {:?}, 2:4 of [{rows}, {cols}] needs [{rows}, {}]",
                            vals.shape,
                            cols / 2
                        )));
                    }
                    p.nnz = rows * cols / 2;
                }
            }
            PackFormat::Csr => {
                if vals.shape.len() != 1 {
                    return Err(err(format!("values must be 1-D, found {:?}", vals.shape)));
                }
                p.nnz = vals.shape[0];
                if p.nnz > numel {
                    return Err(err(format!(
                        "{} values exceed shape [{rows}, {cols}]",
                        p.nnz
                    )));
                }
                if idx.dtype != Dtype::I64 || idx.shape != [rows + 1] {
                    return Err(err(format!(
                        "crow_indices is {} {:?}, expected I64 [{}]",
                        dtype_name(idx.dtype),
                        idx.shape,
                        rows + 1
                    )));
                }
                // CSR stores nothing for empty rows, so a tiny file could claim a huge dense
                // matrix: refuse shapes the stored bytes do not justify (a 1 : 65536 ratio is
                // far beyond any real all-zero weight).
                let stored = (idx.nbytes() + vals.nbytes()) as u128;
                let dense = numel as u128 * dtype_itemsize(dtype) as u128;
                if dense > (stored * 65536).max(1 << 20) {
                    return Err(err(format!(
                        "shape [{rows}, {cols}] ({dense} dense bytes) is not justified by {stored} stored bytes"
                    )));
                }
                let ci = e(p.extra.expect("csr"));
                if ci.dtype != Dtype::I32 || ci.shape != [p.nnz] {
                    return Err(err(format!(
                        "col_indices is {} {:?}, expected I32 [{}]",
                        dtype_name(ci.dtype),
                        ci.shape,
                        p.nnz
                    )));
                }
            }
        }
        Ok(dtype)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    /// The pack format declared in config.json, if any.
    pub fn declared_format(&self) -> Option<PackFormat> {
        self.format
    }
    /// True when at least one tensor is stored packed, or config.json declares a format.
    pub fn is_packed(&self) -> bool {
        self.format.is_some() || self.tensors.iter().any(|t| t.format().is_some())
    }
    /// Logical tensors in stored order.
    pub fn tensors(&self) -> &[LogicalTensor] {
        &self.tensors
    }
    pub fn get(&self, name: &str) -> Option<&LogicalTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
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
            Storage::Packed(p) => p.parts().iter().map(|l| self.loc_entry(*l).nbytes()).sum(),
        }
    }
    fn file_of(&self, l: Loc) -> String {
        self.model.files()[l.0].path().display().to_string()
    }

    /// Verifies a packed tensor's checksum and bit-level structure; returns kept counts per row.
    /// Errors name the file and tensor.
    pub fn validate(&self, t: &LogicalTensor, p: &PackedParts) -> Result<Vec<u64>> {
        let ctx = |e: Error| {
            let kind = e.kind;
            Error::new(
                if kind == ErrorKind::Integrity {
                    kind
                } else {
                    ErrorKind::Format
                },
                format!(
                    "{}: tensor {:?}: {}",
                    self.file_of(p.index),
                    t.name,
                    e.message
                ),
            )
        };
        if let Some(want) = p.crc32 {
            let mut h = crc32fast::Hasher::new();
            for l in p.parts() {
                h.update(self.part_data(l));
            }
            let got = h.finalize();
            if got != want {
                return Err(ctx(Error::integrity(format!(
                    "checksum mismatch (stored {want:08x}, data {got:08x}): the file is corrupt"
                ))));
            }
        }
        let (rows, cols) = (p.rows, p.cols);
        match p.format {
            PackFormat::Bitmask => {
                let counts = formats::bitmask_row_counts(self.part_data(p.index), rows, cols)
                    .map_err(ctx)?;
                let total: u64 = counts.iter().sum();
                if total != p.nnz as u64 {
                    return Err(ctx(Error::format(format!(
                        "bitmask popcount {total} disagrees with compressed length {}",
                        p.nnz
                    ))));
                }
                let ro = read_i64s(self.part_data(p.extra.expect("bitmask")));
                let (offs, _) = formats::prefix_offsets(&counts);
                if let Some(r) = (0..rows).find(|&r| ro[r] != offs[r] as i64) {
                    return Err(ctx(Error::format(format!(
                        "row_offsets[{r}] = {} but the bitmask gives {}",
                        ro[r], offs[r]
                    ))));
                }
                Ok(counts)
            }
            PackFormat::TwoFour => {
                formats::check_24_bitmask(self.part_data(p.index), rows, cols).map_err(ctx)?;
                Ok(vec![(cols / 2) as u64; rows])
            }
            PackFormat::Csr => formats::csr_check(
                self.part_data(p.index),
                self.part_data(p.extra.expect("csr")),
                rows,
                cols,
                p.nnz,
            )
            .map_err(ctx),
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
        if out.len() != t.nbytes() {
            return Err(Error::shape(format!(
                "tensor {:?}: output buffer has {} bytes, needs {}",
                t.name,
                out.len(),
                t.nbytes()
            )));
        }
        match &t.storage {
            Storage::Dense(l) => {
                parallel_copy(self.part_data(*l), out);
                Ok(())
            }
            Storage::Packed(p) => {
                let counts = self.validate(t, p)?;
                let n = dtype_itemsize(t.dtype);
                let r = match p.format {
                    PackFormat::Bitmask | PackFormat::TwoFour => formats::bitmask_decode(
                        n,
                        self.part_data(p.index),
                        self.part_data(p.values),
                        p.rows,
                        p.cols,
                        &counts,
                        out,
                    ),
                    PackFormat::Csr => formats::csr_decode(
                        n,
                        self.part_data(p.extra.expect("csr")),
                        self.part_data(p.values),
                        p.rows,
                        p.cols,
                        &counts,
                        out,
                    ),
                };
                r.map_err(|e| e.context(format!("{}: tensor {:?}", self.file_of(p.index), t.name)))
            }
        }
    }

    /// Decodes a logical tensor into a new buffer.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("{}: no tensor {name:?}", self.model.root().display()),
            )
        })?;
        let mut out = vec![0u8; t.nbytes()];
        self.read_into(t, &mut out)?;
        Ok(out)
    }

    /// Per packed tensor: format, dense shape, nnz, sparsity, packed size.
    pub fn packed_info(&self) -> Vec<PackedTensorInfo> {
        self.tensors
            .iter()
            .filter_map(|t| match &t.storage {
                Storage::Packed(p) => {
                    let numel = t.numel() as u64;
                    Some(PackedTensorInfo {
                        name: t.name.clone(),
                        format: p.format.name().to_string(),
                        dtype: dtype_name(t.dtype),
                        shape: t.shape.clone(),
                        nnz: p.nnz as u64,
                        sparsity: if numel == 0 {
                            0.0
                        } else {
                            1.0 - p.nnz as f64 / numel as f64
                        },
                        dense_bytes: t.nbytes() as u64,
                        packed_bytes: self.stored_bytes(t) as u64,
                    })
                }
                Storage::Dense(_) => None,
            })
            .collect()
    }

    /// Every 2-D float weight of the checkpoint, packed or not, in stored order; see
    /// [`Weight2d`]. Packed tensors are validated (checksum, popcounts) before they are yielded.
    pub fn weights_2d(&self) -> impl Iterator<Item = Result<Weight2d<'_>>> + '_ {
        self.tensors
            .iter()
            .filter(|t| t.shape.len() == 2 && formats::is_packable_dtype(t.dtype))
            .map(move |t| {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let data = match &t.storage {
                    Storage::Dense(l) => WeightData::Dense(self.part_data(*l)),
                    Storage::Packed(p) => {
                        let counts = self.validate(t, p)?;
                        match p.format {
                            PackFormat::Csr => {
                                let wb = bitmask_row_bytes(cols);
                                let mut m = vec![0u8; rows * wb];
                                let col = read_i32s(self.part_data(p.extra.expect("csr")));
                                let mut k = 0usize;
                                for (r, &c) in counts.iter().enumerate() {
                                    for &j in &col[k..k + c as usize] {
                                        m[r * wb + j as usize / 8] |= 1 << (j as usize % 8);
                                    }
                                    k += c as usize;
                                }
                                WeightData::Bitmask(Cow::Owned(m))
                            }
                            _ => WeightData::Bitmask(Cow::Borrowed(self.part_data(p.index))),
                        }
                    }
                };
                Ok(Weight2d {
                    name: t.name.clone(),
                    rows,
                    cols,
                    dtype: t.dtype,
                    format: t.format(),
                    data,
                })
            })
    }

    /// File-level `__metadata__` of every file, keyed by file name.
    pub fn file_metadata(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.model
            .files()
            .iter()
            .map(|f| {
                (
                    f.path()
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    f.metadata().clone(),
                )
            })
            .collect()
    }
}

/// Part names of packed modules, by the suffix after the module's prefix.
const PART_SUFFIXES: [&str; 7] = [
    "shape",
    "compressed",
    "bitmask",
    "row_offsets",
    "crow_indices",
    "col_indices",
    "values",
];

/// In a checkpoint declared packed (config.json or besa-rs file metadata), every module that
/// the declaration names must be complete: a stored part whose anchor (`bitmask` /
/// `crow_indices`) is gone, a checksum without its module, or a module of
/// `sparsity_config.targets` stored nowhere is an `Integrity` error (the module's weight would
/// otherwise silently disappear).
fn check_nothing_orphaned(
    model: &Model,
    logical: &[(Loc, LogicalTensor)],
    format: Option<PackFormat>,
) -> Result<()> {
    let packed: std::collections::HashSet<&str> = logical
        .iter()
        .filter_map(|(_, t)| match &t.storage {
            Storage::Packed(p) => Some(p.prefix.strip_suffix(".weight").unwrap_or(&p.prefix)),
            Storage::Dense(_) => None,
        })
        .collect();
    for (_, t) in logical {
        let Storage::Dense((fi, _)) = t.storage else {
            continue;
        };
        let f = &model.files()[fi];
        let declared_here = format.is_some() || f.metadata().contains_key(META_FORMAT);
        let Some((prefix, suffix)) = t.name.rsplit_once('.') else {
            continue;
        };
        if !declared_here || !PART_SUFFIXES.contains(&suffix) {
            continue;
        }
        // `values` and `shape` are plausible names of plain tensors; they are parts only when
        // they look like one (a `shape` is I64 with two entries; `values` only in CSR files).
        let looks_like_part = match suffix {
            "shape" => t.dtype == Dtype::I64 && t.numel() == 2,
            "values" => {
                format == Some(PackFormat::Csr)
                    || f.metadata().get(META_FORMAT).map(|s| s.as_str()) == Some("csr")
            }
            _ => true,
        };
        if !looks_like_part {
            continue;
        }
        let module = prefix.strip_suffix(".weight").unwrap_or(prefix);
        let anchor = if matches!(suffix, "col_indices" | "values") {
            "crow_indices"
        } else {
            "bitmask"
        };
        return Err(Error::integrity(format!(
            "{}: packed module {module:?} is incomplete: tensor {:?} is stored but its {anchor} part is missing",
            f.path().display(),
            t.name
        )));
    }
    for f in model.files() {
        for key in f.metadata().keys() {
            if let Some(module) = key.strip_prefix(META_CRC_PREFIX) {
                if !packed.contains(module) {
                    return Err(Error::integrity(format!(
                        "{}: the metadata holds checksum {key:?} but no part of packed module {module:?} is stored",
                        f.path().display()
                    )));
                }
            }
        }
    }
    let targets = model
        .config()
        .and_then(|c| c.get("quantization_config"))
        .and_then(|q| q.get("sparsity_config"))
        .and_then(|s| s.get("targets"))
        .and_then(|t| t.as_array());
    if let (Some(targets), Some(_)) = (targets, format) {
        for t in targets.iter().filter_map(|t| t.as_str()) {
            // Module paths only: compressed-tensors also uses class names ("Linear") and
            // regular expressions ("re:...") here.
            let is_path = t.contains('.')
                && !t.starts_with("re:")
                && t.chars()
                    .all(|c| c.is_alphanumeric() || c == '.' || c == '_');
            if is_path && !packed.contains(t) {
                return Err(Error::integrity(format!(
                    "{}: config.json lists {t:?} as packed (sparsity_config.targets) but no packed part of it is stored",
                    model.root().display()
                )));
            }
        }
    }
    Ok(())
}

fn read_i32s(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
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

/// The data of a 2-D weight as the simulator needs it.
#[derive(Debug, Clone)]
pub enum WeightData<'a> {
    /// Dense little-endian values, `rows * cols * itemsize` bytes (zeros are `+-0`).
    Dense(&'a [u8]),
    /// Keep-bitmask, `rows x ceil(cols/8)` bytes, bit j (LSB first) of byte b of a row = column
    /// `8b + j`, padding bits clear.
    Bitmask(Cow<'a, [u8]>),
}

/// One 2-D float weight of a (plain or packed) checkpoint.
#[derive(Debug, Clone)]
pub struct Weight2d<'a> {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: Dtype,
    /// Pack format when stored packed.
    pub format: Option<PackFormat>,
    pub data: WeightData<'a>,
}

impl Weight2d<'_> {
    /// The keep-bitmask (computed from the dense values when stored dense).
    pub fn keep_bitmask(&self) -> Result<Cow<'_, [u8]>> {
        match &self.data {
            WeightData::Bitmask(m) => Ok(Cow::Borrowed(m.as_ref())),
            WeightData::Dense(d) => Ok(Cow::Owned(formats::bitmask_of_dense(
                self.dtype, d, self.rows, self.cols,
            )?)),
        }
    }
    /// Whether weight (r, c) is kept (non-zero). Convenience for small uses; prefer
    /// [`Weight2d::keep_bitmask`] for whole matrices.
    pub fn is_kept(mask: &[u8], cols: usize, r: usize, c: usize) -> bool {
        mask[r * bitmask_row_bytes(cols) + c / 8] >> (c % 8) & 1 == 1
    }
}

/// Opens `path` (plain or packed checkpoint) and calls `f` on each 2-D float weight, in stored
/// order. The entry point for consumers that only need sparsity patterns (the simulator).
pub fn for_each_weight_2d(
    path: &Path,
    mut f: impl FnMut(Weight2d<'_>) -> Result<()>,
) -> Result<()> {
    let m = PackedModel::open(path)?;
    for w in m.weights_2d() {
        f(w?)?;
    }
    Ok(())
}
