"""The HTML report of a model's routing (``moekit report``): one self-contained file built from the
``moekit.analysis`` statistics and the super-expert profiling pass."""

from moekit.report.build import (
    build_stats,
    cache_size_for_fraction,
    check_trace_matches,
    render_html,
    super_experts,
    write_report,
)
from moekit.report.profiling import profile_expert_max, super_expert_check

__all__ = [
    "build_stats",
    "cache_size_for_fraction",
    "check_trace_matches",
    "profile_expert_max",
    "render_html",
    "super_expert_check",
    "super_experts",
    "write_report",
]
