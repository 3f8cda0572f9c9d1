"""Weights on transparent huge pages (2 MiB) for CPU decode.

A decode step streams every active weight once, scattered over experts and layers; on 4 KiB pages that is one TLB
entry per 4 KiB read, far more than the TLB holds, so every page costs a page walk, and the walks and streamed lines
evict what the rest of the step (transformers' Python and small ops) runs on. On 2 MiB pages the same bytes need
512× fewer entries. ``to_huge_pages(model)`` copies each large contiguous CPU parameter and buffer into an anonymous
mapping advised ``MADV_HUGEPAGE`` (aligned to 2 MiB), so that it works whatever the system's THP mode, short of
``never``. Same values, same dtype and shape; one tensor's size of extra memory at a time while copying.
Measured in docs/nn.md ("Huge pages").
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20


def huge_pages_supported() -> bool:
    """Whether this system can back memory with transparent huge pages on request (Linux, THP not ``never``)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor (zero-filled by the kernel on first touch) in a fresh anonymous mapping advised
    ``MADV_HUGEPAGE``, its data starting on a 2 MiB boundary (the tensor keeps the mapping alive)."""
    nbytes = math.prod(shape) * dtype.itemsize
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared would be shmem
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the first faults take huge pages
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    pad = -base % HUGE_PAGE
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=pad).view(dtype).view(shape)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` in a fresh anonymous mapping advised ``MADV_HUGEPAGE``, its data
    starting on a 2 MiB boundary (the tensor keeps the mapping alive)."""
    out = empty_on_huge_pages(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def is_on_huge_page_boundary(t: torch.Tensor) -> bool:
    """Whether ``t``'s data starts on a 2 MiB boundary (as ``on_huge_pages`` places it)."""
    return t.data_ptr() % HUGE_PAGE == 0


def to_huge_pages(model: torch.nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move every contiguous CPU parameter and buffer of ``model`` of at least ``min_bytes`` onto huge pages (see
    ``on_huge_pages``), in place: modules keep their Parameter objects, tied weights stay tied. Returns the bytes
    moved; 0 where huge pages are not supported. Tensors already placed, and views of a larger storage, are left
    alone."""
    if not huge_pages_supported():
        return 0
    moved = 0
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is None or id(t) in seen or t.device.type != "cpu" or not t.is_contiguous():
                    continue
                seen.add(id(t))
                nbytes = t.numel() * t.element_size()
                if nbytes < min_bytes or is_on_huge_page_boundary(t) or t.untyped_storage().nbytes() != nbytes:
                    continue  # small, placed already, or a view sharing its storage (a copy would unshare it)
                new = on_huge_pages(t)
                if isinstance(t, torch.nn.Parameter):
                    t.data = new
                else:
                    module._buffers[name] = new
                moved += nbytes
    return moved
