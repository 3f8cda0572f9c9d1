"""Low-memory mode gives the same statistics, choices and checkpoint as the in-memory path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moekit
from moekit.compress import observe_batches, prune
from moekit.compress.lowmem import observe_lowmem, prune_lowmem, write_pruned_files
from moekit.compress.observer import STAT_FIELDS
from moekit.compress.writer import METADATA_FILE, write_pruned
from moekit.data import Document
from moekit.testing import TINY_ARCHS, random_batch, save_tiny_checkpoint


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layerwise_statistics_equal_in_memory(arch, tmp_path):
    src = save_tiny_checkpoint(arch, tmp_path / "src", with_tokenizer=False)
    batches = [random_batch(batch=2, seq=12, seed=s, pad_last=3) for s in range(2)]
    ref = observe_batches(moekit.load(src, with_tokenizer=False), batches)
    got, _ = observe_lowmem(src, batches=batches)
    assert sorted(ref.layers) == sorted(got.layers) and ref.tokens == got.tokens
    for li in ref.layers:
        for name in (*STAT_FIELDS, "gram"):
            np.testing.assert_allclose(getattr(got.layers[li], name), getattr(ref.layers[li], name),
                                       rtol=1e-6, atol=1e-9, err_msg=f"{arch} layer {li} {name}")


@pytest.mark.parametrize("arch,overrides,kept_sets", [
    ("qwen2_moe", {}, ([0, 2, 3, 5, 6, 7],)),
    ("mixtral", {}, ([1, 2, 4, 7],)),
    ("granitemoe", {}, ([0, 1, 5],)),
    ("gpt_oss", {}, ([0, 2, 3, 5, 7], [1, 4, 6])),  # unequal counts: padded slots
    ("deepseek_v3", {"n_group": 1, "topk_group": 1}, ([0, 1, 2, 3, 4, 5, 6], [1, 3, 5])),
])
def test_file_writer_equals_in_memory_writer(arch, overrides, kept_sets, tmp_path):
    src = save_tiny_checkpoint(arch, tmp_path / "src", with_tokenizer=False, **overrides)
    lm = moekit.load(src, with_tokenizer=False)
    kept = {li: kept_sets[j % len(kept_sets)] for j, li in enumerate(lm.moe.indices)}
    write_pruned(lm, kept, tmp_path / "mem")
    write_pruned_files(src, moekit.compress.lowmem.meta_model(src), kept, tmp_path / "file", shard_bytes=20_000)
    a, b = _state(tmp_path / "mem"), _state(tmp_path / "file")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(list((tmp_path / "file").glob("model-*.safetensors"))) > 1  # really sharded
    cm, cf = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "file"))
    assert {k: v for k, v in cm.items() if k != "transformers_version"} == \
        {k: v for k, v in cf.items() if k != "transformers_version"}


def test_prune_lowmem_matches_prune(tmp_path):
    src = save_tiny_checkpoint("olmoe", tmp_path / "src")
    docs = [Document("The cat sat on the mat. " * 20, "prose", "a", "x"),
            Document("def f(x):\n    return x + 1\n" * 10, "code", "b", "x")]
    lm = moekit.load(src)
    ref = prune(lm, "reap", 0.5, docs, out=tmp_path / "mem", seq_len=64)
    got = prune_lowmem(src, "reap", 0.5, docs, tmp_path / "low", seq_len=64)
    assert got.kept == ref.kept and got.calib_hash == ref.calib_hash
    for li in ref.scores:
        np.testing.assert_allclose(got.scores[li], ref.scores[li], rtol=1e-6)
    a, b = _state(tmp_path / "mem"), _state(tmp_path / "low")
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "low" / METADATA_FILE).read_text())
    assert meta["low_memory"] and meta["method"] == "reap" and meta["calibration_data_sha256"] == ref.calib_hash
    assert (tmp_path / "low" / "tokenizer.json").is_file()
