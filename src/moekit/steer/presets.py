"""Turn an experts file (from ``moekit steer find``) into a RoutingControl.

Modes (``--steer FILE:MODE[:N]``): ``off`` disables the top-N experts, ``on`` forces them (at most the
layer's k per layer, the best-ranked first), ``on+off`` also disables the N experts most tied to the
*second* set (most negative score; SteerMoE's "activate these, deactivate those"), ``boost=X``
multiplies their routing weight by X. N defaults to the file's ``top``. ``off``/``on``/``boost`` use
entries with a positive score: the experts more tied to the first example set (or to the markers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moekit.errors import MoekitError
from moekit.experts import MAX_INDEX, ExpertRef, ExpertSet
from moekit.models.loading import LoadedModel
from moekit.routing import RoutingControl
from moekit.steer.detect import EXPERTS_FORMAT, model_signature
from moekit.validate import finite_float, integer, parse_float

MODES = ("off", "on", "on+off", "boost")


def load_experts(path: str | os.PathLike, lm: LoadedModel | None = None) -> dict:
    """Read an experts file; with ``lm``, check that it was made for this model (one-line error if not)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoekitError(f"experts file {p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise MoekitError(f"cannot read experts file {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != EXPERTS_FORMAT or not isinstance(data.get("entries"), list):
        raise MoekitError(f"{p} is not a moekit experts file (write one with `moekit steer find`)")
    check_entries(data, str(p))
    if lm is not None:
        check_experts(data, lm, source=str(p))
    return data


def check_entries(data: dict, source: str = "experts file") -> None:
    """One-line error unless every entry has integer ``layer``/``expert`` >= 0 and a finite ``score``
    (and ``top``, when present, is a positive integer): the fields the steering presets read."""
    try:
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise MoekitError("'entries' is not a list")
        if "top" in data:
            integer("top", data["top"], 1)
        for i, row in enumerate(entries):
            if not isinstance(row, dict):
                raise MoekitError(f"entry {i} is not an object")
            for key in ("layer", "expert", "score"):
                if key not in row:
                    raise MoekitError(f"entry {i} has no {key!r}")
            integer(f"entry {i} layer", row["layer"], 0, MAX_INDEX)
            integer(f"entry {i} expert", row["expert"], 0, MAX_INDEX)
            finite_float(f"entry {i} score", row["score"])
        if "experts" in data:
            ExpertSet.from_json(data)
    except MoekitError as exc:
        raise MoekitError(f"{source} is not a valid experts file: {exc}") from None


def check_experts(data: dict, lm: LoadedModel, source: str = "experts file") -> None:
    """Raise a one-line MoekitError unless ``data`` was computed on a model like ``lm``."""
    sig = model_signature(lm)
    for key in ("architecture", "layers", "num_experts"):
        if data.get(key) != sig[key]:
            raise MoekitError(f"{source} was made for another model ({data.get('model')}: {key} "
                              f"{data.get(key)} vs {sig[key]} for {lm.name})")
    for mine, theirs in zip(sig["router_norms"], data.get("router_norms") or [], strict=False):
        if any(abs(a - b) > 0.02 * max(abs(a), 1e-6) for a, b in zip(mine, theirs, strict=False)):
            raise MoekitError(f"{source} was made for another model ({data.get('model')}; its router "
                              f"weights differ from {lm.name}'s)")


def selected_experts(data: dict, n: int | None = None, side: str = "pos") -> list[ExpertRef]:
    """The top ``n`` (default: the file's ``top``) experts with a positive score, best first; with
    ``side="neg"`` the ``n`` with the most negative score (those tied to the second set)."""
    n = int(data.get("top", 10)) if n is None else n
    if n < 1:
        raise MoekitError("the number of steering experts must be at least 1")
    if side == "pos":
        rows = [r for r in data["entries"] if r["score"] > 0]
    else:
        rows = [r for r in reversed(data["entries"]) if r["score"] < 0]
    out = [ExpertRef.coerce(r) for r in rows][:n]
    if not out:
        raise MoekitError(f"the experts file has no entry with a {'positive' if side == 'pos' else 'negative'} score")
    return out


def steering_control(data: dict, mode: str, lm: LoadedModel, n: int | None = None) -> RoutingControl:
    """A RoutingControl for ``mode`` ('off', 'on' or 'boost=X') from the experts file ``data``."""
    check_entries(data)
    check_experts(data, lm)
    name, _, arg = mode.partition("=")
    if name not in MODES or (name == "boost") != bool(arg):
        raise MoekitError(f"unknown steering mode {mode!r}; use off, on, on+off or boost=X")
    experts = selected_experts(data, n)
    if name == "off":
        return RoutingControl.make(disable=experts)
    if name in ("on", "on+off"):
        per_layer: dict[int, int] = {}
        chosen = []
        for layer, e in experts:
            if per_layer.get(layer, 0) < lm.moe.layer(layer).top_k:
                per_layer[layer] = per_layer.get(layer, 0) + 1
                chosen.append(ExpertRef(layer, e))
        off = selected_experts(data, n, side="neg") if name == "on+off" else []
        return RoutingControl.make(force=chosen, disable=off)
    factor = finite_float("boost factor", parse_float("boost factor", arg), 0.0)
    return RoutingControl.make(scale={e: factor for e in experts})


def parse_steer(spec: str) -> tuple[str, str, int | None]:
    """``"experts.json:boost=2:4"`` → ("experts.json", "boost=2", 4); N is optional."""
    parts = spec.split(":")
    n = None
    if len(parts) >= 3 and parts[-1].isdigit():
        n = int(parts.pop())
    if len(parts) < 2 or not parts[-1]:
        raise MoekitError(f"bad --steer {spec!r}: write FILE:off, FILE:on or FILE:boost=X (optionally :N)")
    mode = parts.pop()
    return ":".join(parts), mode, n


def control_from_spec(spec: str, lm: LoadedModel) -> RoutingControl:
    """The RoutingControl for a ``--steer FILE:MODE[:N]`` option."""
    path, mode, n = parse_steer(spec)
    return steering_control(load_experts(path, lm), mode, lm, n)
