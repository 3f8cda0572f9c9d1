"""M-SMoE merging: ratio 0 is the identity, merged tensors are new, a hand-checked 2-expert merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.compress import observe_batches
from moekit.compress.merge import align_permutation, group_experts, merge, merge_group, permute_expert
from moekit.testing import random_batch, tiny_lm


def _batches():
    return [random_batch(batch=2, seq=16, seed=s, pad_last=2) for s in range(2)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"])
def test_ratio_zero_reproduces_the_original(arch, tmp_path):
    lm = tiny_lm(arch)
    stats = observe_batches(lm, _batches())
    res, model = merge(lm, 0.0, stats, out=tmp_path / "m")
    assert all(len(g) == 1 for gs in res.groups.values() for g in gs)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    b = random_batch(seed=7)
    with torch.no_grad():
        ref = lm.model(**b).logits
        assert torch.equal(model(**b).logits, ref)
        assert (reloaded(**b).logits - ref).abs().max() < 1e-6


@torch.no_grad()
def test_merged_tensors_are_new_and_shrink_the_layer():
    lm = tiny_lm("olmoe")
    stats = observe_batches(lm, _batches())
    res, model = merge(lm, 0.5, stats)
    assert all(len(gs) == 4 for gs in res.groups.values())
    assert sorted(e for g in res.groups[lm.moe.indices[0]] for e in g) == list(range(8))
    orig_ptrs = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in orig_ptrs for p in model.parameters())
    for view in lm.moe:
        new = model.model.layers[view.index].mlp.experts
        assert new.gate_up_proj.shape[0] == 4
        for i, g in enumerate(res.groups[view.index]):
            if len(g) == 1:  # a singleton group keeps its expert exactly
                assert torch.equal(new.gate_up_proj[i], view.experts.gate_up_proj[g[0]])
            else:
                assert not torch.equal(new.gate_up_proj[i], view.experts.gate_up_proj[g[0]])


def test_grouping_uses_frequency_centres_and_logit_similarity():
    count = np.array([10, 1, 8, 2])
    sim = np.array([[1, 0.1, 0.2, 0.9], [0.1, 1, 0.8, 0.0], [0.2, 0.8, 1, 0.1], [0.9, 0.0, 0.1, 1]])
    assert group_experts(count, sim, 2) == [[0, 3], [2, 1]]
    assert group_experts(count, sim, 2, protect=[1]) == [[0, 3], [1, 2]]


def test_hand_checked_two_expert_merge_with_known_permutation():
    gen = torch.Generator().manual_seed(0)
    n, H = 6, 4
    a = {"gate": torch.randn(n, H, generator=gen), "up": torch.randn(n, H, generator=gen),
         "down": torch.randn(H, n, generator=gen)}
    perm = np.array([3, 0, 5, 1, 4, 2])
    b = permute_expert(a, perm)  # b's neuron i is a's neuron perm[i]
    found = align_permutation(a, b)
    # b neuron found[i] must be a's neuron i
    np.testing.assert_array_equal(perm[found], np.arange(n))
    # b = perm(a + delta): merged = a + w_b * delta with w_b = 3 / (1 + 3)
    delta = {k: 0.01 * torch.ones_like(v) for k, v in a.items()}
    b2 = permute_expert({k: a[k] + delta[k] for k in a}, perm)
    merged = merge_group([a, b2], [1.0, 3.0])
    for k in a:
        torch.testing.assert_close(merged[k], a[k] + 0.75 * delta[k], rtol=0, atol=1e-6)
        assert merged[k].data_ptr() != a[k].data_ptr()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v2"])
def test_merged_experts_are_stored_in_the_architecture_layout(arch):
    from moekit.models import from_model

    lm = tiny_lm(arch, **({"n_group": 1, "topk_group": 1} if arch == "deepseek_v2" else {}))
    stats = observe_batches(lm, _batches())
    res, model = merge(lm, 0.5, stats)
    new = from_model(model)
    for view, nview in zip(lm.moe, new.moe, strict=True):
        counts = stats.layers[view.index].count
        for i, g in enumerate(res.groups[view.index]):
            want = merge_group([view.expert_weights(e) for e in g], [float(counts[e]) for e in g])
            got = nview.expert_weights(i)
            assert want.keys() == got.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(nview.router.weight, view.router.weight[[g[0] for g in res.groups[view.index]]])
