"""``demo_step``: one offloaded generation with its cache statistics, for ``moekit demo``."""

from __future__ import annotations

import time
from typing import Any

from moekit.models.loading import LoadedModel


def demo_step(lm: LoadedModel, prompt: str = "The expert cache", max_new_tokens: int = 24) -> dict[str, Any]:
    """Generate greedily with half of each layer's experts cached (LRU + prefetch) and compare with
    the fully loaded model: returns the text, whether the tokens match, and the cache statistics."""
    from moekit.generation import generate
    from moekit.serve.engine import offload
    from moekit.serve.store import TensorStore

    ids = prompt if lm.tokenizer is not None else [1, 2, 3, 4]
    full = generate(lm, ids, max_new_tokens=max_new_tokens)
    k = max(v.top_k for v in lm.moe)
    slots = max(k, min(2 * k, max(v.num_experts for v in lm.moe) // 2))
    t0 = time.perf_counter()
    with offload(lm, slots=slots, policy="lru+prefetch", store=TensorStore.from_model(lm)) as engine:
        res = generate(lm, ids, max_new_tokens=max_new_tokens)
        stats = engine.stats()
    return {
        "prompt": prompt, "text": res.text, "tokens": len(res.token_ids), "exact": res.token_ids == full.token_ids,
        "seconds": round(time.perf_counter() - t0, 3), "slots_per_layer": slots,
        "hit_rate": stats["hit_rate"], "misses": stats["misses"],
        "prefetch_precision": stats.get("prefetch", {}).get("precision"),
        "predictor_recall": stats.get("prefetch", {}).get("predictor_recall"),
        "miss_ratio_to_belady": stats.get("belady", {}).get("miss_ratio_to_belady"), "stats": stats,
    }
