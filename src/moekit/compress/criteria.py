"""Pruning criteria (a registry) and the choice of experts to keep under a budget.

A criterion maps one layer's calibration statistics to a score per expert; higher = keep.
Definitions (design §5; g = the routing weight the architecture uses, f_j the expert output, S_j the
calibration tokens routed to j):

- ``random``: uniform scores from a seeded generator (seed, layer);
- ``frequency``: |S_j|;  ``gate-sum``: Σ_{S_j} g_j;
- ``ean``: mean_{S_j} ‖f_j‖;  ``reap``: mean_{S_j} g_j‖f_j‖ (Cerebras REAP);
- ``easy-ep``: Σ_{S_j} g_j‖f_j‖·max(0, 1 − cos(h, h + moe_out)) (EASY-EP; calibrate it on a few
  demonstrations of the target domain).

Experts never routed on the calibration data score 0 (random excepted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from moekit.analysis.super_experts import detect_super_experts
from moekit.compress.observer import CalibStats, LayerStats
from moekit.compress.writer import n_drop
from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.models.moe_map import MoEMap
from moekit.registry import Registry

Criterion = Callable[[LayerStats, int], np.ndarray]
CRITERIA: Registry[Criterion] = Registry("pruning criterion")


def experts_kept(num_experts: int, top_k: int, ratio: float, layer: int) -> int:
    """Experts a layer of ``num_experts`` keeps at ``ratio``; a clear error when that is fewer than its top-k
    (the one check prune, merge and their low-memory variants share)."""
    keep = num_experts - n_drop(num_experts, ratio)
    if keep < top_k:
        raise MoekitError(f"ratio {ratio} leaves {keep} experts in layer {layer}, fewer than top-k = {top_k}")
    return keep


def check_ratio(layers: Mapping[int, tuple[int, int]], ratio: float, global_budget: bool = False) -> None:
    """Errors early (before calibration) for a ratio that leaves fewer experts than top-k: per layer, or in all
    under a global budget. ``layers`` maps each MoE layer's index to its ``(num_experts, top_k)``."""
    if not global_budget:
        for li, (num_experts, top_k) in layers.items():
            experts_kept(num_experts, top_k, ratio, li)
        return
    total = sum(e for e, _ in layers.values())
    if total - n_drop(total, ratio) < sum(k for _, k in layers.values()):
        raise MoekitError(f"ratio {ratio} leaves fewer experts in all than top-k per layer")


@CRITERIA.register("random", help="uniform random scores (seeded by --seed and the layer): the baseline")
def _random(st: LayerStats, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, st.index]).random(st.num_experts)


@CRITERIA.register("frequency", help="tokens routed to the expert on the calibration data", needs=["calibration"])
def _frequency(st: LayerStats, seed: int = 0) -> np.ndarray:
    return st.count.astype(np.float64).copy()


@CRITERIA.register("gate-sum", help="sum of the expert's routing weights on the calibration data", needs=["calibration"])
def _gate_sum(st: LayerStats, seed: int = 0) -> np.ndarray:
    return st.gate_sum.copy()


@CRITERIA.register("ean", help="EAN: mean norm of the expert's output over its tokens", needs=["calibration"])
def _ean(st: LayerStats, seed: int = 0) -> np.ndarray:
    return st.mean("norm_sum")


@CRITERIA.register("reap", help="REAP: mean routing weight × output norm over the expert's tokens (Cerebras)",
                   needs=["calibration"])
def _reap(st: LayerStats, seed: int = 0) -> np.ndarray:
    return st.mean("reap_sum")


@CRITERIA.register("easy-ep", help="EASY-EP: weight × output norm × how much the layer changes the token; "
                   "calibrate on a few demonstrations of the target domain", needs=["calibration"])
def _easy_ep(st: LayerStats, seed: int = 0) -> np.ndarray:
    return st.easy_sum.copy()


def needs_calibration(method: str, protect_super: bool = False) -> bool:
    """Whether pruning with ``method`` needs calibration data (the criterion's needs, or super-expert protection)."""
    return "calibration" in CRITERIA.needs(method) or protect_super


def scores(stats: CalibStats, method: str, seed: int = 0) -> dict[int, np.ndarray]:
    """Per MoE layer, the ``method`` score of every expert."""
    fn = CRITERIA.get(method)
    return {li: np.asarray(fn(st, seed), dtype=np.float64) for li, st in sorted(stats.layers.items())}


def super_experts(stats: CalibStats, moe: MoEMap, **thresholds) -> ExpertSet:
    """Super experts of the model ``moe`` from the profiled max |down_proj output| (design §5 thresholds:
    above the 99.5th percentile of all experts and above max/10, first 75% of MoE layers)."""
    if sorted(stats.layers) != moe.indices:
        raise MoekitError(f"calibration statistics of layers {sorted(stats.layers)} do not match the model's MoE "
                          f"layers {moe.indices}")
    return ExpertSet(moe.ref(pos, e) for pos, e in detect_super_experts(stats.stacked("max_abs"), **thresholds))


def _ranked(s: np.ndarray) -> np.ndarray:
    """Expert ids by decreasing score; ties broken by the lower id."""
    return np.lexsort((np.arange(len(s)), -s))


def select_kept(
    layer_scores: Mapping[int, np.ndarray],
    ratio: float,
    top_k: Mapping[int, int],
    global_budget: bool = False,
    protect: Iterable[ExpertRef] = (),
) -> dict[int, list[int]]:
    """The experts to keep per layer.

    Per layer: drop ⌊E·ratio⌋ lowest-scoring experts in every layer. Global: keep
    ``ΣE − ⌊ΣE·ratio⌋`` experts in all, chosen by scores normalised per layer (score / layer sum), with
    every layer keeping at least its top-k. Protected experts are always kept.
    """
    prot: dict[int, set[int]] = {li: set() for li in layer_scores}
    for li, e in protect:
        if li in prot:
            prot[li].add(int(e))
    s = {li: np.where(np.isfinite(v), v, 0.0) for li, v in layer_scores.items()}
    if not global_budget:
        kept = {}
        for li, v in s.items():
            keep_n = experts_kept(len(v), top_k[li], ratio, li)
            if len(prot[li]) > keep_n:
                raise MoekitError(f"layer {li} has {len(prot[li])} protected experts but only {keep_n} are kept")
            key = v.copy()
            key[list(prot[li])] = np.inf
            kept[li] = sorted(int(e) for e in _ranked(key)[:keep_n])
        return kept
    total = sum(len(v) for v in s.values())
    budget = total - n_drop(total, ratio)
    kept_sets: dict[int, set[int]] = {}
    for li, v in s.items():
        key = v.copy()
        key[list(prot[li])] = np.inf
        kept_sets[li] = set(int(e) for e in _ranked(key)[: top_k[li]]) | prot[li]
    mandatory = sum(len(x) for x in kept_sets.values())
    if mandatory > budget:
        raise MoekitError(f"ratio {ratio} keeps {budget} experts in all, fewer than the {mandatory} needed "
                          "(top-k per layer plus protected experts)")
    cands = []
    for li, v in s.items():
        tot = v.sum()
        norm = v / tot if tot > 0 else np.full(len(v), 1.0 / len(v))
        cands += [(-norm[e], li, e) for e in range(len(v)) if e not in kept_sets[li]]
    cands.sort()
    for _, li, e in cands[: budget - mandatory]:
        kept_sets[li].add(int(e))
    return {li: sorted(x) for li, x in kept_sets.items()}
