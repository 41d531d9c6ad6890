"""Keep a long streaming job's memory bounded by what it holds, not by what it once held.

glibc serves allocations below a threshold from heaps it keeps after a free, and raises that
threshold to the size of each freed large block (up to 32 MB): a job that frees blocks of many
sizes from several threads (readers, writers, torch's workers) then keeps hundreds of MB it no
longer uses. A fixed threshold of a few MB makes every large block its own mapping, returned to
the system when freed. Measured on a 0.9 GB streamed quantization: peak growth 0.44 GB every run,
against 0.5-1.3 GB without it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 4 << 20

_done = False


def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold (once per process). Returns whether it was set (False off glibc)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return _done


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc malloc_trim: every arena, the middle of
    the heap too); a no-op elsewhere. Called between the blocks of a long job, whose many small
    allocations otherwise leave the resident size creeping up with fragmentation."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
