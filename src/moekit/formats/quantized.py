"""moekit's weight-only quantized checkpoint format: the int8/int4 group codec and the on-disk reader.

The codec (``quantize_matrix`` / ``dequantize``): **asymmetric** (scale + integer zero point) per group of
``group_size`` consecutive weights along the input dimension of a matrix (nn.Linear (out, in) convention).
The range is widened to contain 0, the scale is s = (max − min) / (2^bits − 1) stored as float16 (rounded
up, so every weight stays in range), the zero point z = round(−min / s) as uint8,
q = clamp(round(w / s) + z, 0, 2^bits − 1), and ŵ = (q − z)·s, so |w − ŵ| ≤ s/2 in every group. A last
group shorter than ``group_size`` is zero-padded (the padding is dropped on load). int4 codes are packed
two per byte (low nibble = even column).

On disk: ``config.json`` (unchanged), tokenizer, ``moekit_quantized.safetensors`` (non-expert tensors,
plus ``<param>.<expert>.qweight/.scales/.zeros`` for every expert matrix) and ``moekit_quantization.json``
(the format record: group size, bits per expert, shapes, transposition, tied weights).

This is a format, below every feature (design §2): ``moekit.models`` loads such a checkpoint, the expert
store (``moekit.serve``) reads experts from it, and ``moekit.compress.quantize`` chooses the bits and writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import MoekitError

QUANT_CONFIG = "moekit_quantization.json"
QUANT_WEIGHTS = "moekit_quantized.safetensors"
FORMAT = "moekit-weight-only"
FORMAT_VERSION = 1
SUPPORTED_BITS = (4, 8)
_MIN_SCALE = 2.0 ** -14  # smallest normal float16


@dataclass
class QTensor:
    """One quantized matrix (out, in): codes (packed for int4), float16 scales and uint8 zero points."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], last dim even → two per byte (low nibble = even index)."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even last dimension")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``."""
    out = torch.empty((*p.shape[:-1], p.shape[-1] * 2), dtype=torch.uint8, device=p.device)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int) -> QTensor:
    """Quantize a 2-D (out, in) matrix group-wise along ``in``."""
    if bits not in SUPPORTED_BITS:
        raise MoekitError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 2 or group_size % 2:
        raise MoekitError(f"group size must be an even number >= 2, got {group_size}")
    out_dim, in_dim = w.shape
    padded = -(-in_dim // group_size) * group_size
    x = w.detach().float()
    if padded != in_dim:
        x = torch.nn.functional.pad(x, (0, padded - in_dim))
    g = x.reshape(out_dim, padded // group_size, group_size)
    qmax = 2 ** bits - 1
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    s = ((hi - lo) / qmax).clamp(min=_MIN_SCALE)
    s16 = (s * (1 + 2.0 ** -10)).to(torch.float16)  # round up: the range still fits in qmax steps
    s = s16.float()
    z = torch.round(-lo / s).clamp(0, qmax)
    q = (torch.round(g / s[..., None]) + z[..., None]).clamp(0, qmax).to(torch.uint8).reshape(out_dim, padded)
    q = q[:, : in_dim + in_dim % 2]  # the padding of a short last group is not stored
    if bits == 4:
        q = pack_int4(q)
    return QTensor(q, s16, z.to(torch.uint8), bits, group_size, (out_dim, in_dim))


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix a QTensor stands for."""
    q = unpack_int4(qt.qweight) if qt.bits == 4 else qt.qweight
    out_dim, in_dim = qt.shape
    padded = qt.scales.shape[-1] * qt.group_size
    q = torch.nn.functional.pad(q.float(), (0, padded - q.shape[-1]))
    g = q.reshape(out_dim, -1, qt.group_size)
    w = (g - qt.zeros.float()[..., None]) * qt.scales.float()[..., None]
    return w.reshape(out_dim, -1)[:, :in_dim].to(dtype)


# Packed int4 experts in memory (inference): per experts module, the codes, scales and zero points of every expert
# stacked, ``[E, out, in/2]`` uint8 / ``[E, out, in/gs]`` float16 / uint8, registered as buffers under these
# names (gate;up or up projection first, then down). ``moekit.models`` attaches them when it loads a checkpoint
# with packed experts, ``moekit.nn.int4_experts`` when it quantizes a model, and moekit's experts run them.
INT4_BUFFERS = ("moekit_int4_gate_up", "moekit_int4_gate_up_scale", "moekit_int4_gate_up_zero",
                "moekit_int4_down", "moekit_int4_down_scale", "moekit_int4_down_zero")


def int4_packable(shape: tuple[int, int], bits: list[int] | tuple[int, ...], group_size: int) -> bool:
    """Whether a bank of (out, in) matrices with these per-expert bits can stay packed as int4 in memory: every
    expert is 4-bit and ``in`` is a whole number of groups (no zero-padded last group)."""
    return all(int(b) == 4 for b in bits) and shape[1] % group_size == 0 and group_size % 2 == 0


def stack_int4(qts: list[QTensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts of one bank as the in-memory int4 layout (see ``INT4_BUFFERS``): stacked codes, scales, zeros."""
    if not qts or not int4_packable(qts[0].shape, [qt.bits for qt in qts], qts[0].group_size):
        raise MoekitError("int4 packing needs 4-bit experts whose input size is a multiple of the group size")
    if any(qt.shape != qts[0].shape or qt.group_size != qts[0].group_size for qt in qts):
        raise MoekitError("int4 packing needs experts of one shape and group size")
    return (torch.stack([qt.qweight for qt in qts]), torch.stack([qt.scales for qt in qts]),
            torch.stack([qt.zeros for qt in qts]))


PACKED_PARTS = ("qweight", "scales", "zeros")
"""The tensors stored per quantized expert matrix (``{name}.{expert}.{part}``), in ``QTensor``'s order."""


def int4_buffer_names(param: str) -> tuple[str, str, str]:
    """The packed int4 tensors (codes, scales, zero points) that stand for expert parameter ``param`` in memory or in
    a cache slot: ``INT4_BUFFERS``' down-projection names for ``down_proj``, its gate/up names otherwise."""
    return INT4_BUFFERS[3:] if param.endswith("down_proj") else INT4_BUFFERS[:3]  # type: ignore[return-value]


def packed_bank_bytes(path: str | Path, names: list[str]) -> dict[str, int]:
    """Bytes each expert bank ``names`` of a quantized checkpoint takes packed (every expert's codes, scales and zero
    points), from the safetensors header alone: what the bank costs in memory or in cache slots when it stays packed."""
    from moekit.formats.safetensors import tensor_infos

    infos = tensor_infos(Path(path) / QUANT_WEIGHTS)
    wanted = set(names)
    out = dict.fromkeys(names, 0)
    for key, info in infos.items():
        bank, _, part = key.rpartition(".")
        name = bank.rpartition(".")[0]
        if part in PACKED_PARTS and name in wanted:
            out[name] += info.nbytes
    return out


def read_int4_banks(path: str | Path, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Expert banks ``names`` of a quantized checkpoint as the in-memory int4 layout (``stack_int4``'s: codes,
    scales, zero points stacked over experts), each expert's parts read with ``pread`` straight into their slices:
    no per-expert copies and no mapping of the file, so loading costs the banks' own bytes (all-int4 banks only)."""
    import os

    from moekit.formats.safetensors import ST_DTYPES, bytes_of, pread_into, read_header

    file = Path(path) / QUANT_WEIGHTS
    meta = read_quant_meta(Path(path))
    header, data_start = read_header(file)
    banks = {}
    fd = os.open(file, os.O_RDONLY)
    try:
        for name in names:
            info = meta["tensors"][name]
            if not int4_packable(tuple(info["shape"][1:]), info["bits"], int(meta["group_size"])):
                raise MoekitError(f"{file}: {name} is not an all-int4 bank of whole groups")
            num = info["shape"][0]
            bank = []
            for part in PACKED_PARTS:
                first = header[f"{name}.0.{part}"]
                bank.append(torch.empty((num, *first["shape"]), dtype=ST_DTYPES[first["dtype"]]))
            for e in range(num):
                for t, part in zip(bank, PACKED_PARTS, strict=True):
                    key = f"{name}.{e}.{part}"
                    entry = header.get(key)
                    if (entry is None or tuple(entry["shape"]) != tuple(t.shape[1:])
                            or ST_DTYPES[entry["dtype"]] != t.dtype):
                        raise MoekitError(f"{file}: {key} is missing or differs from expert 0's; the checkpoint is "
                                          "damaged")
                    start, end = entry["data_offsets"]
                    view = bytes_of(t[e])
                    if len(view) != end - start:
                        raise MoekitError(f"{file}: {key} holds {end - start} bytes, not {len(view)}")
                    pread_into(fd, view, data_start + start, f"{file} ({key})")
            banks[name] = (bank[0], bank[1], bank[2])
    finally:
        os.close(fd)
    return banks


def is_quantized_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a moekit weight-only quantized checkpoint."""
    return (Path(path) / QUANT_CONFIG).is_file()


def read_quant_meta(path: Path) -> dict:
    """The format record of a moekit quantized checkpoint, checked (format, version, weights file present)."""
    try:
        meta = json.loads((path / QUANT_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise MoekitError(f"cannot read {path / QUANT_CONFIG}: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise MoekitError(f"{path}: unsupported quantization format {meta.get('format')!r} v{meta.get('version')}")
    if not (path / QUANT_WEIGHTS).is_file():
        raise MoekitError(f"{path}: {QUANT_WEIGHTS} is missing")
    return meta


def read_quantized(path: str | Path, dtype: torch.dtype, keep_packed: bool = False,
                   packed_only: frozenset[str] | set[str] = frozenset()
                   ) -> tuple[dict, dict[str, torch.Tensor], dict[str, list[QTensor]]]:
    """Read a quantized checkpoint directory: its format record, the full state dict with every expert
    matrix dequantized to ``dtype`` (tied weights filled in), and, with ``keep_packed``, the packed codes
    (``{expert parameter name: [QTensor per expert]}``). Expert parameters named in ``packed_only`` are not
    dequantized (absent from the state dict) and come back packed only with ``keep_packed`` (else read them with
    ``read_int4_banks``)."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_quant_meta(path)
    gs = int(meta["group_size"])
    sd: dict[str, torch.Tensor] = {}
    packed: dict[str, list[QTensor]] = {}
    with safe_open(str(path / QUANT_WEIGHTS), "pt") as f:
        for k in f.keys():  # noqa: SIM118  (safe_open handles are not mappings)
            if not k.endswith((".qweight", ".scales", ".zeros")):
                sd[k] = f.get_tensor(k)
        for name, info in meta["tensors"].items():
            E, o, i = info["shape"]
            if name in packed_only and not keep_packed:  # read later as a stacked bank (read_int4_banks)
                continue
            qts = [QTensor(f.get_tensor(f"{name}.{e}.qweight"), f.get_tensor(f"{name}.{e}.scales"),
                           f.get_tensor(f"{name}.{e}.zeros"), int(info["bits"][e]), gs, (o, i)) for e in range(E)]
            if name not in packed_only:
                full = torch.stack([qt.dequantize(dtype) for qt in qts])
                sd[name] = full.transpose(1, 2).contiguous() if info["transposed"] else full
            if keep_packed or name in packed_only:
                packed[name] = qts
    for k, other in meta.get("tied", {}).items():
        if other in sd:  # (a packed-only expert bank is never the target of a tie)
            sd[k] = sd[other]
    return meta, sd, packed
