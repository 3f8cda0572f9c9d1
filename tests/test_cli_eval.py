"""`moekit eval` on a real checkpoint: numbers equal the Python API; bad data exits 2 (issue 3, req. 5, 8)."""

import json

import pytest

import moekit
from moekit.cli import main
from moekit.data import read_documents
from moekit.eval import perplexity
from moekit.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("ck") / "olmoe")


def test_eval_json_per_file_and_domain(ckpt, tmp_path, capsys):
    a, b = tmp_path / "code.txt", tmp_path / "mixed.jsonl"
    a.write_text("def add(a, b):\n    return a + b\n" * 5)
    b.write_text(json.dumps({"text": "17 + 25 = 42. 3 + 4 = 7.", "domain": "digits"}) + "\n"
                 + json.dumps({"text": "seventeen plus twenty-five equals forty-two.", "domain": "words"}) + "\n")
    assert main(["eval", str(ckpt), "--data", str(a), "--data", str(b), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = perplexity(moekit.load(ckpt), read_documents([a, b]), progress=False)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-9)
    assert set(got["by_domain"]) == {"code", "digits", "words"}
    assert set(got["by_source"]) == {str(a), str(b)}
    n = sum(row["tokens"] for row in got["by_domain"].values())
    assert n == got["tokens"]


def test_eval_bad_data_exits_2(ckpt, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "missing.txt")]) == 2
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert main(["eval", "moekit:nope"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "bad.jsonl:1" in err and "moekit:tiny" in err
