"""Trace whole documents: tokenize, cut into windows, batch, record, label with document and domain."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moekit.data.batching import Window, length_sorted_batches, pad_batch, text_windows
from moekit.errors import MoekitError
from moekit.models.compat import last_logits_kwargs
from moekit.models.loading import LoadedModel
from moekit.routing.record import record
from moekit.trace import RoutingTrace


def tokenize_windows(lm: LoadedModel, docs: Sequence, seq_len: int, max_tokens: int | None = None) -> list[Window]:
    """Token windows ``(doc, start, ids)`` of at most ``seq_len`` tokens, up to ``max_tokens`` in all
    (``moekit.data.batching.token_windows`` with the model's tokenizer)."""
    if lm.tokenizer is None:
        raise MoekitError(f"{lm.name} has no tokenizer; tracing text needs one")
    return text_windows(lm.tokenizer, docs, seq_len, max_tokens)


@torch.no_grad()
def trace_documents(
    lm: LoadedModel,
    docs: Sequence,
    max_tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    fields: Sequence[str] = ("ids", "weights"),
    progress: bool = True,
    part: tuple[int, int] | None = None,
    lockstep: bool = False,
) -> RoutingTrace:
    """Record routing over ``docs`` (objects with ``text`` and ``domain``); one trace document per doc.

    ``part=(i, n)`` runs only batches ``b`` with ``b mod n == i`` of the same batch plan and returns that share
    (document indices and positions global); ``RoutingTrace.merge`` of all n shares is the whole trace, byte
    for byte, since every batch is the same tensor either way (data-parallel tracing). ``lockstep``: every part
    runs as many forwards as the largest one (unrecorded one-token forwards fill in), which a model sharded
    over the ranks (its forward is a collective) needs.
    """
    from rich.progress import Progress

    windows = tokenize_windows(lm, docs, seq_len, max_tokens)
    if not windows:
        raise MoekitError("no tokens to trace: the documents are empty")
    # longest first keeps padding small; the trace is re-sorted by (document, position) at the end
    batches = length_sorted_batches([len(w.ids) for w in windows], batch_size)
    fill = 0
    if part is not None:
        rank, size = part
        fill = -(-len(batches) // size) - len(batches[rank::size]) if lockstep else 0
        batches = batches[rank::size]
    run = [i for batch in batches for i in batch]
    names: list[str] = []
    for d in docs:
        if getattr(d, "domain", None) and d.domain not in names:
            names.append(d.domain)
    with record(lm, fields=fields) as rec, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tracing", total=sum(len(windows[i].ids) for i in run))
        for batch_windows in batches:
            batch = pad_batch([windows[i].ids for i in batch_windows])
            # routing only: no [batch, seq, vocab] logits (issue 13)
            lm.model(**{k: v.to(lm.device) for k, v in batch.items()}, **last_logits_kwargs(lm.model))
            bar.advance(task, int(batch["attention_mask"].sum()))
    for _ in range(fill):
        lm.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=lm.device))
    if not run:  # this part got no batch: an empty share
        num_layers = len(lm.moe)
        return RoutingTrace(
            ids=np.zeros((num_layers, 0, 1), np.int16), weights=np.zeros((num_layers, 0, 1), np.float32),
            probs=np.zeros((num_layers, 0, lm.moe.layers[0].num_experts), np.float16) if "probs" in fields else None,
            token_ids=np.zeros(0, np.int32), doc=np.zeros(0, np.int32), pos=np.zeros(0, np.int32),
            domain=np.zeros(0, np.int16), meta=dict(rec.metadata(), domains=names, seq_len=seq_len))
    trace = rec.trace
    meta = dict(trace.meta, domains=names, seq_len=seq_len)
    row_window = np.array(run)  # trace doc r (a batch row, in run order) is window run[r]
    win_doc = np.array([w.doc for w in windows])[row_window]
    win_start = np.array([w.start for w in windows])[row_window]
    doc = win_doc[trace.doc]
    pos = win_start[trace.doc] + trace.pos
    doc_dom = np.array([names.index(d.domain) if getattr(d, "domain", None) else -1 for d in docs], dtype=np.int16)
    perm = np.lexsort((pos, doc))
    return RoutingTrace(
        ids=trace.ids[:, perm], weights=trace.weights[:, perm],
        probs=None if trace.probs is None else trace.probs[:, perm],
        token_ids=trace.token_ids[perm], doc=doc[perm].astype(np.int32), pos=pos[perm].astype(np.int32),
        domain=doc_dom[doc[perm]], meta=meta,
    )
