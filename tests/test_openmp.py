"""moekit.openmp: the short OpenMP spin is set only where the user chose nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moekit.openmp import SPIN_COUNT, configure_openmp_wait


def test_sets_short_spin_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    configure_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT


def test_respects_user_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    configure_openmp_wait()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    configure_openmp_wait()
    assert os.environ["GOMP_SPINCOUNT"] == "5"


def test_cli_process_runs_with_short_spin() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import moekit.cli, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == SPIN_COUNT
