"""Expert merging (M-SMoE, "Merge, Then Compress"), written as a standard checkpoint with fewer experts.

Per MoE layer, keeping E' = E − ⌊E·ratio⌋ experts:

1. frequency = routed-token counts on the calibration data;
2. similarity = cosine of the router-logit columns over the calibration tokens;
3. the E' most used experts are group centres (super experts, when protected, are always centres);
   every other expert joins its most similar centre;
4. each member's intermediate neurons are aligned to the centre's by a permutation (Hungarian matching,
   ``scipy.optimize.linear_sum_assignment``, on the dot product of their concatenated gate/up rows);
5. the group's expert is the frequency-weighted average of the aligned members (uniform when no member
   was routed) — new tensors, not views.

Router. M-SMoE keeps all E router rows and binds the members to one shared module; a standard HF
checkpoint cannot express "several router rows → one expert" (the experts module indexes E' experts
with the router's E' rows). We write E' experts and keep the **centre's** router row (and bias /
correction bias) for each group, so the result loads with plain ``from_pretrained`` and is as small
as pruning at the same ratio. Tokens that preferred a member are routed by the remaining rows, exactly
as after pruning the members; the merged weights carry the members' knowledge. Duplicating the merged
weights under all E rows would keep M-SMoE's routing exactly but save no memory, so it is not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.compress.criteria import check_ratio, experts_kept, super_experts
from moekit.compress.observer import CalibStats, observe
from moekit.compress.writer import (
    build_model,
    check_kept,
    metadata,
    module_names,
    plan_config,
    pruned_state_dict,
    write_model_dir,
)
from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.models.loading import LoadedModel
from moekit.models.moe_map import MoELayerView
from moekit.registry import Registry

# A merging method plans the groups: (lm, calibration stats, ratio, protect_super, protect) → (groups per layer,
# protected experts); ``merge`` then aligns and averages every group and writes the checkpoint.
Planner = Callable[[LoadedModel, CalibStats, float, bool, Iterable[ExpertRef]],
                   tuple[dict[int, list[list[int]]], ExpertSet]]
MERGERS: Registry[Planner] = Registry("merging method")


@dataclass
class MergeResult:
    """Groups per layer: ``groups[layer][i]`` lists the original experts merged into new expert i (centre first)."""

    ratio: float
    groups: dict[int, list[list[int]]]
    protected: ExpertSet = field(default_factory=ExpertSet)
    out: Path | None = None
    calib_hash: str | None = None
    method: str = "m-smoe"

    def summary(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "out": str(self.out) if self.out else None,
                "experts_per_layer": {str(k): len(v) for k, v in self.groups.items()},
                "groups": {str(k): v for k, v in self.groups.items()},
                "protected": self.protected.to_list(), "calibration_data_sha256": self.calib_hash}


def group_experts(count: np.ndarray, similarity: np.ndarray, n_keep: int, protect: Sequence[int] = ()) -> list[list[int]]:
    """M-SMoE grouping: the ``n_keep`` most used experts (protected first) are centres, sorted by id;
    every other expert joins its most similar centre. Returns groups, centre first, members ascending."""
    E = len(count)
    key = np.asarray(count, dtype=np.float64).copy()
    key[list(protect)] = np.inf
    order = np.lexsort((np.arange(E), -key))
    centres = sorted(int(e) for e in order[:n_keep])
    groups = {c: [c] for c in centres}
    for m in range(E):
        if m in groups:
            continue
        sims = np.array([similarity[m, c] for c in centres])
        sims = np.where(np.isfinite(sims), sims, -np.inf)
        groups[centres[int(np.argmax(sims))]].append(m)
    return [[c] + sorted(groups[c][1:]) for c in centres]


def align_permutation(centre: Mapping[str, torch.Tensor], member: Mapping[str, torch.Tensor]) -> np.ndarray:
    """perm with member neuron ``perm[i]`` matched to centre neuron ``i`` (maximum total gate/up similarity)."""
    from scipy.optimize import linear_sum_assignment

    fc = torch.cat([centre["gate"], centre["up"]], dim=1).double()
    fm = torch.cat([member["gate"], member["up"]], dim=1).double()
    _, cols = linear_sum_assignment(-(fc @ fm.T).cpu().numpy())
    return cols


def permute_expert(w: Mapping[str, torch.Tensor], perm: np.ndarray) -> dict[str, torch.Tensor]:
    """Reorder an expert's intermediate neurons (gate/up rows, down columns, gate/up biases)."""
    p = torch.as_tensor(perm, dtype=torch.long)
    out = {}
    for name, t in w.items():
        if name in ("gate", "up", "gate_bias", "up_bias"):
            out[name] = t[p]
        elif name == "down":
            out[name] = t[:, p]
        else:
            out[name] = t
    return out


def merge_group(experts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Frequency-weighted average of experts aligned to the first one (new tensors)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    centre = {k: v.detach() for k, v in experts[0].items()}
    acc = {k: v.double() * w[0] for k, v in centre.items()}
    for wi, ex in zip(w[1:], experts[1:], strict=True):
        aligned = permute_expert({k: v.detach() for k, v in ex.items()}, align_permutation(centre, ex))
        for k in acc:
            acc[k] = acc[k] + aligned[k].double() * wi
    return {k: v.to(centre[k].dtype).clone() for k, v in acc.items()}


def _write_expert(view: MoELayerView, tensors: dict[str, torch.Tensor], e: int, w: Mapping[str, torch.Tensor]) -> None:
    """Store expert ``e``'s weights (nn.Linear convention) into fused tensors laid out like ``view``'s."""
    if view.expert_layout == "gpt_oss":
        gu = tensors["gate_up_proj"][e]
        gu[:, 0::2] = w["gate"].T
        gu[:, 1::2] = w["up"].T
        tensors["down_proj"][e] = w["down"].T
        if "gate_bias" in w:
            tensors["gate_up_proj_bias"][e, 0::2] = w["gate_bias"]
            tensors["gate_up_proj_bias"][e, 1::2] = w["up_bias"]
            tensors["down_proj_bias"][e] = w["down_bias"]
        return
    tensors["gate_up_proj"][e] = torch.cat([w["gate"], w["up"]], dim=0)
    tensors["down_proj"][e] = w["down"]


def merge_view_tensors(sd: dict[str, torch.Tensor], view: MoELayerView, names: Mapping[int, str],
                       groups: Sequence[Sequence[int]], counts: np.ndarray) -> None:
    """Write, into ``sd`` (already pruned to the group centres), each group's merged expert in place of its centre.
    ``names`` maps ``id(module)`` to its name in the model."""
    prefix = names[id(view.experts)]
    tensors = {p: sd[f"{prefix}.{p}"] for p, _ in view.experts.named_parameters()}
    for i, g in enumerate(groups):
        if len(g) == 1:
            continue
        merged = merge_group([view.expert_weights(e) for e in g], [float(counts[e]) for e in g])
        _write_expert(view, tensors, i, merged)


def check_groups(lm: LoadedModel, groups: Mapping[int, Sequence[Sequence[int]]]) -> dict[int, list[int]]:
    """The kept centres of ``groups`` (validated; groups must be ordered by centre id)."""
    kept = check_kept(lm, {li: [g[0] for g in gs] for li, gs in groups.items()})
    for li, gs in groups.items():
        if [g[0] for g in gs] != kept[li]:
            raise MoekitError(f"layer {li}: groups must be ordered by centre id")
    return kept


@torch.no_grad()
def merged_model(lm: LoadedModel, groups: Mapping[int, Sequence[Sequence[int]]], counts: Mapping[int, np.ndarray]):
    """(model, notes): a new HF model whose expert i of layer l merges ``groups[l][i]`` (centre first)."""
    kept = check_groups(lm, groups)
    config, notes = plan_config(lm, kept)
    new_e = max(len(v) for v in kept.values())
    sd = pruned_state_dict(lm, kept, new_e)
    names = module_names(lm.model)
    for view in lm.moe:
        merge_view_tensors(sd, view, names, groups[view.index], counts[view.index])
    dtype = next(lm.model.parameters()).dtype
    return build_model(config, sd, dtype, getattr(lm.model, "generation_config", None)), notes


def merge_metadata(lm: LoadedModel, method: str, ratio: float, groups: Mapping[int, list[list[int]]],
                   protected: ExpertSet, stats: CalibStats, notes: dict, **extra) -> dict:
    """The ``moekit_compression.json`` record of a merge."""
    kept = {li: [g[0] for g in gs] for li, gs in groups.items()}
    return metadata(method, ratio, kept, lm.moe.layers[0].num_experts, stats.data_hash, notes=notes,
                    num_experts=max(len(v) for v in kept.values()),
                    groups={str(k): v for k, v in groups.items()}, router="centre row per group",
                    protected=protected.to_list(), calibration_tokens=stats.tokens, **extra)


@MERGERS.register("m-smoe", needs=["calibration"],
                  help="M-SMoE: the most used experts are group centres; every other expert joins the centre its "
                  "router-logit column is most similar to; neurons aligned, then frequency-weighted average")
def plan_groups(lm: LoadedModel, stats: CalibStats, ratio: float, protect_super: bool = False,
                protect: Iterable[ExpertRef] = ()) -> tuple[dict[int, list[list[int]]], ExpertSet]:
    """M-SMoE groups per layer and the protected experts (``protect``, plus the super experts with
    ``protect_super``)."""
    protected = ExpertSet(protect).check(lm.moe)
    if protect_super:
        protected = protected | super_experts(stats, lm.moe)
    groups = {}
    for view in lm.moe:
        st = stats.layers[view.index]
        n_keep = experts_kept(view.num_experts, view.top_k, ratio, view.index)
        prot = list(protected.in_layer(view.index))
        if len(prot) > n_keep:
            raise MoekitError(f"layer {view.index} has {len(prot)} protected experts but only {n_keep} are kept")
        groups[view.index] = group_experts(st.count, st.logit_similarity(), n_keep, prot)
    return groups, protected


def merge(lm: LoadedModel, ratio: float, calib: CalibStats | Sequence, out: str | Path | None = None,
          force: bool = False, protect_super: bool = False, seq_len: int = 256, max_tokens: int | None = None,
          progress: bool = False, method: str = "m-smoe", protect: Iterable[ExpertRef] = ()):
    """Merge ``lm``'s experts at ``ratio`` with ``method`` (a ``MERGERS`` name, M-SMoE by default);
    ``protect``: experts that stay group centres, i.e. unchanged. Returns (MergeResult, in-memory merged model)."""
    planner = MERGERS.get(method)
    ExpertSet(protect).check(lm.moe)  # before the calibration pass
    if out is not None:
        from moekit.io import check_writable

        check_writable(out, force)
    check_ratio({v.index: (v.num_experts, v.top_k) for v in lm.moe}, ratio)
    stats = calib if isinstance(calib, CalibStats) else observe(lm, calib, seq_len=seq_len, max_tokens=max_tokens,
                                                                progress=progress)
    groups, protected = planner(lm, stats, ratio, protect_super, protect)
    model, notes = merged_model(lm, groups, {li: st.count for li, st in stats.layers.items()})
    res = MergeResult(ratio, groups, protected, calib_hash=stats.data_hash, method=MERGERS.canonical(method))
    if out is not None:
        meta = merge_metadata(lm, res.method, ratio, groups, protected, stats, notes)
        res.out = write_model_dir(model, out, force, meta, lm)
    return res, model
