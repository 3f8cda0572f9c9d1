"""Serving: offloaded generation with an expert cache and prefetch, and an OpenAI-compatible server.

``load_offloaded(spec)`` loads a model with only its non-expert weights resident; ``offload(lm, ...)``
runs every generation on it through an expert cache (policies in ``POLICIES``); ``engine.stats()``
reports hit rate, misses, bytes per token, prefetch precision/recall, stall time, tokens/s and the miss
ratio to Belady's optimum.  ``moekit serve`` (``moekit.serve.server``) serves it over the OpenAI API.
"""

from __future__ import annotations

from moekit.serve.cache import POLICIES, Policy
from moekit.serve.demo import demo_step
from moekit.serve.engine import OffloadEngine, offload
from moekit.serve.store import ExpertStore, FileStore, TensorStore, load_offloaded, store_for

__all__ = [
    "POLICIES", "ExpertStore", "FileStore", "OffloadEngine", "Policy", "TensorStore", "demo_step",
    "load_offloaded", "offload", "store_for",
]
