"""Expert pruning: score experts on calibration text, keep the best under a budget, write a checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.compress.criteria import (
    CRITERIA,
    check_ratio,
    needs_calibration,
    scores,
    select_kept,
    super_experts,
)
from moekit.compress.observer import CalibStats, observe
from moekit.compress.writer import pruned_experts, write_pruned
from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.models.loading import LoadedModel


@dataclass
class PruneResult:
    """What pruning decided (and where it wrote, if it did)."""

    method: str
    ratio: float
    kept: dict[int, list[int]]
    scores: dict[int, np.ndarray]
    protected: ExpertSet = field(default_factory=ExpertSet)
    global_budget: bool = False
    out: Path | None = None
    calib_hash: str | None = None
    calib_tokens: int = 0

    @property
    def num_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())

    def summary(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "global": self.global_budget,
                "kept_per_layer": {str(k): len(v) for k, v in self.kept.items()}, "experts_kept": self.num_kept,
                "protected": self.protected.to_list(), "out": str(self.out) if self.out else None,
                "calibration_tokens": self.calib_tokens, "calibration_data_sha256": self.calib_hash}


def check_ratio_for_model(lm: LoadedModel, ratio: float, global_budget: bool = False) -> None:
    """Errors early (before calibration) for ratios that leave fewer experts than top-k (``check_ratio``)."""
    check_ratio({v.index: (v.num_experts, v.top_k) for v in lm.moe}, ratio, global_budget)


def choose(lm: LoadedModel, stats: CalibStats | None, method: str, ratio: float, global_budget: bool = False,
           protect_super: bool = False, seed: int = 0, protect: Iterable[ExpertRef] = ()) -> PruneResult:
    """Score and select (no writing). ``stats`` may be None only for ``random`` without super-expert
    protection. ``protect``: experts always kept (with ``protect_super``, the super experts too)."""
    CRITERIA.get(method)
    check_ratio_for_model(lm, ratio, global_budget)
    protect = ExpertSet(protect).check(lm.moe)
    if stats is None:
        if needs_calibration(method, protect_super):
            raise MoekitError(f"criterion {method!r} needs calibration data")
        from moekit.compress.observer import LayerStats

        stats = CalibStats({v.index: LayerStats(v.index, v.num_experts, v.top_k) for v in lm.moe}, tokens=0)
    s = scores(stats, method, seed)
    protected = protect | super_experts(stats, lm.moe) if protect_super else protect
    kept = select_kept(s, ratio, {v.index: v.top_k for v in lm.moe}, global_budget, protected)
    return PruneResult(method, ratio, kept, s, protected, global_budget, calib_hash=stats.data_hash,
                       calib_tokens=stats.tokens)


def prune(lm: LoadedModel, method: str, ratio: float, calib: CalibStats | Sequence | None = None,
          out: str | Path | None = None, force: bool = False, global_budget: bool = False,
          protect_super: bool = False, seed: int = 0, seq_len: int = 256, max_tokens: int | None = None,
          progress: bool = False, protect: Iterable[ExpertRef] = ()) -> PruneResult:
    """Prune ``lm``'s experts by ``method`` at ``ratio``; write a checkpoint to ``out`` when given.

    ``calib`` is precomputed ``CalibStats`` or documents (``moekit.data.read_documents``); ``protect``:
    experts never removed (an ``ExpertSet``, e.g. ``ExpertSet.load("experts.json")``).
    """
    CRITERIA.get(method)
    check_ratio_for_model(lm, ratio, global_budget)
    ExpertSet(protect).check(lm.moe)  # before the calibration pass
    if out is not None:
        from moekit.io import check_writable

        check_writable(out, force)
    stats = calib
    if calib is not None and not isinstance(calib, CalibStats):
        stats = observe(lm, calib, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
    res = choose(lm, stats, method, ratio, global_budget, protect_super, seed, protect)
    if out is not None:
        res.out = write_pruned(lm, res.kept, out, force=force, method=method, ratio=ratio, calib_hash=res.calib_hash,
                               global_budget=global_budget, protected=res.protected.to_list(), seed=seed,
                               calibration_tokens=res.calib_tokens)
    return res


__all__ = ["PruneResult", "choose", "prune", "pruned_experts"]
