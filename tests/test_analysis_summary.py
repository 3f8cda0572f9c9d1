"""``summarize`` on small traces: JSON-serialisable, optional parts left out, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.analysis import cache_curves, summarize
from moekit.errors import MoekitError
from moekit.trace import RoutingTrace


def make_trace(n_layers=3, n=96, e=8, k=2, probs=True, domains=True, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(n)]) for _ in range(n_layers)])
    p = rng.dirichlet(np.ones(e), size=(n_layers, n)).astype(np.float16) if probs else None
    doc = np.repeat(np.arange(n // 32), 32).astype(np.int32)
    meta = {"model": "toy", "num_experts": e, "top_k": k, "layers": [1, 2, 4]}
    dom = None
    if domains:
        meta["domains"] = ["a", "b"]
        dom = (doc % 2).astype(np.int16)
    return RoutingTrace(ids=ids.astype(np.int16), weights=np.ones(ids.shape, np.float32), probs=p,
                        token_ids=rng.integers(0, 100, n).astype(np.int32), doc=doc,
                        pos=np.tile(np.arange(32), n // 32).astype(np.int32), domain=dom, meta=meta)


def test_summarize_full_is_json():
    s = summarize(make_trace(), sch_seg_lens=(4,))
    text = json.dumps(s, allow_nan=False)  # NaN would have been turned into null
    assert json.loads(text)["model"]["layers"] == [1, 2, 4]
    assert s["coactivation"]["layer"] == 2 and s["affinity"]["next_layer"] == 4
    assert len(s["domains"]["layers"]) == 3
    # dynamic k, counted token by token: experts kept until the sorted mass first exceeds p
    tr = make_trace()
    dk = s["dynamic_k"]
    assert dk["ps"] == [0.5, 0.8, 0.9]
    for i, p in enumerate(dk["ps"]):
        for layer in range(3):
            need = []
            for row in tr.probs[layer].astype(np.float64):
                cs = np.cumsum(np.sort(row)[::-1])
                need.append(min(int(np.argmax(cs > p)) + 1 if (cs > p).any() else 8, 8))
            need = np.array(need)
            assert dk["mean"][i][layer] == pytest.approx(need.mean(), rel=1e-12)
            # per domain (tokens of even documents are domain a): the labels reach the profile
            for d in range(2):
                assert dk["by_domain"][i][d][layer] == pytest.approx(need[tr.domain == d].mean(), rel=1e-12)
    assert s["srp"]["seg_lens"] == [4, 16, 64, 256]
    assert s["srp"]["model"][3] is None  # documents of 32 tokens have no window of 256
    assert s["cache"]["capacities"] == [2, 3, 4, 6, 8]
    lay = s["cache"]["layer"]
    assert all(b >= x for b, x in zip(lay["belady"]["hits"], lay["lru"]["hits"], strict=True))


def test_summarize_without_domains_or_probs():
    s = summarize(make_trace(probs=False, domains=False), sch_seg_lens=(), cache=False)
    assert s["domains"] is None and s["dynamic_k"] is None and s["cache"] is None and s["sch"] is None


def test_empty_trace_is_an_error():
    tr = make_trace(n=32)
    empty = tr.select_tokens(np.zeros(32, dtype=bool))
    with pytest.raises(MoekitError):
        summarize(empty)
    with pytest.raises(MoekitError):
        cache_curves(empty)


def test_analysis_sources_never_import_torch_or_models():
    import pathlib

    import moekit.analysis as pkg

    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "moekit.models" not in text, path.name
