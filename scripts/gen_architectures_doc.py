"""Regenerate docs/architectures.md from the support table (moekit.models.support)."""

from __future__ import annotations

from pathlib import Path

from moekit.io import atomic_write
from moekit.models.support import support_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
    with atomic_write(out, force=True, mode="w", kind="any") as f:  # the script owns this generated file
        f.write(support_markdown())
    print(f"wrote {out}")
