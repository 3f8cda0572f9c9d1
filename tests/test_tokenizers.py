"""One tokenizer loader (moekit.formats.tokenizer): every way of loading a model finds the same tokenizer, or none."""

from __future__ import annotations

import pytest

import moekit
from moekit.data import load_tokenizer
from moekit.formats.tokenizer import load_tokenizer_from
from moekit.models.loading import load_structure
from moekit.serve.store import load_offloaded
from moekit.testing import save_tiny_checkpoint

TEXT = "The experts of a mixture route 12 tokens."


def _loaders(path):
    return {
        "resident": lambda: moekit.load(path).tokenizer,
        "structure": lambda: load_structure(path, with_tokenizer=True).tokenizer,
        "offloaded": lambda: load_offloaded(path).tokenizer,
        "loader": lambda: load_tokenizer_from(path),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return (save_tiny_checkpoint("qwen3_moe", root / "with"),
            save_tiny_checkpoint("qwen3_moe", root / "without", with_tokenizer=False))


def test_every_loader_finds_the_shipped_tokenizer(checkpoints):
    want = load_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    for name, get in _loaders(checkpoints[0]).items():
        tok = get()
        assert tok is not None, name
        assert tok(TEXT, add_special_tokens=False)["input_ids"] == want, name


def test_no_loader_invents_a_tokenizer(checkpoints):
    # AutoTokenizer alone builds an empty one (vocab size 1) for a directory without tokenizer files
    for name, get in _loaders(checkpoints[1]).items():
        assert get() is None, name


def test_unreadable_tokenizer_files_give_none(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert load_tokenizer_from(tmp_path) is None
