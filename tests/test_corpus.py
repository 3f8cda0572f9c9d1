"""The bundled corpus, its tokenizer, the synthetic generators and the user-data reader."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from moekit.data import (
    SPLITS,
    Document,
    corpus_meta,
    corpus_path,
    domains,
    load_corpus,
    load_tokenizer,
    read_documents,
    tokenizer_path,
)
from moekit.data import synthetic as syn
from moekit.errors import MoekitError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[Document]]:
    return {split: load_corpus(split) for split in SPLITS}


@pytest.fixture(scope="module")
def build_script():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- corpus


def test_splits_disjoint_and_cover_all_domains(corpus):
    doms = domains()
    assert len(doms) >= 5
    assert {"literature", "prose", "code", "arith_digits", "arith_words"} <= set(doms)
    seen: set[str] = set()
    for split, docs in corpus.items():
        ids = {d.doc_id for d in docs}
        assert len(ids) == len(docs), f"duplicate doc ids in {split}"
        assert not ids & seen, f"{split} shares documents with another split"
        seen |= ids
        assert {d.domain for d in docs} == set(doms), f"{split} misses a domain"
        assert all(d.text.strip() and d.source for d in docs)
    assert len(corpus["train"]) > 8 * len(corpus["test"])


def test_meta_matches_files(corpus):
    meta = corpus_meta()
    for split, docs in corpus.items():
        info = meta["splits"][split]
        assert info["docs"] == len(docs)
        assert info["chars"] == sum(len(d.text) for d in docs)
        for dom, stats in info["domains"].items():
            assert stats["docs"] == sum(d.domain == dom for d in docs)


def test_sizes_within_limits(corpus):
    compressed = sum(p.stat().st_size for p in corpus_path().iterdir())
    assert compressed <= 8 * 1024 * 1024
    train_chars = sum(len(d.text) for d in corpus["train"])
    assert 3_000_000 <= train_chars <= 7_000_000
    for dom in domains():
        dom_chars = sum(len(d.text) for d in corpus["train"] if d.domain == dom)
        assert dom_chars <= 0.4 * train_chars, f"{dom} dominates the train split"


def test_split_assignment_is_the_documented_hash(corpus, build_script):
    for split, docs in corpus.items():
        for d in docs[::25]:
            group = d.doc_id
            if d.domain.startswith("arith_"):
                group = "arith/" + d.doc_id.rsplit("/", 1)[1]
            assert build_script.split_of(group) == split


def test_synthetic_domains_rebuild_identically(corpus, build_script):
    bundled = {d.doc_id: d for docs in corpus.values() for d in docs}
    rebuilt = build_script.arith_docs() + build_script.json_docs()
    assert rebuilt == build_script.arith_docs() + build_script.json_docs()
    for row in rebuilt:
        d = bundled[row["doc_id"]]
        assert (d.text, d.domain, d.source) == (row["text"], row["domain"], row["source"])


def test_arith_twins_state_the_same_true_facts(corpus):
    for docs in corpus.values():
        by_id = {d.doc_id: d for d in docs}
        words = [d for d in docs if d.domain == "arith_words"][:200]
        assert words
        for w in words:
            twin = by_id[w.doc_id.replace("arith_words/", "arith_digits/")]
            w_lines, d_lines = w.text.split("\n"), twin.text.split("\n")
            assert len(w_lines) == len(d_lines) >= 2
            for wl, dl in zip(w_lines, d_lines, strict=True):
                (wf, wr), (df, dr) = syn.parse_fact(wl), syn.parse_fact(dl)
                assert wf == df and wr == dr == wf.result


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (21, "twenty-one"),
        (40, "forty"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (105, "one hundred five"),
        (9801, "nine thousand eight hundred one"),
        (-47, "negative forty-seven"),
    ],
)
def test_number_to_words(n, words):
    assert syn.number_to_words(n) == words
    assert syn.words_to_number(words) == n


def test_words_round_trip_over_result_range():
    for n in range(0, 99 * 99 + 1):
        assert syn.words_to_number(syn.number_to_words(n)) == n
    with pytest.raises(ValueError):
        syn.words_to_number("twenty-ten")


def test_generators_are_deterministic_and_style_independent():
    a = syn.arith_document(random.Random(7), "digits", 12)
    assert a == syn.arith_document(random.Random(7), "digits", 12)
    assert a != syn.arith_document(random.Random(8), "digits", 12)
    w = syn.arith_document(random.Random(7), "words", 12)
    for dl, wl in zip(a.split("\n"), w.split("\n"), strict=True):
        assert syn.parse_fact(dl) == syn.parse_fact(wl)
    assert syn.json_document(random.Random(3), 5) == syn.json_document(random.Random(3), 5)
    for line in syn.json_document(random.Random(3), 5).split("\n"):
        assert json.loads(line)["type"] in ("customer", "order", "sensor")


def test_fact_format_and_prompt():
    fact = syn.ArithFact(17, "plus", 25)
    assert syn.format_fact(fact, "digits") == "17 + 25 = 42."
    assert syn.format_fact(fact, "words") == "seventeen plus twenty-five equals forty-two."
    assert syn.fact_prompt(fact, "digits") == ("17 + 25 =", " 42.")
    assert syn.parse_fact("6 * 7 = 42.") == (syn.ArithFact(6, "times", 7), 42)
    rng = random.Random(0)
    for _ in range(500):
        f = syn.random_fact(rng)
        assert 0 <= f.a <= 99 and 0 <= f.b <= 99 and f.result >= 0
    assert syn.arith_fact(random.Random(1), "words").endswith(".")
    with pytest.raises(ValueError):
        syn.arith_fact(random.Random(1), "roman")


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_tokenizer_vocab_and_specials(tokenizer):
    assert (tokenizer_path() / "tokenizer.json").is_file()
    assert 4000 <= len(tokenizer) <= 8192
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2 + 2 ="}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\n2 + 2 =\n<|assistant|>\n"


def test_tokenizer_round_trips_test_docs_of_every_domain(tokenizer, corpus):
    for dom in domains():
        docs = [d for d in corpus["test"] if d.domain == dom][:5]
        assert docs
        for d in docs:
            ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == d.text, d.doc_id
    odd = "  tabs\tand  ünïcödé — “quotes” 🙂\n\n"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


# ----------------------------------------------------------------------------- read_documents


def test_read_text_and_jsonl(tmp_path):
    (tmp_path / "poems.txt").write_text("Roses are red.\n", encoding="utf-8")
    jl = tmp_path / "mixed.jsonl"
    jl.write_text('{"text": "a", "domain": "x"}\n\n{"text": "b"}\n', encoding="utf-8")
    docs = read_documents([str(tmp_path / "poems.txt"), jl])
    assert [(d.text, d.domain) for d in docs] == [("Roses are red.\n", "poems"), ("a", "x"), ("b", "mixed")]
    assert len({d.doc_id for d in docs}) == 3


def test_read_bundled_specs(corpus):
    assert read_documents(["moekit:corpus"]) == corpus["test"]
    assert read_documents(["moekit:corpus:validation"]) == corpus["validation"]
    with pytest.raises(MoekitError, match="split"):
        read_documents(["moekit:corpus:dev"])
    with pytest.raises(MoekitError, match="split"):
        load_corpus("dev")


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.txt", "", r"empty\.txt is empty"),
        ("blank.jsonl", "\n  \n", r"blank\.jsonl is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("notext.jsonl", '{"prompt": "hi"}\n', r"notext\.jsonl:1: .*\"text\""),
        ("binary.txt", b"\xff\xfe\x00bad", r"binary\.txt is not UTF-8"),
    ],
)
def test_read_errors_name_the_file(tmp_path, name, content, pattern):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(MoekitError, match=pattern) as info:
        read_documents([path])
    assert "\n" not in str(info.value)


def test_read_missing_file(tmp_path):
    with pytest.raises(MoekitError, match=r"nope\.txt does not exist"):
        read_documents([tmp_path / "nope.txt"])
    with pytest.raises(MoekitError, match="is a directory"):
        read_documents([tmp_path])
