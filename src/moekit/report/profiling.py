"""Super-expert profiling (the model-side half of design §5; the detector is
``moekit.analysis.super_experts.detect_super_experts``).

Source: Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models": record
max |down_proj output| per routed expert over calibration text, then check that zeroing the detected
experts hurts perplexity far more than zeroing as many random experts.

``profile_expert_max`` hooks each MoE layer's experts module with a forward pre-hook, takes the
inputs it is about to receive (hidden states, top-k indices, top-k weights) and runs the expert-output
probe on them (``moekit.models.probe.expert_outputs``, as calibration does): the experts module once per
routed expert on that expert's tokens with one-hot routing and unit weight, so the output is exactly the
expert's own down_proj output (biases included, e.g. GPT-OSS), whatever the layout.  Padding positions are excluded.

Only the experts' inputs are needed, so the forward asks for the last position's logits alone
(``logits_to_keep=1``): the pass never holds ``[batch, seq, vocab]`` logits, which dominate its memory on
large-vocabulary models (issue 13: ``report --max-memory``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from moekit.errors import MoekitError
from moekit.experts import ExpertRef
from moekit.models.compat import last_logits_kwargs
from moekit.models.probe import expert_outputs


def _call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top-k index [T, K]) from the experts module's call."""
    vals = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    if len(vals) < 2:
        raise MoekitError("cannot read the experts module's inputs (expected hidden states and top-k indices)")
    return vals[0], vals[1]


def _expert_maxima(experts: torch.nn.Module, num_experts: int, hidden: torch.Tensor, index: torch.Tensor,
                   keep: torch.Tensor | None) -> np.ndarray:
    """``[E]`` max |output| of each expert over the tokens routed to it (NaN: no token)."""
    out = np.full(num_experts, np.nan)
    h = hidden.reshape(-1, hidden.shape[-1])
    idx = index.reshape(h.shape[0], -1)
    if keep is not None and keep.numel() == h.shape[0]:
        h, idx = h[keep], idx[keep]
    for e, _, y in expert_outputs(experts, num_experts, h, idx):
        out[e] = float(y.abs().max())
    return out


@torch.no_grad()
def profile_expert_max(lm: Any, docs: Sequence, max_tokens: int | None = 8192, seq_len: int = 256,
                       batch_size: int = 8) -> np.ndarray:
    """``[L, E]`` max |down_proj output| per (MoE layer position, routed expert) over ``docs``.

    ``docs`` are documents (objects with ``text``); at most ``max_tokens`` tokens are run, ``batch_size``
    windows per forward (fewer under ``moekit.load(max_memory=)``'s activation share).  An expert that
    received no token gets NaN."""
    from moekit.data.batching import length_sorted_batches, pad_batch
    from moekit.models.loading import windows_per_forward
    from moekit.routing.tracing import tokenize_windows

    windows = tokenize_windows(lm, docs, seq_len, max_tokens)
    if not windows:
        raise MoekitError("no tokens to profile: the documents are empty")
    batch_size = windows_per_forward(lm, seq_len, batch_size)  # fewer per forward under a memory budget
    views = list(lm.moe)
    e_max = max(v.num_experts for v in views)
    maxima = np.full((len(views), e_max), np.nan)
    state: dict[str, Any] = {"keep": None, "busy": False}
    handles = []

    def make_hook(pos: int, view: Any):
        def pre_hook(module, args, kwargs):
            if state["busy"]:
                return None
            hidden, index = _call_args(args, kwargs)
            state["busy"] = True
            try:
                m = _expert_maxima(module, view.num_experts, hidden, index, state["keep"])
            finally:
                state["busy"] = False
            row = maxima[pos, : view.num_experts]
            maxima[pos, : view.num_experts] = np.fmax(row, m)
            return None

        return pre_hook

    for pos, view in enumerate(views):
        handles.append(view.experts.register_forward_pre_hook(make_hook(pos, view), with_kwargs=True))
    extra = last_logits_kwargs(lm.model)
    try:
        for b in length_sorted_batches([len(w.ids) for w in windows], batch_size):
            batch = pad_batch([windows[i].ids for i in b])
            state["keep"] = batch["attention_mask"].reshape(-1).bool().to(lm.device)
            lm.model(**{k: v.to(lm.device) for k, v in batch.items()}, use_cache=False, **extra)
    finally:
        for h in handles:
            h.remove()
        state["keep"] = None
    return maxima


def super_expert_check(
    lm: Any,
    docs: Sequence,
    experts: Iterable[ExpertRef],
    seeds: Sequence[int] = (0, 1, 2),
    max_tokens: int | None = 4096,
    seq_len: int = 256,
) -> dict[str, Any]:
    """Perplexity with ``experts`` (refs or anything ``ExpertRef.coerce`` reads) zeroed vs as many random experts.

    Zeroing uses ``moekit.route(lm, scale={(l, e): 0.0})``: the expert stays selected but its output
    is multiplied by 0 (the paper's zeroed down_proj).  Random experts are drawn uniformly without
    replacement from all routed experts not in ``experts``, once per seed.  Returns ``baseline``,
    ``zeroed`` (perplexity), ``random`` (one per seed), ``random_sets`` and ``ratio`` (zeroed /
    mean random)."""
    from moekit.eval import perplexity
    from moekit.routing import route

    experts = [ExpertRef.coerce(x) for x in experts]
    if not experts:
        raise MoekitError("super_expert_check needs at least one expert to zero")

    def ppl(scale: dict | None) -> float:
        if scale:
            with route(lm, scale=scale):
                return float(perplexity(lm, docs, max_tokens=max_tokens, seq_len=seq_len, progress=False)["perplexity"])
        return float(perplexity(lm, docs, max_tokens=max_tokens, seq_len=seq_len, progress=False)["perplexity"])

    pool = [r for r in lm.moe.all_experts() if r not in set(experts)]
    if len(pool) < len(experts):
        raise MoekitError("not enough other experts to draw a random control set")
    base = ppl(None)
    zeroed = ppl({x: 0.0 for x in experts})
    rand, sets = [], []
    for s in seeds:
        pick = np.random.default_rng(s).choice(len(pool), size=len(experts), replace=False)
        chosen = [pool[i] for i in sorted(pick.tolist())]
        sets.append([str(x) for x in chosen])
        rand.append(ppl({x: 0.0 for x in chosen}))
    mean_rand = float(np.mean(rand))
    return {"experts": [str(x) for x in experts], "baseline": base, "zeroed": zeroed, "random": rand,
            "random_sets": sets, "seeds": list(seeds), "ratio": zeroed / mean_rand if mean_rand else float("nan")}
