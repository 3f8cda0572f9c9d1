"""Expert store: routed-expert weights read on demand, one expert at a time; everything else resident.

Expert ``e``'s slice of a fused bank (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, GPT-OSS
transposed with biases) is read with ``pread`` straight from the checkpoint through ``formats.Checkpoint``:
from its per-expert tensors (``experts.{e}.gate_proj.weight`` …, placed where transformers' own
conversion puts them) or from its slab of a fused tensor.  No copy of the checkpoint is prepared and no
other expert is touched, so the first run costs what every run costs.

Reads go through the OS page cache, like a memory-mapped checkpoint (llama.cpp, accelerate's disk offload): it
is not the process's memory (not in RSS), the kernel gives it back under pressure, and a miss whose bytes are still
cached costs a memory copy (~4x faster than this VM's storage). ``bypass_page_cache=True`` drops each read range
from it (``posix_fadvise DONTNEED``) so that every miss is a real storage read (to measure the storage tier).

Zero-copy (``FileStore.mapped``): where the checkpoint stores an expert in the model's layout and dtype (each of
its tensors one contiguous range: a slab of a fused tensor, or per-expert tensors, gate and up side by side), the
engine computes a miss whose bytes are in the page cache straight from a mapping of the file
(``formats.MappedFiles``), mapped for that step only, instead of copying it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.formats import Checkpoint, Piece, Target, bytes_of, drop_cache, pread_into, read_header
from moekit.formats.mapped import MappedFiles
from moekit.formats.mapped import available as mapping_available
from moekit.formats.quantized import PACKED_PARTS, int4_buffer_names
from moekit.formats.safetensors import ST_DTYPES
from moekit.formats.tokenizer import load_tokenizer_from
from moekit.models.loading import (
    LoadedModel,
    bank_keys,
    expert_param_names,
    hub_snapshot,
    read_weights,
    resolve,
    resolve_dtype,
    skeleton,
)
from moekit.models.moe_map import build_moe_map


class ExpertStore:
    """The slow tier: reads expert ``(layer, e)`` into caller-provided tensors."""

    #: bytes of one expert (all its tensors), per MoE layer index
    expert_bytes: dict[int, int]

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:  # pragma: no cover
        """Fill ``out`` (param name → tensor of the per-expert shape) with the expert's weights; returns bytes read."""
        raise NotImplementedError

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:  # pragma: no cover
        raise NotImplementedError

    def mapped(self, layer: int, expert: int) -> MappedExpert | None:
        """The expert's tensors as zero-copy views of page-cache-resident bytes, or None (not in the page cache, or
        not stored in the model's layout and dtype, or a store without files)."""
        return None

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class MappedExpert:
    """One expert's tensors on a file mapping (``weights``) and the file ranges they cover (``ranges``: what
    ``populate`` maps in before the compute and ``release`` unmaps after it)."""

    weights: dict[str, torch.Tensor]
    ranges: tuple[tuple[str, int, int], ...]
    files: MappedFiles

    def populate(self) -> None:
        for r in self.ranges:
            self.files.populate(*r)

    def release(self) -> None:
        for r in self.ranges:
            self.files.release(*r)

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.ranges)


class FileStore(ExpertStore):
    """Experts read with ``pread`` from a checkpoint (``formats.Checkpoint``), converted to ``dtype`` on the
    way when the checkpoint stores another dtype."""

    def __init__(self, ckpt: Checkpoint, targets: dict[int, dict[str, Target]], dtype: torch.dtype,
                 bypass_page_cache: bool = False) -> None:
        self.ckpt = ckpt
        self.targets = targets
        self.dtype = dtype
        self.bypass_page_cache = bypass_page_cache and hasattr(os, "posix_fadvise")
        size = torch.empty(0, dtype=dtype).element_size()
        self.expert_bytes = {li: sum(_prod(t.shape[1:]) * size for t in d.values()) for li, d in targets.items()}
        if self.bypass_page_cache:
            for f in {p.info.file for d in targets.values() for t in d.values() for p in t.pieces}:
                drop_cache(ckpt.handles.fd(f))
        #: zero-copy misses from the page cache (not when measuring the storage tier)
        self.zero_copy = mapping_available() and not self.bypass_page_cache
        self.maps = MappedFiles()
        self._mapped: dict[tuple[int, int], MappedExpert | None] = {}

    def _layout(self, tgt: Target, expert: int) -> tuple[str, int, int] | None:
        """(file, offset, bytes) of the expert's slice of ``tgt`` when it is one contiguous range in the store's dtype
        and the slice's layout, else None."""
        if tgt.recipe is not None:  # transposed, interleaved, chunked on disk: converted on read
            return None
        if not tgt.per_expert:
            info = tgt.pieces[0].info
            if len(tgt.pieces) != 1 or info.dtype != self.dtype or tuple(info.shape) != tuple(tgt.shape):
                return None
            per = info.nbytes // tgt.shape[0]
            return info.file, info.offset + expert * per, per
        parts = sorted((p for p in tgt.pieces if p.expert == expert), key=lambda p: p.part)
        first = parts[0].info
        pos = first.offset
        for p in parts:
            if p.info.file != first.file or p.info.offset != pos or p.info.dtype != self.dtype:
                return None
            pos += p.info.nbytes
        return first.file, first.offset, pos - first.offset

    def _mapping(self, layer: int, expert: int) -> MappedExpert | None:
        key = (layer, expert)
        if key in self._mapped:
            return self._mapped[key]
        weights, ranges = {}, []
        me: MappedExpert | None = None
        for name, tgt in self.targets[layer].items():
            where = self._layout(tgt, expert)
            if where is None:
                break
            try:
                weights[name] = self.maps.view(*where).view(self.dtype).view(tgt.shape[1:])
            except (RuntimeError, OSError, ValueError):  # misaligned for the dtype, or the file cannot be mapped
                break
            ranges.append(where)
        else:
            me = MappedExpert(weights, tuple(ranges), self.maps)
        self._mapped[key] = me
        return me

    def mapped(self, layer: int, expert: int) -> MappedExpert | None:
        if not self.zero_copy:
            return None
        me = self._mapping(layer, expert)
        if me is None or not all(self.maps.resident(*r) for r in me.ranges):
            return None
        return me

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (t.shape[1:], self.dtype) for n, t in self.targets[layer].items()}

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        total = 0
        for name, tgt in self.targets[layer].items():
            dst = out[name]
            if not (dst.device.type == "cpu" and dst.is_contiguous()):
                raise MoekitError("FileStore.read needs contiguous CPU tensors")
            self.ckpt.read_expert(tgt, expert, dst, drop=self.bypass_page_cache)
            total += sum(p.info.nbytes for p in self.ckpt.expert_pieces(tgt, expert)) if tgt.per_expert \
                else tgt.pieces[0].info.nbytes // tgt.shape[0]
        return total

    def close(self) -> None:
        self._mapped.clear()
        self.maps.close()
        self.ckpt.close()


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class PackedSlab:
    """Where one quantized expert matrix lives: per expert, (offset, bytes, shape, dtype) of its codes, scales
    and zero points, and its bit width; plus what the model expects (``transposed``: GPT-OSS ``[in, out]``)."""

    parts: tuple[dict[str, tuple[int, int, tuple[int, ...], torch.dtype]], ...]
    bits: tuple[int, ...]
    group_size: int
    matrix: tuple[int, int]
    transposed: bool

    @property
    def model_shape(self) -> tuple[int, int]:
        out_dim, in_dim = self.matrix
        return (in_dim, out_dim) if self.transposed else (out_dim, in_dim)


class QuantizedFileStore(FileStore):
    """Experts of a moekit quantized checkpoint: each expert's packed codes are read with ``pread`` and
    dequantized into the cache slot, so the disk read is the quantized size (4 or 8 bits per weight) and the
    cache holds ready-to-use weights. Unquantized per-expert tensors (biases) are read as ``FileStore`` does.

    ``packed_int4=True``: the MoE layers whose experts are all int4 with whole groups (``int4_layers``) keep them
    packed in the slots too (codes, fp16 group scales and zero points under ``int4_buffer_names``): 0.5 + 3/group
    bytes per weight, so a budget holds ~3.8x the experts of bf16, and moekit's int4 kernel runs decode on them."""

    def __init__(self, file: Path, ckpt: Checkpoint, targets: dict[int, dict[str, Target]],
                 packed: dict[int, dict[str, PackedSlab]], dtype: torch.dtype, bypass_page_cache: bool = False,
                 packed_int4: bool = False) -> None:
        from moekit.formats.quantized import int4_packable

        super().__init__(ckpt, targets, dtype, bypass_page_cache)
        self.zero_copy = False  # the cache holds dequantized (or re-laid-out) experts: nothing to compute on in place
        self.path = str(file)  # the quantized weights file
        self.packed = packed
        #: MoE layers whose experts stay packed int4 in the cache slots
        self.int4_layers = {li for li, d in packed.items() if packed_int4 and len(d) == 2 and all(
            int4_packable(p.matrix, p.bits, p.group_size) for p in d.values())}
        size = torch.empty(0, dtype=dtype).element_size()
        self.expert_bytes = {  # what a slot holds: budgets count those bytes
            li: self.expert_bytes.get(li, 0) + sum(
                sum(part[1] for part in p.parts[0].values()) if li in self.int4_layers
                else p.matrix[0] * p.matrix[1] * size for p in packed[li].values())
            for li in packed
        }
        if self.bypass_page_cache:
            drop_cache(self.ckpt.handles.fd(self.path))

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        plain = {n: (t.shape[1:], self.dtype) for n, t in self.targets.get(layer, {}).items()}
        if layer in self.int4_layers:
            return plain | {slot_name: self.packed[layer][n].parts[0][part][2:]
                            for n in self.packed[layer]
                            for slot_name, part in zip(int4_buffer_names(n), PACKED_PARTS, strict=True)}
        return plain | {n: (p.model_shape, self.dtype) for n, p in self.packed[layer].items()}

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        from moekit.formats.quantized import QTensor

        total = super().read(layer, expert, {n: out[n] for n in self.targets.get(layer, {})}) \
            if layer in self.targets else 0  # the unquantized tensors
        fd = self.ckpt.handles.fd(self.path)
        int4 = layer in self.int4_layers
        for name, slab in self.packed[layer].items():
            parts = {}
            for part, (offset, nbytes, shape, dt) in slab.parts[expert].items():
                # packed int4 slots: the codes, scales and zero points go straight into the slot's tensors
                buf = out[int4_buffer_names(name)[PACKED_PARTS.index(part)]] if int4 else torch.empty(shape, dtype=dt)
                if int4 and (tuple(buf.shape) != tuple(shape) or buf.dtype != dt or not buf.is_contiguous()):
                    raise MoekitError(f"{self.path}: {name} of expert {layer}:{expert} ({part}) does not fit its slot")
                pread_into(fd, bytes_of(buf), offset, f"{self.path} ({name} of expert {layer}:{expert})")
                if self.bypass_page_cache:
                    drop_cache(fd, offset, nbytes)
                parts[part] = buf
                total += nbytes
            if int4:
                continue
            qt = QTensor(parts["qweight"], parts["scales"], parts["zeros"], slab.bits[expert], slab.group_size,
                         slab.matrix)
            w = qt.dequantize(self.dtype)
            out[name].copy_(w.t() if slab.transposed else w)
        return total

    @classmethod
    def open(cls, path: Path, meta: dict, keys: dict[int, dict[str, str]], dtype: torch.dtype,
             bypass_page_cache: bool = False, packed_int4: bool = False) -> QuantizedFileStore:
        """The store of quantized checkpoint ``path`` (format record ``meta``) for the model's bank ``keys``
        (``packed_int4``: see the class)."""
        from moekit.formats.quantized import QUANT_WEIGHTS

        file = path / QUANT_WEIGHTS
        header, data_start = read_header(file)
        ckpt = Checkpoint(path)

        def where(key: str) -> tuple[int, int, tuple[int, ...], torch.dtype]:
            if key not in header:
                raise MoekitError(f"{file}: tensor {key} is missing; the quantized checkpoint is incomplete")
            start, end = header[key]["data_offsets"]
            return data_start + start, end - start, tuple(header[key]["shape"]), ST_DTYPES[header[key]["dtype"]]

        targets: dict[int, dict[str, Target]] = {}
        packed: dict[int, dict[str, PackedSlab]] = {}
        gs = int(meta["group_size"])
        for li, pk in keys.items():
            packed[li] = {}
            for pname, key in pk.items():
                info = meta["tensors"].get(key)
                if info is None:  # stored as is (biases): one fused tensor, a contiguous slab per expert
                    where(key)
                    t = ckpt.tensors[key]
                    targets.setdefault(li, {})[pname] = Target(key, t.shape, [Piece(t)])
                    continue
                num, out_dim, in_dim = info["shape"]
                parts = tuple({p: where(f"{key}.{e}.{p}") for p in PACKED_PARTS}
                              for e in range(num))
                packed[li][pname] = PackedSlab(parts, tuple(int(b) for b in info["bits"]), gs, (out_dim, in_dim),
                                               bool(info["transposed"]))
        return cls(file, ckpt, targets, packed, dtype, bypass_page_cache, packed_int4)


class TensorStore(ExpertStore):
    """Experts copied from in-memory fused banks (host RAM as the slow tier, e.g. under a GPU cache)."""

    def __init__(self, banks: dict[int, dict[str, torch.Tensor]]) -> None:
        self.banks = banks
        self.expert_bytes = {li: sum(t[0].numel() * t.element_size() for t in d.values()) for li, d in banks.items()}

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(t.shape[1:]), t.dtype) for n, t in self.banks[layer].items()}

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        for name, bank in self.banks[layer].items():
            out[name].copy_(bank[expert])
        return self.expert_bytes[layer]

    @classmethod
    def from_model(cls, lm: LoadedModel) -> TensorStore:
        banks = {}
        for view in lm.moe:
            names = expert_param_names(view.experts)
            if any(getattr(view.experts, n).is_meta for n in names):
                raise MoekitError("this model's experts are not in memory; load it with moekit.serve.load_offloaded")
            banks[view.index] = {n: getattr(view.experts, n).detach() for n in names}
        return cls(banks)


# ---------------------------------------------------------------------------------------------------
# Loading with the experts left in the store
# ---------------------------------------------------------------------------------------------------

def load_offloaded(
    spec: str | os.PathLike,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    bypass_page_cache: bool = False,
    packed_experts: bool = False,
) -> LoadedModel:
    """Load ``spec`` with its non-expert weights resident on ``device`` and its routed experts left
    in the checkpoint (read on demand by ``moekit.serve.offload``); ``dtype`` defaults to the checkpoint's.
    ``packed_experts`` (moekit int4 quantized checkpoints): the cache keeps the experts packed and runs them with
    the int4 kernel (``QuantizedFileStore``'s ``packed_int4``).

    Memory: the non-expert weights only; nothing is read twice and no file is mapped."""
    path, name = resolve(spec)
    if path is None:
        path = Path(hub_snapshot(name))
    from moekit.formats.quantized import is_quantized_checkpoint

    if packed_experts and not is_quantized_checkpoint(path):
        raise MoekitError(f"{path}: packed experts need a moekit quantized checkpoint (moekit quantize --bits 4)")
    dtype = resolve_dtype(dtype, path)
    model = skeleton(path, dtype)
    structure = build_moe_map(model)  # (routing rules are verified on real weights: the map is built again below)
    for view in structure:  # before anything is read: an expert layout the store cannot serve is one clear error
        view.require_standard_bank("offloading")
    keys = bank_keys(model, structure)
    expert_keys = {k for d in keys.values() for k in d.values()}
    store: ExpertStore
    if is_quantized_checkpoint(path):
        from moekit.formats.quantized import QUANT_WEIGHTS, read_quant_meta

        store = QuantizedFileStore.open(path, read_quant_meta(path), keys, dtype, bypass_page_cache, packed_experts)
        if packed_experts and not store.int4_layers:
            store.close()
            raise MoekitError(f"{path}: no experts can stay packed: that needs all-int4 experts whose input sizes are "
                              f"multiples of the group size ({read_quant_meta(path)['group_size']})")
        _read_dense_quantized(model, path / QUANT_WEIGHTS, expert_keys, store)
    else:
        ckpt = Checkpoint(path)
        plan = ckpt.plan(model)
        missing = sorted(k for k in expert_keys if k not in plan)
        if missing:
            raise MoekitError(f"{path}: no on-disk tensors for expert bank {missing[0]}")
        store = FileStore(ckpt, {li: {p: plan[k] for p, k in d.items()} for li, d in keys.items()}, dtype,
                          bypass_page_cache=bypass_page_cache)
        read_weights(model, ckpt, skip=expert_keys, drop_cache=bypass_page_cache)
    _to_device(model, device)
    model.eval()
    lm = LoadedModel(model=model, tokenizer=load_tokenizer_from(path) if with_tokenizer else None, moe=build_moe_map(model),
                     name=name, path=path)
    lm._moekit_expert_store = store  # type: ignore[attr-defined]
    return lm


def _read_dense_quantized(model: nn.Module, file: Path, expert_keys: set[str], store: QuantizedFileStore) -> None:
    """The non-expert tensors of a quantized checkpoint (stored under the model's own names)."""
    infos = store.ckpt.tensors
    for key, t in model.state_dict(keep_vars=True).items():
        if key in expert_keys or key not in infos:
            continue
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        buf = torch.empty(t.shape, dtype=t.dtype)
        store.ckpt.read_target(Target(key, tuple(t.shape), [Piece(infos[key])]), buf, drop=store.bypass_page_cache)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(buf, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = buf
    model.tie_weights()
    still = sorted(k for k, t in model.state_dict(keep_vars=True).items() if k not in expert_keys and t.is_meta)
    if still:
        raise MoekitError(f"could not find {len(still)} tensors in {file} (e.g. {still[0]})")


def _to_device(model: nn.Module, device: str | torch.device) -> None:
    """Move every resident tensor to ``device``, leaving the meta expert banks alone."""
    stash = []
    for view in build_moe_map(model):
        for n in expert_param_names(view.experts):
            stash.append((view.experts, n, view.experts._parameters[n]))
            view.experts._parameters[n] = None
    try:
        model.to(device)
    finally:
        for mod, n, p in stash:
            mod._parameters[n] = p


def store_for(lm: LoadedModel, bypass_page_cache: bool = False) -> ExpertStore:
    """The store of ``lm``: its own (``load_offloaded``), else its checkpoint's files, else its in-memory banks."""
    store = getattr(lm, "_moekit_expert_store", None)
    if store is not None:
        return store
    if lm.path is not None:
        from moekit.formats.quantized import is_quantized_checkpoint

        if not is_quantized_checkpoint(Path(lm.path)):
            dtype = next(iter(lm.moe)).router.weight.dtype
            keys = bank_keys(lm.model, lm.moe)
            ckpt = Checkpoint(lm.path)
            plan = ckpt.plan(lm.model)
            if all(k in plan for d in keys.values() for k in d.values()):
                return FileStore(ckpt, {li: {p: plan[k] for p, k in d.items()} for li, d in keys.items()}, dtype,
                                 bypass_page_cache=bypass_page_cache)
    return TensorStore.from_model(lm)
