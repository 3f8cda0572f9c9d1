"""The expert-output probe: each routed expert's own output on the tokens routed to it.

Calibration (``compress/observer.py``: norms, REAP, EASY-EP, max |f|) and super-expert profiling
(``report/profiling.py``: max |down_proj output|) both need f_j(x), the expert's output before the router
weight is applied. The probe calls the layer's experts module itself with one-hot routing and weight 1, so
every architecture's own expert function is used (GPT-OSS's clamped SwiGLU and biases included), whatever the
weight layout.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def expert_outputs(experts: torch.nn.Module, num_experts: int, hidden: torch.Tensor,
                   ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(j, rows, f)`` for each expert ``j`` in ``ids [T, K]`` (ascending; ids outside ``0..E-1``, the "no
    expert" slots, are skipped): ``rows`` bool ``[T]`` marks the tokens routed to j, ``f`` is j's output on
    ``hidden[rows]`` (``hidden`` is ``[T, H]``), as the experts module computes it."""
    for j in torch.unique(ids).tolist():
        if not 0 <= j < num_experts:
            continue
        rows = (ids == j).any(dim=1)
        x = hidden[rows]
        n = x.shape[0]
        f = experts(x, torch.full((n, 1), j, dtype=ids.dtype, device=x.device),
                    torch.ones((n, 1), dtype=x.dtype, device=x.device))
        yield j, rows, f
