"""A checkpoint's tokenizer files, and the one tokenizer loader: transformers' ``AutoTokenizer`` on a checkpoint,
or ``None`` where there is none to load (instead of the empty tokenizer ``AutoTokenizer`` builds for a directory
without tokenizer files). Every model loader (resident, low-memory, offloaded, upcycle) uses it; the checkpoint
writer copies the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "tekken.json")
"""Files of which at least one is present in a checkpoint that ships a tokenizer."""

TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                         "chat_template.json")
"""Further tokenizer files a checkpoint may ship beside ``TOKENIZER_FILES`` (copied along with them)."""


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether a checkpoint directory ships tokenizer files (else AutoTokenizer builds an empty one)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer_from(source: str | os.PathLike, local_files_only: bool = False) -> Any | None:
    """The tokenizer of ``source`` (a checkpoint directory, or a hub id), or None when a directory ships no
    tokenizer files or transformers cannot read them (a model without a tokenizer still loads)."""
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not has_tokenizer(source):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)
    except (OSError, ValueError, KeyError, TypeError):
        return None
