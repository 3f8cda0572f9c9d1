"""Exactness of the checkpoint writer: a pruned checkpoint computes what the original computes with the
pruned experts disabled (``moekit.route(disable=...)``), for every tiny architecture."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.compress.writer import METADATA_FILE, pruned_experts, write_pruned
from moekit.errors import MoekitError
from moekit.testing import TINY_ARCHS, random_batch, tiny_lm


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _check(lm, kept, tmp_path, name="out"):
    out = write_pruned(lm, kept, tmp_path / name, method="manual", ratio=None)
    batch = random_batch(vocab=lm.config.vocab_size, batch=2, seq=16, seed=3, pad_last=3)
    with moekit.route(lm, disable=pruned_experts(lm, kept)):
        ref = _logits(lm.model, batch)
    new = _reload(out)
    got = _logits(new, batch)
    mask = batch["attention_mask"].bool()
    diff = (ref - got)[mask].abs().max().item()
    return out, new, diff


GROUP_LIMITED = ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1")  # their own tests below
ARCHS_PLAIN = [a for a in TINY_ARCHS if a not in GROUP_LIMITED]


@pytest.mark.parametrize("arch", ARCHS_PLAIN)
def test_pruned_checkpoint_equals_route_disable(arch, tmp_path):
    lm = tiny_lm(arch)
    # equal counts per layer (softmax routers need them): drop two experts per layer, different ones
    kept = {li: [e for e in range(8) if e not in ((1, 6) if j % 2 == 0 else (0, 5))]
            for j, li in enumerate(lm.moe.indices)}
    out, new, diff = _check(lm, kept, tmp_path)
    assert diff < 1e-5, diff
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["kept_experts"] == [f"{li}:{e}" for li in sorted(kept) for e in kept[li]]  # an expert-set list
    cfg = json.loads((out / "config.json").read_text())
    counts = [cfg[f] for f in ("num_experts", "num_local_experts", "n_routed_experts") if f in cfg]
    assert counts and all(c == 6 for c in counts)
    lm2 = moekit.models.from_model(new)
    assert [v.num_experts for v in lm2.moe] == [6] * len(lm.moe)


@pytest.mark.parametrize("arch", GROUP_LIMITED)
def test_deepseek_equal_pruning_per_group_is_exact(arch, tmp_path):
    # 2 groups of 4; drop one expert per group → 2 groups of 3, group structure kept
    lm = tiny_lm(arch, n_group=2, topk_group=1)
    kept = {v.index: [e for e in range(8) if e not in (2, 5)] for v in lm.moe}
    out, new, diff = _check(lm, kept, tmp_path)
    assert diff < 1e-5, diff
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_group"] == 2 and cfg["topk_group"] == 1 and cfg["n_routed_experts"] == 6
    assert json.loads((out / METADATA_FILE).read_text())["notes"] == {}


@pytest.mark.parametrize("arch", GROUP_LIMITED)
def test_deepseek_single_group_is_exact(arch, tmp_path):
    lm = tiny_lm(arch, n_group=1, topk_group=1)
    kept = {v.index: [0, 1, 3, 4, 7] for v in lm.moe}
    _, _, diff = _check(lm, kept, tmp_path)
    assert diff < 1e-5, diff


def test_deepseek_unequal_groups_drop_group_limit(tmp_path):
    # the tiny config has 4 groups of 2: dropping 2 experts from different groups leaves unequal groups
    lm = tiny_lm("deepseek_v3")
    kept = {v.index: [0, 1, 2, 4, 6, 7] for v in lm.moe}
    out = write_pruned(lm, kept, tmp_path / "o")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_group"] == 1 and cfg["topk_group"] == 1
    assert "group_limit_removed" in json.loads((out / METADATA_FILE).read_text())["notes"]
    _reload(out)  # loads and runs
    _logits(_reload(out), random_batch())


@pytest.mark.parametrize("arch,overrides", [("gpt_oss", {}), ("deepseek_v3", {"n_group": 1, "topk_group": 1})])
def test_unequal_counts_padded_exactly(arch, overrides, tmp_path):
    lm = tiny_lm(arch, **overrides)
    choices = ([0, 2, 3, 5, 7], [1, 4, 6])
    kept = {li: choices[j % 2] for j, li in enumerate(lm.moe.indices)}
    out, new, diff = _check(lm, kept, tmp_path)
    assert diff < 1e-5, diff
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["num_experts"] == 5
    assert meta["notes"]["padded_experts"] == {str(lm.moe.indices[1]): 2}


def test_unequal_counts_refused_without_router_bias(tmp_path):
    lm = tiny_lm("qwen3_moe")
    a, b = lm.moe.indices
    with pytest.raises(MoekitError, match="per-layer ratio"):
        write_pruned(lm, {a: [0, 1, 2], b: [0, 1, 2, 3]}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_refuses_overwrite_and_too_few_experts(tmp_path):
    lm = tiny_lm("olmoe")
    kept = {v.index: list(range(6)) for v in lm.moe}
    write_pruned(lm, kept, tmp_path / "o")
    with pytest.raises(MoekitError, match="--force"):
        write_pruned(lm, kept, tmp_path / "o")
    write_pruned(lm, kept, tmp_path / "o", force=True)
    with pytest.raises(MoekitError, match="fewer than top-k"):
        write_pruned(lm, {v.index: [0] for v in lm.moe}, tmp_path / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    lm = tiny_lm("mixtral")
    kept = {v.index: list(range(4)) for v in lm.moe}
    from moekit.formats import writer

    def boom(*a, **k):  # interrupted after the weights are written, before the tokenizer and the record
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        write_pruned(lm, kept, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
