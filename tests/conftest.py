"""Shared fixtures: bundled models load once per session (see moekit.testing)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MOEKIT_TRANSFORMERS_WARNINGS", "1")  # moekit.load keeps transformers' warnings here

from moekit.openmp import configure_openmp_wait  # noqa: E402

configure_openmp_wait()  # short OpenMP spin, also for the CLI subprocesses the tests start (see moekit.openmp)

import torch  # noqa: E402

from moekit.testing import *  # noqa: E402,F401,F403  (pytest fixtures for the bundled models)

# The tests use small tensors: one thread avoids OpenMP spin-waiting when the 2 cores are shared.
torch.set_num_threads(1)


# ---- deprecations that transformers reports through its logger (not the warnings module) fail the test ----
import logging  # noqa: E402

import pytest  # noqa: E402

_DEPRECATIONS: list[str] = []


class _DeprecationLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            _DEPRECATIONS.append(message.splitlines()[0])


logging.getLogger("transformers").addHandler(_DeprecationLog(level=logging.WARNING))


@pytest.fixture(autouse=True)
def _no_upstream_deprecations():
    """transformers' ``warning_once`` deprecations about moekit's calls fail the test that caused them."""
    del _DEPRECATIONS[:]
    yield
    if _DEPRECATIONS:
        found = sorted(set(_DEPRECATIONS))
        del _DEPRECATIONS[:]
        pytest.fail("transformers deprecation triggered: " + " | ".join(found), pytrace=False)
