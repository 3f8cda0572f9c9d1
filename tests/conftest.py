"""Shared fixtures: bundled models load once per session (see moekit.testing)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moekit.testing import *  # noqa: E402,F401,F403  (pytest fixtures for the bundled models)
