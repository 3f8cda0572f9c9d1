"""The one hook on routers: change routing (``route``) and record it (``record``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from moekit.models.loading import LoadedModel
from moekit.routing.control import Expert, LayerControl, RoutingControl, merge
from moekit.routing.hook import RouterHook
from moekit.routing.record import FIELDS, Recorder, record


@contextlib.contextmanager
def route(
    lm: LoadedModel,
    disable=(),
    force=(),
    scale=None,
    bias=None,
    top_k: int | dict[int, int] | None = None,
    top_p: float | dict[int, float] | None = None,
    control: RoutingControl | None = None,
) -> Iterator[RoutingControl]:
    """Change routing for every forward inside the block; exact, composable, and gone after exit.

    ``disable``/``force``: experts never / always selected (an ``ExpertSet``, ``ExpertRef``s, ``"3:5"`` strings
    or ``(layer, expert)`` pairs; layer = decoder-layer index); ``scale``: expert → factor on the routing weight;
    ``bias``: expert → logit bias; ``top_k``/``top_p``: experts
    per token (int or per-layer dict; top-p as in "Harder Tasks Need More Experts").
    """
    ctrl = control or RoutingControl.make(disable, force, scale, bias, top_k, top_p)
    ctrl.validate(lm.moe)
    hook = RouterHook.of(lm)
    hook.push_control(ctrl)
    try:
        yield ctrl
    finally:
        hook.pop_control(ctrl)


__all__ = ["FIELDS", "Expert", "LayerControl", "Recorder", "RouterHook", "RoutingControl", "merge", "record", "route"]
