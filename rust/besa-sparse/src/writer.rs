//! Writing safetensors files and sharded checkpoints, atomically.
//!
//! A file is planned first (names, dtypes, shapes, byte lengths), its header is serialised and
//! validated with the `safetensors` crate, the file is created at its full size, and each
//! tensor is written at its offset (from the input's memory map for copies, from two reusable
//! buffers for encoded tensors, written by a background thread while the next is filled, so
//! memory stays at about twice the largest packed tensor). Directories are built under a hidden temporary name next to
//! the destination and renamed into place only when complete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::os::unix::fs::FileExt;

use crate::dtype::itemsize as dtype_itemsize;
use crate::error::{Error, Result};

/// Header size limit of the format (same as the reader's).
pub const MAX_HEADER: usize = 100_000_000;

/// One tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
        }
    }
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * dtype_itemsize(self.dtype)
    }
}

/// Serialises a safetensors header for `tensors` in the given order, offsets tiling the buffer
/// from 0, with `metadata` (sorted keys) first when given; padded with spaces to a multiple of 8.
/// Returns the header bytes (without the 8-byte length) and each tensor's data offsets.
/// Header bytes and the data offsets of each tensor.
pub type Header = (Vec<u8>, Vec<(usize, usize)>);

pub fn header_bytes(
    tensors: &[PlannedTensor],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Header> {
    let mut seen = std::collections::HashSet::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut infos = Vec::with_capacity(tensors.len());
    let mut off = 0usize;
    for t in tensors {
        if !seen.insert(t.name.as_str()) || t.name == "__metadata__" {
            crate::bail!(
                format,
                "tensor name {:?} is used twice (or reserved)",
                t.name
            );
        }
        let n = t.nbytes();
        offsets.push((off, off + n));
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (off, off + n),
            },
        ));
        off += n;
    }
    // Validation of the layout by the safetensors crate itself.
    Metadata::new(None, infos).map_err(|e| Error::format(format!("invalid tensor layout: {e}")))?;

    let js = |s: &str| serde_json::to_string(s).expect("string serialises");
    let mut h = String::from("{");
    let mut first = true;
    if let Some(md) = metadata {
        h.push_str("\"__metadata__\":{");
        for (i, (k, v)) in md.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&js(k));
            h.push(':');
            h.push_str(&js(v));
        }
        h.push('}');
        first = false;
    }
    for (t, (a, b)) in tensors.iter().zip(&offsets) {
        if !first {
            h.push(',');
        }
        first = false;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        h.push_str(&format!(
            "{}:{{\"dtype\":\"{:?}\",\"shape\":[{}],\"data_offsets\":[{a},{b}]}}",
            js(&t.name),
            t.dtype,
            shape.join(",")
        ));
    }
    h.push('}');
    let mut bytes = h.into_bytes();
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    if bytes.len() > MAX_HEADER {
        crate::bail!(
            format,
            "header of {} bytes exceeds the 100 MB limit",
            bytes.len()
        );
    }
    Ok((bytes, offsets))
}

/// A safetensors file being written: created at its final size with its header, then each
/// tensor is written at its offset with positioned writes (`pwrite`), either straight from a
/// caller's slice or from a scratch buffer the caller fills. Filled buffers are written by a
/// background thread while the caller fills the next one (two buffers at most, so memory stays
/// at about twice the largest packed tensor or a few MB of rows, and no page of the output is
/// faulted through a memory map).
pub struct ShardWriter {
    path: PathBuf,
    file: Arc<File>,
    data_start: usize,
    offsets: Vec<(usize, usize)>,
    index: BTreeMap<String, usize>,
    /// Buffers not in flight, for reuse.
    spare: Vec<Vec<u8>>,
    bg: Option<Background>,
}

/// Writes of a filled buffer: (start, end) in the buffer -> file offset.
struct Job {
    buf: Vec<u8>,
    writes: Vec<(usize, usize, u64)>,
}

/// The thread writing filled buffers, and the buffers it hands back.
struct Background {
    tx: SyncSender<Job>,
    done: Receiver<Vec<u8>>,
    in_flight: usize,
    handle: JoinHandle<std::io::Result<()>>,
}

/// Buffers being written at once by the background thread.
const MAX_IN_FLIGHT: usize = 1;

impl Background {
    fn start(file: Arc<File>) -> Self {
        let (tx, rx) = sync_channel::<Job>(MAX_IN_FLIGHT);
        let (done_tx, done) = sync_channel::<Vec<u8>>(MAX_IN_FLIGHT + 1);
        let handle = std::thread::Builder::new()
            .name("besa-writer".into())
            .spawn(move || -> std::io::Result<()> {
                for job in rx {
                    for &(a, b, off) in &job.writes {
                        file.write_all_at(&job.buf[a..b], off)?;
                    }
                    let _ = done_tx.send(job.buf);
                }
                Ok(())
            })
            .expect("spawn the writer thread");
        Self {
            tx,
            done,
            in_flight: 0,
            handle,
        }
    }

    /// Waits for the thread to write everything sent; its first error.
    fn join(self) -> std::io::Result<()> {
        drop(self.tx);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread panicked")))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // an abandoned file (error path): let the pending writes end before it is removed
        if let Some(bg) = self.bg.take() {
            let _ = bg.join();
        }
    }
}

impl ShardWriter {
    /// Creates `path` (which must not exist) at its final size and writes the header.
    pub fn create(
        path: &Path,
        tensors: &[PlannedTensor],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        let (header, offsets) = header_bytes(tensors, metadata)?;
        let data_len = offsets.last().map_or(0, |o| o.1);
        let total = 8 + header.len() + data_len;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(total as u64).map_err(|e| Error::io(path, e))?;
        let mut head = (header.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&header);
        file.write_all_at(&head, 0)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            data_start: 8 + header.len(),
            offsets,
            index: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            spare: Vec::new(),
            bg: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn slot(&self, name: &str) -> Result<(usize, usize)> {
        let i = *self.index.get(name).ok_or_else(|| {
            Error::config(format!(
                "tensor {name:?} is not planned in {}",
                self.path.display()
            ))
        })?;
        Ok(self.offsets[i])
    }

    /// The slot of tensor `name`, which `len` bytes must fill exactly.
    fn slot_of_len(&self, name: &str, len: usize) -> Result<(usize, usize)> {
        let (a, b) = self.slot(name)?;
        crate::ensure!(
            len == b - a,
            shape,
            "tensor {name:?}: {len} bytes given, {} planned",
            b - a
        );
        Ok((a, b))
    }

    /// Writes the bytes of tensor `name` (exactly its planned length).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let (a, _) = self.slot_of_len(name, data.len())?;
        self.file
            .write_all_at(data, (self.data_start + a) as u64)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// A buffer of at least `len` bytes (contents unspecified), waiting for one in flight
    /// when the background thread holds as many as it may.
    fn take_buffer(&mut self, len: usize) -> Result<Vec<u8>> {
        self.wait_for_room()?;
        let mut buf = self.spare.pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Ok(buf)
    }

    /// Waits until the background thread may take one more buffer; keeps two of the buffers
    /// it handed back for reuse.
    fn wait_for_room(&mut self) -> Result<()> {
        let Some(bg) = &mut self.bg else {
            return Ok(());
        };
        let mut back = Vec::new();
        while let Ok(b) = bg.done.try_recv() {
            bg.in_flight -= 1;
            back.push(b);
        }
        let mut stopped = false;
        if bg.in_flight >= MAX_IN_FLIGHT {
            match bg.done.recv() {
                Ok(b) => {
                    bg.in_flight -= 1;
                    back.push(b);
                }
                Err(_) => stopped = true,
            }
        }
        for b in back {
            if self.spare.len() < 2 {
                self.spare.push(b);
            }
        }
        if stopped {
            return Err(self.background_error());
        }
        Ok(())
    }

    /// Writes tensor `name` from an owned buffer of exactly its planned length, in the
    /// background.
    pub fn write_owned(&mut self, name: &str, data: Vec<u8>) -> Result<()> {
        let (a, _) = self.slot_of_len(name, data.len())?;
        self.wait_for_room()?;
        let len = data.len();
        self.send(data, vec![(0, len, (self.data_start + a) as u64)])
    }

    /// Hands a filled buffer to the background thread (started on first use).
    fn send(&mut self, buf: Vec<u8>, writes: Vec<(usize, usize, u64)>) -> Result<()> {
        let file = &self.file;
        let bg = self
            .bg
            .get_or_insert_with(|| Background::start(file.clone()));
        let sent = bg.tx.send(Job { buf, writes }).is_ok();
        if !sent {
            return Err(self.background_error());
        }
        bg.in_flight += 1;
        Ok(())
    }

    /// The error that stopped the background thread.
    fn background_error(&mut self) -> Error {
        let e = match self.bg.take().map(Background::join) {
            Some(Err(e)) => e,
            _ => std::io::Error::other("the writer thread stopped"),
        };
        Error::io(&self.path, e)
    }

    /// Lends `f` one buffer per name (planned lengths, contents unspecified: `f` must write
    /// every byte), then writes them to their offsets.
    pub fn fill_tensors<R>(
        &mut self,
        names: &[&str],
        f: impl FnOnce(&mut [&mut [u8]]) -> Result<R>,
    ) -> Result<R> {
        let mut slots = Vec::with_capacity(names.len());
        for n in names {
            slots.push(self.slot(n)?);
        }
        let total: usize = slots.iter().map(|(a, b)| b - a).sum();
        let mut buf = self.take_buffer(total)?;
        let mut rest: &mut [u8] = &mut buf[..total];
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(names.len());
        for (a, b) in &slots {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(b - a);
            bufs.push(mine);
            rest = tail;
        }
        let r = f(&mut bufs);
        drop(bufs);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.spare.push(buf);
                return Err(e);
            }
        };
        let mut writes = Vec::with_capacity(slots.len());
        let mut at = 0;
        for (a, b) in &slots {
            writes.push((at, at + b - a, (self.data_start + a) as u64));
            at += b - a;
        }
        self.send(buf, writes)?;
        Ok(r)
    }

    /// Writes tensor `name` (rows of `row_bytes` bytes) chunk by chunk: `f(rows, buf)` fills
    /// the bytes of rows `rows` into `buf`, which is then written at its offset while the next
    /// chunk is filled. Chunks are a few MB, so the data goes from the cache to the file
    /// without a full-size buffer.
    pub fn fill_rows(
        &mut self,
        name: &str,
        row_bytes: usize,
        mut f: impl FnMut(std::ops::Range<usize>, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        const CHUNK: usize = 1 << 23;
        let (a, b) = self.slot(name)?;
        let rows = (b - a).checked_div(row_bytes).unwrap_or(0);
        crate::ensure!(
            rows * row_bytes == b - a,
            shape,
            "tensor {name:?}: {} bytes are not whole rows of {row_bytes}",
            b - a
        );
        let per = (CHUNK / row_bytes.max(1)).max(1);
        let mut r = 0;
        while r < rows {
            let end = (r + per).min(rows);
            let len = (end - r) * row_bytes;
            let mut buf = self.take_buffer(len)?;
            if let Err(e) = f(r..end, &mut buf[..len]) {
                self.spare.push(buf);
                return Err(e);
            }
            let off = (self.data_start + a + r * row_bytes) as u64;
            self.send(buf, vec![(0, len, off)])?;
            r = end;
        }
        Ok(())
    }

    /// Rewrites the header with new metadata values; the new header must have exactly the
    /// length of the one written by [`ShardWriter::create`] (fixed-width values such as the
    /// 8-hex-digit checksums written after the data).
    pub fn rewrite_metadata(
        &mut self,
        tensors: &[PlannedTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let (header, _) = header_bytes(tensors, Some(metadata))?;
        if 8 + header.len() != self.data_start {
            crate::bail!(
                config,
                "{}: rewritten header changes length",
                self.path.display()
            );
        }
        self.file
            .write_all_at(&header, 8)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Waits for the background writes, then closes the file, fsyncing it first when `sync`.
    pub fn finish(mut self, sync: bool) -> Result<()> {
        if let Some(bg) = self.bg.take() {
            bg.join().map_err(|e| Error::io(&self.path, e))?;
        }
        if sync {
            self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// Writes a complete in-memory safetensors file (small files, tests).
pub fn write_file(
    path: &Path,
    tensors: &[(PlannedTensor, &[u8])],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let plan: Vec<PlannedTensor> = tensors.iter().map(|(t, _)| t.clone()).collect();
    for (t, d) in tensors {
        if d.len() != t.nbytes() {
            crate::bail!(
                shape,
                "tensor {:?}: {} bytes given, dtype and shape need {}",
                t.name,
                d.len(),
                t.nbytes()
            );
        }
    }
    let mut w = ShardWriter::create(path, &plan, metadata)?;
    for (t, d) in tensors {
        w.write_tensor(&t.name, d)?;
    }
    w.finish(false)
}

/// Serialises a complete safetensors file into memory (small files, tests, fixtures).
pub fn serialize(
    tensors: &[(PlannedTensor, &[u8])],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let plan: Vec<PlannedTensor> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let (header, _) = header_bytes(&plan, metadata)?;
    let mut out = Vec::new();
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (t, d) in tensors {
        if d.len() != t.nbytes() {
            crate::bail!(shape, "tensor {:?}: wrong byte length", t.name);
        }
        out.extend_from_slice(d);
    }
    Ok(out)
}

/// Groups of tensors (kept together) assigned to shards of at most `shard_size` bytes of data
/// (a group larger than that gets a shard of its own). Returns, per shard, the group indices.
pub fn plan_shards(group_bytes: &[usize], shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur = 0u64;
    for (i, &b) in group_bytes.iter().enumerate() {
        let b = b as u64;
        if shards.is_empty() || (cur > 0 && cur + b > shard_size) {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().expect("pushed").push(i);
        cur += b;
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

/// File name of shard `k` (0-based) of `n`: `model.safetensors` when n == 1, else
/// `model-0000K-of-0000N.safetensors` (1-based), as `save_pretrained` names them.
pub fn shard_name(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// Orders tensors in a file by decreasing item size, then by the given order, so every tensor
/// starts at an offset aligned to its item size (as the `safetensors` crate does).
pub fn align_order(tensors: &mut [PlannedTensor]) {
    tensors.sort_by_key(|t| std::cmp::Reverse(dtype_itemsize(t.dtype)));
}

pub use crate::atomic::{
    commit_dir, crash_point, dead_leftovers, make_partial_dir, recover_leftovers, AtomicDir,
    Leftover,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_exact_vector_of_the_spec() {
        let data: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let t = PlannedTensor::new("attn.0", Dtype::F32, vec![1, 2, 3]);
        let bytes = serialize(&[(t, &data)], None).unwrap();
        let header = br#"{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}"#;
        assert_eq!(header.len(), 64);
        let mut want = vec![0x40, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(header);
        want.extend_from_slice(&data);
        assert_eq!(bytes, want);
        // and the safetensors crate reads it back
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("attn.0").unwrap().data(), &data[..]);
    }

    #[test]
    fn metadata_first_sorted_and_padded() {
        let md: BTreeMap<String, String> = [
            ("z".to_string(), "1".to_string()),
            ("format".into(), "pt".into()),
        ]
        .into();
        let t = PlannedTensor::new("a", Dtype::U8, vec![3]);
        let bytes = serialize(&[(t, &[1u8, 2, 3][..])], Some(&md)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let h = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(
            h.starts_with(r#"{"__metadata__":{"format":"pt","z":"1"},"a":"#),
            "{h}"
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &[1, 2, 3]);
    }

    #[test]
    fn duplicate_names_refused() {
        let t = PlannedTensor::new("a", Dtype::U8, vec![1]);
        assert!(header_bytes(&[t.clone(), t], None).is_err());
    }

    #[test]
    fn shard_planning() {
        assert_eq!(plan_shards(&[5, 5, 5], 10), vec![vec![0, 1], vec![2]]);
        assert_eq!(plan_shards(&[20, 1], 10), vec![vec![0], vec![1]]);
        assert_eq!(plan_shards(&[], 10), vec![Vec::<usize>::new()]);
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
    }
}
