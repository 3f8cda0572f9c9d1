"""One checkpoint reader: safetensors headers + ``pread`` of tensors or single experts, with transformers
v5's own weight renames and per-expert → fused conversions.

A Hugging Face checkpoint stores per-expert tensors (``mlp.experts.3.gate_proj.weight``) while the v5
model holds fused banks (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``).  ``Checkpoint.plan(model)`` asks
transformers which checkpoint key goes where (``get_model_conversion_mapping`` + ``rename_source_key``:
the mappings ``from_pretrained`` itself applies) and records, for every model tensor, the on-disk pieces
that fill it; the conversions moekit executes itself are the two that expert banks use
(``MergeModulelist(dim=0)`` stacking experts and ``Concatenate(dim=1)`` of gate and up), so one expert's
slice of a fused bank is read straight from its per-expert tensors without touching any other expert.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError, UnsupportedArchitecture
from moekit.formats.safetensors import FileHandles, TensorInfo, read_range, read_tensor, tensor_infos

_FLOAT_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor filling part of a model tensor: all of it (``expert`` None), or expert
    ``expert``'s slice, as part ``part`` of ``nparts`` concatenated on the slice's first axis."""

    info: TensorInfo
    expert: int | None = None
    part: int = 0
    nparts: int = 1


@dataclass
class Target:
    """A model tensor and the pieces that fill it."""

    key: str
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def per_expert(self) -> bool:
        return any(p.expert is not None for p in self.pieces)


class Checkpoint:
    """A local safetensors checkpoint directory, read from its headers (no weight is read until asked)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            self.tensors.update(tensor_infos(f))
        self.handles = FileHandles()

    def _files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                raise MoekitError(f"{index}: not a safetensors index") from None
            files = [self.path / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MoekitError(f"{self.path}: shard {missing[0]} named in the index is missing")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise MoekitError(f"{self.path}: no safetensors weights (model.safetensors or its index)")
        return files

    # ----- structure ------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor as stored."""
        return sum(t.nbytes for t in self.tensors.values())

    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype holding most of the checkpoint's bytes (float32 when it has no float tensor)."""
        by: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else torch.float32

    def plan(self, model: nn.Module) -> dict[str, Target]:
        """Model state-dict key → the on-disk pieces that fill it (transformers' renames and fusions)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        conv = get_model_conversion_mapping(model)
        renames = [c for c in conv if isinstance(c, WeightRenaming)]
        converters = [c for c in conv if isinstance(c, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)
        targets: dict[str, Target] = {}
        for key, info in self.tensors.items():
            new, pattern = rename_source_key(key, renames, converters, prefix, sd)
            if new not in sd:
                continue  # not a parameter of this model (e.g. rotary inv_freq buffers of old checkpoints)
            tgt = targets.setdefault(new, Target(new, sd[new]))
            if pattern is None:
                tgt.pieces.append(Piece(info))
                continue
            c = next(c for c in converters if pattern in c.source_patterns)
            ops = [(type(o).__name__, getattr(o, "dim", None)) for o in c.operations]
            if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
                raise UnsupportedArchitecture(f"{key}: transformers converts it with {ops}; moekit reads only "
                                              "stacked and gate/up-concatenated expert tensors piecewise")
            rx = re.escape(pattern).replace(r"\*", r"(\d+)")
            m = re.search(rx, key)
            if m is None:
                raise UnsupportedArchitecture(f"{key}: no expert index where {pattern!r} expects one")
            tgt.pieces.append(Piece(info, int(m.group(1)), c.source_patterns.index(pattern), len(c.source_patterns)))
        for tgt in targets.values():
            self._check(tgt)
        return targets

    @staticmethod
    def _check(tgt: Target) -> None:
        if not tgt.per_expert:
            if len(tgt.pieces) != 1 or tgt.pieces[0].info.shape != tgt.shape:
                got = [list(p.info.shape) for p in tgt.pieces]
                raise MoekitError(f"{tgt.key}: checkpoint has {got}, the model expects {list(tgt.shape)}")
            return
        E = tgt.shape[0]
        seen = {(p.expert, p.part) for p in tgt.pieces}
        n = tgt.pieces[0].nparts
        if len(seen) != len(tgt.pieces) or seen != {(e, q) for e in range(E) for q in range(n)}:
            raise MoekitError(f"{tgt.key}: the checkpoint does not hold exactly one piece per expert and part")
        sub = 1
        for s in tgt.shape[1:]:
            sub *= s
        if any(p.info.numel * n != sub for p in tgt.pieces):
            raise MoekitError(f"{tgt.key}: per-expert tensor sizes do not match the fused shape {list(tgt.shape)}")

    # ----- data -----------------------------------------------------------------------------------
    def read_target(self, tgt: Target, out: torch.Tensor, drop: bool = False) -> None:
        """Fill ``out`` (the model tensor's shape, any dtype) from the target's pieces, one piece at a time."""
        if not tgt.per_expert:
            _read_into(self.handles, tgt.pieces[0].info, out, 0, drop)
            return
        for e in range(tgt.shape[0]):
            self.read_expert(tgt, e, out[e], drop)

    def read_expert(self, tgt: Target, e: int, out: torch.Tensor, drop: bool = False) -> None:
        """Fill ``out`` (shape ``tgt.shape[1:]``) with expert ``e``'s slice of the target (no other expert read)."""
        if not tgt.per_expert:  # fused on disk: expert e is a contiguous slab of the whole tensor
            info = tgt.pieces[0].info
            per = info.nbytes // tgt.shape[0]
            _read_into(self.handles, info, out, e * per, drop)
            return
        flat = out.reshape(tgt.pieces[0].nparts, -1) if out.is_contiguous() else None
        for p in tgt.pieces:
            if p.expert != e:
                continue
            if flat is not None:
                _read_into(self.handles, p.info, flat[p.part], 0, drop)
            else:
                rows = out.shape[0] // p.nparts
                out[p.part * rows:(p.part + 1) * rows].copy_(read_tensor(self.handles, p.info, drop).reshape(
                    out[p.part * rows:(p.part + 1) * rows].shape))

    def expert_pieces(self, tgt: Target, e: int) -> list[Piece]:
        return [p for p in tgt.pieces if p.expert == e] if tgt.per_expert else list(tgt.pieces)

    def materialize(self, module: nn.Module, plan: dict[str, Target], prefix: str, dtype: torch.dtype) -> None:
        """Give a meta-device ``module`` (at ``prefix`` of the planned model) real tensors read from the
        checkpoint, tensor by tensor, floating ones in ``dtype`` — except those the meta structure keeps in
        float32 (``_keep_in_fp32_modules``, e.g. DeepSeek-V2's router), which stay float32 as in the loaded model."""
        out = {}
        for name, t in module.state_dict().items():
            tgt = plan.get(prefix + name)
            if tgt is None:
                raise UnsupportedArchitecture(f"no on-disk tensor for {prefix + name}")
            want = t.dtype if not t.dtype.is_floating_point or (t.is_meta and t.dtype == torch.float32) else dtype
            buf = torch.empty(t.shape, dtype=want)
            self.read_target(tgt, buf)
            out[name] = buf
        module.load_state_dict(out, strict=True, assign=True)

    def close(self) -> None:
        self.handles.close()


def _read_into(handles: FileHandles, info: TensorInfo, out: torch.Tensor, start: int, drop: bool) -> None:
    """Read into ``out`` the bytes of ``info`` from ``start`` (as many as ``out`` holds in the stored dtype),
    converting dtype on the way when ``out``'s differs; straight into ``out`` when it can."""
    if out.dtype == info.dtype and out.is_contiguous() and out.device.type == "cpu":
        read_range(handles, info, out, start, drop)
        return
    buf = torch.empty(out.shape, dtype=info.dtype)
    read_range(handles, info, buf, start, drop)
    out.copy_(buf)


def config_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype a checkpoint's config.json declares (``dtype`` or the older ``torch_dtype``), or None."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for k in ("dtype", "torch_dtype"):
        v = cfg.get(k)
        if isinstance(v, str) and v.replace("torch.", "") in _FLOAT_NAMES:
            return _FLOAT_NAMES[v.replace("torch.", "")]
    return None


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: what config.json declares, else what its safetensors
    headers hold, else float32."""
    dt = config_dtype(path)
    if dt is not None:
        return dt
    try:
        return Checkpoint(path).dtype
    except MoekitError:
        return torch.float32
