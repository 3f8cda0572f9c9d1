"""The expert vocabulary: how every moekit file, option and API names an expert (design §2).

- ``ExpertRef(layer, expert)``: one routed expert. ``layer`` is the **HF decoder-layer index** (what
  ``moekit inspect`` shows and ``model.model.layers[layer]`` is), never the position among the MoE
  layers; ``expert`` is the expert's row in that layer's router. One string form, ``"3:5"``, and one
  parser, :meth:`ExpertRef.parse`. Converting between decoder index and MoE position is the model map's
  job (``MoEMap.moe_position`` / ``MoEMap.layer_of``) and nobody else's.
- ``ExpertSet``: an immutable, sorted set of refs with one JSON form, ``{"experts": ["3:5", "7:1"]}``
  (an object, so a file may carry other keys beside it: ``moekit steer find`` files do). Read with
  :meth:`ExpertSet.from_json` / :meth:`ExpertSet.load`, which also accept, on input only, the forms
  older moekit files used: ``[[3, 5], ...]`` pairs, ``[{"layer": 3, "expert": 5}, ...]`` rows and
  ``{"3": [5, 6]}`` per-layer maps.
- ``NO_EXPERT`` (``-1``, weight 0): the one "no expert" id in recorded routing (traces, analysis, steering
  counts). Two boundaries speak another dialect and convert there, with these functions only:
  the expert dispatch (``moekit.nn``: an id ≥ E contributes nothing; :func:`to_dispatch_ids` /
  :func:`to_trace_ids`), and a changed HF router output (``moekit.models.rules.Selection``: the slot keeps a
  real id with weight 0, so every HF experts implementation runs unchanged, and ``valid`` marks it;
  :func:`masked_to_trace_ids`, used by the recorder).

Torch-free: every layer of the package may import it.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from moekit.errors import MoekitError

V = TypeVar("V")

MAX_INDEX = 32767
"""Largest layer or expert index accepted (traces store expert ids as int16)."""

NO_EXPERT = -1
"""The "no expert" id of recorded routing (a slot a token did not use; its weight is 0)."""

FORMAT_HINT = f"write LAYER:EXPERT (decoder-layer and expert indices 0..{MAX_INDEX}), e.g. 3:5"


def _index(text: str) -> int | None:
    """A non-negative decimal index from text, or None (signs, spaces inside, non-digits, huge refused)."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        return None
    v = int(text)
    return v if v <= MAX_INDEX else None


def _is_file(text: str) -> bool:
    """``text`` names an existing file (False for names the OS cannot even look up: too long, NUL bytes)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _short(obj: Any, limit: int = 40) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, order=True)
class ExpertRef:
    """One routed expert: HF decoder-layer index and expert index; ``str(ref) == "3:5"``.

    Unpacks like a pair (``layer, expert = ref``), sorts by layer then expert."""

    layer: int
    expert: int

    def __post_init__(self) -> None:
        for name in ("layer", "expert"):
            v = getattr(self, name)
            try:
                v = operator.index(v) if _is_int(v) and not isinstance(v, float) else None
            except TypeError:  # e.g. a tensor of several elements
                v = None
            if v is None:
                raise MoekitError(f"bad expert {_short(self.layer)}:{_short(self.expert)}: {name} must be an integer")
            if not 0 <= v <= MAX_INDEX:
                raise MoekitError(f"bad expert {self.layer}:{self.expert}: {name} must be in [0, {MAX_INDEX}]")
            object.__setattr__(self, name, v)

    def __str__(self) -> str:
        return f"{self.layer}:{self.expert}"

    def __iter__(self) -> Iterator[int]:
        return iter((self.layer, self.expert))

    @classmethod
    def parse(cls, text: str, what: str = "expert") -> ExpertRef:
        """``"3:5"`` → ``ExpertRef(3, 5)``; a one-line MoekitError naming ``what`` on anything else."""
        if not isinstance(text, str):
            raise MoekitError(f"bad {what} {_short(text)}: {FORMAT_HINT}")
        layer, sep, expert = text.strip().partition(":")
        li, ei = _index(layer), _index(expert)
        if not sep or li is None or ei is None:
            raise MoekitError(f"bad {what} {_short(text)}: {FORMAT_HINT}")
        return cls(li, ei)

    @classmethod
    def coerce(cls, item: Any, what: str = "expert") -> ExpertRef:
        """An ExpertRef from what files and APIs hold: a ref, ``"3:5"``, a ``(3, 5)`` pair or a
        ``{"layer": 3, "expert": 5}`` row (the last two are legacy file forms)."""
        if isinstance(item, ExpertRef):
            return item
        if isinstance(item, str):
            return cls.parse(item, what)
        pair = (item["layer"], item["expert"]) if isinstance(item, Mapping) and {"layer", "expert"} <= item.keys() \
            else item
        if isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) for v in pair) \
                and all(0 <= v <= MAX_INDEX for v in pair):
            return cls(*(int(v) for v in pair))
        raise MoekitError(f"bad {what} {_short(item)}: {FORMAT_HINT}")


def _is_int(v: Any) -> bool:
    """An integer value (JSON floats such as 3.0 included; booleans and numpy bools excluded)."""
    if isinstance(v, bool) or type(v).__name__ in ("bool_", "bool"):
        return False
    if hasattr(v, "__index__"):
        return True
    return isinstance(v, float) and v.is_integer()


class ModelExperts(Protocol):
    """What :meth:`ExpertSet.check` needs from a model map (``moekit.models.MoEMap`` has it)."""

    def check_expert(self, layer: int, expert: int) -> None: ...


class ExpertSet:
    """An immutable set of :class:`ExpertRef`, iterated in sorted order; one JSON form
    ``{"experts": ["3:5", ...]}`` (see the module docstring for the legacy forms read on input)."""

    __slots__ = ("_refs", "_set")

    def __init__(self, refs: Iterable[Any] = ()) -> None:
        self._set: frozenset[ExpertRef] = frozenset(ExpertRef.coerce(r) for r in refs)
        self._refs: tuple[ExpertRef, ...] = tuple(sorted(self._set))

    # --- set behaviour -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ExpertRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, item: object) -> bool:
        try:
            return ExpertRef.coerce(item) in self._set
        except MoekitError:
            return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertSet) and self._refs == other._refs

    def __hash__(self) -> int:
        return hash(self._refs)

    def __or__(self, other: Iterable[Any]) -> ExpertSet:
        return ExpertSet([*self._refs, *ExpertSet(other)])

    def __repr__(self) -> str:
        return f"ExpertSet({self.to_text()!r})"

    def per_layer(self) -> dict[int, tuple[int, ...]]:
        """``{layer: (expert, ...)}``, layers and experts ascending."""
        out: dict[int, list[int]] = {}
        for ref in self._refs:
            out.setdefault(ref.layer, []).append(ref.expert)
        return {li: tuple(es) for li, es in out.items()}

    def in_layer(self, layer: int) -> tuple[int, ...]:
        """The experts of decoder layer ``layer``, ascending (empty when none)."""
        return tuple(r.expert for r in self._refs if r.layer == layer)

    # --- text and JSON forms -------------------------------------------------------------------------
    def to_text(self) -> str:
        """The comma-separated option form, ``"3:5,7:1"``."""
        return ",".join(map(str, self._refs))

    def to_list(self) -> list[str]:
        """``["3:5", "7:1"]``: the value of the ``experts`` key (and of lists embedded in other files)."""
        return [str(r) for r in self._refs]

    def to_json(self) -> dict[str, list[str]]:
        """The one JSON form of an expert set."""
        return {"experts": self.to_list()}

    @classmethod
    def parse(cls, text: str | None, what: str = "expert") -> ExpertSet:
        """``"3:5,7:1"`` → the set; empty or None → the empty set; one-line error on a bad item."""
        if text is None or not text.strip():
            return cls()
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise MoekitError(f"bad {what} list {_short(text)}: an empty item; {FORMAT_HINT}")
        return cls(ExpertRef.parse(item, what) for item in items)

    @classmethod
    def from_json(cls, data: Any, source: str = "expert set") -> ExpertSet:
        """The set held by ``data``: ``{"experts": [...]}`` (other keys ignored) or, legacy, a list of
        ``"3:5"`` / ``[3, 5]`` / ``{"layer": 3, "expert": 5}`` items or a ``{"3": [5, 6]}`` map."""
        if isinstance(data, Mapping) and "experts" in data:
            data = data["experts"]
            if not isinstance(data, list):
                raise MoekitError(f"{source}: 'experts' must be a list of \"LAYER:EXPERT\" strings")
        if isinstance(data, list):
            return cls(ExpertRef.coerce(item, f"expert in {source}") for item in data)
        if isinstance(data, Mapping) and data and all(isinstance(k, str) and _index(k) is not None for k in data):
            refs = []
            for key, ids in data.items():
                if not isinstance(ids, list):
                    raise MoekitError(f"{source}: a per-layer map needs expert-id lists, got {key!r}: {_short(ids)}")
                refs += [ExpertRef.coerce([_index(key), e], f"expert in {source}") for e in ids]
            return cls(refs)
        raise MoekitError(f"{source} holds no expert set: write {{\"experts\": [\"3:5\", ...]}}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertSet:
        """Read an expert-set JSON file (any file with an ``experts`` list: ``moekit steer find`` output,
        ``moekit report --super-experts``, ...), legacy forms included."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MoekitError(f"expert file {p} does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise MoekitError(f"cannot read expert file {p}: {str(exc).splitlines()[0]}") from None
        return cls.from_json(data, source=f"expert file {p}")

    def save(self, path: str | os.PathLike, force: bool = True, **extra: Any) -> Path:
        """Write the set's JSON form atomically, with ``"written_by": "moekit"`` (what lets ``--force``
        replace it) and the JSON-serialisable ``extra`` keys (e.g. ``model``), which readers ignore."""
        from moekit.io import atomic_write

        with atomic_write(path, force=force, mode="w") as fh:
            json.dump({**self.to_json(), "written_by": "moekit", **extra}, fh, indent=1)
            fh.write("\n")
        return Path(path)

    @classmethod
    def from_option(cls, value: str | None, what: str = "expert") -> ExpertSet:
        """A command-line value: ``"3:5,7:1"`` or the path of an expert-set JSON file."""
        if value is None or not value.strip():
            return cls()
        if value.strip().endswith(".json") or _is_file(value):
            return cls.load(value.strip())
        return cls.parse(value, what)

    # --- validation ----------------------------------------------------------------------------------
    def check(self, moe: ModelExperts) -> ExpertSet:
        """Raise a one-line MoekitError naming the first ref that is not an expert of the model ``moe``
        (its layer is not an MoE layer, or its expert id is out of range); returns the set."""
        for ref in self._refs:
            try:
                moe.check_expert(ref.layer, ref.expert)
            except MoekitError as exc:
                raise MoekitError(f"expert {ref} is not in this model: {exc}") from None
        return self


def expert_values(text: str | None, what: str = "expert value") -> dict[ExpertRef, str]:
    """``"3:5=2.0,4:1=0.5"`` → ``{ExpertRef(3, 5): "2.0", ...}`` (values left as text for the caller to check);
    a key may also be an expert-set JSON file, whose every expert gets the value (``"super.json=0.5"``)."""
    if text is None or not text.strip():
        return {}
    out: dict[ExpertRef, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise MoekitError(f"bad {what} {_short(item.strip())}: write LAYER:EXPERT=X, e.g. 3:5=2.0")
        for ref in ExpertSet.from_option(key, what):
            out[ref] = value.strip()
    return out


def expert_values_json(values: Mapping[Any, V]) -> dict[str, V]:
    """A per-expert value map in file form, ``{"3:5": value, ...}`` in ref order (quantize's bit widths, the
    server's ``boost``/``bias``); keys in any form ``ExpertRef.coerce`` reads."""
    keyed = {ExpertRef.coerce(k): v for k, v in values.items()}
    return {str(ref): keyed[ref] for ref in sorted(keyed)}


def moe_position(layers: Sequence[int], layer: int, where: str = "") -> int:
    """Position of decoder layer ``layer`` among the MoE layers ``layers`` (their decoder indices, ascending).

    The one implementation of the decoder index → MoE position conversion: ``MoEMap.moe_position`` uses it,
    and so does ``RoutingTrace.layer_pos`` for traces read without their model (the trace keeps the map's
    ``layers``)."""
    for pos, li in enumerate(layers):
        if li == layer:
            return pos
    raise MoekitError(f"layer {layer} is not an MoE layer{where} (MoE layers: {list(layers)})")


# --- the "no expert" id at the two boundaries -----------------------------------------------------------
# Written with arithmetic on a boolean mask (``ids - none * (ids - value)``) so the same code serves numpy arrays
# and torch tensors and keeps their dtype and device; real ids pass through unchanged.
def _replace(ids: Any, none: Any, value: int) -> Any:
    return ids - none * (ids - value)


def to_trace_ids(ids: Any, num_experts: int) -> Any:
    """Dispatch ids (``>= num_experts`` = no expert) → trace ids (``NO_EXPERT`` = no expert)."""
    return _replace(ids, ids >= num_experts, NO_EXPERT)


def to_dispatch_ids(ids: Any, num_experts: int) -> Any:
    """Trace ids (``NO_EXPERT``) → dispatch ids (``num_experts``: the slot the expert dispatch skips, and the
    extra column that absorbs "no expert" in ``[N, E + 1]`` count tables)."""
    return _replace(ids, ids < 0, num_experts)


def masked_to_trace_ids(ids: Any, valid: Any) -> Any:
    """A rule's selection (``valid`` False = an unused slot holding a placeholder id) → trace ids."""
    return _replace(ids, ~valid, NO_EXPERT)
