"""Beyond one process: expert placement across ranks, and torchrun integration (data / expert parallel).

``placement``: plan which experts live on which rank from a routing trace, simulate the traffic; ``apply``:
permute a checkpoint's experts to a plan exactly. ``runtime``/``data_parallel``: split tracing, evaluation and
calibration across ``torchrun`` ranks and merge the results exactly.
"""

from __future__ import annotations

from moekit.distributed.placement import PLACEMENTS, Placement, RoutingStats, compare, plan, simulate

__all__ = ["PLACEMENTS", "Placement", "RoutingStats", "compare", "plan", "simulate"]
