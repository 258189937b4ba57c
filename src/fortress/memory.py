"""The process's heap: how glibc keeps and returns the memory of a round's large temporaries."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = None


def _c():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.mallopt, _libc.malloc_trim      # glibc only
        except (OSError, AttributeError):
            _libc = False
    return _libc


def keep_freed_memory(top: int = 32 << 20, trim: int = 256 << 20) -> bool:
    """Let glibc serve tensors up to `top` bytes from its heap and keep up to `trim` freed bytes for reuse.

    By default glibc hands each allocation above ~128 kB-32 MB straight to the kernel (mmap) and
    back (munmap) when freed, so every large temporary of a round (sub-tables, their gradients,
    uploads) is faulted in page by page again (its cost: docs/results/engine.md). Returns whether it
    applied (glibc only).
    """
    libc = _c()
    if not libc:
        return False
    mallopt = libc.mallopt
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, top)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def rss_mb() -> float:
    """Resident memory of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return 0.0


_floor = 0.0       # resident memory after the last trim (or when first asked): about what is live


def release_above(slack_mb: float) -> bool:
    """Return the heap's free pages to the kernel (glibc's malloc_trim) when resident memory is more than
    `slack_mb` above what was live at the last trim; True when it trimmed.

    Freed temporaries of varying sizes leave free holes inside glibc's heap that it never gives
    back by itself, so a round of many chunks grows resident memory with its clients although
    the live tensors do not grow (docs/results/engine.md). Trimming costs page faults when the memory is used again, hence only above the slack; the
    reference is what was live after a trim, so the slack does not ratchet up round after round.
    """
    global _floor
    libc = _c()
    now = rss_mb()
    if not _floor:
        _floor = now
    if not libc or now <= _floor + slack_mb:
        return False
    libc.malloc_trim(0)
    _floor = rss_mb()
    return True
