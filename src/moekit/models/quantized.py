"""Load moekit's weight-only quantized checkpoints (format: ``moekit.formats.quantized``) as the standard HF
model with dequantized experts; ``moekit.load`` calls this for such a directory."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moekit.errors import MoekitError
from moekit.formats.quantized import is_quantized_checkpoint, read_quant_meta, read_quantized

__all__ = ["is_quantized_checkpoint", "load_quantized"]


def load_quantized(path: str | Path, dtype: torch.dtype | str | None = None, keep_packed: bool = False):
    """The standard HF model of a moekit quantized checkpoint, experts dequantized to ``dtype`` (default: the
    dtype it was quantized from).

    ``keep_packed=True`` also attaches the packed codes as ``model._moekit_packed``
    (``{expert parameter name: [QTensor per expert]}``) and the format record as
    ``model._moekit_quantization``, for expert stores that keep experts compressed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    path = Path(path)
    dtype = dtype or getattr(torch, read_quant_meta(path).get("dtype", "float32"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    meta, sd, packed = read_quantized(path, dtype, keep_packed)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MoekitError(f"{path}: quantized checkpoint does not match its config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    with contextlib.suppress(OSError):  # a checkpoint without generation_config.json keeps the default
        model.generation_config = GenerationConfig.from_pretrained(path)
    if keep_packed:
        model._moekit_packed = packed
        model._moekit_quantization = meta
    return model.eval()
