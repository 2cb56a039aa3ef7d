//! Writing safetensors files and sharded checkpoints, atomically.
//!
//! A file is planned first (names, dtypes, shapes, byte lengths), its header is serialised and
//! validated with the `safetensors` crate, the file is created at its full size, and each
//! tensor is written at its offset (from the input's memory map for copies, from one reusable
//! buffer for encoded tensors, so memory stays at about the largest tensor). Directories are built under a hidden temporary name next to
//! the destination and renamed into place only when complete.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

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
            return Err(Error::format(format!(
                "tensor name {:?} is used twice (or reserved)",
                t.name
            )));
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
        return Err(Error::format(format!(
            "header of {} bytes exceeds the 100 MB limit",
            bytes.len()
        )));
    }
    Ok((bytes, offsets))
}

/// A safetensors file being written: created at its final size with its header, then each
/// tensor is written at its offset with positioned writes (`pwrite`), either straight from a
/// caller's slice or from a reusable scratch buffer the caller fills (so memory stays at the
/// largest packed tensor, and no page of the output is faulted through a memory map).
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    data_start: usize,
    offsets: Vec<(usize, usize)>,
    index: BTreeMap<String, usize>,
    scratch: Vec<u8>,
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
            file,
            data_start: 8 + header.len(),
            offsets,
            index: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            scratch: Vec::new(),
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

    /// Writes the bytes of tensor `name` (exactly its planned length).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let (a, b) = self.slot(name)?;
        if data.len() != b - a {
            return Err(Error::shape(format!(
                "tensor {name:?}: {} bytes given, {} planned",
                data.len(),
                b - a
            )));
        }
        self.file
            .write_all_at(data, (self.data_start + a) as u64)
            .map_err(|e| Error::io(&self.path, e))
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
        if self.scratch.len() < total {
            self.scratch.resize(total, 0);
        }
        let mut rest: &mut [u8] = &mut self.scratch[..total];
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(names.len());
        for (a, b) in &slots {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(b - a);
            bufs.push(mine);
            rest = tail;
        }
        let r = f(&mut bufs)?;
        for (buf, (a, _)) in bufs.iter().zip(&slots) {
            self.file
                .write_all_at(buf, (self.data_start + a) as u64)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(r)
    }

    /// Writes tensor `name` (rows of `row_bytes` bytes) chunk by chunk: `f(rows, buf)` fills
    /// the bytes of rows `rows` into `buf`, which is then written at its offset. Chunks are a
    /// few MB, so the data goes from the cache to the file without a full-size buffer.
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
            if self.scratch.len() < len {
                self.scratch.resize(len, 0);
            }
            let mut buf = std::mem::take(&mut self.scratch);
            let res = f(r..end, &mut buf[..len]).and_then(|()| {
                self.file
                    .write_all_at(&buf[..len], (self.data_start + a + r * row_bytes) as u64)
                    .map_err(|e| Error::io(&self.path, e))
            });
            self.scratch = buf;
            res?;
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
            return Err(Error::config(format!(
                "{}: rewritten header changes length",
                self.path.display()
            )));
        }
        self.file
            .write_all_at(&header, 8)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Closes the file, fsyncing it first when `sync`.
    pub fn finish(self, sync: bool) -> Result<()> {
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
            return Err(Error::shape(format!(
                "tensor {:?}: {} bytes given, dtype and shape need {}",
                t.name,
                d.len(),
                t.nbytes()
            )));
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
            return Err(Error::shape(format!(
                "tensor {:?}: wrong byte length",
                t.name
            )));
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

/// Test-only crash hook: when the environment variable `BESA_RS_TEST_CRASH_AT` names `step`,
/// the process kills itself with SIGKILL right there (no destructor, no cleanup), as a
/// `kill -9` at that instant would. Read in this one place; never set it outside tests.
pub fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("BESA_RS_TEST_CRASH_AT").ok());
    if at.as_deref() == Some(step) {
        // SAFETY: plain libc calls on the current process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Whether process `pid` is alive (or exists and belongs to someone else).
fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The parent directory and file name of an output path.
fn split_out(final_path: &Path) -> Result<(PathBuf, String)> {
    let name = final_path
        .file_name()
        .ok_or_else(|| Error::config(format!("invalid output path {}", final_path.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match final_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// A leftover of an interrupted run next to an output `NAME`: `.NAME.partial-PID-N` (a new
/// output being written, or an old one being deleted after the swap) or `.NAME.old-PID-N` (the
/// previous output moved aside, only where the file system cannot swap two directories).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    /// True for a `.old-` backup of a previous complete output.
    pub backup: bool,
    pub pid: u32,
}

/// Leftovers next to `final_path` whose owning process is gone.
pub fn dead_leftovers(final_path: &Path) -> Result<Vec<Leftover>> {
    let (parent, name) = split_out(final_path)?;
    let Ok(rd) = std::fs::read_dir(&parent) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = fname.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let (backup, tail) = if let Some(t) = rest.strip_prefix("partial-") {
            (false, t)
        } else if let Some(t) = rest.strip_prefix("old-") {
            (true, t)
        } else {
            continue;
        };
        // `PID-N`; older backups of the Python writer were `.NAME.old-PID`.
        let pid = match tail.split_once('-') {
            Some((p, n)) => n.parse::<u128>().ok().and(p.parse::<u32>().ok()),
            None if backup => tail.parse::<u32>().ok(),
            None => None,
        };
        let Some(pid) = pid else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        out.push(Leftover {
            path: e.path(),
            backup,
            pid,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Cleans up after killed runs that wrote `final_path`: a backup of the previous output is
/// renamed back when `final_path` is missing (the run died between moving the old output
/// aside and moving the new one in), other leftovers of dead processes are deleted. Returns
/// one line per action, for the user.
pub fn recover_leftovers(final_path: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let leftovers = dead_leftovers(final_path)?;
    // Newest backup first (the names of one process sort by creation time).
    let mut backups: Vec<&Leftover> = leftovers.iter().filter(|l| l.backup).collect();
    backups.sort_by_key(|l| {
        std::fs::symlink_metadata(&l.path)
            .and_then(|m| m.modified())
            .ok()
    });
    if let Some(b) = backups.last() {
        if std::fs::symlink_metadata(final_path).is_err() {
            rename_noreplace(&b.path, final_path).map_err(|e| Error::io(&b.path, e))?;
            notes.push(format!(
                "restored {} from {}, the previous output moved aside by a killed run (pid {})",
                final_path.display(),
                b.path.display(),
                b.pid
            ));
        }
    }
    // Names of besa-rs versions that did not record the writer's pid: the shared backup
    // `.NAME.old` is put back when the output is missing; the others are only reported.
    let (parent, name) = split_out(final_path)?;
    let legacy_old = parent.join(format!(".{name}.old"));
    if legacy_old.is_dir() && std::fs::symlink_metadata(final_path).is_err() {
        rename_noreplace(&legacy_old, final_path).map_err(|e| Error::io(&legacy_old, e))?;
        notes.push(format!(
            "restored {} from {}, the previous output moved aside by a killed run",
            final_path.display(),
            legacy_old.display()
        ));
    }
    if let Ok(rd) = std::fs::read_dir(&parent) {
        let mut legacy: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| {
                f.strip_prefix(&format!(".{name}."))
                    .is_some_and(|r| r == "old" || (r.ends_with(".partial") && !r.contains('-')))
            })
            .collect();
        legacy.sort();
        for f in legacy {
            notes.push(format!(
                "found {}, probably left by a killed run of an older besa-rs (its writer is unknown): delete it if no run is writing it",
                parent.join(f).display()
            ));
        }
    }
    for l in &leftovers {
        if !l.path.exists() {
            continue;
        }
        std::fs::remove_dir_all(&l.path).map_err(|e| Error::io(&l.path, e))?;
        notes.push(format!(
            "removed {} left by a killed run (pid {})",
            l.path.display(),
            l.pid
        ));
    }
    Ok(notes)
}

/// `rename` that fails with `AlreadyExists` instead of replacing an existing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    match renameat2(from, to, RenameFlag::NoReplace) {
        Err(e) if unsupported(&e) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            std::fs::rename(from, to)
        }
        r => r,
    }
}

#[derive(Clone, Copy)]
enum RenameFlag {
    NoReplace,
    Exchange,
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flag: RenameFlag) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(from)?, c(to)?);
    let flags = match flag {
        RenameFlag::NoReplace => libc::RENAME_NOREPLACE,
        RenameFlag::Exchange => libc::RENAME_EXCHANGE,
    };
    // SAFETY: two valid NUL-terminated paths; the syscall has no other memory effects.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn renameat2(_from: &Path, _to: &Path, _flag: RenameFlag) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// A fresh, empty `.NAME.partial-PID-N` directory next to `final_path`.
pub fn make_partial_dir(final_path: &Path) -> Result<PathBuf> {
    let (parent, name) = split_out(final_path)?;
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{name}.partial-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

fn sync_dir(p: &Path) {
    if let Ok(d) = File::open(if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    }) {
        let _ = d.sync_all();
    }
}

/// Moves the complete directory `tmp` onto `final_path`. A missing `final_path` is created
/// with one atomic no-replace rename (if another process created it meanwhile, this one's
/// output is only put in place with `overwrite`, else refused with a message). An existing one
/// (`overwrite` only) is swapped atomically with `tmp` (`renameat2(RENAME_EXCHANGE)`), so the
/// final name holds a complete output at every instant; the old one is then deleted. Where the
/// file system cannot swap, the old output is renamed to `.NAME.old-PID-N` first (a kill in
/// between is repaired by [`recover_leftovers`] on the next run).
pub fn commit_dir(tmp: &Path, final_path: &Path, overwrite: bool, sync: bool) -> Result<()> {
    if sync {
        sync_dir(tmp);
    }
    let (parent, name) = split_out(final_path)?;
    for _attempt in 0..3 {
        match rename_noreplace(tmp, final_path) {
            Ok(()) => {
                if sync {
                    sync_dir(&parent);
                }
                return Ok(());
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists
                    || e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) => return Err(Error::io(final_path, e)),
        }
        // final_path exists.
        if !overwrite {
            return Err(Error::config(format!(
                "output directory {} was created by another process while this run was writing; nothing was replaced and this run's output was discarded (pass --overwrite to replace it)",
                final_path.display()
            )));
        }
        let is_dir = std::fs::symlink_metadata(final_path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if !is_dir {
            return Err(Error::config(format!(
                "output {} exists and is not a directory; nothing was replaced",
                final_path.display()
            )));
        }
        match renameat2(tmp, final_path, RenameFlag::Exchange) {
            Ok(()) => {
                // `tmp` now holds the previous output.
                crash_point("commit-swapped");
                if sync {
                    sync_dir(&parent);
                }
                std::fs::remove_dir_all(tmp).map_err(|e| {
                    Error::io(tmp, e).context(format!(
                        "{} was replaced, but its previous contents could not be deleted",
                        final_path.display()
                    ))
                })?;
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if unsupported(&e) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let old = parent.join(format!(".{name}.old-{}-{nanos}", std::process::id()));
                match std::fs::rename(final_path, &old) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(final_path, e)),
                }
                crash_point("commit-moved-aside");
                if let Err(e) = rename_noreplace(tmp, final_path) {
                    let back = std::fs::rename(&old, final_path);
                    return Err(Error::io(final_path, e).context(match back {
                        Ok(()) => "the new output could not be moved in; the previous one is back in place".to_string(),
                        Err(_) => format!(
                            "the new output could not be moved in; the previous one is at {} and the new one at {}",
                            old.display(),
                            tmp.display()
                        ),
                    }));
                }
                if sync {
                    sync_dir(&parent);
                }
                std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
                return Ok(());
            }
            Err(e) => return Err(Error::io(final_path, e)),
        }
    }
    Err(Error::config(format!(
        "output directory {} keeps being replaced by other processes; this run's output was discarded",
        final_path.display()
    )))
}

/// A directory built under a temporary name and moved into place by [`AtomicDir::commit`];
/// dropped without commit, it is removed.
pub struct AtomicDir {
    tmp: PathBuf,
    final_path: PathBuf,
    overwrite: bool,
    committed: bool,
    notes: Vec<String>,
}

impl AtomicDir {
    /// Repairs leftovers of killed runs (see [`recover_leftovers`]; [`AtomicDir::notes`] says
    /// what was done), then refuses an existing `final_path` unless `overwrite`.
    pub fn new(final_path: &Path, overwrite: bool) -> Result<Self> {
        let notes = recover_leftovers(final_path)?;
        if final_path.exists() && !overwrite {
            return Err(Error::config(format!(
                "output directory {} already exists (pass --overwrite to replace it)",
                final_path.display()
            )));
        }
        if final_path.exists() && !final_path.is_dir() {
            return Err(Error::config(format!(
                "output {} exists and is not a directory",
                final_path.display()
            )));
        }
        let tmp = make_partial_dir(final_path)?;
        Ok(Self {
            tmp,
            final_path: final_path.to_path_buf(),
            overwrite,
            committed: false,
            notes,
        })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// What [`AtomicDir::new`] repaired (one line each).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Moves the temporary directory onto the final path (see [`commit_dir`]).
    pub fn commit(mut self, sync: bool) -> Result<PathBuf> {
        if let Err(e) = commit_dir(&self.tmp, &self.final_path, self.overwrite, sync) {
            // With no output under the final name (the old one moved aside and the new one
            // not moved in), the complete new output is kept where the message says it is.
            if std::fs::symlink_metadata(&self.final_path).is_err() {
                self.committed = true;
            }
            return Err(e);
        }
        self.committed = true;
        Ok(self.final_path.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

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

    #[test]
    fn atomic_dir_refuses_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        {
            let d = AtomicDir::new(&out, false).unwrap();
            std::fs::write(d.path().join("x"), b"1").unwrap();
            // dropped without commit
        }
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        let d = AtomicDir::new(&out, false).unwrap();
        std::fs::write(d.path().join("x"), b"1").unwrap();
        d.commit(true).unwrap();
        assert!(out.join("x").is_file());
        assert!(AtomicDir::new(&out, false).is_err());
        let d = AtomicDir::new(&out, true).unwrap();
        std::fs::write(d.path().join("y"), b"2").unwrap();
        d.commit(false).unwrap();
        assert!(out.join("y").is_file() && !out.join("x").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_dead_runs_are_repaired_and_swaps_keep_a_complete_output() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let dead = (1u32 << 22) + 77; // above the kernel's pid_max: never alive
        let backup = root.path().join(format!(".out.old-{dead}-1"));
        std::fs::create_dir(&backup).unwrap();
        std::fs::write(backup.join("x"), b"old").unwrap();
        let partial = root.path().join(format!(".out.partial-{dead}-2"));
        std::fs::create_dir(&partial).unwrap();
        let notes = recover_leftovers(&out).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("restored"), "{notes:?}");
        assert_eq!(std::fs::read(out.join("x")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        // a live process's partial directory is left alone
        let mine = make_partial_dir(&out).unwrap();
        assert!(recover_leftovers(&out).unwrap().is_empty() && mine.exists());
        std::fs::write(mine.join("y"), b"new").unwrap();
        assert!(commit_dir(&mine, &out, false, false).is_err());
        commit_dir(&mine, &out, true, false).unwrap();
        assert_eq!(std::fs::read(out.join("y")).unwrap(), b"new");
        assert!(!out.join("x").exists() && !mine.exists());
    }
}
