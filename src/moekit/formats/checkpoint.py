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
    """A model tensor and the pieces that fill it; ``recipe`` (with ``output``): transformers' conversion of whole
    on-disk tensors into it (concatenations, chunks, splits, transposes, interleaves), which moekit runs itself."""

    key: str
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)
    recipe: tuple[tuple, ...] | None = None
    output: int = 0

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
            if new not in sd and key in sd:  # transformers' own fallback: a key the model has keeps its name
                new, pattern = rename_source_key(key, [], [], prefix, sd)
            if new not in sd:
                continue  # not a parameter of this model (e.g. rotary inv_freq buffers of old checkpoints)
            tgt = targets.setdefault(new, Target(new, sd[new]))
            if pattern is None:
                tgt.pieces.append(Piece(info))
                continue
            c = next(c for c in converters if pattern in c.source_patterns)
            ops = [(type(o).__name__, getattr(o, "dim", None)) for o in c.operations]
            if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
                part = Piece(info, None, c.source_patterns.index(pattern), len(c.source_patterns))
                # a one-to-many conversion renames to its first target; the others replace that pattern (as
                # transformers' own Split does)
                first = c.target_patterns[0]
                outs = [new if i == 0 else new.replace(first, tp, 1) for i, tp in enumerate(c.target_patterns)]
                recipe = _recipe(key, c.operations, [sd.get(k) for k in outs])
                for i, out_key in enumerate(outs):
                    if out_key in sd:
                        t = targets.setdefault(out_key, Target(out_key, sd[out_key]))
                        t.recipe, t.output = recipe, i
                        t.pieces.append(part)
                continue
            # transformers' source patterns are regular expressions in which "*" stands for the expert index
            m = re.search(pattern.replace("*", r"(\d+)"), key)
            if m is None:
                raise UnsupportedArchitecture(f"{key}: no expert index where {pattern!r} expects one")
            tgt.pieces.append(Piece(info, int(m.group(1)), c.source_patterns.index(pattern), len(c.source_patterns)))
        for tgt in targets.values():
            if tgt.recipe is not None:  # a conversion takes its sources in source-pattern order
                tgt.pieces.sort(key=lambda p: p.part)
            self._check(tgt)
        return targets

    @staticmethod
    def _check(tgt: Target) -> None:
        if tgt.recipe is not None:  # run the conversion on shapes alone (meta tensors)
            metas = [torch.empty(p.info.shape, device="meta") for p in tgt.pieces]
            try:
                got = tuple(_run_recipe(metas, tgt.recipe, tgt.shape)[tgt.output].shape)
            except (RuntimeError, IndexError, ValueError) as exc:
                raise MoekitError(f"{tgt.key}: transformers' conversion does not apply to the checkpoint's "
                                  f"{[list(p.info.shape) for p in tgt.pieces]} ({exc})") from None
            if got != tuple(tgt.shape):
                raise MoekitError(f"{tgt.key}: checkpoint converts to {list(got)}, the model expects {list(tgt.shape)}")
            return
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
        if tgt.recipe is not None:  # the whole conversion's sources (attention-sized, or one fused bank)
            tensors = [read_tensor(self.handles, p.info, drop) for p in tgt.pieces]
            out.copy_(_run_recipe(tensors, tgt.recipe, tgt.shape)[tgt.output])
            return
        if not tgt.per_expert:
            _read_into(self.handles, tgt.pieces[0].info, out, 0, drop)
            return
        for e in range(tgt.shape[0]):
            self.read_expert(tgt, e, out[e], drop)

    def read_expert(self, tgt: Target, e: int, out: torch.Tensor, drop: bool = False) -> None:
        """Fill ``out`` (shape ``tgt.shape[1:]``) with expert ``e``'s slice of the target (no other expert read)."""
        if tgt.recipe is not None:
            slab_ops = _per_expert_recipe(tgt)
            if slab_ops is None:
                raise UnsupportedArchitecture(f"{tgt.key}: transformers' conversion {list(tgt.recipe)} mixes experts; "
                                              "moekit cannot read one expert of it alone")
            info = tgt.pieces[0].info
            slab = torch.empty(info.shape[1:], dtype=info.dtype)
            read_range(self.handles, info, slab, e * (info.nbytes // info.shape[0]), drop)
            out.copy_(_run_recipe([slab], slab_ops, tuple(tgt.shape[1:]))[0])
            return
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


def _recipe(key: str, operations: list, out_shapes: list[tuple[int, ...] | None]) -> tuple[tuple, ...]:
    """transformers' conversion operations as moekit's own steps (``out_shapes``: the model's shape of each target,
    None where the model lacks it); an operation moekit does not run is an error."""
    steps: list[tuple] = []
    for op in operations:
        name = type(op).__name__
        if name == "Concatenate" and getattr(op, "num_shards_attribute", None) is None:
            steps.append(("concatenate", op.dim))
        elif name == "Chunk" and getattr(op, "num_shards_attribute", None) is None:
            steps.append(("chunk", op.dim, len(out_shapes)))
        elif name == "Split" and all(shape is not None for shape in out_shapes):
            steps.append(("split", op.dim, tuple(shape[op.dim] for shape in out_shapes)))
        elif name == "Transpose":
            steps.append(("transpose", op.dim0, op.dim1, bool(op.check_dims)))
        elif name == "Interleave":
            steps.append(("interleave", op.dim, bool(op.inverse)))
        else:
            raise UnsupportedArchitecture(
                f"{key}: transformers converts it with {[type(o).__name__ for o in operations]}; moekit runs "
                "stacks, concatenations, chunks, splits, transposes and interleaves of checkpoint tensors")
    return tuple(steps)


def _run_recipe(tensors: list[torch.Tensor], steps: tuple[tuple, ...], shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Apply conversion ``steps`` to the source tensors (in source-pattern order) as transformers' operations do;
    returns the outputs in target-pattern order. ``shape`` is the (first) target's: a checked transpose applies only
    where the tensor does not have it already, and a split takes the target's size along its axis."""
    value = list(tensors)
    for step in steps:
        kind = step[0]
        if kind == "concatenate":
            value = [torch.cat(value, dim=step[1])]
        elif kind == "chunk":
            value = list(torch.chunk(value[0], step[2], dim=step[1]))
        elif kind == "split":
            value = list(torch.split(value[0], list(step[2]), dim=step[1]))
        elif kind == "transpose":
            _, d0, d1, check = step
            value = [v if check and tuple(v.shape) == tuple(shape) else v.transpose(d0, d1) for v in value]
        elif kind == "interleave":
            _, dim, inverse = step
            out = []
            for v in value:
                split = list(v.shape)
                split[dim:dim + 1] = [2, split[dim] // 2] if inverse else [split[dim] // 2, 2]
                out.append(v.reshape(split).transpose(dim, dim + 1).reshape(v.shape))
            value = out
    return value


def _per_expert_recipe(tgt: Target) -> tuple[tuple, ...] | None:
    """The recipe of a fused expert bank as steps on one expert's slab (axes shifted past the expert axis), or None
    when a step mixes experts (it acts on the expert axis, or there is more than one source)."""
    if len(tgt.pieces) != 1:
        return None
    steps = []
    for step in tgt.recipe or ():
        if step[0] == "transpose" and min(step[1], step[2]) >= 1:
            steps.append(("transpose", step[1] - 1, step[2] - 1, step[3]))
        elif step[0] == "interleave" and step[1] >= 1:
            steps.append(("interleave", step[1] - 1, step[2]))
        else:
            return None
    return tuple(steps)


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
