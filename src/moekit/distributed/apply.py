"""Apply a placement to a checkpoint: permute every MoE layer's experts so contiguous sharding is the plan.

Position p of layer l holds the old expert ``placement.order(l)[p]``; every expert-indexed tensor moves with
it (router rows, router bias, ``e_score_correction_bias``, the fused expert banks and their biases), so the
model computes the same function: the same experts are chosen (under new ids) with the same weights, and
only the summation order over the k chosen experts may round differently. The result is a plain
transformers checkpoint (``AutoModelForCausalLM.from_pretrained``) with ``moekit_placement.json`` beside it.
DeepSeek-style group-limited routing scores contiguous groups of experts, so a placement must keep each
group's experts together (it may move whole groups between ranks); others are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.compress.writer import build_model, pruned_state_dict, tokenizer_source
from moekit.distributed.placement import Placement
from moekit.errors import MoekitError
from moekit.formats.writer import write_checkpoint
from moekit.models.loading import LoadedModel

PLACEMENT_FILE = "moekit_placement.json"


def check_placement(lm: LoadedModel, placement: Placement) -> dict[int, list[int]]:
    """The per-layer new order of old experts, after checking the placement fits ``lm``."""
    if list(placement.layers) != lm.moe.indices:
        raise MoekitError(f"the placement is for MoE layers {placement.layers}, the model has {lm.moe.indices}")
    n_group = int(getattr(lm.config, "n_group", 1) or 1)
    orders = {}
    for pos, view in enumerate(lm.moe):
        e = view.num_experts
        if placement.num_experts[pos] != e:
            raise MoekitError(f"layer {view.index}: the placement has {placement.num_experts[pos]} experts, "
                              f"the model {e}")
        order = placement.order(pos)
        if n_group > 1:
            size = e // n_group
            groups = np.asarray(order).reshape(n_group, size) // size
            if (groups != groups[:, :1]).any():
                raise MoekitError(
                    f"layer {view.index}: the placement splits a routing group ({n_group} groups of {size} "
                    "experts score together in this model); keep each group's experts on one rank")
        orders[view.index] = order
    return orders


@torch.no_grad()
def placed_model(lm: LoadedModel, placement: Placement):
    """A new in-memory transformers model with every MoE layer's experts permuted to the placement."""
    orders = check_placement(lm, placement)
    dtype = next(lm.model.parameters()).dtype
    sd = pruned_state_dict(lm, orders, lm.moe.layers[0].num_experts)
    return build_model(lm.config, sd, dtype, getattr(lm.model, "generation_config", None))


def write_placed(lm: LoadedModel, placement: Placement, out: str | Path, force: bool = False) -> Path:
    """Write the permuted checkpoint (+ tokenizer, + ``moekit_placement.json``) atomically; returns ``out``."""
    from moekit.version import __version__

    model = placed_model(lm, placement)
    record = dict(placement.to_json(), source_model=lm.name, moekit_version=__version__)
    return write_checkpoint(out, force=force, model=model, tokenizer=tokenizer_source(lm),
                            record=(PLACEMENT_FILE, record))
