"""Quantized checkpoints: the loading hooks used by ``moekit.load`` (format: ``compress/quantize.py``)."""

from __future__ import annotations

from pathlib import Path

QUANT_CONFIG = "moekit_quantization.json"


def is_quantized_checkpoint(path: Path) -> bool:
    """True when ``path`` holds a moekit weight-only quantized checkpoint."""
    return (Path(path) / QUANT_CONFIG).is_file()


def load_quantized(path: Path, dtype=None, keep_packed: bool = False):
    """Load a moekit quantized checkpoint: the standard HF model with experts dequantized to ``dtype``.

    ``keep_packed=True`` also attaches the packed codes as ``model._moekit_packed``
    (``{expert parameter name: [QTensor per expert]}``) and the format record as
    ``model._moekit_quantization``, for expert stores that keep experts compressed.
    """
    from moekit.compress.quantize import load_quantized_dir

    return load_quantized_dir(path, dtype=dtype, keep_packed=keep_packed)
