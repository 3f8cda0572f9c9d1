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


def drop_file_cache(path: str | os.PathLike) -> None:
    """Drop a whole file from the page cache, its written data flushed first (dirty pages cannot be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        drop_cache(fd)
    finally:
        os.close(fd)


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


ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class StreamWriter:
    """Write one safetensors file tensor by tensor, never holding more than the tensor being written.

    The header is written first from the declared ``specs`` (name, dtype, shape, in file order); then
    ``write`` must be called once per spec, in that order, with a tensor of exactly that dtype and shape.
    ``close`` checks that every declared tensor was written. Used by writers that stream a checkpoint
    bigger than memory (``compress.lowmem``)."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        pos = 0
        for name, dtype, shape in specs:
            if name in header:
                raise MoekitError(f"internal error: tensor {name} declared twice")
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self._order.append((name, dtype, tuple(shape)))
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment of the data
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name`` (the next declared one)."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            want = self._order[self._next][0] if self._next < len(self._order) else "nothing"
            raise MoekitError(f"internal error: writing {name}, expected {want}")
        _, dtype, shape = self._order[self._next]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise MoekitError(f"internal error: {name} is {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}")
        self._f.write(bytes_of(t.detach().cpu().contiguous()))
        self._next += 1

    def close(self, check: bool = True) -> None:
        """Finish the file; ``check``: every declared tensor must have been written."""
        self._f.close()
        if check and self._next != len(self._order):
            raise MoekitError(f"internal error: {len(self._order) - self._next} declared tensors were not written")


class SpooledWriter:
    """Write one safetensors file from tensors given one at a time whose list is not known in advance: each
    tensor's bytes go to a data file beside ``path`` as it comes (nothing is kept in memory), and ``close``
    writes the header and then the data behind it (a kernel-side copy). Memory: one tensor at a time."""

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()
        self._specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._metadata = metadata
        self.nbytes = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Append tensor ``name``."""
        t = t.detach().cpu().contiguous()
        self._data.write(bytes_of(t))
        self._specs.append((name, t.dtype, tuple(t.shape)))
        self.nbytes += t.numel() * t.element_size()

    def names(self) -> list[str]:
        return [n for n, _, _ in self._specs]

    def close(self) -> None:
        """Write the finished file (header, then the spooled data) and remove the data file."""
        self._data.close()
        header = StreamWriter(self.path, self._specs, self._metadata)  # writes the header only
        ok = False
        try:
            f = header._f
            f.flush()
            with open(self._data_path, "rb") as src:
                left = os.fstat(src.fileno()).st_size
                while left > 0:
                    n = os.copy_file_range(src.fileno(), f.fileno(), left) if hasattr(os, "copy_file_range") \
                        else f.write(src.read(min(left, 64 << 20)))
                    if n <= 0:
                        raise MoekitError(f"internal error: short copy into {self.path}")
                    left -= n
            header._next = len(header._order)
            ok = True
        finally:  # a failed copy (e.g. a full disk) raises its own error, not a missing-tensors one
            header.close(check=ok)
            self._data_path.unlink(missing_ok=True)
