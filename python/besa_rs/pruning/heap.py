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

:func:`tighten` goes further for the same blocks: it fixes glibc's thresholds (``mallopt``) so
that a block of :data:`MMAP_THRESHOLD` bytes or more is ``mmap``'d (and unmapped when freed)
and a free top of the heap above :data:`TRIM_THRESHOLD` is given back at once. Without it the
mmap threshold climbs to 32 MiB and the trim threshold to 64 MiB as soon as a large tensor is
freed, and the chunk temporaries of BESA's low-memory path (besa_rs.ste.codes) stay resident
between ``malloc_trim`` calls: on a LLaMA-7B-shaped block in bfloat16 the peak fell from 1.77 to
1.65 GB (``benches/memory.py``). The settings hold for the rest of the process (glibc has no
way back to its adaptive thresholds); fresh large blocks then cost page faults (measured in
the same bench: a few percent of the run)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

#: ``False`` turns :func:`release` off (the benches measure with and without it)
ENABLED = True
#: how many times :func:`release` gave memory back (tests check it ran)
CALLS = 0


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


#: ``mallopt`` parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: allocations of this many bytes or more get their own mapping once :func:`tighten` ran
MMAP_THRESHOLD = 1 << 20
#: a free heap top larger than this goes back to the system at once after :func:`tighten`
TRIM_THRESHOLD = 8 << 20
#: whether :func:`tighten` has set the thresholds (once per process)
TIGHTENED = False


@functools.cache
def _mallopt() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def tighten() -> bool:
    """Fixes glibc's mmap and trim thresholds (see the module doc) for the rest of the process;
    True when they are set (now or before), False where there is no glibc or with
    :data:`ENABLED` off."""
    global TIGHTENED
    if TIGHTENED:
        return True
    opt = _mallopt() if ENABLED else None
    if opt is None:
        return False
    ok = bool(opt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        opt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    TIGHTENED = ok
    return ok


def release() -> bool:
    """Gives the free pages of the C heaps back to the operating system; True when it ran."""
    global CALLS
    trim = _malloc_trim() if ENABLED else None
    if trim is None:
        return False
    trim(0)
    CALLS += 1
    return True
