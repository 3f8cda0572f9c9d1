"""Zero-copy views of checkpoint bytes that sit in the OS page cache (Linux: ``mmap`` + ``mincore`` + ``madvise``).

A read with ``pread`` copies the page cache into a buffer (read + write), and the buffer is read again by whoever
uses it; computing straight from a mapping of the file reads the bytes once. Mapped pages count in the process's
RSS (``RssFile``) while they are mapped, so a user of ``MappedFiles`` maps a range only for as long as it computes
on it (``populate`` before, ``release`` after): the page cache keeps the bytes, the process keeps nothing.

``resident`` asks the kernel whether every page of a range is in the page cache (``mincore``): a range that is not
(a checkpoint bigger than RAM, bytes never read) is better read with ``pread`` into memory the caller owns than
faulted in page by page from storage while a kernel computes on it.

The mappings are private and never written (a write would only copy the page, never reach the file).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading

import numpy as np
import torch

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a range in without touching it page by page


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def available() -> bool:
    """Whether zero-copy views work here (Linux with ``mincore``/``madvise``; ``MOEKIT_ZERO_COPY=0`` turns them off)."""
    return _LIBC is not None and os.environ.get("MOEKIT_ZERO_COPY", "1") != "0"


class MappedFiles:
    """Whole-file private read mappings, made once per file on first use (address space only until touched)."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._populate = True  # MADV_POPULATE_READ until the kernel says it does not know it

    def _map(self, path: str) -> torch.Tensor:
        m = self._maps.get(path)
        if m is None:
            with self._lock:
                m = self._maps.get(path)
                if m is None:
                    with open(path, "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    m = self._maps[path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
        return m[1]

    def view(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        """The ``nbytes`` bytes at ``offset`` of ``path`` as a uint8 tensor on the mapping (no copy)."""
        return self._map(path)[offset:offset + nbytes]

    def _pages(self, path: str, offset: int, nbytes: int) -> tuple[int, int]:
        base = self._map(path).data_ptr()
        a = (base + offset) // PAGE * PAGE
        b = -(-(base + offset + nbytes) // PAGE) * PAGE
        return a, b - a

    def resident(self, path: str, offset: int, nbytes: int) -> bool:
        """Whether every page of the range is in the page cache."""
        assert _LIBC is not None
        addr, length = self._pages(path, offset, nbytes)
        vec = np.empty(length // PAGE, dtype=np.uint8)
        if _LIBC.mincore(addr, length, vec.ctypes.data) != 0:
            return False
        return bool(np.bitwise_and(vec, 1).all())

    def populate(self, path: str, offset: int, nbytes: int) -> None:
        """Map the range's pages in one call (instead of a fault per 64 KiB while a kernel reads it)."""
        assert _LIBC is not None
        if self._populate:
            addr, length = self._pages(path, offset, nbytes)
            if _LIBC.madvise(addr, length, MADV_POPULATE_READ) != 0:
                self._populate = False  # an older kernel: the reads fault the pages in

    def release(self, path: str, offset: int, nbytes: int) -> None:
        """Unmap the range's pages from the process (out of its RSS); the page cache keeps them. Pages shared with
        a neighbouring range are unmapped too: a later read maps them again."""
        assert _LIBC is not None
        addr, length = self._pages(path, offset, nbytes)
        _LIBC.madvise(addr, length, mmap.MADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            paths = list(self._maps)
            for path in paths:
                mm, t = self._maps.pop(path)
                del t
                with contextlib.suppress(BufferError):  # a view is still alive: the mapping goes when it does
                    mm.close()


__all__ = ["MappedFiles", "available"]
