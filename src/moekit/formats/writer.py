"""The one checkpoint writer: every model directory moekit writes (prune, merge, low-memory prune, quantize,
placement, upcycle, training, tiny test checkpoints) goes through ``write_checkpoint``.

What it writes, atomically (``moekit.io.atomic_output_dir``: a temporary sibling renamed into place, with
moekit's ``.moekit-output.json`` marker, so ``--force`` may replace it later):

- the weights: an in-memory transformers model through its own ``save_pretrained`` (weight renames of
  transformers v5 reversed, tied weights stored once, config and generation config included), or tensors
  streamed into safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
  ``model.safetensors.index.json``) with the config beside them;
- ``config.json`` whose ``dtype`` is the dtype of the weights actually written;
- the tokenizer: saved from a tokenizer object, or its files copied from a checkpoint directory;
- a moekit record (JSON; e.g. ``moekit_compression.json``) that also says whether a tokenizer was written,
  and any further files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from moekit.formats.safetensors import SpooledWriter
from moekit.formats.tokenizer import TOKENIZER_EXTRA_FILES, TOKENIZER_FILES
from moekit.io import atomic_output_dir

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    """Tensors streamed into safetensors files of about ``shard_bytes`` each (``None``: one file), named as
    transformers names them once ``close`` knows how many there are; keeps the bytes written per dtype. Each
    tensor goes to disk when added (``SpooledWriter``), so a writer streaming a checkpoint larger than memory
    holds one tensor, not a shard and its serialized copy."""

    def __init__(self, folder: Path, shard_bytes: int | None = 5 << 30, name: str = WEIGHTS_NAME,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.folder, self.shard_bytes, self.name = Path(folder), shard_bytes, name
        self.metadata = dict(metadata or {"format": "pt"})
        self.shards: list[list[str]] = []
        self.bytes_by_dtype: dict[torch.dtype, int] = {}
        self._cur: SpooledWriter | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor; a shard is closed once it holds ``shard_bytes``."""
        n = tensor.numel() * tensor.element_size()
        if self._cur is None:
            self._cur = SpooledWriter(self.folder / f".shard-{len(self.shards):05d}.part", self.metadata)
        self._cur.write(name, tensor)
        self.bytes_by_dtype[tensor.dtype] = self.bytes_by_dtype.get(tensor.dtype, 0) + n
        if self.shard_bytes is not None and self._cur.nbytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._cur is not None:
            self._cur.close()
            self.shards.append(self._cur.names())
            self._cur = None

    def close(self) -> dict[str, str]:
        """Write what is queued, name the shards and write the index (several shards); returns tensor → file."""
        self._flush()
        n = len(self.shards)
        stem, ext = os.path.splitext(self.name)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = self.name if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}{ext}"
            (self.folder / f".shard-{i:05d}.part").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": sum(self.bytes_by_dtype.values())}, "weight_map": weight_map}
            (self.folder / f"{self.name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def float_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding most of the bytes written (what the config should declare)."""
        floats = {d: n for d, n in self.bytes_by_dtype.items() if d.is_floating_point}
        return max(floats, key=floats.get) if floats else None


def write_tokenizer(tokenizer: Any, folder: Path) -> bool:
    """Save ``tokenizer`` (an object with ``save_pretrained``) or copy the tokenizer files of the checkpoint
    directory ``tokenizer``; whether any tokenizer was written."""
    if tokenizer is None:
        return False
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return True
    src, found = Path(tokenizer), False
    for name in (*TOKENIZER_FILES, *TOKENIZER_EXTRA_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
            found = True
    return found


def write_checkpoint(
    out: str | os.PathLike,
    *,
    force: bool = False,
    model: torch.nn.Module | None = None,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    config: Any = None,
    dtype: torch.dtype | None = None,
    generation_config: Any = None,
    tokenizer: Any = None,
    record: tuple[str, Mapping[str, Any]] | None = None,
    extra_files: Mapping[str, str | bytes | Path] | None = None,
    shard_bytes: int | None = 5 << 30,
    weights_name: str = WEIGHTS_NAME,
    weights_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint directory ``out`` atomically (see the module docstring); returns ``out``.

    Weights come from ``model`` (``save_pretrained``) or from ``tensors`` ((name, tensor) pairs, streamed into
    ``weights_name`` shards of ``shard_bytes``) with a copy of ``config`` declaring ``dtype`` (default: the
    floating-point dtype of most of the bytes written) and ``generation_config`` (an object, or a file to
    copy). ``tokenizer``: an object or a checkpoint
    directory to copy tokenizer files from. ``record``: ``(file name, dict)``, written as JSON with
    ``tokenizer_copied`` added. ``extra_files``: name → text, bytes, or a file to copy (skipped if absent).
    """
    if (model is None) == (tensors is None):
        raise ValueError("write_checkpoint takes the weights from exactly one of model and tensors")
    with atomic_output_dir(out, force) as tmp:
        if model is not None:
            model.save_pretrained(tmp)  # config.json declares the dtype of the weights it writes
        else:
            shards = ShardWriter(tmp, shard_bytes, weights_name, weights_metadata)
            for name, t in tensors:
                shards.add(name, t)
            shards.close()
            if config is not None:
                config = copy.deepcopy(config)
                written = dtype or shards.float_dtype()
                if written is not None:
                    config.dtype = written
                config.save_pretrained(tmp)
            if isinstance(generation_config, Path):
                if generation_config.is_file():
                    shutil.copy2(generation_config, tmp / "generation_config.json")
            elif generation_config is not None:
                generation_config.save_pretrained(tmp)
        copied = write_tokenizer(tokenizer, tmp)
        if record is not None:
            name, data = record
            (tmp / name).write_text(json.dumps(dict(data, tokenizer_copied=copied), indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            if isinstance(data, Path):
                if data.is_file():
                    shutil.copy2(data, tmp / name)
            elif isinstance(data, bytes):
                (tmp / name).write_bytes(data)
            else:
                (tmp / name).write_text(data)
    return Path(out)
