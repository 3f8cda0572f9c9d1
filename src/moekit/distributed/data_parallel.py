"""Data-parallel tracing, evaluation and calibration under torchrun, merged exactly.

Every rank builds the same batch plan as a single process would and runs batches ``rank, rank + n, …``; the
shares are gathered and merged in the single-process order (traces by (document, position), losses by
window, calibration statistics folded batch by batch). Each batch is the same tensor either way, so the
merged result equals the single-process result bit for bit when every process uses the same number of threads
(torchrun sets ``OMP_NUM_THREADS=1`` per rank; compare with ``OMP_NUM_THREADS=1 moekit ...``). All ranks
return the merged result; the CLI writes on rank 0 only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from moekit.compress.observer import CalibStats, batches_of, calibration_windows, observe_batches
from moekit.distributed.runtime import World, all_gather_arrays, all_gather_bytes
from moekit.errors import MoekitError
from moekit.eval import WindowLosses, aggregate_windows, window_losses
from moekit.models.loading import LoadedModel
from moekit.routing.tracing import trace_documents
from moekit.trace import RoutingTrace

_TRACE_FIELDS = ("ids", "weights", "probs", "token_ids", "doc", "pos", "domain")


def is_sharded(lm: LoadedModel) -> bool:
    """Whether ``lm`` was placed over the ranks by transformers (its forward then involves every rank)."""
    return getattr(lm.model.config, "distributed_config", None) is not None


def load_expert_parallel(spec: str, world: World, dtype=None) -> LoadedModel:
    """Load ``spec`` with transformers' expert parallelism over all ranks: each rank holds E/R experts of every
    MoE layer (``DistributedConfig(ep_size=R, fsdp_size=R)``: the batch is data parallel, tokens reach their
    experts by all-to-all, the rest of the model is FSDP-sharded). ``route`` and ``record`` work unchanged."""
    import torch
    from transformers.distributed import DistributedConfig

    from moekit.models.loading import load

    lm = load(spec, dtype=dtype or torch.float32,
              distributed_config=DistributedConfig(fsdp_size=world.size, ep_size=world.size))
    bad = [v.index for v in lm.moe if v.num_experts % world.size]
    if bad:
        raise MoekitError(f"{world.size} ranks do not divide the {lm.moe.layers[0].num_experts} experts of layer {bad[0]}")
    return lm


def check_same_work(world: World, *what) -> None:
    """Every rank must split the same work (same model, data and options): compare a digest across ranks."""
    import hashlib

    digest = hashlib.sha256(json.dumps([repr(w) for w in what]).encode()).hexdigest().encode()
    seen = all_gather_bytes(digest, world)
    if len(set(seen)) > 1:
        bad = [r for r, d in enumerate(seen) if d != seen[0]]
        raise MoekitError(f"ranks {bad} were given other data or options than rank 0; every rank must run the "
                          "same command")


def trace_documents_dp(lm: LoadedModel, docs: Sequence, world: World, max_tokens: int | None = None,
                       seq_len: int = 512, batch_size: int = 8, fields: Sequence[str] = ("ids", "weights"),
                       progress: bool = True) -> RoutingTrace:
    """``trace_documents`` split over the ranks of ``world``; every rank gets the whole merged trace.

    Works on a replicated model and on one sharded over the ranks (``load_expert_parallel``): ranks then run
    the same number of forwards."""
    check_same_work(world, lm.name, [d.text for d in docs], max_tokens, seq_len, batch_size, list(fields))
    share = trace_documents(lm, docs, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                            fields=fields, progress=progress and world.is_main, part=world.part,
                            lockstep=is_sharded(lm))
    arrays = {k: np.asarray(getattr(share, k)) for k in _TRACE_FIELDS if getattr(share, k) is not None}
    parts = []
    for got, meta in all_gather_arrays(arrays, world, {"meta": json.dumps(share.meta)}):
        parts.append(RoutingTrace(meta=json.loads(meta["meta"]), **got))
    return RoutingTrace.merge(parts)


def window_losses_dp(lm: LoadedModel, docs: Sequence, world: World, max_tokens: int | None = None,
                     batch_size: int = 8, seq_len: int = 256, progress: bool = True) -> WindowLosses:
    """Every window's loss, the windows split over the ranks and gathered on all of them."""
    check_same_work(world, lm.name, [getattr(d, "text", d) for d in docs], max_tokens, batch_size, seq_len)
    mine = window_losses(lm, docs, max_tokens, batch_size, seq_len, progress and world.is_main, part=world.part,
                         lockstep=is_sharded(lm))
    merged = WindowLosses(mine.doc, np.zeros_like(mine.nll), np.zeros_like(mine.n), np.zeros_like(mine.done))
    for got, _ in all_gather_arrays({"nll": mine.nll, "n": mine.n, "done": mine.done.astype(np.uint8)}, world):
        done = got["done"].astype(bool)
        if (done & merged.done).any():
            raise MoekitError("internal error: two ranks evaluated the same window")
        merged.nll[done], merged.n[done], merged.done[done] = got["nll"][done], got["n"][done], True
    return merged


def perplexity_dp(lm: LoadedModel, docs: Sequence, world: World, max_tokens: int | None = None,
                  batch_size: int = 8, seq_len: int = 256, progress: bool = True) -> dict:
    """``moekit.eval.perplexity`` with the batches split over the ranks; the same result on every rank."""
    losses = window_losses_dp(lm, docs, world, max_tokens, batch_size, seq_len, progress)
    return aggregate_windows(lm.name, docs, losses)


def observe_dp(lm: LoadedModel, docs: Sequence, world: World, seq_len: int = 256, max_tokens: int | None = None,
               batch_size: int = 8, progress: bool = False) -> CalibStats:
    """Calibration statistics (``compress.observer.observe``) with the batches split over the ranks, folded in
    batch order so that they equal the single-process statistics exactly."""
    from moekit.compress.writer import data_hash

    windows = calibration_windows(lm, docs, seq_len, max_tokens)
    check_same_work(world, lm.name, windows, batch_size)
    batches = batches_of(windows, batch_size)
    mine = list(range(len(batches)))[world.rank::world.size]
    arrays: dict[str, np.ndarray] = {"batches": np.array(mine, np.int64)}
    for b in mine:
        stats = observe_batches(lm, [batches[b]], progress=False)
        arrays |= {f"b{b}/{k}": v for k, v in stats.to_arrays().items()}
    if is_sharded(lm):
        for _ in range(-(-len(batches) // world.size) - len(mine)):  # sharded forwards are collectives
            lm.model(input_ids=batches[0]["input_ids"][:1, :1], use_cache=False)
    per_batch: dict[int, CalibStats] = {}
    for got, _ in all_gather_arrays(arrays, world):
        for b in got["batches"].tolist():
            prefix = f"b{b}/"
            per_batch[b] = CalibStats.from_arrays({k[len(prefix):]: v for k, v in got.items() if k.startswith(prefix)})
    if sorted(per_batch) != list(range(len(batches))):
        raise MoekitError("internal error: calibration batches missing after gathering")
    folded = CalibStats.fold([per_batch[b] for b in range(len(batches))])
    folded.data_hash = data_hash(windows)
    return folded
