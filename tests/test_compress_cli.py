"""`moekit prune / merge / quantize` on real checkpoint directories: outputs, JSON, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.compress.quantize import quantized_copy
from moekit.compress.writer import METADATA_FILE
from moekit.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ck") / "q3")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "demo.txt"
    p.write_text("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 8)
    return p


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_prune_writes_a_loadable_checkpoint(ckpt, calib, tmp_path, capsys):
    out = tmp_path / "p"
    code, stdout, err = _run(capsys, ["prune", str(ckpt), "--method", "reap", "--ratio", "0.25", "--calib",
                                      str(calib), "--out", str(out), "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["kept_per_layer"] == {"0": 6, "2": 6} and summary["experts_kept"] == 12
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["method"] == "reap" and meta["ratio"] == 0.25 and len(meta["calibration_data_sha256"]) == 64
    lm = moekit.load(out)
    assert [v.num_experts for v in lm.moe] == [6, 6] and lm.tokenizer is not None


def test_prune_random_needs_no_calibration_and_errors_are_one_line(ckpt, calib, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = _run(capsys, ["prune", str(ckpt), "--method", "random", "--ratio", "0.5", "--out", str(out)])
    assert code == 0, err
    cases = [
        (["--method", "random", "--ratio", "0.9"], "fewer than top-k"),
        (["--method", "reap", "--ratio", "0.25"], "calibration data is empty"),
        (["--method", "nope", "--ratio", "0.25", "--calib", str(calib)], "choose one of: random, frequency"),
        (["--method", "reap", "--ratio", "1.5", "--calib", str(calib)], "--ratio must be in"),
        (["--method", "reap", "--ratio", "0.2", "--calib", str(calib), "--global"], "per-layer ratio"),
    ]
    for extra, pattern in cases:
        code, _, err = _run(capsys, ["prune", str(ckpt), *extra, "--out", str(tmp_path / "x")])
        assert code == 2 and pattern in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "x").exists()
    code, _, err = _run(capsys, ["prune", str(ckpt), "--method", "random", "--ratio", "0.5", "--out", str(out)])
    assert code == 2 and "--force" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = _run(capsys, ["prune", str(ckpt), "--ratio", "0.25", "--calib", str(empty), "--out",
                                 str(tmp_path / "y")])
    assert code == 2 and "empty" in err


def test_unsupported_architecture_is_an_error(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    code, _, err = _run(capsys, ["prune", str(tmp_path / "dense"), "--method", "random", "--ratio", "0.5",
                                 "--out", str(tmp_path / "o")])
    assert code == 2 and "Mixture-of-Experts" in err


def test_low_memory_prune_equals_in_memory(ckpt, calib, tmp_path, capsys):
    args = ["prune", str(ckpt), "--method", "frequency", "--ratio", "0.5", "--calib", str(calib), "--json"]
    code, a, err = _run(capsys, [*args, "--out", str(tmp_path / "a")])
    assert code == 0, err
    code, b, err = _run(capsys, [*args, "--out", str(tmp_path / "b"), "--low-memory"])
    assert code == 0, err
    ka = json.loads((tmp_path / "a" / METADATA_FILE).read_text())["kept_experts"]
    kb = json.loads((tmp_path / "b" / METADATA_FILE).read_text())["kept_experts"]
    assert ka == kb


def test_merge_and_quantize_commands(ckpt, calib, tmp_path, capsys):
    code, out, err = _run(capsys, ["merge", str(ckpt), "--ratio", "0.5", "--calib", str(calib),
                                   "--out", str(tmp_path / "m"), "--json"])
    assert code == 0, err
    s = json.loads(out)
    assert s["experts_per_layer"] == {"0": 4, "2": 4}
    assert sorted(e for g in s["groups"]["0"] for e in g) == list(range(8))
    assert [v.num_experts for v in moekit.load(tmp_path / "m").moe] == [4, 4]

    # hidden size 64, so the group size 32 asked for differs from the default 128 in what it writes
    wide = save_tiny_checkpoint("qwen3_moe", tmp_path / "wide", hidden_size=64)
    code, out, err = _run(capsys, ["quantize", str(wide), "--bits", "4", "--group-size", "32",
                                   "--out", str(tmp_path / "q"), "--json"])
    assert code == 0, err
    s = json.loads(out)
    assert s["average_bits"] == 4.0 and s["experts_4bit"] == 16
    # the size of what was written (not of the source or of a temporary directory)
    files = [p for p in (tmp_path / "q").rglob("*") if p.is_file()]
    assert s["bytes_on_disk"] == sum(p.stat().st_size for p in files) < sum(
        p.stat().st_size for p in wide.rglob("*") if p.is_file())
    # the written checkpoint is the source with its experts quantized at the options given (4 bits, groups of 32)
    src = moekit.load(wide)
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = quantized_copy(src, 4, 32)(input_ids=ids).logits
        got = moekit.load(tmp_path / "q").model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    code, out, err = _run(capsys, ["quantize", str(ckpt), "--avg-bits", "6", "--group-size", "32", "--calib",
                                   str(calib), "--out", str(tmp_path / "mix"), "--json"])
    assert code == 0, err
    s = json.loads(out)
    assert s["average_bits"] <= 6 and s["experts_8bit"] == 8
    # the mixed 4/8-bit checkpoint serves offloaded (packed experts read and dequantized on demand), same text
    gen = ["generate", str(tmp_path / "mix"), "--prompt", "def add(a, b):", "--max-tokens", "12"]
    code, whole, err = _run(capsys, gen)
    assert code == 0, err
    code, offloaded, err = _run(capsys, [*gen, "--offload", "--policy", "lru"])
    assert code == 0, err
    assert offloaded == whole and whole.strip()
    code, _, err = _run(capsys, ["quantize", str(ckpt), "--avg-bits", "6", "--out", str(tmp_path / "z")])
    assert code == 2 and "--calib" in err
    code, _, err = _run(capsys, ["quantize", str(ckpt), "--bits", "3", "--out", str(tmp_path / "z")])
    assert code == 2 and "8 or 4" in err
