"""Low-memory pruning: calibrate one decoder layer at a time from the safetensors files.

The model is built with its parameters on the ``meta`` device (no weights in memory). One pass with every
decoder layer replaced by a pass-through records the inputs each layer receives (embeddings, attention
masks, position embeddings — whatever that architecture's model forward computes). Then, layer by layer,
the layer's tensors are read from the checkpoint through ``formats.Checkpoint`` (transformers' own renames
and per-expert → fused conversions, one tensor at a time), the calibration hidden states are carried
through it with the same observers as the in-memory path (``observer.LayerObserver``), and the layer goes
back to ``meta``. Peak memory ≈ one decoder layer + the calibration hidden states.

The pruned checkpoint is written straight from the source files (``write_pruned_files``): tensors are
read one at a time, expert-indexed ones sliced (per-expert keys dropped and renumbered, fused ones
indexed on dim 0), and written in shards of at most ``shard_bytes``, in the dtype they are stored in
(which config.json then records).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from moekit.compress.observer import (
    CalibStats,
    LayerObserver,
    batches_of,
    calibration_windows,
    new_stats,
    progress_bar,
)
from moekit.compress.writer import (
    METADATA_FILE,
    check_kept,
    data_hash,
    disable_param,
    metadata,
    plan_config,
)
from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.formats import Checkpoint, read_tensor
from moekit.formats.writer import write_checkpoint
from moekit.models.loading import LoadedModel, load_structure

_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


class _PassThrough(nn.Module):
    """Stands in for a decoder layer during the capture pass: records its inputs, changes nothing."""

    def __init__(self, i: int, orig: nn.Module, sink: list) -> None:
        super().__init__()
        self.i, self.sink = i, sink
        if hasattr(orig, "attention_type"):
            self.attention_type = orig.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.i, hidden_states, args, kwargs))
        return hidden_states


def meta_model(path: str | Path, dtype: torch.dtype | str | None = "auto") -> LoadedModel:
    """The checkpoint's model with its parameters on the meta device, wrapped as a LoadedModel (with its
    tokenizer); ``dtype`` defaults to the checkpoint's."""
    return load_structure(Path(path), dtype, with_tokenizer=True)


@torch.no_grad()
def observe_lowmem(path: str | Path, docs: Sequence | None = None, batches: Sequence[dict] | None = None,
                   seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8,
                   progress: bool = False, dtype: torch.dtype | str | None = "auto") -> tuple[CalibStats, LoadedModel]:
    """Calibration statistics computed layer by layer from the checkpoint at ``path`` (in ``dtype``, by
    default the checkpoint's); also returns the meta-device LoadedModel (structure only) used to select and write."""
    lm = meta_model(path, dtype)
    dtype = next(lm.model.parameters()).dtype
    reader = Checkpoint(path)
    plan = reader.plan(lm.model)
    if batches is None:
        windows = calibration_windows(lm, docs or [], seq_len, max_tokens)
        batches, dh = batches_of(windows, batch_size), data_hash(windows)
    else:
        dh = None
    base = lm.model.model
    reader.materialize(base.embed_tokens, plan, "model.embed_tokens.", dtype)
    layers = list(base.layers)
    sink: list = []
    base.layers = nn.ModuleList(_PassThrough(i, m, sink) for i, m in enumerate(layers))
    norm = base.norm
    base.norm = nn.Identity()
    inputs = []
    try:
        for b in batches:
            sink.clear()
            base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            per_layer = {i: (args, kwargs) for i, _, args, kwargs in sink}
            inputs.append((sink[0][1], per_layer, b["attention_mask"].bool().reshape(-1)))
    finally:
        base.layers = nn.ModuleList(layers)
        base.norm = norm
    base.embed_tokens.to("meta")
    stats = new_stats(lm)
    views = {v.index: v for v in lm.moe}
    hidden = [h for h, _, _ in inputs]
    prog, task = progress_bar(progress, len(layers), "calibration (layer by layer)")
    with prog:
        for i, layer in enumerate(layers):
            reader.materialize(layer, plan, f"model.layers.{i}.", dtype)
            ob = LayerObserver(views[i], layer, stats[i]).attach() if i in views else None
            try:
                for b, (_, per_layer, mask) in enumerate(inputs):
                    args, kwargs = per_layer[i]
                    if ob is not None:
                        ob.mask = mask
                    out = layer(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
            finally:
                if ob is not None:
                    ob.detach()
                layer.to("meta")
            prog.advance(task)
    tokens = sum(int(m.sum()) for _, _, m in inputs)
    return CalibStats(stats, tokens=tokens, data_hash=dh), lm


def _disk_block_key(rest: str) -> bool:
    head = rest.split(".", 1)[0]
    return head in ("mlp", "block_sparse_moe") and "shared" not in rest


@torch.no_grad()
def write_pruned_files(src: str | Path, lm: LoadedModel, kept: Mapping[int, Sequence[int]], out: str | Path,
                       force: bool = False, meta_extra: Mapping | None = None, shard_bytes: int = 256 << 20) -> Path:
    """Write the pruned checkpoint of the safetensors checkpoint ``src`` without loading it whole.

    ``lm`` is its (meta) LoadedModel, used for the structure. Same result as ``writer.write_pruned``.
    """
    src = Path(src)
    kept = check_kept(lm, kept)
    config, notes = plan_config(lm, kept)
    new_e = max(len(v) for v in kept.values())
    reader = Checkpoint(src)

    def load(key: str) -> torch.Tensor:
        return read_tensor(reader.handles, reader.tensors[key])

    views = {v.index: v for v in lm.moe}
    layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

    def pruned_tensors():
        """(name, tensor) of the pruned checkpoint, one source tensor at a time, in the source's order."""
        for key in reader.tensors:
            m = layer_re.match(key)
            view = views.get(int(m[1])) if m else None
            if view is None:
                yield key, load(key)
                continue
            rest, ids, E = m[2], kept[view.index], view.num_experts
            pe = _PER_EXPERT.match(rest)
            if pe and pe["proj"] in _PROJ:
                e = int(pe["e"])
                if e in ids:
                    yield f"model.layers.{m[1]}.{pe['block']}.experts.{ids.index(e)}.{pe['proj']}.weight", load(key)
                if e == ids[0]:  # zero experts for padded slots, shaped like this tensor
                    t = load(key)
                    for slot in range(len(ids), new_e):
                        yield f"model.layers.{m[1]}.{pe['block']}.experts.{slot}.{pe['proj']}.weight", torch.zeros_like(t)
                continue
            t = load(key)
            if _disk_block_key(rest) and t.dim() >= 1 and t.shape[0] == E:
                new = t.index_select(0, torch.tensor(ids))
                pad = new_e - len(ids)
                if pad:
                    dis = disable_param(view)
                    fill = float("-inf") if dis is not None and rest.endswith(("router.bias", "e_score_correction_bias")) \
                        else 0.0
                    new = torch.cat([new, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype)])
                yield key, new
            else:
                yield key, t

    extra = dict(meta_extra or {})
    meta = metadata(extra.pop("method", "manual"), extra.pop("ratio", None), kept, lm.moe.layers[0].num_experts,
                    extra.pop("calib_hash", None), notes=notes, num_experts=new_e, low_memory=True, **extra)
    # tensors are copied as stored: config.json declares the dtype written, not the planning one
    return write_checkpoint(out, force=force, tensors=pruned_tensors(), config=config, shard_bytes=shard_bytes,
                            generation_config=src / "generation_config.json", tokenizer=src,
                            record=(METADATA_FILE, meta))


def prune_lowmem(path: str | Path, method: str, ratio: float, docs: Sequence | None, out: str | Path,
                 force: bool = False, global_budget: bool = False, protect_super: bool = False, seed: int = 0,
                 seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8, progress: bool = False,
                 dtype: torch.dtype | str | None = "auto", protect: Iterable[ExpertRef] = ()):
    """``prune`` for checkpoints larger than memory: layer-by-layer calibration (in ``dtype``, by default the
    checkpoint's), file-to-file writing (tensors as stored); ``protect``: experts never removed."""
    from moekit.compress.criteria import CRITERIA, needs_calibration
    from moekit.compress.prune import check_ratio_for_model, choose
    from moekit.io import check_writable

    CRITERIA.get(method)
    check_writable(out, force)
    if docs is None and needs_calibration(method, protect_super):
        raise MoekitError(f"criterion {method!r} needs calibration data")
    if docs is None:
        lm, stats = meta_model(path, dtype), None
    else:
        meta = meta_model(path, dtype)
        check_ratio_for_model(meta, ratio, global_budget)
        ExpertSet(protect).check(meta.moe)  # before the calibration pass
        stats, lm = observe_lowmem(path, docs, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                                   progress=progress, dtype=dtype)
    res = choose(lm, stats, method, ratio, global_budget, protect_super, seed, protect)
    res.out = write_pruned_files(path, lm, res.kept, out, force, meta_extra={
        "method": method, "ratio": ratio, "calib_hash": res.calib_hash, "global_budget": global_budget,
        "protected": res.protected.to_list(), "seed": seed, "calibration_tokens": res.calib_tokens})
    return res
