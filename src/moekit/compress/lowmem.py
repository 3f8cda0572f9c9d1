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

One module (~470 lines): the streamed prune, merge and quantize share its layer-wise reader and writer.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from moekit.io import atomic_output_dir
from moekit.malloc import return_freed_memory
from moekit.models.loading import LoadedModel, load_structure, windows_per_forward

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
                   progress: bool = False, dtype: torch.dtype | str | None = "auto",
                   activation_bytes: int | None = None) -> tuple[CalibStats, LoadedModel]:
    """Calibration statistics computed layer by layer from the checkpoint at ``path`` (in ``dtype``, by
    default the checkpoint's); also returns the meta-device LoadedModel (structure only) used to select and write.

    ``activation_bytes`` (a budget's activation share): fewer than ``batch_size`` windows per forward when their
    activations would exceed it (``models.loading.windows_per_forward``), so the batches depend on the budget, the
    model's shape and the data only, never on the machine's state."""
    return_freed_memory()
    lm = meta_model(path, dtype)
    lm.activation_bytes = activation_bytes
    dtype = next(lm.model.parameters()).dtype
    reader = Checkpoint(path)
    plan = reader.plan(lm.model)
    if batches is None:
        windows = calibration_windows(lm, docs or [], seq_len, max_tokens)
        batches = batches_of(windows, windows_per_forward(lm, seq_len, batch_size))
        dh = data_hash(windows)
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
    return_freed_memory()
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


def _layer_of(key: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return int(m[1]) if m else None


@torch.no_grad()
def write_layerwise(src: str | Path, lm: LoadedModel, out: str | Path, config, meta: Mapping,
                    transform: Callable[[int, dict[str, torch.Tensor]], None], force: bool = False,
                    shard_bytes: int = 2 << 30, progress: bool = False, what: str = "writing") -> Path:
    """Write a checkpoint laid out like ``src`` (its key names, per-expert or fused expert tensors), one decoder
    layer in memory at a time.

    Each decoder layer ``i`` is read into ``lm``'s meta structure; ``transform(i, sd)`` rewrites its state dict
    ``sd`` (model keys) in place, e.g. fewer experts; every on-disk tensor of ``src`` is then written from it
    (an expert's per-expert tensors only for the experts that remain). Tensors outside the decoder layers are
    copied; floating tensors are written in ``lm``'s dtype, which ``config`` records."""
    return_freed_memory()
    src = Path(src)
    reader = Checkpoint(src)
    plan = reader.plan(lm.model)
    dtype = next(lm.model.parameters()).dtype
    where = {p.info.key: (tgt, p) for tgt in plan.values() for p in tgt.pieces}
    meta_dtypes = {k: t.dtype for k, t in lm.model.state_dict().items()}  # the load dtypes (fp32 routers kept)
    by_layer: dict[int | None, list[str]] = {}
    for key in reader.tensors:
        tgt = where.get(key)
        by_layer.setdefault(_layer_of(tgt[0].key if tgt else key), []).append(key)
    layers = list(lm.model.model.layers)

    def tensors():
        for key in by_layer.get(None, []):
            tgt, _ = where.get(key, (None, None))
            if tgt is None:  # not part of the model (an old buffer): kept as stored
                yield key, read_tensor(reader.handles, reader.tensors[key])
                continue
            buf = torch.empty(tgt.shape, dtype=meta_dtypes[tgt.key])
            reader.read_target(tgt, buf)
            yield key, buf
        prog, task = progress_bar(progress, len(layers), what)
        with prog:
            for i, layer in enumerate(layers):
                prefix = f"model.layers.{i}."
                reader.materialize(layer, plan, prefix, dtype)
                try:
                    sd = {prefix + k: v for k, v in layer.state_dict().items()}
                    transform(i, sd)
                    for key in by_layer.get(i, []):
                        tgt, piece = where.get(key, (None, None))
                        if tgt is None:
                            yield key, read_tensor(reader.handles, reader.tensors[key])
                        elif piece.expert is None:
                            yield key, sd[tgt.key].clone()
                        elif piece.expert < sd[tgt.key].shape[0]:
                            part = sd[tgt.key][piece.expert].reshape(piece.nparts, -1)[piece.part]
                            yield key, part.reshape(piece.info.shape).clone()
                finally:
                    layer.to("meta")
                prog.advance(task)

    try:
        return write_checkpoint(out, force=force, tensors=tensors(), config=config, dtype=dtype,
                                shard_bytes=shard_bytes, generation_config=src / "generation_config.json",
                                tokenizer=src, record=(METADATA_FILE, meta))
    finally:
        reader.close()


def merge_lowmem(path: str | Path, ratio: float, docs: Sequence, out: str | Path, force: bool = False,
                 protect_super: bool = False, seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8,
                 progress: bool = False, dtype: torch.dtype | str | None = "auto", method: str = "m-smoe",
                 protect: Iterable[ExpertRef] = (), activation_bytes: int | None = None):
    """``merge`` for checkpoints larger than memory: layer-by-layer calibration, then one decoder layer at a time
    merged and written (in ``dtype``, by default the checkpoint's). Same checkpoint as ``merge``.
    ``activation_bytes``: see ``observe_lowmem``."""
    from moekit.compress.criteria import check_ratio
    from moekit.compress.merge import MERGERS, MergeResult, check_groups, merge_metadata, merge_view_tensors
    from moekit.compress.writer import module_names, plan_config, prune_view_tensors
    from moekit.io import check_writable

    planner = MERGERS.get(method)
    check_writable(out, force)
    if not docs:
        raise MoekitError("merging needs calibration data")
    structure = meta_model(path, dtype)
    ExpertSet(protect).check(structure.moe)
    check_ratio({v.index: (v.num_experts, v.top_k) for v in structure.moe}, ratio)
    stats, lm = observe_lowmem(path, docs, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                               progress=progress, dtype=dtype, activation_bytes=activation_bytes)
    groups, protected = planner(lm, stats, ratio, protect_super, protect)
    kept = check_groups(lm, groups)
    config, notes = plan_config(lm, kept)
    new_e = max(len(v) for v in kept.values())
    views = {v.index: v for v in lm.moe}
    names = module_names(lm.model)

    def transform(i: int, sd: dict[str, torch.Tensor]) -> None:
        if i in views:
            prune_view_tensors(sd, views[i], names, kept[i], new_e)
            merge_view_tensors(sd, views[i], names, groups[i], stats.layers[i].count)

    res = MergeResult(ratio, groups, protected, calib_hash=stats.data_hash, method=MERGERS.canonical(method))
    meta = merge_metadata(lm, res.method, ratio, groups, protected, stats, notes, low_memory=True)
    res.out = write_layerwise(path, lm, out, config, meta, transform, force, progress=progress,
                              what="merging (layer by layer)")
    return res


@torch.no_grad()
def quantize_lowmem(path: str | Path, bits: int = 8, group_size: int = 128, avg_bits: float | None = None,
                    docs: Sequence | None = None, out: str | Path | None = None, force: bool = False,
                    seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8, progress: bool = False,
                    dtype: torch.dtype | str | None = "auto", activation_bytes: int | None = None):
    """``quantize`` for checkpoints larger than memory: one decoder layer in memory at a time (in ``dtype``, by
    default the checkpoint's), its experts quantized and streamed into the quantized file. Mixed precision
    (``avg_bits``) calibrates layer by layer and reads each layer's experts once more for the error term.
    Same checkpoint as ``quantize``; the result's ``packed`` stays empty (nothing is kept in memory).
    ``activation_bytes``: see ``observe_lowmem``."""
    from moekit.compress.quantize import (
        FORMAT,
        QUANT_CONFIG,
        QUANT_WEIGHTS,
        QuantResult,
        allocate_bits,
        check_quant_args,
        expert_matrices,
        expert_params,
        importance,
        qtensor_specs,
        quant_extra,
        quant_record,
        quantize_matrix,
    )
    from moekit.compress.writer import module_names
    from moekit.formats import StreamWriter
    from moekit.formats.writer import write_tokenizer
    from moekit.io import check_writable

    return_freed_memory()
    check_quant_args(bits, group_size)
    if out is None:
        raise MoekitError("the low-memory quantizer writes a checkpoint: give out")
    check_writable(out, force)
    if avg_bits is not None:
        if not docs:
            raise MoekitError("mixed precision (--avg-bits) needs calibration data (--calib)")
        stats, lm = observe_lowmem(path, docs, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                                   progress=progress, dtype=dtype, activation_bytes=activation_bytes)
    else:
        lm = meta_model(path, dtype)
    params = expert_params(lm)
    dtype = next(lm.model.parameters()).dtype
    reader = Checkpoint(path)
    plan = reader.plan(lm.model)
    names = module_names(lm.model)
    layers = list(lm.model.model.layers)
    try:
        if avg_bits is not None:  # the 4-bit error term needs every expert's weights: one layer's bank at a time
            imp = {}
            prog, task = progress_bar(progress, len(lm.moe), "quantization error (layer by layer)")
            with prog:
                for v in lm.moe:
                    reader.materialize(v.experts, plan, names[id(v.experts)] + ".", dtype)
                    try:
                        imp.update(importance(lm, stats, group_size, views=[v]))
                    finally:
                        v.experts.to("meta")
                    prog.advance(task)
            alloc = allocate_bits(imp, params, avg_bits)
        else:
            alloc = {k: bits for k in params}
        packed_keys = {}  # expert parameter name → (view, name in expert_matrices)
        for v in lm.moe:
            for pname in expert_matrices(v):
                packed_keys[f"{names[id(v.experts)]}.{pname}"] = (v, pname)
        if getattr(lm.config, "tie_word_embeddings", False):
            lm.model.tie_weights()  # calibration moved the embeddings to meta alone, which unties them
        first: dict[int, str] = {}
        tied: dict[str, str] = {}
        specs, order = [], []
        for k, t in lm.model.state_dict(keep_vars=True).items():
            if k in packed_keys:
                v, pname = packed_keys[k]
                w = expert_matrices(v)[pname][0]
                for e in range(v.num_experts):
                    for field, (dt, shape) in qtensor_specs(w.shape[1], w.shape[2], alloc[(v.index, e)],
                                                            group_size).items():
                        specs.append((f"{k}.{e}.{field}", dt, shape))
                order.append(k)
                continue
            if id(t) in first:  # tied weights (embeddings / lm_head) are stored once
                tied[k] = first[id(t)]
                continue
            first[id(t)] = k
            specs.append((k, t.dtype, tuple(t.shape)))  # the meta structure's: the load dtype, fp32 routers kept
            order.append(k)
        meta = quant_record(lm, {k: [alloc[(v.index, e)] for e in range(v.num_experts)]
                                 for k, (v, _) in packed_keys.items()}, group_size, tied,
                            quant_extra(lm, alloc, params, avg_bits))
        with atomic_output_dir(out, force) as tmp:
            writer = StreamWriter(tmp / QUANT_WEIGHTS, specs, {"format": FORMAT})
            prog, task = progress_bar(progress, len(layers), "quantizing (layer by layer)")
            spec_of = {n: (d, shape) for n, d, shape in specs}
            current, lsd = None, {}
            ok = False
            try:
                with prog:
                    for k in order:
                        li = _layer_of(k)
                        if li != current:
                            if current is not None:
                                layers[current].to("meta")
                                prog.advance(task)
                            current, lsd = li, {}
                            if li is not None:
                                prefix = f"model.layers.{li}."
                                reader.materialize(layers[li], plan, prefix, dtype)
                                lsd = {prefix + n: t for n, t in layers[li].state_dict().items()}
                        if k in packed_keys:
                            v, pname = packed_keys[k]
                            w = expert_matrices(v)[pname][0]
                            for e in range(v.num_experts):
                                qt = quantize_matrix(w[e], alloc[(v.index, e)], group_size)
                                for field in ("qweight", "scales", "zeros"):
                                    writer.write(f"{k}.{e}.{field}", getattr(qt, field))
                        elif li is not None:
                            writer.write(k, lsd[k])
                        else:
                            buf = torch.empty(spec_of[k][1], dtype=spec_of[k][0])
                            reader.read_target(plan[k], buf)
                            writer.write(k, buf)
                    lsd = {}
                    if current is not None:
                        layers[current].to("meta")
                        prog.advance(task)
                ok = True
            finally:
                writer.close(check=ok)
            lm.model.config.save_pretrained(tmp)
            if (Path(path) / "generation_config.json").is_file():
                shutil.copy2(Path(path) / "generation_config.json", tmp / "generation_config.json")
            meta["tokenizer_copied"] = write_tokenizer(lm.tokenizer if lm.tokenizer is not None else path, tmp)
            (tmp / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        reader.close()
    res = QuantResult(alloc, group_size)
    res.out = Path(out)
    return res


def prune_lowmem(path: str | Path, method: str, ratio: float, docs: Sequence | None, out: str | Path,
                 force: bool = False, global_budget: bool = False, protect_super: bool = False, seed: int = 0,
                 seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8, progress: bool = False,
                 dtype: torch.dtype | str | None = "auto", protect: Iterable[ExpertRef] = (),
                 activation_bytes: int | None = None):
    """``prune`` for checkpoints larger than memory: layer-by-layer calibration (in ``dtype``, by default the
    checkpoint's), file-to-file writing (tensors as stored); ``protect``: experts never removed;
    ``activation_bytes``: see ``observe_lowmem``."""
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
                                   progress=progress, dtype=dtype, activation_bytes=activation_bytes)
    res = choose(lm, stats, method, ratio, global_budget, protect_super, seed, protect)
    res.out = write_pruned_files(path, lm, res.kept, out, force, meta_extra={
        "method": method, "ratio": ratio, "calib_hash": res.calib_hash, "global_budget": global_budget,
        "protected": res.protected.to_list(), "seed": seed, "calibration_tokens": res.calib_tokens})
    return res
