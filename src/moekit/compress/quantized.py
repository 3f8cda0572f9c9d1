"""Quantized checkpoints (filled in by the compression work); loading hooks used by ``moekit.load``."""

from __future__ import annotations

from pathlib import Path

QUANT_CONFIG = "moekit_quantization.json"


def is_quantized_checkpoint(path: Path) -> bool:
    """True when ``path`` holds a moekit weight-only quantized checkpoint."""
    return (Path(path) / QUANT_CONFIG).is_file()


def load_quantized(path: Path, dtype=None):
    """Load a moekit quantized checkpoint (implemented with the compression package)."""
    from moekit.errors import MoekitError

    raise MoekitError(f"{path} is a quantized checkpoint, which this moekit cannot read yet")
