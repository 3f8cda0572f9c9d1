"""safetensors without loading: header (names, dtypes, shapes, byte offsets) and ``pread`` of byte ranges.

Nothing here maps a file or reads a data section unless asked for one tensor (or one slice of it), so
the structure of a checkpoint of any size costs a few kilobytes of memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import MoekitError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # the safetensors limit; a larger value means a corrupt or foreign file


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, byte size, shape, dtype (no data)."""

    file: str
    key: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(raw header entries without ``__metadata__``, byte offset of the data section) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoekitError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise MoekitError(f"{path}: not a safetensors file (header of {n} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise MoekitError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise MoekitError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, by name, from its header only."""
    header, start = read_header(path)
    out = {}
    for key, e in header.items():
        if e.get("dtype") not in ST_DTYPES:
            raise MoekitError(f"{path}: tensor {key} has unsupported dtype {e.get('dtype')!r}")
        a, b = e["data_offsets"]
        out[key] = TensorInfo(str(path), key, start + a, b - a, tuple(int(s) for s in e["shape"]), ST_DTYPES[e["dtype"]])
    return out


def bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (empty tensors included)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(bytearray())


def pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill ``view`` with the bytes at ``offset`` of ``fd`` (looping over short reads); ``what`` names it in errors."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise MoekitError(f"short read of {what} (file truncated?)")
        got += n


def drop_cache(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the OS to drop a range of ``fd`` from the page cache (so reads are real reads and do not
    accumulate as cached pages); a no-op where unsupported."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class FileHandles:
    """Open file descriptors by path, opened once (thread-safe enough for dict get/set under the GIL)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds.setdefault(path, os.open(path, os.O_RDONLY))
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_range(handles: FileHandles, info: TensorInfo, out: torch.Tensor, start: int = 0,
               drop: bool = False) -> None:
    """Read ``out.nbytes`` bytes of tensor ``info`` from byte ``start`` of its data into contiguous CPU ``out``."""
    n = out.numel() * out.element_size()
    if start + n > info.nbytes:
        raise MoekitError(f"internal error: read past the end of {info.key}")
    fd = handles.fd(info.file)
    pread_into(fd, bytes_of(out), info.offset + start, f"{info.key} in {Path(info.file).name}")
    if drop:
        drop_cache(fd, info.offset + start, n)


def read_tensor(handles: FileHandles, info: TensorInfo, drop: bool = False) -> torch.Tensor:
    """A new CPU tensor holding tensor ``info`` (its stored dtype)."""
    t = torch.empty(info.shape, dtype=info.dtype)
    read_range(handles, info, t, 0, drop)
    return t
