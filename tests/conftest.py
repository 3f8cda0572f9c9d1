"""Shared fixtures: bundled models load once per session (see moekit.testing)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moekit.openmp import configure_openmp_wait  # noqa: E402

configure_openmp_wait()  # short OpenMP spin, also for the CLI subprocesses the tests start (see moekit.openmp)

import torch  # noqa: E402

from moekit.testing import *  # noqa: E402,F401,F403  (pytest fixtures for the bundled models)

# The tests use small tensors: one thread avoids OpenMP spin-waiting when the 2 cores are shared.
torch.set_num_threads(1)
