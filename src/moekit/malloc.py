"""Give freed memory back to the OS at once, for processes that must stay under a memory budget.

glibc's malloc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB) with its own ``mmap``,
returned to the OS when freed, but it raises that threshold to the size of every such block freed (up to
32 MiB): after the first freed layer or activation tensor, blocks of a few MB come from the heap, where a
freed block is kept for reuse and a fragmented heap keeps growing. Loading one decoder layer after another
(``prune``/``merge``/``quantize`` under ``--max-memory``) or running a model with offloaded experts then holds
~200 MB more than it uses on a 640 MB model (measured in docs/scale.md). Fixing the threshold turns that
adjustment off: large tensors are always mapped and unmapped. Costs a page fault per first touch of a new
large block, which is small next to the reads these paths do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10

_done = False


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at its initial 128 KiB (and trim the heap above 128 KiB) for this process; True when
    applied (glibc only; a no-op elsewhere and on later calls)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
