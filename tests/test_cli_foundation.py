"""`moekit inspect` / `moekit trace` and `moekit.load` on real checkpoint directories (issue 2, req. 2 and 7)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import moekit
from moekit.cli import main
from moekit.errors import MoekitError
from moekit.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("ck") / "dsv3")


def test_load_local_directory_gives_model_tokenizer_and_map(ckpt):
    lm = moekit.load(ckpt)
    assert lm.tokenizer is not None and lm.moe.indices == [1, 2] and not lm.model.training
    assert lm.tokenizer.decode(lm.tokenizer("17 + 25 = 42.")["input_ids"]) == "17 + 25 = 42."


def test_load_errors_are_one_line():
    for spec, pattern in (("moekit:nope", "bundled models"), ("./no/such/dir", "not found"),
                          ("/tmp", "no config.json")):
        with pytest.raises(MoekitError, match=pattern) as exc:
            moekit.load(spec)
        assert "\n" not in str(exc.value)


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoekitError, match="allenai/OLMoE-1B-7B-0924.*local directory"):
        moekit.load("allenai/OLMoE-1B-7B-0924")


def test_inspect_json(ckpt, capsys):
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "deepseek_v3" and info["dense_layers"] == [0]
    assert [row["layer"] for row in info["layers"]] == [1, 2]
    assert info["layers"][0]["num_experts"] == 8 and info["layers"][0]["top_k"] == 3
    assert "shared_experts" in info["layers"][0]["shared"]
    assert info["params_total"] > info["params_active"]


def test_inspect_table(ckpt, capsys):
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3" in out and "sigmoid" in out


def test_trace_cli_writes_a_loadable_trace(ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    (tmp_path / "more.jsonl").write_text(
        json.dumps({"text": "seventeen plus twenty-five equals forty-two.", "domain": "words"}) + "\n"
        + json.dumps({"text": "17 + 25 = 42.", "domain": "digits"}) + "\n")
    out = tmp_path / "x.trace"
    rc = main(["trace", str(ckpt), "--data", str(tmp_path / "notes.txt"), "--data", str(tmp_path / "more.jsonl"),
               "--out", str(out), "--seq-len", "64", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    t = moekit.RoutingTrace.load(out, mmap=True)
    lm = moekit.load(ckpt)
    n_tokens = [len(lm.tokenizer(s)["input_ids"]) for s in (
        (tmp_path / "notes.txt").read_text(), "seventeen plus twenty-five equals forty-two.", "17 + 25 = 42.")]
    assert t.num_tokens == summary["tokens"] == sum(n_tokens)
    assert t.domains == ["notes", "words", "digits"]
    assert np.bincount(t.doc).tolist() == n_tokens
    assert t.pos[: n_tokens[0]].tolist() == list(range(n_tokens[0]))  # windows re-joined in order
    # the traced routing equals a direct teacher-forced pass over the last document
    ids = lm.tokenizer("17 + 25 = 42.", return_tensors="pt")["input_ids"]
    with moekit.record(lm) as rec, torch.no_grad():
        lm.model(input_ids=ids)
    np.testing.assert_array_equal(rec.trace.ids, t.select_docs([2]).ids)
    # --max-tokens and the refusal to overwrite
    assert main(["trace", str(ckpt), "--data", str(tmp_path / "notes.txt"), "--out", str(out)]) == 2
    assert main(["trace", str(ckpt), "--data", str(tmp_path / "notes.txt"), "--out", str(out), "--force",
                 "--max-tokens", "50"]) == 0
    assert moekit.RoutingTrace.load(out).num_tokens == 50


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        ["inspect", str(tmp_path / "missing")],
        ["trace", str(ckpt), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a.trace")],
        ["trace", str(ckpt), "--data", str(empty), "--out", str(tmp_path / "b.trace")],
    ]
    for args in cases:
        proc = subprocess.run([sys.executable, "-c", "import sys; from moekit.cli import main; sys.exit(main())",
                               *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_dense_checkpoint_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense")]) == 2
