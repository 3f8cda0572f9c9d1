"""Build the HTML report: statistics from ``moekit.analysis`` (and the super-expert profiling pass),
figures from ``moekit.report.figures``, one self-contained file (inline PNGs and CSS, no scripts, no
network requests).

``write_report`` is the entry point; the statistics live in ``moekit.report.stats`` and the HTML in
``moekit.report.render`` (their names stay importable from here)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moekit.report.render import render_html  # noqa: F401  (re-exported)
from moekit.report.stats import (  # noqa: F401  (re-exported)
    DEFAULT_CHECK_TOKENS,
    DEFAULT_PROFILE_TOKENS,
    build_stats,
    cache_size_for_fraction,
    check_trace_matches,
    check_trace_nonempty,
    model_summary,
    super_experts,
)


def _readable(path: str | os.PathLike) -> None:
    """Give a written output the usual permissions (temporary files are created 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_report(
    lm: Any | None,
    trace: Any,
    out_path: str | os.PathLike,
    docs: Sequence | None = None,
    layer: int | None = None,
    json_path: str | os.PathLike | None = None,
    force: bool = False,
    stats: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    profile_tokens: int | None = DEFAULT_PROFILE_TOKENS,
    check_tokens: int | None = DEFAULT_CHECK_TOKENS,
    super_check: bool = True,
) -> dict[str, Any]:
    """Write the HTML report of ``trace`` to ``out_path`` (and the statistics to ``json_path``).

    ``lm`` (optional) gives the model summary, is checked against the trace, and with ``docs`` runs the
    super-expert profiling and zeroing check.  ``stats`` reuses an existing ``summarize`` result.
    Returns the statistics dict (``out`` and ``json`` hold the paths written)."""
    from moekit.io import atomic_write, check_writable

    out_path = Path(out_path)
    check_writable(out_path, force)
    if json_path is not None:
        check_writable(json_path, force)
    report = build_stats(lm, trace, docs=docs, layer=layer, stats=stats, model_info=model_info,
                         profile_tokens=profile_tokens, check_tokens=check_tokens, super_check=super_check)
    report["trace_only"] = lm is None or not docs
    t0 = time.perf_counter()
    page = render_html(report)
    report["timings"]["html"] = round(time.perf_counter() - t0, 1)
    with atomic_write(out_path, force=force, mode="w") as fh:
        fh.write(page)
    _readable(out_path)
    report["out"] = str(out_path)
    if json_path is not None:
        with atomic_write(json_path, force=force, mode="w") as fh:
            json.dump(report, fh)
        _readable(json_path)
        report["json"] = str(json_path)
    return report
