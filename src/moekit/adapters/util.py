"""Input helpers for the adapter commands: the base model a pool of adapters was trained from."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from moekit.adapters.core import read_adapter_config
from moekit.errors import MoekitError


def adapter_base_model(path: str | os.PathLike) -> str | None:
    """The model spec an adapter was trained from (``moekit.json``'s "model", else PEFT's base path)."""
    p = Path(path)
    meta = p / "moekit.json"
    if meta.is_file():
        try:
            model = json.loads(meta.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError):
            model = None
        if isinstance(model, str):
            return model
    return read_adapter_config(p).get("base_model_name_or_path")


def pool_base_model(dirs: Sequence[Path]) -> str:
    """The one base model every adapter of a pool names; several or none → one-line error (pass --model)."""
    names = {adapter_base_model(d) for d in dirs}
    names.discard(None)
    if len(names) != 1:
        found = ", ".join(sorted(str(n) for n in names)) or "none recorded"
        raise MoekitError(f"cannot tell the pool's base model ({found}); pass --model")
    return names.pop()
