"""MoE feed-forward layers built on moekit's dispatch: routed (+ shared, fine-grained) experts, Chain-of-Experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.nn.dispatch import expert_forward
from moekit.nn.losses import add_aux_loss
from moekit.nn.routers import Router, build_router

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}


class ExpertBank(nn.Module):
    """E gated FFN experts stored as 3-D tensors in transformers' layout: ``gate_up_proj [E,2I,H]``, ``down_proj [E,H,I]``."""

    def __init__(self, hidden: int, inter: int, num_experts: int, act: str = "silu") -> None:
        super().__init__()
        self.hidden, self.inter, self.num_experts = hidden, inter, num_experts
        self.act_name = act
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        nn.init.normal_(self.gate_up_proj, std=hidden**-0.5)
        nn.init.normal_(self.down_proj, std=inter**-0.5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_k weights · expert_ids(x)`` for ``x [T,H]``; ids ≥ E add nothing."""
        return expert_forward(x, ids, weights, self.gate_up_proj, self.down_proj, ACTIVATIONS[self.act_name])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, act={self.act_name}"
        )


class GatedMLP(nn.Module):
    """Dense SwiGLU-style FFN, used for shared experts (DeepSeekMoE adds them unweighted)."""

    def __init__(self, hidden: int, inter: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class MoELayer(nn.Module):
    """Routed experts (+ optional always-on shared experts) with the router's aux losses attached to the output.

    ``forward(x [..., H], mask=None) -> y [..., H]``. The weighted aux loss of the router is injected with
    ``AddAuxiliaryLoss``, so it is trained by a plain ``main_loss.backward()``; ``last_aux`` keeps detached
    values (tensors, no host sync) for logging and the router's ``tokens_per_expert`` accumulates loads without a host sync.
    ``num_shared`` shared experts of width ``inter`` form one dense MLP of width ``num_shared·inter``.
    """

    def __init__(
        self,
        hidden: int,
        inter: int,
        num_experts: int,
        top_k: int,
        router: str | Router = "softmax_then_topk",
        num_shared: int = 0,
        act: str = "silu",
        router_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.hidden, self.inter, self.num_experts, self.top_k = hidden, inter, num_experts, top_k
        self.router = (
            router
            if isinstance(router, Router)
            else build_router(router, hidden, num_experts, top_k, **(router_kwargs or {}))
        )
        self.experts = ExpertBank(hidden, inter, num_experts, act)
        self.shared = GatedMLP(hidden, num_shared * inter, act) if num_shared > 0 else None
        self.last_aux: dict[str, torch.Tensor] = {}

    @classmethod
    def fine_grained(
        cls,
        hidden: int,
        inter: int,
        num_experts: int,
        top_k: int,
        granularity: int = 1,
        num_shared: int = 0,
        **kwargs,
    ) -> MoELayer:
        """DeepSeekMoE: split N experts of width I into m·N of width I/m, m·K active, plus ``num_shared`` of width I/m."""
        if inter % granularity:
            raise ValueError(f"granularity {granularity} does not divide the expert width {inter}")
        return cls(
            hidden,
            inter // granularity,
            num_experts * granularity,
            top_k * granularity,
            num_shared=num_shared,
            **kwargs,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        route = self.router(x, mask)
        flat = x.reshape(-1, shape[-1])
        y = self.experts(flat, route.ids, route.weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        y = y.view(shape)
        self.last_aux = {name: v.detach() for name, v in route.aux.items()}
        loss = self.router.aux_loss(route.aux)
        return y if loss is None else add_aux_loss(y, loss)


class CoELayer(nn.Module):
    """Chain-of-Experts: C iterations over one expert bank, a router per iteration, ``x_{t+1} = x_t + MoE_t(x_t)``.

    Returns ``x_C − x_0`` (``output="delta"``, a drop-in for an FFN inside a residual block) or ``x_C``
    (``output="state"``, the reference code's default with ``outer_residual=False``).
    """

    def __init__(
        self,
        hidden: int,
        inter: int,
        num_experts: int,
        top_k: int,
        iterations: int = 2,
        router: str = "softmax_then_topk",
        num_shared: int = 0,
        act: str = "silu",
        router_kwargs: dict | None = None,
        output: str = "delta",
    ) -> None:
        super().__init__()
        if output not in ("delta", "state"):
            raise ValueError(f"output must be 'delta' or 'state', got {output!r}")
        self.iterations, self.output = iterations, output
        self.routers = nn.ModuleList(
            build_router(router, hidden, num_experts, top_k, **(router_kwargs or {}))
            for _ in range(iterations)
        )
        self.experts = ExpertBank(hidden, inter, num_experts, act)
        self.shared = GatedMLP(hidden, num_shared * inter, act) if num_shared > 0 else None
        self.last_aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x0 = state = x.reshape(-1, shape[-1])
        losses, self.last_aux = [], {}
        for t, router in enumerate(self.routers):
            route = router(state, mask)
            step = self.experts(state, route.ids, route.weights)
            if self.shared is not None:
                step = step + self.shared(state)
            state = state + step
            self.last_aux |= {f"{name}/{t}": v.detach() for name, v in route.aux.items()}
            loss = router.aux_loss(route.aux)
            if loss is not None:
                losses.append(loss)
        out = (state - x0 if self.output == "delta" else state).view(shape)
        return add_aux_loss(out, torch.stack(losses).sum()) if losses else out
