"""Atomic output: a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BesaIOError, ConfigError


def _write_error(final: Path, e: BaseException) -> BaseException:
    """A failure inside a write block (disk full, read-only file system, I/O error; also as
    raised by safetensors or torch.save) as a one-line :class:`BesaIOError`; other exceptions
    (BesaErrors, KeyboardInterrupt, bugs) are returned unchanged."""
    from .errors import BesaError

    if isinstance(e, BesaError):
        return e
    is_write = isinstance(e, OSError) or type(e).__name__ == "SafetensorError"
    if not is_write and isinstance(e, RuntimeError):
        # torch.save reports a failed write as a C++ stream error, without the errno
        is_write = any(w in str(e) for w in ("write", "No space", "I/O error", "iostream error"))
    if not is_write:
        return e
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    else:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = lines[0] if lines else type(e).__name__
        if "No space" not in msg and _disk_full(final.parent):
            msg = "No space left on device"
    return BesaIOError(f"cannot write {final}: {msg}")


def _disk_full(directory: Path) -> bool:
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path, directory: bool = False) -> None:
    """Gives a temporary file/dir (created 0600/0700) the permissions a plain open/mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path in the same directory; on success it is fsynced and renamed
    onto ``final``; on failure it is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    public_mode(tmp_path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        err = _write_error(final, e)
        if err is e:
            raise
        raise err from None


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _notes(lines: list[str]) -> None:
    for line in lines:
        print(f"besa-rs: {line}", file=sys.stderr)


@contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Builds a directory under ``.NAME.partial-PID-N`` next to ``final`` and moves it into place
    only when the block succeeds. An existing ``final`` is refused unless ``overwrite``; with
    ``overwrite`` it is swapped atomically with the complete new directory (the final name holds
    a complete output at every instant), then the old one is deleted. Leftovers of killed runs
    next to ``final`` are repaired first (one line on stderr per action). Shared with
    pack/unpack: ``besa_sparse::writer`` in Rust."""
    from . import _native

    final = Path(final)
    _notes(_native.recover_leftovers(final))
    if final.exists() and not overwrite:
        raise ConfigError(
            f"output directory {final} already exists (pass --overwrite to replace it)"
        )
    tmp = Path(_native.make_partial_dir(final))
    public_mode(tmp, directory=True)
    committing = False
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        _native.crash_point("atomic-dir-before-commit")
        committing = True
        _native.commit_dir(tmp, final, overwrite=overwrite, sync=True)
    except BaseException as e:
        # A failed commit that left nothing under the final name keeps the complete new
        # output where the error message says it is (the next run cleans it up).
        if not (committing and not os.path.lexists(final)):
            shutil.rmtree(tmp, ignore_errors=True)
        err = _write_error(final, e)
        if err is e:
            raise
        raise err from None


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_write(directory: Path, what: str, nbytes: int = 65536) -> None:
    """Creates, fills (``nbytes``), fsyncs and deletes a file in ``directory``: catches
    read-only file systems, missing permissions and full disks before any work starts."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".besa-rs-probe-", dir=directory)
    except OSError as e:
        raise BesaIOError(f"{what}: cannot write in {directory}: {e.strerror}") from None
    try:
        os.write(fd, b"\0" * nbytes)
        os.fsync(fd)
    except OSError as e:
        raise BesaIOError(f"{what}: cannot write in {directory}: {e.strerror}") from None
    finally:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)


def check_output_file(path: str | os.PathLike[str] | None, what: str) -> None:
    """Validates an output file path (``--json``, ``--plot``) before any work: not an existing
    directory, and its directory writable (read-only or full file systems are refused).
    ``None`` and ``-`` (stdout) pass."""
    if path is None or os.fspath(path) == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p}: is an existing directory, expected a file path")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{what} {p}: exists and is not a regular file")
    _writable_parent(p, what)


def _writable_parent(p: Path, what: str) -> Path:
    """The nearest existing ancestor of ``p``'s parent, checked to be a writable directory."""
    anc = _existing_ancestor(p.parent)
    if not anc.is_dir():
        raise ConfigError(f"{what} {p}: {anc} is not a directory")
    _probe_write(anc, f"{what} {p}")
    return anc


def check_output_dir(
    path: str | os.PathLike[str],
    what: str,
    need_bytes: int = 0,
    src: str | os.PathLike[str] | None = None,
) -> None:
    """Validates an output directory before any work: not overlapping the input ``src``
    (checked first, so nothing is ever written inside the input), not an existing file, its
    parent writable, and (``need_bytes``) that much free space there."""
    if src is not None:
        from . import _native

        _native.check_out(src, path)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: exists and is not a directory")
    anc = _writable_parent(p, what)
    if need_bytes:
        st = os.statvfs(anc)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise BesaIOError(
                f"{what} {p}: only {free / 1e6:.1f} MB free in {anc}, about {need_bytes / 1e6:.1f} MB needed"
            )
