"""Handing freed host memory back to the operating system between the stages of a large block.

Tensors on the CPU are ``malloc``'d. glibc serves requests below its mmap threshold from its
heaps, and that threshold rises by itself (up to 32 MiB) once a large block has been freed, so
the chunk-sized temporaries of ranking and of the mask's backward (16-32 MiB each) end up in the
heaps too. Freed heap memory stays in the process (and in its resident set) whenever a live
allocation sits above it, e.g. the optimiser state made at the first step: on a LLaMA-7B-shaped
block this grew the heap by 0.1-0.3 GB of free pages during the optimisation
(``benches/memory.py --stages``). :func:`release` calls ``malloc_trim(0)``, which gives every
whole free page of every heap back (``madvise``), at the end of a stage; nothing live moves and
no value changes. Only glibc has it: elsewhere (musl, macOS, Windows) it does nothing.

It costs a walk over the free lists and, later, the page faults of reusing the pages given back
(a few ms per call on a LLaMA-7B block), so BESA calls it only for blocks that use the lean
memory path (:func:`besa_rs.pruning.besa.recompute_masked_weights`).

:func:`tightened` goes further for the same blocks: it fixes glibc's thresholds (``mallopt``) so
that a block of :data:`MMAP_THRESHOLD` bytes or more is ``mmap``'d (and unmapped when freed)
and a free top of the heap above :data:`TRIM_THRESHOLD` is given back at once. Without it the
mmap threshold climbs to 32 MiB and the trim threshold to 64 MiB as soon as a large tensor is
freed, and the chunk temporaries of BESA's low-memory path (besa_rs.ste.codes) stay resident
between ``malloc_trim`` calls: on a LLaMA-7B-shaped block in bfloat16 the peak fell from
1.72-1.76 to 1.63 GB (``benches/memory.py``). Fresh large blocks then cost page faults (about
10 s of system time in that 54 s run; BESA does not tighten when it also quantizes, whose
many more temporaries made a run 3x slower). Afterwards the
thresholds are set to the ceilings the adaptive scheme reaches by itself (glibc has no way back
to adapting them)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from typing import Any

#: ``False`` turns :func:`release` off (the benches measure with and without it)
ENABLED = True
#: how many times :func:`release` gave memory back (tests check it ran)
CALLS = 0


def _libc_fn(name: str, argtypes: list[Any]) -> Any:
    """The C library's function ``name`` (returning int), or None where it has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    return _libc_fn("malloc_trim", [ctypes.c_size_t])


#: ``mallopt`` parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: allocations of this many bytes or more get their own mapping inside :func:`tightened`
MMAP_THRESHOLD = 1 << 20
#: a free heap top larger than this goes back to the system at once inside :func:`tightened`
TRIM_THRESHOLD = 8 << 20
#: the thresholds set back after a tightened stretch: the ceilings glibc's adaptive scheme
#: reaches by itself once a large block is freed (32 MiB and twice that)
LOOSE_MMAP_THRESHOLD = 32 << 20
LOOSE_TRIM_THRESHOLD = 64 << 20
#: whether the thresholds are tightened now (tests check it)
TIGHT = False


@functools.cache
def _mallopt() -> Any:
    """glibc's ``mallopt``, or None where the C library has none."""
    return _libc_fn("mallopt", [ctypes.c_int, ctypes.c_int])


def _set(mmap: int, trim: int) -> bool:
    opt = _mallopt() if ENABLED else None
    if opt is None:
        return False
    return bool(opt(_M_MMAP_THRESHOLD, mmap)) and bool(opt(_M_TRIM_THRESHOLD, trim))


@contextlib.contextmanager
def tightened() -> Iterator[bool]:
    """While the ``with`` body runs, glibc's thresholds are :data:`MMAP_THRESHOLD` and
    :data:`TRIM_THRESHOLD` (see the module doc); afterwards they are the adaptive scheme's
    ceilings (:data:`LOOSE_MMAP_THRESHOLD`, :data:`LOOSE_TRIM_THRESHOLD`: glibc has no way back
    to adapting them). Yields whether they were set (False without glibc or with
    :data:`ENABLED` off)."""
    global TIGHT
    if TIGHT:  # nested: the outer stretch restores
        yield True
        return
    ok = _set(MMAP_THRESHOLD, TRIM_THRESHOLD)
    TIGHT = ok
    try:
        yield ok
    finally:
        if ok:
            _set(LOOSE_MMAP_THRESHOLD, LOOSE_TRIM_THRESHOLD)
            TIGHT = False


def release() -> bool:
    """Gives the free pages of the C heaps back to the operating system; True when it ran."""
    global CALLS
    trim = _malloc_trim() if ENABLED else None
    if trim is None:
        return False
    trim(0)
    CALLS += 1
    return True
