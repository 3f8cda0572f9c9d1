"""moekit.eval: perplexity equals a hand computation, padding-invariant; KL to a reference (issue 3, req. 5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.data import Document, load_tokenizer
from moekit.eval import document_windows, kl_to_reference, perplexity, unigram_perplexity
from moekit.models import from_model
from moekit.testing import tiny_model

SEQ = 16
DOCS = [
    Document("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 3, "code", "d0", "a.py"),
    Document("To be, or not to be, that is the question.", "literature", "d1", "b.txt"),
    Document('{"name": "x", "value": 12, "tags": ["a", "b"]}', "json", "d2", "c.jsonl"),
    Document("seven plus five equals twelve. " * 4, "arith_words", "d3", "c.jsonl"),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _lm(tok, seed: int):
    return from_model(tiny_model("qwen3_moe", seed=seed, vocab_size=len(tok)), tokenizer=tok, name=f"rand{seed}")


@pytest.fixture(scope="module")
def lm(tok):
    return _lm(tok, 0)


def _hand_nll(lm, docs) -> tuple[float, int]:
    total, n = 0.0, 0
    for doc in docs:
        ids = lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - 1, SEQ - 1):
            w = torch.tensor(ids[s : s + SEQ])[None]
            with torch.no_grad():
                logits = lm.model(input_ids=w).logits[0]
            total += F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return total, n


def test_perplexity_matches_hand_computation(lm):
    total, n = _hand_nll(lm, DOCS)
    res = perplexity(lm, DOCS, seq_len=SEQ, batch_size=4, progress=False)
    assert res["tokens"] == n
    assert res["nll"] == pytest.approx(total / n, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    code_total, code_n = _hand_nll(lm, DOCS[:1])
    assert res["by_domain"]["code"]["tokens"] == code_n
    assert res["by_domain"]["code"]["nll"] == pytest.approx(code_total / code_n, rel=1e-5)
    assert res["by_source"]["c.jsonl"]["tokens"] == res["by_domain"]["json"]["tokens"] + \
        res["by_domain"]["arith_words"]["tokens"]


def test_padding_does_not_change_perplexity(lm):
    a = perplexity(lm, DOCS, seq_len=SEQ, batch_size=1, progress=False)
    b = perplexity(lm, DOCS, seq_len=SEQ, batch_size=4, progress=False)
    assert a["tokens"] == b["tokens"]
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
    for d in a["by_domain"]:
        assert a["by_domain"][d]["nll"] == pytest.approx(b["by_domain"][d]["nll"], rel=1e-5)


def test_max_tokens_and_windows(lm):
    res = perplexity(lm, DOCS, seq_len=SEQ, max_tokens=20, progress=False)
    assert res["tokens"] == 20
    ws = document_windows(list(range(40)), SEQ)
    assert [w[0] for w in ws] == [0, 15, 30] and sum(len(w) - 1 for w in ws) == 39


def test_kl_self_zero_and_other_positive(lm, tok):
    same = kl_to_reference(lm, lm, DOCS, seq_len=SEQ, progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    other = kl_to_reference(lm, _lm(tok, 1), DOCS, seq_len=SEQ, progress=False)
    assert other["kl"] > 1e-3
    assert other["tokens"] == perplexity(lm, DOCS, seq_len=SEQ, progress=False)["tokens"]


def test_unigram_uses_same_tokens(lm, tok):
    uni = unigram_perplexity(tok, DOCS, DOCS)
    res = perplexity(lm, DOCS, seq_len=SEQ, progress=False)
    assert uni["tokens"] == res["tokens"]
    assert 1 < uni["perplexity"] < len(tok)
