"""Expert store: routed-expert weights read on demand, one expert at a time; everything else resident.

Layout. An expert bank of the transformers v5 model is a set of fused 3-D tensors (``gate_up_proj``
``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, GPT-OSS transposed with biases).  Expert ``e``'s slab of
each tensor is contiguous on disk, so one expert is a handful of ``pread`` calls at known offsets of a
safetensors file (the header is parsed here; no mmap, so nothing lingers in the process's RSS).

* When the checkpoint already stores the banks under the model's own names (fused), they are read from
  the checkpoint itself.
* Otherwise (``save_pretrained`` writes per-expert ``experts.{e}.gate_proj.weight`` tensors, and
  names vary by architecture), moekit prepares an offload layout once: ``experts.safetensors`` (fused
  banks, model names) and ``dense.safetensors`` (every other tensor) in a cache directory
  (``$MOEKIT_CACHE_DIR`` or ``~/.cache/moekit/offload``), using transformers' own loader for the
  conversion.  Preparation loads the model once.

``bypass_page_cache=True`` drops each read range from the OS page cache (``posix_fadvise
DONTNEED``) so that a miss is a real storage read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.models.loading import LoadedModel, _quiet_transformers, resolve
from moekit.models.moe_map import build_moe_map

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
LAYOUT_VERSION = 1


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill ``view`` with the bytes at ``offset`` of ``fd`` (looping over short reads); ``what`` names it in errors."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise MoekitError(f"short read of {what}")
        got += n


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (empty tensors included)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(bytearray())


@dataclass(frozen=True)
class Slab:
    """Where one expert's slice of one fused tensor lives: file, offset of expert 0, bytes per expert."""

    path: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]   # per-expert shape (the fused shape without its leading E)
    dtype: torch.dtype


def expert_param_names(experts: nn.Module) -> list[str]:
    """Names of the fused per-expert tensors of an expert bank (parameters with a leading E axis)."""
    E = int(experts.num_experts)
    return [n for n in EXPERT_PARAMS
            if isinstance(getattr(experts, n, None), torch.Tensor) and getattr(experts, n).shape[:1] == (E,)]


class ExpertStore:
    """The slow tier: reads expert ``(layer, e)`` into caller-provided tensors."""

    #: bytes of one expert (all its tensors), per MoE layer index
    expert_bytes: dict[int, int]

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:  # pragma: no cover
        """Fill ``out`` (param name → tensor of the per-expert shape) with the expert's weights; returns bytes read."""
        raise NotImplementedError

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileStore(ExpertStore):
    """Experts read with ``pread`` from safetensors files (fused banks under the model's names)."""

    def __init__(self, slabs: dict[int, dict[str, Slab]], bypass_page_cache: bool = True) -> None:
        self.slabs = slabs
        self.bypass_page_cache = bypass_page_cache and hasattr(os, "posix_fadvise")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.expert_bytes = {li: sum(s.nbytes for s in d.values()) for li, d in slabs.items()}
        if self.bypass_page_cache:
            for path in {s.path for d in slabs.values() for s in d.values()}:
                fd = self._fd(path)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (s.shape, s.dtype) for n, s in self.slabs[layer].items()}

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        total = 0
        for name, slab in self.slabs[layer].items():
            dst = out[name]
            if not (dst.device.type == "cpu" and dst.is_contiguous() and dst.dtype == slab.dtype):
                raise MoekitError("FileStore.read needs contiguous CPU tensors of the stored dtype")
            fd = self._fd(slab.path)
            off = slab.offset + expert * slab.nbytes
            pread_into(fd, _bytes_of(dst), off, f"{slab.path} (expert {layer}:{expert})")
            if self.bypass_page_cache:
                os.posix_fadvise(fd, off, slab.nbytes, os.POSIX_FADV_DONTNEED)
            total += slab.nbytes
        return total

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


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
    cache holds ready-to-use weights. Unquantized per-expert tensors (biases) are read as ``FileStore`` does."""

    def __init__(self, file: Path, slabs: dict[int, dict[str, Slab]], packed: dict[int, dict[str, PackedSlab]],
                 dtype: torch.dtype, bypass_page_cache: bool = True) -> None:
        super().__init__(slabs, bypass_page_cache)
        self.path = str(file)  # the quantized weights file
        self.packed = packed
        self.dtype = dtype
        size = torch.empty(0, dtype=dtype).element_size()
        self.expert_bytes = {  # the cache holds dequantized experts: budgets count those bytes
            li: sum(s.nbytes for s in slabs.get(li, {}).values())
            + sum(p.matrix[0] * p.matrix[1] * size for p in packed[li].values())
            for li in packed
        }
        if self.bypass_page_cache:
            os.posix_fadvise(self._fd(self.path), 0, 0, os.POSIX_FADV_DONTNEED)

    def shapes(self, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        plain = {n: (s.shape, s.dtype) for n, s in self.slabs.get(layer, {}).items()}
        return plain | {n: (p.model_shape, self.dtype) for n, p in self.packed[layer].items()}

    def read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        from moekit.compress.quantize import QTensor

        total = super().read(layer, expert, out) if layer in self.slabs else 0  # the unquantized tensors
        fd = self._fd(self.path)
        for name, slab in self.packed[layer].items():
            parts = {}
            for part, (offset, nbytes, shape, dt) in slab.parts[expert].items():
                buf = torch.empty(shape, dtype=dt)
                pread_into(fd, _bytes_of(buf), offset, f"{self.path} ({name} of expert {layer}:{expert})")
                if self.bypass_page_cache:
                    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
                parts[part] = buf
                total += nbytes
            qt = QTensor(parts["qweight"], parts["scales"], parts["zeros"], slab.bits[expert], slab.group_size,
                         slab.matrix)
            w = qt.dequantize(self.dtype)
            out[name].copy_(w.t() if slab.transposed else w)
        return total

    @classmethod
    def open(cls, path: Path, meta: dict, keys: dict[int, dict[str, str]], dtype: torch.dtype,
             bypass_page_cache: bool = True) -> QuantizedFileStore:
        """The store of quantized checkpoint ``path`` (format record ``meta``) for the model's bank ``keys``."""
        from moekit.compress.quantize import QUANT_WEIGHTS

        file = path / QUANT_WEIGHTS
        header, data_start = read_safetensors_header(file)

        def where(key: str) -> tuple[int, int, tuple[int, ...], torch.dtype]:
            if key not in header:
                raise MoekitError(f"{file}: tensor {key} is missing; the quantized checkpoint is incomplete")
            start, end = header[key]["data_offsets"]
            return data_start + start, end - start, tuple(header[key]["shape"]), _ST_DTYPES[header[key]["dtype"]]

        slabs: dict[int, dict[str, Slab]] = {}
        packed: dict[int, dict[str, PackedSlab]] = {}
        gs = int(meta["group_size"])
        for li, pk in keys.items():
            packed[li] = {}
            for pname, key in pk.items():
                info = meta["tensors"].get(key)
                if info is None:  # stored as is (biases): one fused tensor, a contiguous slab per expert
                    offset, nbytes, shape, dt = where(key)
                    slabs.setdefault(li, {})[pname] = Slab(str(file), offset, nbytes // shape[0], shape[1:], dt)
                    continue
                num, out_dim, in_dim = info["shape"]
                parts = tuple({p: where(f"{key}.{e}.{p}") for p in ("qweight", "scales", "zeros")}
                              for e in range(num))
                packed[li][pname] = PackedSlab(parts, tuple(int(b) for b in info["bits"]), gs, (out_dim, in_dim),
                                               bool(info["transposed"]))
        return cls(file, slabs, packed, dtype, bypass_page_cache)


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
# Layouts
# ---------------------------------------------------------------------------------------------------

def _bank_keys(model: nn.Module) -> dict[int, dict[str, str]]:
    """Decoder layer → {param name → state-dict key} of every expert bank of ``model``."""
    moe = build_moe_map(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {v.index: {p: f"{names[id(v.experts)]}.{p}" for p in expert_param_names(v.experts)} for v in moe}


def _index(files: list[Path]) -> dict[str, tuple[Path, dict, int]]:
    out = {}
    for f in files:
        header, data_start = read_safetensors_header(f)
        for k, entry in header.items():
            out[k] = (f, entry, data_start)
    return out


def _slabs_from(index: dict, keys: dict[int, dict[str, str]]) -> dict[int, dict[str, Slab]] | None:
    slabs: dict[int, dict[str, Slab]] = {}
    for li, pk in keys.items():
        slabs[li] = {}
        for pname, key in pk.items():
            if key not in index:
                return None
            f, entry, data_start = index[key]
            start, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            E = shape[0]
            if (end - start) % E:
                return None
            slabs[li][pname] = Slab(str(f), data_start + start, (end - start) // E, shape[1:], _ST_DTYPES[entry["dtype"]])
    return slabs


def cache_root() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE_DIR", Path.home() / ".cache" / "moekit")) / "offload"


def _layout_dir(path: Path) -> Path:
    h = hashlib.sha1(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / f"{path.name}-{h.hexdigest()[:12]}"


def prepare_layout(lm: LoadedModel, out_dir: str | os.PathLike) -> Path:
    """Write the offload layout of a fully loaded model: fused expert banks + every other tensor."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    keys = _bank_keys(lm.model)
    expert_keys = {k for d in keys.values() for k in d.values()}
    state = lm.model.state_dict()
    experts = {k: state[k].detach().contiguous() for k in expert_keys}
    save_file(experts, str(tmp / "experts.safetensors"))
    del experts
    dense, seen = {}, set()
    for k, t in state.items():
        if k in expert_keys:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:  # tied weights (lm_head = embed_tokens): stored once, re-tied on load
            continue
        seen.add(ptr)
        dense[k] = t.detach().contiguous()
    save_file(dense, str(tmp / "dense.safetensors"))
    (tmp / "layout.json").write_text(json.dumps({"version": LAYOUT_VERSION, "model": lm.name}))
    for f in tmp.iterdir():  # flush, so that dropping the page cache later really drops it
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def ensure_layout(path: Path, keys: dict[int, dict[str, str]], dtype: torch.dtype = torch.float32,
                  lm: LoadedModel | None = None) -> tuple[list[Path], list[Path]]:
    """(files holding the expert banks, files holding the dense tensors) for checkpoint ``path``,
    preparing the offload layout once when the checkpoint does not store fused banks (from ``lm``
    when it is that checkpoint fully loaded, else by loading it once)."""
    files = sorted(path.glob("*.safetensors"))
    if files and _slabs_from(_index(files), keys) is not None:
        return files, files
    lay = _layout_dir(path)
    if not (lay / "layout.json").is_file():
        if lm is None:
            from moekit.models.loading import load

            lm = load(path, dtype=dtype, with_tokenizer=False)
        prepare_layout(lm, lay)
    return [lay / "experts.safetensors"], [lay / "dense.safetensors"]


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's config declares (float32 when it declares none)."""
    from transformers import AutoConfig

    _quiet_transformers()
    dt = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model built from its config with no weight initialisation (expert banks left untouched)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    _quiet_transformers()
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _drop_banks(model: nn.Module) -> None:
    """Replace every expert bank's fused tensors by meta tensors (they never occupy memory)."""
    for view in build_moe_map(model):
        for n in expert_param_names(view.experts):
            p = getattr(view.experts, n)
            setattr(view.experts, n, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False))


def load_offloaded(
    spec: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    bypass_page_cache: bool = True,
) -> LoadedModel:
    """Load ``spec`` with its non-expert weights resident on ``device`` and its routed experts left
    in the store (read on demand by ``moekit.serve.offload``); ``dtype`` defaults to the checkpoint's."""
    path, name = resolve(spec)
    if path is None:
        from moekit.models.loading import _hub_snapshot

        path = Path(_hub_snapshot(name))
    from moekit.compress.quantized import is_quantized_checkpoint

    quantized = is_quantized_checkpoint(path)
    if quantized:
        from moekit.compress.quantize import QUANT_WEIGHTS, read_quant_meta

        meta = read_quant_meta(path)
        dtype = getattr(torch, meta.get("dtype", "float32")) if dtype is None else dtype
    elif dtype is None:
        dtype = checkpoint_dtype(path)
    model = _skeleton(path, dtype)
    keys = _bank_keys(model)
    _drop_banks(model)
    store: ExpertStore
    if quantized:
        store = QuantizedFileStore.open(path, meta, keys, dtype, bypass_page_cache)
        dense_files = [path / QUANT_WEIGHTS]
    else:
        expert_files, dense_files = ensure_layout(path, keys, dtype)
        slabs = _slabs_from(_index(expert_files), keys)
        if slabs is None:
            raise MoekitError(f"the offload layout of {path} does not match the model; delete {cache_root()} and retry")
        stored = {slab.dtype for d in slabs.values() for slab in d.values()}
        if stored != {dtype}:
            raise MoekitError(f"experts are stored as {sorted(map(str, stored))} but dtype={dtype} was asked; "
                              "load with the checkpoint's dtype")
        store = FileStore(slabs, bypass_page_cache=bypass_page_cache)
    expert_keys = {k for d in keys.values() for k in d.values()}
    wanted = set(model.state_dict().keys()) - expert_keys
    loaded = _read_dense(model, dense_files, wanted, bypass_page_cache)
    model.tie_weights()
    have = {_tensor_at(model, k).data_ptr() for k in loaded}
    still = sorted(k for k in wanted - loaded if _tensor_at(model, k).data_ptr() not in have)
    if still:
        raise MoekitError(f"could not find {len(still)} tensors in {path} (e.g. {still[0]})")
    _to_device(model, device)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None
    lm = LoadedModel(model=model, tokenizer=tokenizer, moe=build_moe_map(model), name=name, path=path)
    lm._moekit_expert_store = store  # type: ignore[attr-defined]
    return lm


def _read_dense(model: nn.Module, files: list[Path], wanted: set[str], bypass_page_cache: bool) -> set[str]:
    """Read the non-expert tensors straight into the model's own (uninitialised) tensors with ``pread``:
    no mmap and no intermediate copy, so loading costs no memory beyond the weights themselves."""
    loaded: set[str] = set()
    for f in files:
        header, data_start = read_safetensors_header(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            for key, entry in header.items():
                if key not in wanted or key in loaded:
                    continue
                dst = _tensor_at(model, key).data
                start, end = entry["data_offsets"]
                src_dtype = _ST_DTYPES[entry["dtype"]]
                if tuple(entry["shape"]) != tuple(dst.shape):
                    raise MoekitError(f"{key}: shape {entry['shape']} in {f.name}, model expects {list(dst.shape)}")
                direct = dst.dtype == src_dtype and dst.is_contiguous() and dst.device.type == "cpu"
                buf = dst if direct else torch.empty(dst.shape, dtype=src_dtype)
                pread_into(fd, _bytes_of(buf), data_start + start, f"{key} from {f}")
                if not direct:
                    dst.copy_(buf)
                loaded.add(key)
            if bypass_page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return loaded


def _tensor_at(model: nn.Module, key: str) -> torch.Tensor:
    mod_name, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, attr)


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


def store_for(lm: LoadedModel, bypass_page_cache: bool = True) -> ExpertStore:
    """The store of ``lm``: its own (``load_offloaded``), else its checkpoint's files, else its in-memory banks."""
    store = getattr(lm, "_moekit_expert_store", None)
    if store is not None:
        return store
    if lm.path is not None:
        dtype = next(iter(lm.moe)).router.weight.dtype
        keys = _bank_keys(lm.model)
        expert_files, _ = ensure_layout(Path(lm.path), keys, dtype, lm=lm)
        slabs = _slabs_from(_index(expert_files), keys)
        if slabs is not None:
            return FileStore(slabs, bypass_page_cache=bypass_page_cache)
    return TensorStore.from_model(lm)
