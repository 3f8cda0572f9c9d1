"""Token windows and length-sorted batches are written once (moekit.data.batching); every pass over text
(trace, calibration, super-expert profiling, perplexity, adapter training) cuts the same windows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moekit.adapters.train import token_windows as adapter_windows
from moekit.compress.observer import batches_of, calibration_windows
from moekit.data import load_corpus
from moekit.data.batching import (
    document_windows,
    length_sorted_batches,
    pad_batch,
    text_windows,
    token_windows,
)
from moekit.errors import MoekitError
from moekit.eval import window_losses
from moekit.routing.tracing import tokenize_windows, trace_documents


def _old_trace_windows(token_lists, seq_len, max_tokens):
    """The windowing trace, calibration and profiling each had (routing/tracing.py before the move)."""
    windows, total = [], 0
    for d, ids in enumerate(token_lists):
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len]
            if max_tokens is not None:
                chunk = chunk[: max_tokens - total]
            if chunk:
                windows.append((d, start, chunk))
                total += len(chunk)
            if max_tokens is not None and total >= max_tokens:
                return windows
    return windows


def _old_perplexity_windows(token_lists, seq_len, max_tokens):
    """Perplexity's own windowing before the move (overlap one token, budget in predicted tokens)."""
    out, budget = [], max_tokens if max_tokens is not None else float("inf")
    for i, ids in enumerate(token_lists):
        for s in range(0, max(len(ids) - 1, 0), seq_len - 1):
            w = list(ids[s:s + seq_len])
            if budget <= 0:
                return out
            if len(w) - 1 > budget:
                w = w[: int(budget) + 1]
            out.append((i, s, w))
            budget -= len(w) - 1
    return out


def test_token_windows_equal_the_old_windowing_of_every_caller():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 100, n)) for n in (0, 1, 2, 7, 16, 17, 33, 5)]
    for seq_len, max_tokens in itertools.product((2, 3, 8, 16), (None, 0, 1, 9, 16, 40, 1000)):
        got = [tuple(w) for w in token_windows(docs, seq_len, max_tokens)]
        assert got == _old_trace_windows(docs, seq_len, max_tokens), (seq_len, max_tokens)
        got = [tuple(w) for w in token_windows(docs, seq_len, max_tokens, overlap=1)]
        assert got == _old_perplexity_windows(docs, seq_len, max_tokens), (seq_len, max_tokens)


def test_windows_read_documents_lazily_up_to_the_budget():
    read = []

    def docs():
        for i in range(100):
            read.append(i)
            yield list(range(10))

    assert sum(len(w.ids) for w in token_windows(docs(), 4, max_tokens=25)) == 25
    assert read == [0, 1, 2]  # the third document completes the budget; no fourth is tokenized


def test_document_windows_and_bad_seq_len():
    assert document_windows(list(range(40)), 16) == [list(range(0, 16)), list(range(15, 31)), list(range(30, 40))]
    with pytest.raises(MoekitError, match="seq_len must be at least 2"):
        token_windows([[1, 2, 3]], 1, overlap=1)
    with pytest.raises(MoekitError, match="seq_len must be at least 1"):
        token_windows([[1, 2, 3]], 0)


def test_length_sorted_batches_longest_first_and_stable():
    assert length_sorted_batches([3, 5, 5, 1, 4], 2) == [[1, 2], [4, 0], [3]]
    assert length_sorted_batches([], 4) == []


def test_callers_cut_the_same_windows(bundled_tiny):
    lm = bundled_tiny
    docs = load_corpus("validation")[:12]
    seq_len, budget = 24, 300
    windows = text_windows(lm.tokenizer, docs, seq_len, budget)
    assert sum(len(w.ids) for w in windows) == budget
    # trace, calibration (and the super-expert profiler, which calls tokenize_windows) use these windows
    assert tokenize_windows(lm, docs, seq_len, budget) == windows
    calib = calibration_windows(lm, docs, seq_len, budget)
    assert calib == [w.ids for w in windows]
    # calibration batches: the windows longest first, padded
    batches = batches_of(calib, 4)
    order = length_sorted_batches([len(w) for w in calib], 4)
    for b, idx in zip(batches, order, strict=True):
        want = pad_batch([calib[i] for i in idx])
        assert all(b[k].equal(want[k]) for k in ("input_ids", "attention_mask"))
    # the trace holds exactly these tokens at these positions
    trace = trace_documents(lm, docs, max_tokens=budget, seq_len=seq_len, batch_size=4, progress=False)
    assert trace.token_ids.tolist() == [t for w in windows for t in w.ids]
    assert trace.doc.tolist() == [w.doc for w in windows for _ in w.ids]
    assert trace.pos.tolist() == [w.start + i for w in windows for i in range(len(w.ids))]
    # perplexity and adapter training: the same documents with one token of overlap
    ppl_windows = text_windows(lm.tokenizer, docs, seq_len, budget, overlap=1)
    losses = window_losses(lm, docs, max_tokens=budget, seq_len=seq_len, progress=False)
    assert losses.doc.tolist() == [w.doc for w in ppl_windows]
    assert losses.n.tolist() == [len(w.ids) - 1 for w in ppl_windows]
    assert adapter_windows(lm.tokenizer, docs, seq_len) == [w.ids for w in text_windows(lm.tokenizer, docs, seq_len,
                                                                                         overlap=1)]
