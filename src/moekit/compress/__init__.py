"""Compression: prune, merge and quantize experts into checkpoints that load anywhere (design §5)."""

from moekit.compress.criteria import CRITERIA, scores, select_kept, super_experts
from moekit.compress.merge import MERGERS
from moekit.compress.observer import CalibStats, LayerStats, observe, observe_batches
from moekit.compress.prune import PruneResult, choose, prune
from moekit.compress.writer import pruned_experts, pruned_model, write_pruned


def demo_step(lm, ratio: float = 0.25, method: str = "reap", max_tokens: int = 4096) -> dict:
    """REAP at 25% on ``lm`` (a bundled model): perplexity on held-out text before and after (in memory)."""
    from moekit.compress.demo import demo_step as _demo

    return _demo(lm, ratio=ratio, method=method, max_tokens=max_tokens)


__all__ = ["CRITERIA", "MERGERS", "CalibStats", "LayerStats", "PruneResult", "choose", "demo_step", "observe",
           "observe_batches", "prune", "pruned_experts", "pruned_model", "scores", "select_kept", "super_experts",
           "write_pruned"]
