"""The one hook on routers (design §3): every router's output passes through ``RouterHook``.

The hook is installed when the first ``route`` or ``record`` context is entered and removed when the
last one exits, so a model outside those contexts runs exactly its own code.
"""

from __future__ import annotations

import torch

from moekit.models.loading import LoadedModel
from moekit.models.moe_map import MoELayerView, require_rule
from moekit.routing.control import LayerControl, RoutingControl, merge

_ABSENT = object()  # "no instance attribute": the class's method applies


class RouterHook:
    """Wraps each router's forward: applies the active controls, then feeds the active recorders."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.controls: list[RoutingControl] = []
        self.recorders: list = []
        self._resolved: dict[int, LayerControl | None] = {}
        self._inputs: dict = {}
        self._installed = False
        # (module, attribute, what its instance held before: a forward another tool swapped in, or _ABSENT)
        self._saved: list[tuple[torch.nn.Module, str, object]] = []

    # ----- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def of(cls, lm: LoadedModel) -> RouterHook:
        hook = getattr(lm.model, "_moekit_router_hook", None)
        if hook is None:
            hook = cls(lm)
            lm.model._moekit_router_hook = hook
        return hook

    def _sync(self) -> None:
        self._resolved = {}
        if (self.controls or self.recorders) and not self._installed:
            for view in self.lm.moe:
                module, name = view.hook_target
                self._saved.append((module, name, module.__dict__.get(name, _ABSENT)))
                setattr(module, name, self._wrap(view, getattr(module, name)))
                if view.router_io == "logits":  # keep the router's input for recorders of "hidden"
                    self._saved.append((view.router, "forward", view.router.__dict__.get("forward", _ABSENT)))
                    view.router.forward = self._keep_input(view, view.router.forward)
            self._installed = True
        elif not (self.controls or self.recorders) and self._installed:
            for module, name, before in reversed(self._saved):  # the class method, or the forward swapped in before
                if before is _ABSENT:
                    delattr(module, name)
                else:
                    setattr(module, name, before)
            self._saved.clear()
            self._inputs.clear()  # drop the last router inputs kept for recorders
            self._installed = False

    def push_control(self, control: RoutingControl) -> None:
        self.controls.append(control)
        self._sync()

    def pop_control(self, control: RoutingControl) -> None:
        self.controls.remove(control)
        self._sync()

    def add_recorder(self, rec) -> None:
        self.recorders.append(rec)
        self._sync()

    def remove_recorder(self, rec) -> None:
        self.recorders.remove(rec)
        self._sync()

    # ----- the hook itself ------------------------------------------------------------------------------
    def layer_control(self, view: MoELayerView, device) -> LayerControl | None:
        if view.index not in self._resolved:
            merged = merge(self.controls)
            self._resolved[view.index] = None if merged.is_empty() else LayerControl.resolve(merged, view, device)
        return self._resolved[view.index]

    def _keep_input(self, view: MoELayerView, original):
        def forward(hidden_states, *args, **kwargs):
            self._inputs[view.index] = hidden_states
            return original(hidden_states, *args, **kwargs)

        return forward

    def _wrap(self, view: MoELayerView, original):
        def forward(hidden_states, *args, **kwargs):
            out = original(hidden_states, *args, **kwargs)
            logits, weights, ids, hidden = _decode(view, hidden_states, out, self._inputs)
            valid = None
            ctrl = self.layer_control(view, logits.device) if self.controls else None
            if ctrl is not None:
                sel = require_rule(view).select(
                    logits, top_k=ctrl.top_k, disable=ctrl.disable, force=ctrl.force,
                    logit_bias=ctrl.logit_bias, top_p=ctrl.top_p,
                )
                w = sel.weights
                if ctrl.scale is not None:
                    w = w * ctrl.scale[sel.ids]
                weights, ids, valid = w.to(weights.dtype), sel.ids, sel.valid
                out = _encode(view, out, logits, weights, ids)
            for rec in self.recorders:
                rec.on_router(view, hidden, logits, weights, ids, valid)
            return out

        return forward


def _decode(view: MoELayerView, first_arg, out, inputs: dict):
    """(logits, weights [T,k], ids [T,k], router input) from what the hooked method returned."""
    if view.router_io == "dense_scores":  # Llama 4: (scores [T,E] with the sigmoid of the top-k, logits)
        scores, logits = out[0], out[1]
        ids = torch.topk(logits, view.rule.top_k if view.rule else view.router.top_k, dim=1)[1]
        return logits, scores.gather(1, ids), ids, first_arg
    if view.router_io == "logits":  # DBRX: route_tokens_to_experts(logits) -> (weights, ids)
        return first_arg, out[0], out[1], inputs.get(view.index, first_arg)
    if view.router_io == "jetmoe":  # (index_sorted_experts, batch_index, batch_gates, expert_size, logits)
        logits = out[4]
        top, ids = logits.topk(view.router.top_k, dim=1)  # the gating's own top-k call
        return logits, torch.softmax(top, dim=1).to(out[2].dtype), ids, first_arg
    if view.router_io == "probs":  # Gemma 4: softmax probabilities in place of logits (log p: the same softmax)
        return out[0].float().log(), out[1], out[2], first_arg
    return out[0], out[1], out[2], first_arg


def _encode(view: MoELayerView, out, logits, weights, ids):
    """The hooked method's output carrying the new selection."""
    if view.router_io == "dense_scores":
        dense = torch.zeros(logits.shape, dtype=weights.dtype, device=weights.device)
        return (dense.scatter_add(1, ids, weights), *out[1:])  # empty slots add weight 0
    if view.router_io == "logits":
        return (weights, ids, *out[2:])
    if view.router_io == "probs":
        return (out[0], weights, ids, *out[3:])
    if view.router_io == "jetmoe":  # JetMoE's sorted dispatch for the new selection (empty slots carry weight 0)
        k = ids.shape[1]
        index_sorted = ids.flatten().sort(0)[1]
        sizes = torch.bincount(ids.flatten(), minlength=logits.shape[1]).tolist()
        return (index_sorted, index_sorted.div(k, rounding_mode="trunc"), weights.flatten()[index_sorted], sizes,
                logits)
    return (logits, weights, ids, *out[3:])
