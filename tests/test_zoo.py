"""The bundled trained models (moekit:tiny, moekit:tiny-shared): plain-HF loadable, small, and trained."""

import dataclasses

import pytest
import torch

from moekit.data import domains, load_corpus
from moekit.eval import perplexity, unigram_perplexity
from moekit.models import resolve

NAMES = ["moekit:tiny", "moekit:tiny-shared"]
MAX_BYTES = 25 * 1024 * 1024




@pytest.mark.parametrize("name", NAMES)
def test_loads_with_plain_transformers_and_fits(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = resolve(name)
    weights = path / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= MAX_BYTES
    assert (path / "README.md").is_file() and (path / "loss.png").stat().st_size <= 100 * 1024
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_configs_meet_requirements(bundled_tiny, bundled_tiny_shared):
    for lm in (bundled_tiny, bundled_tiny_shared):
        cfg = lm.config
        assert cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 2
        assert len(lm.moe.layers) >= 4
    assert bundled_tiny.config.model_type == "qwen3_moe"
    assert bundled_tiny_shared.config.model_type == "qwen2_moe"
    assert bundled_tiny_shared.config.shared_expert_intermediate_size > 0
    assert not getattr(bundled_tiny.config, "shared_expert_intermediate_size", 0)


def test_tiny_beats_unigram_on_test_split(bundled_tiny):
    test = load_corpus("test")
    docs = []
    for d in domains():
        docs += [dataclasses.replace(doc, text=doc.text[:600]) for doc in test if doc.domain == d][:2]
    train = load_corpus("train")[::3]
    uni = unigram_perplexity(bundled_tiny.tokenizer, train, docs)
    ppl = perplexity(bundled_tiny, docs, progress=False)
    assert ppl["tokens"] == uni["tokens"]
    assert ppl["perplexity"] < 0.5 * uni["perplexity"]
