"""Write a compressed model as a standard Hugging Face checkpoint.

``write_pruned(lm, kept, out)`` keeps, in every MoE layer, the experts listed in ``kept[layer]`` (in
ascending order) and writes a checkpoint that loads with plain ``AutoModelForCausalLM.from_pretrained``:
router rows, router bias (GPT-OSS) and ``e_score_correction_bias`` (DeepSeek-V3) are sliced with the
expert tensors, and the config's expert count is patched.

Unequal counts per layer (global budgets). HF configs have one expert count for all layers, so a layer
that keeps fewer experts than the largest count is padded with zero experts that can never be chosen.
That is only exact where the router has a per-expert additive term: GPT-OSS (router bias, set to −inf)
and DeepSeek-V3 (``e_score_correction_bias``, selection only, set to −inf; sigmoid scores are per expert,
so the other experts' weights do not change). Softmax routers without a bias would renormalise over the
padded slots, so for them unequal counts are refused with a clear error.

DeepSeek group-limited routing. Groups are contiguous blocks of E/n_group experts. When every layer keeps
the same number c of experts in every group (c ≥ 2 for DeepSeek-V3, whose group score sums the best two),
the group structure is kept (n_group unchanged; ``topk_group`` raised to ceil(k/c) where fewer groups
could not hold k experts) and pruning is exact. Otherwise n_group and topk_group become 1 (plain top-k),
which changes routing; ``moekit_compression.json`` says so under ``notes``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from moekit.errors import MoekitError, UnsupportedArchitecture
from moekit.experts import ExpertRef, ExpertSet
from moekit.formats.writer import write_checkpoint
from moekit.models.loading import LoadedModel
from moekit.models.moe_map import MoELayerView

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
METADATA_FILE = "moekit_compression.json"


def data_hash(windows: Sequence[Sequence[int]]) -> str:
    """sha256 of the calibration token windows (what the statistics were computed on)."""
    h = hashlib.sha256()
    for w in windows:
        h.update(len(w).to_bytes(4, "little"))
        h.update(torch.tensor(list(w), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def disable_param(view: MoELayerView) -> str | None:
    """Name of the router tensor that can switch a padded expert off exactly (−inf), or None."""
    if isinstance(getattr(view.router, "e_score_correction_bias", None), torch.Tensor):
        return "e_score_correction_bias"
    if isinstance(getattr(view.router, "bias", None), torch.Tensor):
        return "bias"
    return None


def expert_count_fields(config) -> list[str]:
    """The config fields that hold the number of routed experts."""
    d = config.to_dict()
    fields = [f for f in EXPERT_COUNT_FIELDS if f in d and isinstance(d[f], int)]
    if not fields:
        raise UnsupportedArchitecture(f"{config.model_type}: no expert-count field ({', '.join(EXPERT_COUNT_FIELDS)}) "
                                      "in its config; moekit cannot write a compressed checkpoint for it")
    return fields


def check_kept(lm: LoadedModel, kept: Mapping[int, Sequence[int]], allow_unequal: bool = True) -> dict[int, list[int]]:
    """Validate ``kept`` (every MoE layer present, ids in range, no duplicates, ≥ top-k kept)."""
    out = {}
    for view in lm.moe:
        if view.index not in kept:
            raise MoekitError(f"no kept experts given for MoE layer {view.index}")
        ids = sorted(int(e) for e in kept[view.index])
        if len(set(ids)) != len(ids):
            raise MoekitError(f"layer {view.index}: duplicate expert ids in {ids}")
        if ids and not (ids[0] >= 0 and ids[-1] < view.num_experts):
            raise MoekitError(f"layer {view.index}: expert ids must be in 0..{view.num_experts - 1}")
        if len(ids) < view.top_k:
            raise MoekitError(f"layer {view.index} would keep {len(ids)} experts, fewer than top-k = {view.top_k}")
        out[view.index] = ids
    extra = set(kept) - set(out)
    if extra:
        raise MoekitError(f"layers {sorted(extra)} are not MoE layers (MoE layers: {lm.moe.indices})")
    counts = {len(v) for v in out.values()}
    if len(counts) > 1 and not allow_unequal:
        raise MoekitError("layers keep different numbers of experts")
    return out


def plan_config(lm: LoadedModel, kept: Mapping[int, list[int]]):
    """The patched config for ``kept`` and notes about what changed beyond the expert count."""
    config = copy.deepcopy(lm.config)
    new_e = max(len(v) for v in kept.values())
    padded = {li: new_e - len(v) for li, v in kept.items() if len(v) < new_e}
    notes: dict = {}
    if padded:
        bad = [v.index for v in lm.moe if v.index in padded and disable_param(v) is None]
        if bad:
            raise MoekitError(
                f"the budget leaves different expert counts per layer ({sorted({len(v) for v in kept.values()})}), "
                f"and {lm.moe.model_type} routers have no bias to switch padded experts off exactly; "
                "use a per-layer ratio (no --global) for this architecture")
        notes["padded_experts"] = {str(li): n for li, n in padded.items()}
    for f in expert_count_fields(config):
        setattr(config, f, new_e)
    k = int(getattr(config, "num_experts_per_tok", lm.moe.layers[0].top_k))
    if k > new_e:
        config.num_experts_per_tok = new_e
        notes["num_experts_per_tok"] = f"lowered from {k} to {new_e}"
    n_group = int(getattr(config, "n_group", 1) or 1)
    if n_group > 1:
        old_e = lm.moe.layers[0].num_experts
        size = old_e // n_group
        per_group = set()
        for ids in kept.values():
            counts = [sum(1 for e in ids if e // size == g) for g in range(n_group)]
            per_group.add(tuple(counts))
        # group scores are the sum of a group's two best experts under the sigmoid rule (DeepSeek-V3 and kin)
        min_size = 2 if getattr(lm.moe.layers[0].rule, "name", "") == "sigmoid_group" else 1
        equal = not padded and len(per_group) == 1 and len(set(next(iter(per_group)))) == 1
        c = next(iter(per_group))[0] if equal else 0
        if equal and c >= min_size:
            tg = int(config.topk_group)
            need = -(-int(config.num_experts_per_tok) // c)
            if need > tg:
                config.topk_group = min(need, n_group)
                notes["topk_group"] = f"raised from {tg} to {config.topk_group} so the kept groups hold top-k experts"
        else:
            notes["group_limit_removed"] = (
                f"kept experts are not the same number (>= {min_size}) in each of the {n_group} groups; "
                "n_group and topk_group set to 1 (plain top-k), so routing differs from the original's group limit")
            config.n_group = 1
            config.topk_group = 1
    return config, notes


def module_names(model: torch.nn.Module) -> dict[int, str]:
    """``id(module)`` → its qualified name in ``model``."""
    return {id(m): name for name, m in model.named_modules()}


def pruned_state_dict(lm: LoadedModel, kept: Mapping[int, list[int]], new_e: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert-indexed tensor sliced to ``kept`` (padded to ``new_e``)."""
    sd = dict(lm.model.state_dict())
    names = module_names(lm.model)
    for view in lm.moe:
        prune_view_tensors(sd, view, names, kept[view.index], new_e)
    return sd


def prune_view_tensors(sd: dict[str, torch.Tensor], view: MoELayerView, names: Mapping[int, str],
                       ids: Sequence[int], new_e: int) -> None:
    """Slice, in ``sd`` (model state-dict keys; only the keys present are touched), every expert-indexed tensor
    of ``view`` (experts, router, the block's own per-expert tensors) to ``ids``, padded to ``new_e``.
    ``names`` maps ``id(module)`` to its name in the model."""
    idx = torch.tensor(list(ids), dtype=torch.long)
    pad = new_e - len(ids)
    dis = disable_param(view)
    # the experts, the router and the block's own per-expert tensors (a selection bias kept on the block)
    block_own = {n: t for n, t in [*view.block.named_parameters(recurse=False),
                                   *view.block.named_buffers(recurse=False)]}
    for mod, is_router, tensors in ((view.experts, False, None), (view.router, True, None),
                                    (view.block, True, block_own)):
        prefix = names[id(mod)]
        for pname, t in list((tensors if tensors is not None else mod.state_dict()).items()):
            key = f"{prefix}.{pname}"
            if key not in sd or t.dim() == 0:
                continue
            if t.dim() == 2 and t.shape == (1, view.num_experts):  # [1, E] (ERNIE-4.5's selection bias)
                sd[key] = t.index_select(1, idx.to(t.device)).clone()
                continue
            if t.shape[0] != view.num_experts:
                continue
            new = t.index_select(0, idx.to(t.device)).clone()
            if pad:
                fill = float("-inf") if (is_router and pname == dis) else 0.0
                new = torch.cat([new, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])
            sd[key] = new


def build_model(config, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, generation_config=None):
    """A fresh HF model for ``config`` holding ``state_dict`` (strict)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise MoekitError(f"internal error: compressed state dict does not fit the patched config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if generation_config is not None:
        model.generation_config = copy.deepcopy(generation_config)
    return model.eval()


def tokenizer_source(lm: LoadedModel):
    """What the writer saves as ``lm``'s tokenizer: the loaded tokenizer, else the source directory's files."""
    return lm.tokenizer if lm.tokenizer is not None else lm.path


def metadata(method: str, ratio: float | None, kept: Mapping[int, Sequence[int]], original_experts: int,
             calib_hash: str | None = None, **extra) -> dict:
    """The ``moekit_compression.json`` record (``kept_experts``: the kept experts' original ids as an expert-set
    list, ``["0:1", "0:3", ...]``; new ids are their ranks within each layer)."""
    from moekit.version import __version__

    return {"method": method, "ratio": ratio, "calibration_data_sha256": calib_hash,
            "original_num_experts": original_experts,
            "kept_experts": ExpertSet(ExpertRef(li, int(e)) for li, ids in kept.items() for e in ids).to_list(),
            "moekit_version": __version__, **extra}


def write_model_dir(model, out: str | Path, force: bool, meta: dict, lm: LoadedModel) -> Path:
    """``model`` + ``lm``'s tokenizer + the compression record into ``out`` (``formats.write_checkpoint``)."""
    return write_checkpoint(out, force=force, model=model, tokenizer=tokenizer_source(lm), record=(METADATA_FILE, meta))


@torch.no_grad()
def pruned_model(lm: LoadedModel, kept: Mapping[int, Sequence[int]]):
    """(model, notes): a new in-memory HF model keeping only ``kept`` experts."""
    kept = check_kept(lm, kept)
    for view in lm.moe:
        view.require_standard_bank("writing a pruned checkpoint", dispatch=False)
    config, notes = plan_config(lm, kept)
    new_e = max(len(v) for v in kept.values())
    dtype = next(lm.model.parameters()).dtype
    model = build_model(config, pruned_state_dict(lm, kept, new_e), dtype, getattr(lm.model, "generation_config", None))
    return model, notes


def write_pruned(lm: LoadedModel, kept: Mapping[int, Sequence[int]], out: str | Path, force: bool = False,
                 method: str = "manual", ratio: float | None = None, calib_hash: str | None = None,
                 **extra) -> Path:
    """Write the checkpoint that keeps ``kept[layer]`` experts in each MoE layer; returns ``out``."""
    kept = check_kept(lm, kept)
    model, notes = pruned_model(lm, kept)
    meta = metadata(method, ratio, kept, lm.moe.layers[0].num_experts, calib_hash, notes=notes,
                    num_experts=max(len(v) for v in kept.values()), **extra)
    return write_model_dir(model, out, force, meta, lm)


def pruned_experts(lm: LoadedModel, kept: Mapping[int, Sequence[int]]) -> list[ExpertRef]:
    """The experts that ``kept`` drops — what ``moekit.route(disable=...)`` needs."""
    out = []
    for view in lm.moe:
        keep = set(kept[view.index])
        out += [ExpertRef(view.index, e) for e in range(view.num_experts) if e not in keep]
    return out


def n_drop(num_experts: int, ratio: float) -> int:
    """Experts removed from a layer of ``num_experts`` at ``ratio`` (floor, as REAP)."""
    if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
        raise MoekitError(f"ratio must be in [0, 1), got {ratio}")
    return int(math.floor(num_experts * ratio + 1e-9))
