//! Output directories built atomically: a hidden `.NAME.partial-PID-N` directory next to the
//! destination, renamed into place only when complete (swapped with an existing output in one
//! step where the file system can), and the repair of leftovers of killed runs. Pack, unpack
//! and the Python writers (through `besa-py`) all use this one implementation.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
            crate::bail!(
                config,
                "output directory {} was created by another process while this run was writing; nothing was replaced and this run's output was discarded (pass --overwrite to replace it)",
                final_path.display()
            );
        }
        let is_dir = std::fs::symlink_metadata(final_path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if !is_dir {
            crate::bail!(
                config,
                "output {} exists and is not a directory; nothing was replaced",
                final_path.display()
            );
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
            crate::bail!(
                config,
                "output directory {} already exists (pass --overwrite to replace it)",
                final_path.display()
            );
        }
        if final_path.exists() && !final_path.is_dir() {
            crate::bail!(
                config,
                "output {} exists and is not a directory",
                final_path.display()
            );
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
