"""Expert placement across ranks from a routing trace: plan, simulate, save (numpy only, no torch).

A placement gives every expert of every MoE layer a rank, with the same number of experts per rank (the
layout every expert-parallel engine needs: engines shard the expert bank contiguously, so rank r holds
experts ``r·E/R … (r+1)·E/R − 1``; ``placement apply`` permutes a checkpoint so that this contiguous split is
the planned one).

Traffic is simulated on the trace with two models of expert parallelism (tokens data-parallel, home rank of
a token = its document index mod R):

- ``a2a`` (standard EP, two all-to-alls per MoE layer): a token is sent to every distinct rank other than its
  home that holds one of its selected experts, and the outputs come back: ``2·|ranks(l, t) \\ {home}|``.
  A placement helps here by putting experts a token selects together on one rank.
- ``coherent`` (ExFlow's context-coherent EP, one all-to-all per layer): a token's state stays where its
  highest-weight expert ran; the next layer sends it to each distinct rank of its experts other than that
  one, and the other ranks of the layer send their partial outputs to it. With top-1 routing this is exactly
  "one transfer when consecutive-layer experts sit on different ranks", what ExFlow minimises.

Load imbalance is max/mean of the routed (token, expert) slots per rank, per layer.

Methods (``PLACEMENTS``): ``contiguous`` (the engines' default), ``random``, ``least-loaded`` (greedy
longest-processing-time balancing of expert loads, the LLEP reading), ``affinity`` (ExFlow: consecutive
layers' experts that pass tokens to each other share a rank; a linear assignment per layer plus swap search),
``affinity-balanced`` (the same swaps under a per-rank load cap, starting from least-loaded).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.analysis.coactivation import layer_affinity
from moekit.analysis.load import expert_load
from moekit.errors import MoekitError
from moekit.registry import Registry

FORMAT = "moekit-placement"
FORMAT_VERSION = 1


@dataclass
class RoutingStats:
    """What the planners read from a trace: per-layer loads and consecutive-layer transition counts."""

    layers: list[int]
    num_experts: list[int]
    loads: list[np.ndarray]  # [E_l] routed slots per expert
    transitions: list[np.ndarray]  # [E_l, E_{l+1}] tokens selecting e' at l and e at l+1 (len L-1)

    @classmethod
    def from_trace(cls, trace) -> RoutingStats:
        """Counts over all tokens of ``trace`` (a ``RoutingTrace``)."""
        ne = trace.num_experts
        ids = [np.asarray(trace.ids[i]) for i in range(trace.num_layers)]
        loads = [expert_load(ids[i], ne[i]) for i in range(len(ids))]
        trans = [layer_affinity(ids[i], ids[i + 1], ne[i], ne[i + 1], normalize="none") for i in range(len(ids) - 1)]
        return cls(trace.layers, ne, loads, trans)


@dataclass
class Placement:
    """Rank of every expert in every MoE layer (``assignment[i][e]``, layer i in ``layers`` order)."""

    ranks: int
    layers: list[int]
    assignment: list[np.ndarray]
    method: str = "manual"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.assignment) != len(self.layers):
            raise MoekitError(f"placement lists {len(self.layers)} layers but {len(self.assignment)} assignments")
        self.assignment = [np.asarray(a, dtype=np.int64) for a in self.assignment]
        for li, a in zip(self.layers, self.assignment, strict=True):
            check_assignment(a, self.ranks, f"layer {li}")

    @property
    def num_experts(self) -> list[int]:
        return [len(a) for a in self.assignment]

    def order(self, pos: int) -> list[int]:
        """Old expert ids in their new positions for layer ``pos``: rank 0's experts first (ascending), …"""
        a = self.assignment[pos]
        return [int(e) for e in np.lexsort((np.arange(len(a)), a))]

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method, "ranks": self.ranks,
            "layers": [int(li) for li in self.layers],
            "assignment": {str(li): [int(r) for r in a] for li, a in zip(self.layers, self.assignment, strict=True)},
            "order": {str(li): self.order(i) for i, li in enumerate(self.layers)},
            **self.meta,
        }

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the placement as JSON (temp file + rename)."""
        from moekit.io import atomic_write

        with atomic_write(path, force=force, mode="w") as fh:
            fh.write(json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Placement:
        """Read and validate a placement file."""
        p = Path(path)
        if not p.is_file():
            raise MoekitError(f"placement file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoekitError(f"{p} is not a placement file (not JSON: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MoekitError(f"{p} is not a moekit placement file (no \"format\": \"{FORMAT}\")")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise MoekitError(f"{p} has placement format {data['format_version']}; this moekit reads up to {FORMAT_VERSION}")
        try:
            ranks, layers = int(data["ranks"]), [int(li) for li in data["layers"]]
            assignment = [np.asarray(data["assignment"][str(li)], dtype=np.int64) for li in layers]
        except (KeyError, TypeError, ValueError) as exc:
            raise MoekitError(f"{p} is a malformed placement file ({exc.__class__.__name__}: {exc})") from None
        meta = {k: v for k, v in data.items() if k not in ("format", "format_version", "method", "ranks", "layers",
                                                             "assignment", "order")}
        return cls(ranks, layers, assignment, str(data.get("method", "manual")), meta)


def check_assignment(a: np.ndarray, ranks: int, where: str) -> None:
    """Every rank holds the same number of experts and every rank id is in range."""
    if a.ndim != 1 or a.size == 0:
        raise MoekitError(f"{where}: assignment must be a non-empty list of ranks")
    if a.min() < 0 or a.max() >= ranks:
        raise MoekitError(f"{where}: ranks must lie in 0..{ranks - 1}")
    counts = np.bincount(a, minlength=ranks)
    if (counts != a.size // ranks).any():
        raise MoekitError(f"{where}: every rank must hold {a.size // ranks} experts, got {counts.tolist()}")


def check_ranks(ranks: int, num_experts: Sequence[int]) -> None:
    """``ranks`` ≥ 1 and divides every layer's expert count."""
    if isinstance(ranks, bool) or not isinstance(ranks, int | np.integer) or ranks < 1:
        raise MoekitError(f"ranks must be a positive integer, got {ranks!r}")
    bad = sorted({e for e in num_experts if e % ranks})
    if bad:
        raise MoekitError(f"{ranks} ranks do not divide the expert count {bad[0]}: every rank must hold the same "
                          "number of experts")


# ----- methods -------------------------------------------------------------------------------------------

Planner = Callable[[RoutingStats, int, np.random.Generator], list[np.ndarray]]


@dataclass(frozen=True)
class PlacementMethod:
    """A registered planner and its one-line help."""

    plan: Planner
    help: str


PLACEMENTS: Registry[PlacementMethod] = Registry("placement method")


def _method(name: str, help_text: str) -> Callable[[Planner], Planner]:
    def deco(fn: Planner) -> Planner:
        PLACEMENTS.add(name, PlacementMethod(fn, help_text), help=help_text)
        return fn

    return deco


@_method("contiguous", "experts 0..E/R-1 on rank 0, the next E/R on rank 1, ... (what engines do by default)")
def plan_contiguous(stats: RoutingStats, ranks: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.arange(e) // (e // ranks) for e in stats.num_experts]


@_method("random", "a uniformly random placement per layer (seeded): the baseline a plan must beat")
def plan_random(stats: RoutingStats, ranks: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for e in stats.num_experts:
        a = np.empty(e, dtype=np.int64)
        a[rng.permutation(e)] = np.arange(e) // (e // ranks)
        out.append(a)
    return out


def _least_loaded(load: np.ndarray, ranks: int) -> np.ndarray:
    """Greedy LPT: heaviest expert first onto the least-loaded rank that still has a free slot."""
    e = len(load)
    cap = e // ranks
    a = np.empty(e, dtype=np.int64)
    rank_load = np.zeros(ranks)
    free = np.full(ranks, cap)
    for x in np.lexsort((np.arange(e), -load)):
        open_ranks = np.flatnonzero(free > 0)
        r = int(open_ranks[np.argmin(rank_load[open_ranks])])
        a[x], rank_load[r], free[r] = r, rank_load[r] + load[x], free[r] - 1
    return a


@_method("least-loaded", "balance routed load per rank (greedy heaviest-expert-first, LLEP's reading): "
                         "minimises the busiest rank's work")
def plan_least_loaded(stats: RoutingStats, ranks: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [_least_loaded(load.astype(np.float64), ranks) for load in stats.loads]


def _assign_to_ranks(gain: np.ndarray, ranks: int) -> np.ndarray:
    """Maximise Σ gain[e, rank(e)] with E/R experts per rank (linear assignment over expanded slots)."""
    from scipy.optimize import linear_sum_assignment

    e = gain.shape[0]
    cap = e // ranks
    slots = np.repeat(gain, cap, axis=1)  # [E, R·cap]: column j is a slot of rank j // cap
    _, cols = linear_sum_assignment(-slots)
    return (cols // cap).astype(np.int64)


def _kept_transitions(a_prev: np.ndarray, a_next: np.ndarray, trans: np.ndarray) -> float:
    return float(trans[a_prev[:, None] == a_next[None, :]].sum())


def _swap_search(assign: list[np.ndarray], trans: list[np.ndarray], passes: int = 4,
                 loads: list[np.ndarray] | None = None, caps: list[float] | None = None) -> None:
    """Pairwise swaps of experts on different ranks that raise the transitions kept on a rank (in place);
    with ``loads``/``caps``, only swaps that keep every rank's routed load of the layer within its cap."""
    n = len(assign)
    for _ in range(passes):
        improved = False
        for i in range(n):
            a = assign[i]
            # gain[e, r]: transitions between expert e of layer i and the experts on rank r in layers i±1
            gain = np.zeros((len(a), int(a.max()) + 1))
            if i > 0:
                np.add.at(gain.T, assign[i - 1], trans[i - 1])  # rows of trans[i-1] are layer i-1's experts
            if i + 1 < n:
                np.add.at(gain.T, assign[i + 1], trans[i].T)
            own = gain[np.arange(len(a)), a]
            if loads is not None:
                load = loads[i].astype(np.float64)
                rank_load = np.bincount(a, weights=load, minlength=gain.shape[1])
            for x in range(len(a)):
                # swapping x with every y at once: what x gains on y's rank and y on x's, minus what they had
                delta = gain[x, a] + gain[:, a[x]] - own[x] - own
                delta[a == a[x]] = 0.0
                if loads is not None:
                    moved = load - load[x]  # what y's rank gains (x's rank loses the same)
                    ok = (rank_load[a] - moved <= caps[i]) & (rank_load[a[x]] + moved <= caps[i])
                    delta[~ok] = 0.0
                y = int(np.argmax(delta))
                if delta[y] > 1e-9:
                    if loads is not None:
                        rank_load[a[x]] += load[y] - load[x]
                        rank_load[a[y]] += load[x] - load[y]
                    a[x], a[y] = a[y], a[x]
                    own[x], own[y] = gain[x, a[x]], gain[y, a[y]]
                    improved = True
        if not improved:
            return


@_method("affinity", "ExFlow: experts of consecutive layers that pass tokens to each other share a rank "
                     "(fewest cross-rank transfers; load is not balanced)")
def plan_affinity(stats: RoutingStats, ranks: int, rng: np.random.Generator) -> list[np.ndarray]:
    assign = [_least_loaded(stats.loads[0].astype(np.float64), ranks)]
    for i, trans in enumerate(stats.transitions):
        prev = assign[i]
        gain = np.zeros((trans.shape[1], ranks))
        np.add.at(gain.T, prev, trans)  # gain[e, r] = tokens reaching e from the experts of rank r
        assign.append(_assign_to_ranks(gain, ranks))
    _swap_search(assign, stats.transitions)
    return assign


BALANCE_SLACK = 0.10


@_method("affinity-balanced", "ExFlow's affinity under a load cap: start from least-loaded, then swap experts to "
                              "keep tokens on a rank while no rank exceeds 1.1x the mean load (or the "
                              "least-loaded plan's peak, if higher)")
def plan_affinity_balanced(stats: RoutingStats, ranks: int, rng: np.random.Generator) -> list[np.ndarray]:
    assign = [_least_loaded(load.astype(np.float64), ranks) for load in stats.loads]
    caps = []
    for load, a in zip(stats.loads, assign, strict=True):
        peak = np.bincount(a, weights=load.astype(np.float64), minlength=ranks).max()
        caps.append(max(peak, (1 + BALANCE_SLACK) * float(load.sum()) / ranks))
    _swap_search(assign, stats.transitions, passes=8, loads=stats.loads, caps=caps)
    return assign


def plan(trace, ranks: int, method: str = "affinity", seed: int = 0) -> Placement:
    """Plan a placement of ``trace``'s experts on ``ranks`` ranks with a registered method."""
    check_ranks(ranks, trace.num_experts)
    entry = PLACEMENTS.get(method)
    stats = RoutingStats.from_trace(trace)
    assignment = entry.plan(stats, ranks, np.random.default_rng(seed))
    meta = {"seed": seed, "num_experts": [int(e) for e in trace.num_experts],
            "trace": {"model": trace.meta.get("model"), "architecture": trace.meta.get("architecture"),
                      "tokens": trace.num_tokens, "ids_sha256": _ids_hash(trace)}}
    return Placement(ranks, trace.layers, assignment, method, meta)


def _ids_hash(trace) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(trace.ids)).tobytes()).hexdigest()


# ----- simulation ----------------------------------------------------------------------------------------

def _rank_sets(ids: np.ndarray, assign: np.ndarray, ranks: int) -> np.ndarray:
    """Boolean ``[N, R]``: rank r holds one of token n's selected experts."""
    n, k = ids.shape
    r = np.where(ids >= 0, assign[np.clip(ids, 0, None)], ranks)  # column R absorbs "no expert"
    out = np.zeros((n, ranks + 1), dtype=bool)
    out[np.repeat(np.arange(n), k), r.ravel()] = True
    return out[:, :ranks]


def simulate(trace, placement: Placement, bytes_per_token: float | None = None) -> dict:
    """All-to-all volume (both traffic models, see module docstring) and load imbalance of ``placement``."""
    if list(placement.layers) != list(trace.layers) or placement.num_experts != list(trace.num_experts):
        raise MoekitError(f"placement is for MoE layers {placement.layers} with experts {placement.num_experts}; "
                          f"the trace has {trace.layers} with {trace.num_experts}")
    ranks, n = placement.ranks, trace.num_tokens
    if n == 0:
        raise MoekitError("the trace has no tokens to simulate")
    home = np.asarray(trace.doc).astype(np.int64) % ranks
    rows = np.arange(n)
    loc = home.copy()
    a2a = coherent = remote_slots = slots = 0
    imbalance = []
    for i in range(trace.num_layers):
        ids = np.asarray(trace.ids[i]).astype(np.int64)
        w = np.asarray(trace.weights[i], dtype=np.float32)
        assign = placement.assignment[i]
        sets = _rank_sets(ids, assign, ranks)
        a2a += 2 * int(sets.sum() - sets[rows, home].sum())
        coherent += int(sets.sum() - sets[rows, loc].sum())  # dispatch from where the token is
        valid = ids >= 0
        any_valid = valid.any(axis=1)
        top = np.argmax(np.where(valid, w, -np.inf), axis=1)
        top_rank = np.where(any_valid, assign[np.clip(ids[rows, top], 0, None)], loc)
        coherent += int(sets.sum() - sets[rows, top_rank].sum())  # partial outputs gathered at the top expert
        loc = top_rank
        slot_rank = assign[np.clip(ids, 0, None)][valid]
        per_rank = np.bincount(slot_rank, minlength=ranks)
        slots += int(valid.sum())
        remote_slots += int((slot_rank != np.broadcast_to(home[:, None], ids.shape)[valid]).sum())
        mean = per_rank.mean()
        imbalance.append(float(per_rank.max() / mean) if mean > 0 else 1.0)
    out = {
        "method": placement.method, "ranks": ranks, "tokens": n, "moe_layers": trace.num_layers,
        "a2a_transfers_per_token": a2a / n, "coherent_transfers_per_token": coherent / n,
        "remote_slot_fraction": remote_slots / max(slots, 1),
        "imbalance_mean": float(np.mean(imbalance)), "imbalance_max": float(np.max(imbalance)),
    }
    if bytes_per_token is not None:
        if not (math.isfinite(bytes_per_token) and bytes_per_token > 0):
            raise MoekitError(f"bytes per token must be a positive number, got {bytes_per_token}")
        out["a2a_bytes_per_token"] = out["a2a_transfers_per_token"] * bytes_per_token
        out["coherent_bytes_per_token"] = out["coherent_transfers_per_token"] * bytes_per_token
    return out


def compare(trace, ranks: int, methods: Sequence[str] | None = None, seed: int = 0,
            bytes_per_token: float | None = None, plan_trace=None) -> list[dict]:
    """Simulate every method on ``trace`` (planned on ``plan_trace``, default the same trace): one row each."""
    rows = []
    for name in methods or PLACEMENTS.names():
        p = plan(plan_trace if plan_trace is not None else trace, ranks, name, seed)
        rows.append(simulate(trace, p, bytes_per_token))
    return rows
