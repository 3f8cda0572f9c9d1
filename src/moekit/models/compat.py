"""Names that changed between the transformers versions moekit supports, in one place.

transformers 5.24 renamed the KV-cache forward argument and output field ``past_key_values`` to
``cache`` (the old name warns and goes away in 5.40). moekit passes whichever name the model's own
``forward`` declares, so no call of ours triggers the deprecation on any supported version.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from torch import nn

_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


@lru_cache(maxsize=64)
def _forward_cache_name(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the KV-cache argument name ``model.forward`` declares."""
    return {_forward_cache_name(type(model)): cache}


@lru_cache(maxsize=64)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def last_logits_kwargs(model: nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` when ``model.forward`` takes it (transformers causal LMs), else ``{}``: for
    passes that need hidden states or expert inputs, not ``[batch, seq, vocab]`` logits."""
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}


def output_cache(out):
    """The KV cache a model output carries (``out.cache``, or ``out.past_key_values`` before 5.24)."""
    fields = out.keys() if hasattr(out, "keys") else ()
    for name in _CACHE_NAMES:
        if name in fields:
            return out[name]
    return None


def forward_cache(kwargs: dict):
    """The KV cache passed to a model forward, under any of its historical names (None if absent)."""
    for name in _CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None
