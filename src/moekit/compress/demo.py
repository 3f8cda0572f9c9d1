"""Small helpers for demos and benchmarks: domain-balanced document samples and the demo's compression step."""

from __future__ import annotations

import time
from collections.abc import Sequence

from moekit.models.loading import LoadedModel


def balanced_docs(split: str, max_tokens_per_domain: int | None = None, tokenizer=None,
                  domains: Sequence[str] | None = None, max_docs_per_domain: int | None = None) -> list:
    """Documents of a bundled split, at most ``max_docs_per_domain`` / about ``max_tokens_per_domain``
    tokens per domain (whole documents, in corpus order), interleaved across domains."""
    from moekit.data import load_corpus
    from moekit.data.corpus import interleave_domains

    by: dict[str, list] = {}
    used: dict[str, int] = {}
    for d in load_corpus(split):
        if domains is not None and d.domain not in domains:
            continue
        lst = by.setdefault(d.domain, [])
        if max_docs_per_domain is not None and len(lst) >= max_docs_per_domain:
            continue
        if max_tokens_per_domain is not None:
            if used.get(d.domain, 0) >= max_tokens_per_domain:
                continue
            used[d.domain] = used.get(d.domain, 0) + len(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        lst.append(d)
    return interleave_domains([d for docs in by.values() for d in docs])


def demo_step(lm: LoadedModel, ratio: float = 0.25, method: str = "reap", max_tokens: int = 4096) -> dict:
    """Prune ``lm`` in memory with ``method`` at ``ratio`` (calibrated on the bundled validation split) and
    return held-out (test split) perplexity before and after, with timings."""
    import torch

    from moekit.compress.observer import observe
    from moekit.compress.prune import choose
    from moekit.compress.writer import pruned_model
    from moekit.eval import perplexity
    from moekit.models.loading import from_model

    t0 = time.perf_counter()
    per_domain = max(256, max_tokens // 6)
    calib = balanced_docs("validation", per_domain, lm.tokenizer)
    test = balanced_docs("test", per_domain, lm.tokenizer)
    with torch.no_grad():
        before = perplexity(lm, test, max_tokens=max_tokens, progress=False)
        stats = observe(lm, calib, max_tokens=max_tokens)
        res = choose(lm, stats, method, ratio)
        model, _ = pruned_model(lm, res.kept)
        small = from_model(model, lm.tokenizer, name=f"{lm.name} {method} {int(ratio * 100)}%")
        after = perplexity(small, test, max_tokens=max_tokens, progress=False)
    experts_before = sum(v.num_experts for v in lm.moe)
    params_before = sum(p.numel() for p in lm.model.parameters())
    params_after = sum(p.numel() for p in model.parameters())
    return {"method": method, "ratio": ratio, "experts_before": experts_before, "experts_after": res.num_kept,
            "params_before": params_before, "params_after": params_after,
            "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "by_domain_before": {k: v["perplexity"] for k, v in before["by_domain"].items()},
            "by_domain_after": {k: v["perplexity"] for k, v in after["by_domain"].items()},
            "eval_tokens": before["tokens"], "calibration_tokens": stats.tokens,
            "seconds": time.perf_counter() - t0}
