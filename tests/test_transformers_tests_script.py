"""scripts/run_transformers_moe_tests.py on a small tests tree laid out like transformers' checkout: the JSON tally
counts what pytest ran, "moekit" is the default experts implementation only when switched on, and the
eager-equivalence test's "grouped_mm" slot then runs moekit. A real pytest subprocess and real tiny models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import transformers

REPO = Path(__file__).resolve().parent.parent

# One file per architecture, as transformers has; each asserts what the run is expected to switch on.
MODEL_TEST = '''
import os

import transformers.integrations.moe as moe
from moekit.testing import tiny_config
from transformers import AutoModelForCausalLM


def test_default_experts_implementation():
    model = AutoModelForCausalLM.from_config(tiny_config("{arch}"))
    assert model.config._experts_implementation == os.environ["EXPECTED_EXPERTS"]


def test_grouped_mm_slot():
    expected = "moekit.nn.dispatch" if os.environ["EXPECTED_EXPERTS"] == "moekit" else "transformers.integrations.moe"
    assert moe.grouped_mm_experts_forward.__module__ == expected


def test_named_implementation_is_kept():
    model = AutoModelForCausalLM.from_config(tiny_config("{arch}"), experts_implementation="eager")
    assert model.config._experts_implementation == "eager"


def test_fails_on_purpose():
    assert False


def test_skipped_on_purpose():
    import pytest

    pytest.skip("on purpose")
'''


@pytest.fixture(scope="module")
def script():
    path = REPO / "scripts" / "run_transformers_moe_tests.py"
    spec = importlib.util.spec_from_file_location("run_transformers_moe_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    root = tmp_path / "transformers"
    for arch in ("olmoe", "qwen3_moe"):
        d = root / "tests" / "models" / arch
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
        (d / f"test_modeling_{arch}.py").write_text(MODEL_TEST.format(arch=arch))
    (root / "tests" / "__init__.py").write_text("")
    (root / "tests" / "models" / "__init__.py").write_text("")
    return root


@pytest.mark.slow  # two pytest subprocesses that import transformers and torch
@pytest.mark.parametrize("experts", ["moekit", "grouped_mm"])
def test_tally_counts_and_switches_moekit_on(script, source, monkeypatch, capsys, experts: str) -> None:
    monkeypatch.setenv("EXPECTED_EXPERTS", experts)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    code = script.main(["--source", str(source), "--archs", "olmoe,qwen3_moe", "--experts", experts])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("arch") for line in lines] == ["olmoe", "qwen3_moe", None]
    for line in lines[:2]:
        assert (line["passed"], line["failed"], line["errors"], line["skipped"]) == (3, 1, 0, 1)
        assert line["failing"] == ["test_modeling_" + line["arch"] + "::test_fails_on_purpose"]
        assert line["experts_implementation"] == experts
    assert lines[2] == {"kind": "tally", "tag": f"v{transformers.__version__}",
                        "experts_implementation": experts, "passed": 6, "failed": 2, "errors": 0, "skipped": 2}


def test_bad_arguments_exit_2(script, source, capsys) -> None:
    assert script.main(["--source", str(source), "--archs", "llama"]) == 2
    assert "unknown architecture(s) llama" in capsys.readouterr().err
    assert script.main(["--source", str(source / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_missing_test_file_is_reported(script, source, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EXPECTED_EXPERTS", "moekit")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    assert script.main(["--source", str(source), "--archs", "mixtral"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first == {"arch": "mixtral", "error": "tests/models/mixtral/test_modeling_mixtral.py not in v"
                     + transformers.__version__}

