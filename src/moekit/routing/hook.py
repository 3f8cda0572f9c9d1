"""The one hook on routers (design §3): every router's output passes through ``RouterHook``.

The hook is installed when the first ``route`` or ``record`` context is entered and removed when the
last one exits, so a model outside those contexts runs exactly its own code.
"""

from __future__ import annotations

from moekit.models.loading import LoadedModel
from moekit.models.moe_map import MoELayerView, require_rule
from moekit.routing.control import LayerControl, RoutingControl, merge


class RouterHook:
    """Wraps each router's forward: applies the active controls, then feeds the active recorders."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.controls: list[RoutingControl] = []
        self.recorders: list = []
        self._resolved: dict[int, LayerControl | None] = {}
        self._installed = False

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
                original = view.router.forward
                view.router.forward = self._wrap(view, original)
            self._installed = True
        elif not (self.controls or self.recorders) and self._installed:
            for view in self.lm.moe:
                del view.router.forward  # drop the instance attribute; the class method is back
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

    def _wrap(self, view: MoELayerView, original):
        def forward(hidden_states, *args, **kwargs):
            out = original(hidden_states, *args, **kwargs)
            logits, weights, ids = out[0], out[1], out[2]
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
                out = (logits, weights, ids, *out[3:])
            for rec in self.recorders:
                rec.on_router(view, hidden_states, logits, weights, ids, valid)
            return out

        return forward

