"""Test-time rerouting ("Rewiring Experts on the Fly"): additive router-logit vectors, one ``[E]`` vector
per selected MoE layer, optimised by next-token loss on the context — at prefill and every N generated
tokens — while the model's own weights never change.

The vectors enter routing through ``moekit.route(bias=...)``: the bias values are tensors that require
grad, so the router hook's re-derived selection (``logits + bias`` → the architecture's rule) is
differentiable. Selection itself is discrete: the gradient reaches the vectors through the routing
weights of the selected experts (and the rule's normalisation), and Adam's steps move the logits enough
to change which experts are selected. Gradients are taken with ``torch.autograd.grad`` for the vectors
only, so no ``.grad`` of a model parameter is ever written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moekit.errors import MoekitError
from moekit.generation import Decoder
from moekit.models.loading import LoadedModel
from moekit.routing import RoutingControl, route


class RouterBias:
    """Per-layer additive router-logit vectors and their Adam optimiser."""

    def __init__(self, lm: LoadedModel, layers: Sequence[int] | None = None, steps: int = 5, lr: float = 0.03,
                 max_context: int = 512) -> None:
        if steps < 1 or lr <= 0 or max_context < 2:
            raise MoekitError("rewire needs steps >= 1, lr > 0 and max_context >= 2")
        self.lm = lm
        idx = list(layers) if layers else lm.moe.indices
        self.vectors = {li: torch.zeros(lm.moe.layer(li).num_experts, device=lm.device, requires_grad=True)
                        for li in idx}
        self.steps, self.lr, self.max_context = int(steps), float(lr), int(max_context)
        self.opt = torch.optim.Adam(list(self.vectors.values()), lr=self.lr)
        self.history: list[dict] = []

    def control(self, differentiable: bool = False) -> RoutingControl:
        """The vectors as a routing control (tensor values that carry grad when ``differentiable``)."""
        bias = {}
        for li, v in self.vectors.items():
            vals = v if differentiable else v.detach().cpu().tolist()
            for e in range(v.numel()):
                bias[(li, e)] = vals[e]
        return RoutingControl.make(bias=bias)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of ``ids`` under the current (differentiable) vectors."""
        x = ids.view(1, -1)[:, -self.max_context:].to(self.lm.device)
        if x.shape[1] < 2:
            raise MoekitError("rewire needs a context of at least 2 tokens")
        with route(self.lm, control=self.control(differentiable=True)):
            logits = self.lm.model(input_ids=x, use_cache=False).logits[0, :-1]
        return F.cross_entropy(logits.float(), x[0, 1:])

    def fit(self, ids: torch.Tensor) -> dict:
        """``steps`` Adam steps on the next-token loss of ``ids``; returns the losses seen."""
        params = list(self.vectors.values())
        losses = []
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = self.loss(ids)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = torch.zeros_like(p) if g is None else g
                self.opt.step()
                losses.append(float(loss.detach()))
        entry = {"tokens": int(min(ids.numel(), self.max_context)), "losses": losses,
                 "bias_norm": float(torch.sqrt(sum((v.detach() ** 2).sum() for v in params)))}
        self.history.append(entry)
        return entry


class RewireDecoder(Decoder):
    """Adapts router-logit vectors on the context at prefill and every ``every`` generated tokens; the KV
    cache is rebuilt after each update so every position is routed with the current vectors."""

    def __init__(self, lm: LoadedModel, layers: Sequence[int] | None = None, every: int = 32, steps: int = 5,
                 lr: float = 0.03, max_context: int = 512) -> None:
        super().__init__(lm)
        if every < 0:
            raise MoekitError("rewire every must be >= 0 (0: adapt at prefill only)")
        self.bias = RouterBias(lm, layers, steps, lr, max_context)
        self.every = int(every)
        self.context: list[int] = []
        self._since = 0
        self.stats: dict = {"updates": 0, "layers": list(self.bias.vectors), "history": self.bias.history}

    def _refill(self) -> torch.Tensor:
        ids = torch.tensor(self.context, dtype=torch.long)
        self.bias.fit(ids)
        self.stats["updates"] += 1
        self._since = 0
        with route(self.lm, control=self.bias.control()):
            return super().prefill(ids)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.context = [int(t) for t in ids.view(-1)]
        if len(self.context) < 2:
            with route(self.lm, control=self.bias.control()):
                return super().prefill(ids)
        return self._refill()

    def step(self, token: int) -> torch.Tensor:
        self.context.append(int(token))
        self._since += 1
        if self.every and self._since >= self.every:
            return self._refill()
        with route(self.lm, control=self.bias.control()):
            return super().step(token)
