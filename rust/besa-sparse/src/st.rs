//! Reading safetensors files through a memory map, with the `safetensors` crate's strict header
//! validation (header <= 100 MB, offsets tile the buffer exactly, byte lengths match shapes).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{Error, Result};

pub use crate::dtype::{itemsize as dtype_itemsize, name as dtype_name, parse as parse_dtype};

/// One tensor of a mapped file: its header entry and its bytes.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the file's data buffer (end exclusive).
    pub data_offsets: (usize, usize),
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }
}

/// A memory-mapped, validated safetensors file.
pub struct StFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Tensors in file (offset) order.
    tensors: Vec<TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for StFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl StFile {
    /// Maps and validates `path`. Any defect of the file is a `Format` error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            crate::bail!(format, "{}: not a regular file", path.display());
        }
        if meta.len() < 8 {
            crate::bail!(
                format,
                "{}: not a safetensors file (only {} bytes, the 8-byte header length is missing)",
                path.display(),
                meta.len()
            );
        }
        // SAFETY: the map is read-only; a file truncated by another process while mapped is
        // outside what this library can defend against (same contract as safetensors/memmap2).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(path, mmap)
    }

    fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let declared = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes checked"));
        let file_len = mmap.len() as u64;
        if declared > 100_000_000 {
            crate::bail!(
                format,
                "{}: header length {declared} exceeds the 100 MB limit (corrupt or not a safetensors file)",
                path.display()
            );
        }
        if declared > file_len - 8 {
            crate::bail!(
                format,
                "{}: header length {declared} is larger than the file ({file_len} bytes): truncated or corrupt",
                path.display()
            );
        }
        let header = &mmap[8..8 + declared as usize];
        if let Some(name) = duplicate_key(header) {
            crate::bail!(
                format,
                "{}: invalid safetensors file: tensor name {name:?} appears twice in the header",
                path.display()
            );
        }
        let (n, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::format(format!(
                "{}: invalid safetensors file: {}",
                path.display(),
                describe(&e, &mmap[8..8 + declared as usize], file_len, declared)
            ))
        })?;
        let mut tensors: Vec<TensorEntry> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                data_offsets: info.data_offsets,
            })
            .collect();
        for t in &tensors {
            // A zero dimension makes the element count 0 whatever the others are, so the
            // safetensors crate accepts e.g. [0, 2^63, 2^63]; no consumer (numpy, torch) can
            // represent such a shape: every product of dimensions must fit in an i64.
            let fits = t.shape.iter().try_fold(1i64, |acc, &d| {
                i64::try_from(d.max(1)).ok()?.checked_mul(acc)
            });
            if fits.is_none() {
                crate::bail!(
                    format,
                    "{}: invalid safetensors file: tensor {:?} has shape {:?} whose dimensions overflow when multiplied out",
                    path.display(),
                    t.name,
                    t.shape
                );
            }
        }
        tensors.sort_by_key(|t| t.data_offsets);
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + n,
            tensors,
            metadata: metadata
                .metadata()
                .clone()
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The bytes of a tensor of this file.
    pub fn data(&self, t: &TensorEntry) -> &[u8] {
        &self.mmap[self.data_start + t.data_offsets.0..self.data_start + t.data_offsets.1]
    }

    /// Drops the pages of tensor `t` of this file from the process's page tables (they stay in
    /// the page cache): consumers reading a model once, matrix by matrix, keep their resident
    /// set at the matrices in flight. Only whole pages inside the tensor's range of this
    /// read-only file map are touched, so no byte any borrower sees can change (a later read
    /// faults the same bytes back in from the file).
    pub fn release(&self, t: &TensorEntry) {
        #[cfg(target_os = "linux")]
        {
            let (a, b) = (
                self.data_start + t.data_offsets.0,
                self.data_start + t.data_offsets.1,
            );
            if b > self.mmap.len() || a >= b {
                return;
            }
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page = if page > 0 { page as usize } else { 4096 };
            let base = self.mmap.as_ptr() as usize;
            let first = (base + a).div_ceil(page) * page;
            let end = (base + b) / page * page;
            if end > first {
                // SAFETY: [first, end) is made of whole pages inside this file's read-only shared
                // map (`self.mmap`, alive as long as `self`); MADV_DONTNEED on such a map
                // only drops this process's page-table entries.
                unsafe {
                    libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = t;
    }
}

/// The first top-level key that appears twice in a JSON header object (`serde_json` and the
/// `safetensors` crate keep the last one silently); `None` when there is none or the header is
/// not a JSON object (the `safetensors` crate reports that).
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Dup;
    impl<'de> Visitor<'de> for Dup {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(Dup).ok().flatten()
}

/// Names the first tensor whose byte length disagrees with dtype x shape, or whose range runs
/// past the data buffer (the `safetensors` crate reports these without a name).
fn find_bad_tensor(header: &[u8], data_len: u64) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    for (name, info) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype")?.as_str()?;
        let itemsize = parse_dtype(dtype).ok().map(dtype_itemsize)? as u128;
        let numel: u128 = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(u128::from))
            .try_fold(1u128, |acc, d| d.map(|d| acc.saturating_mul(d)))?;
        let off = info.get("data_offsets")?.as_array()?;
        let (b, e) = (off.first()?.as_u64()?, off.get(1)?.as_u64()?);
        if e > data_len {
            return Some(format!(
                "tensor {name:?} has data_offsets [{b}, {e}] beyond the {data_len}-byte data buffer"
            ));
        }
        if (e.saturating_sub(b)) as u128 != numel.saturating_mul(itemsize) {
            return Some(format!(
                "tensor {name:?} ({dtype}, shape {}) needs {} bytes but data_offsets [{b}, {e}] hold {}",
                info.get("shape")?,
                numel.saturating_mul(itemsize),
                e.saturating_sub(b)
            ));
        }
    }
    None
}

fn describe(
    e: &safetensors::SafeTensorError,
    header: &[u8],
    file_len: u64,
    declared: u64,
) -> String {
    use safetensors::SafeTensorError as E;
    let data_len = file_len - 8 - declared;
    if matches!(e, E::TensorInvalidInfo | E::MetadataIncompleteBuffer) {
        if let Some(msg) = find_bad_tensor(header, data_len) {
            return msg;
        }
    }
    match e {
        E::MetadataIncompleteBuffer => format!(
            "tensor data does not fill the file exactly (file is {file_len} bytes, header {declared}): truncated, padded or overlapping tensors"
        ),
        E::InvalidOffset(name) => format!(
            "tensor {name:?} has data_offsets that overlap another tensor, leave a hole or run backwards"
        ),
        E::TensorInvalidInfo => {
            "a tensor's byte length disagrees with its dtype and shape".to_string()
        }
        E::ValidationOverflow => "a tensor's shape overflows when multiplied out".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{serialize, PlannedTensor};

    fn file_with(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn open_bytes(bytes: &[u8]) -> Result<StFile> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, bytes).unwrap();
        StFile::open(&p)
    }

    #[test]
    fn reads_what_the_writer_writes_in_offset_order() {
        let a = PlannedTensor::new("b", Dtype::F32, vec![2]);
        let b = PlannedTensor::new("a", Dtype::U8, vec![3]);
        let md: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let bytes = serialize(&[(a, &[1u8; 8][..]), (b, &[2u8; 3][..])], Some(&md)).unwrap();
        let f = open_bytes(&bytes).unwrap();
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(f.data(f.get("a").unwrap()), &[2, 2, 2]);
        assert_eq!(f.metadata()["format"], "pt");
        f.release(f.get("b").unwrap());
        assert_eq!(f.data(f.get("b").unwrap()), &[1u8; 8]);
    }

    #[test]
    fn header_defects_are_named() {
        let msg = |bytes: &[u8]| open_bytes(bytes).unwrap_err().message;
        assert!(msg(&[1, 2, 3]).contains("only 3 bytes"));
        let mut big = 200_000_000u64.to_le_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert!(msg(&big).contains("exceeds the 100 MB limit"));
        let mut long = 50u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        assert!(msg(&long).contains("larger than the file"));
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(msg(&file_with(dup, &[0, 0])).contains("\"a\" appears twice"));
        let short = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(msg(&file_with(short, &[0; 8])).contains("needs 12 bytes"));
        let past = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(msg(&file_with(past, &[0; 2])).contains("beyond the 2-byte data buffer"));
        let huge = r#"{"w":{"dtype":"U8","shape":[0,9223372036854775807,4],"data_offsets":[0,0]}}"#;
        assert!(msg(&file_with(huge, &[])).contains("overflow"));
    }
}
