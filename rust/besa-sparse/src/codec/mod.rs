//! One codec per packed format, behind one trait that owns everything about the format: its
//! names (command line, config.json, aliases), its stored parts (names, dtypes, shapes), how a
//! module of it is recognised, how its parts are checked, and encode / decode / keep-mask.
//!
//! The packed reader, pack/unpack, inspect and the simulator only talk to [`Codec`]. A new
//! format is one new file in this folder plus one line in [`all`].

use std::fmt;
use std::ops::Range;

use safetensors::tensor::Dtype;

use crate::error::Result;

mod bitmask;
mod bitmask_quantized;
mod csr;
pub mod kernels;
pub mod nbit;
mod pack_quantized;
#[cfg(target_arch = "x86_64")]
mod simd16;
#[cfg(target_arch = "x86_64")]
mod simd_quant;
mod two_four;

pub use nbit::{QuantInput, QuantParams};
pub use two_four::{check_24, Not24};

/// A dense row-major float matrix (little-endian bytes).
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    /// Quantized formats: the codes, scales and zero points the matrix was dequantized from.
    pub quant: Option<QuantInput<'a>>,
}

/// Header facts of one stored part, for [`Codec::check_layout`].
#[derive(Debug, Clone, Copy)]
pub struct PartInfo<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub nbytes: usize,
}

/// One tensor a codec writes for a matrix: `<module>.<suffix>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    pub suffix: &'static str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// What the layout check of a stored module found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Dtype of the stored values (the dense tensor's dtype).
    pub dtype: Dtype,
    /// Values stored (for 2:4 this includes zero fillers).
    pub nnz: usize,
}

/// The stored parts of one packed matrix, in [`Codec::parts`] order, after the layout check.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    /// Dtype of the dense matrix.
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    pub itemsize: usize,
    pub nnz: usize,
    pub parts: &'a [&'a [u8]],
    /// Quantized formats: the checkpoint's scheme (config.json `quantization_config`).
    pub quant: Option<QuantParams>,
}

/// The quantization parameters of one stored matrix (to regenerate the side file).
#[derive(Debug, Clone)]
pub struct QuantData {
    /// U8 `[rows, cols]` codes (pruned positions hold their group's zero point).
    pub codes: Vec<u8>,
    /// U8 `[rows, groups]` zero points.
    pub zero: Vec<u8>,
    /// Index in [`Codec::parts`] of `weight_scale` (`[rows, groups]`, stored as given).
    pub scale_part: usize,
    pub groups: usize,
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeOptions {
    /// Formats with a structure (2:4): make the matrix fit by re-pruning instead of failing.
    pub force: bool,
}

/// A codec's decision on a candidate matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Pack it, storing `stored_nnz` values; `dropped` weights were re-pruned by `force`.
    Pack { stored_nnz: u64, dropped: u64 },
    /// The format cannot hold this matrix (copied through dense, or an error when the tensor
    /// was asked for by name).
    Skip(String),
}

/// Everything about one packed format.
pub trait Codec: Send + Sync + 'static {
    /// Short name (command line, reports, file metadata): "bitmask".
    fn name(&self) -> &'static str;
    /// `quantization_config.sparsity_config.format` in config.json: "sparse-bitmask".
    fn config_name(&self) -> &'static str;
    /// Other accepted spellings of the name.
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// `(quant_method, sparsity_structure)` of the config.json block.
    fn config_method(&self) -> (&'static str, &'static str);
    /// Suffixes of the stored parts in stored and checksum order.
    fn parts(&self) -> &'static [&'static str];
    /// Index in [`Codec::parts`] of the part holding the dense shape (I64 `[rows, cols]`).
    fn shape_part(&self) -> usize {
        0
    }
    /// Whether the format stores quantized codes (its modules need [`QuantParams`], from
    /// config.json when reading and from the side file `quantization.safetensors` when
    /// packing).
    fn is_quantized(&self) -> bool {
        false
    }
    /// The part whose presence marks a module as stored in this format.
    fn anchor(&self) -> &'static str;
    /// Index in [`Codec::parts`] of the stored values.
    fn values_part(&self) -> usize;
    /// Whether [`EncodeOptions::force`] applies to this format.
    fn has_force(&self) -> bool {
        false
    }
    /// Checks dtypes and shapes of the parts (`shape` already read: `rows x cols`; `quant`:
    /// the checkpoint's quantization scheme, if any); errors say what is wrong without naming
    /// the file (the reader adds that).
    fn check_layout(
        &self,
        rows: usize,
        cols: usize,
        parts: &[PartInfo<'_>],
        quant: Option<QuantParams>,
    ) -> Result<Layout>;
    /// Whether a candidate can be stored; `counts` are its kept elements per row.
    /// Default: every matrix fits, storing its nonzeros (`counts` per row).
    fn admit(&self, _m: Matrix<'_>, counts: &[u64], _opts: EncodeOptions) -> Result<Admission> {
        Ok(Admission::Pack {
            stored_nnz: counts.iter().sum(),
            dropped: 0,
        })
    }
    /// The parts written for a matrix, in [`Codec::parts`] order.
    fn plan(
        &self,
        dtype: Dtype,
        rows: usize,
        cols: usize,
        stored_nnz: usize,
        quant: Option<QuantParams>,
    ) -> Vec<PartSpec>;
    /// Encodes `m` into its planned parts (every byte written).
    fn encode(&self, m: Matrix<'_>, counts: &[u64], out: &mut [&mut [u8]]) -> Result<()>;
    /// Bit-level checks of stored parts; returns the values stored per row.
    fn validate(&self, s: &Stored<'_>) -> Result<Vec<u64>>;
    /// Decodes rows `rows` of validated parts into `out` (`rows.len() * cols * itemsize`).
    fn decode(
        &self,
        s: &Stored<'_>,
        counts: &[u64],
        rows: Range<usize>,
        out: &mut [u8],
    ) -> Result<()>;
    /// One byte per weight of validated parts (1 = stored and non-zero under the zero rule),
    /// read from the index and the stored values without decoding the matrix.
    fn keep_mask(&self, s: &Stored<'_>, counts: &[u64], out: &mut [u8]) -> Result<()>;
    /// Quantized formats: the codes and zero points of validated parts.
    fn quant_data(&self, _s: &Stored<'_>, _counts: &[u64]) -> Result<QuantData> {
        crate::bail!(format, "{} stores no quantization parameters", self.name())
    }
    /// Quantized formats: [`Codec::validate`] and [`Codec::quant_data`] in one pass over the
    /// stored codes (the counts are the kept weights per row: codes that differ from their
    /// zero point).
    fn validate_quant(&self, s: &Stored<'_>) -> Result<(Vec<u64>, QuantData)> {
        let counts = self.validate(s)?;
        let d = self.quant_data(s, &counts)?;
        Ok((counts, d))
    }
}

/// A packed format: a copyable handle on its codec.
#[derive(Clone, Copy)]
pub struct PackFormat(&'static dyn Codec);

/// compressed-tensors "sparse-bitmask".
pub const BITMASK: PackFormat = PackFormat(&bitmask::Bitmask);
/// compressed-tensors "sparse-24-bitmask".
pub const TWO_FOUR: PackFormat = PackFormat(&two_four::TwoFour);
/// besa-rs CSR.
pub const CSR: PackFormat = PackFormat(&csr::Csr);
/// compressed-tensors "pack-quantized".
pub const PACK_QUANTIZED: PackFormat = PackFormat(&pack_quantized::PackQuantized);
/// besa-rs "bitmask-quantized".
pub const BITMASK_QUANTIZED: PackFormat = PackFormat(&bitmask_quantized::BitmaskQuantized);

/// Every format, in the order they are listed to users.
pub fn all() -> &'static [PackFormat] {
    static ALL: [PackFormat; 5] = [BITMASK, TWO_FOUR, CSR, PACK_QUANTIZED, BITMASK_QUANTIZED];
    &ALL
}

/// The format with this name, config.json name or alias.
pub fn by_name(name: &str) -> Option<PackFormat> {
    all()
        .iter()
        .copied()
        .find(|f| f.name() == name || f.config_name() == name || f.aliases().contains(&name))
}

/// The format named by config.json (`sparsity_config.format`); only config names match.
pub fn by_config_name(name: &str) -> Option<PackFormat> {
    all().iter().copied().find(|f| f.config_name() == name)
}

impl PackFormat {
    /// Parses a user-given name (name, config name or alias).
    pub fn parse(name: &str) -> Result<Self> {
        by_name(name).ok_or_else(|| {
            let names: Vec<&str> = all().iter().map(|f| f.name()).collect();
            crate::Error::config(format!(
                "unknown pack format {name:?} (expected one of: {})",
                names.join(", ")
            ))
        })
    }
    /// The codec of this format.
    pub fn codec(self) -> &'static dyn Codec {
        self.0
    }
}

impl std::ops::Deref for PackFormat {
    type Target = dyn Codec;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for PackFormat {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}
impl Eq for PackFormat {}
impl std::hash::Hash for PackFormat {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.name().hash(h)
    }
}
impl fmt::Debug for PackFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackFormat({})", self.name())
    }
}
impl fmt::Display for PackFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for PackFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for PackFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PackFormat::parse(&s).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// The `shape` part of a matrix: `[rows, cols]` as two little-endian I64.
pub fn write_shape(buf: &mut [u8], rows: usize, cols: usize) {
    buf[..8].copy_from_slice(&(rows as i64).to_le_bytes());
    buf[8..16].copy_from_slice(&(cols as i64).to_le_bytes());
}

/// Bytes of the bitmask of one row of `cols` columns.
pub fn bitmask_row_bytes(cols: usize) -> usize {
    cols.div_ceil(8)
}

#[cfg(test)]
mod quant_tests;
#[cfg(test)]
mod tests;
