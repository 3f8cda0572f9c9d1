"""RoutingTrace: per token and MoE layer, the experts chosen and their weights (design §3).

Layout (all numpy arrays; axis 0 of the per-layer arrays is the MoE layer, in ``meta["layers"]`` order):

- ``ids``      int16   [L, N, K]  selected experts; ``-1`` (``moekit.experts.NO_EXPERT``) where fewer than K
  were used
- ``weights``  float32 [L, N, K]  routing weight actually applied (0 where id is -1)
- ``probs``    float16 [L, N, E]  optional: full router probabilities (same E in every layer)
- ``token_ids`` int32 [N], ``doc`` int32 [N] (document index), ``pos`` int32 [N] (position in doc),
  ``domain`` int16 [N] (index into ``meta["domains"]``, -1 = none)
- ``meta``: model id, architecture, decoder layer index of each MoE layer, experts and top-k per
  layer, domain names, moekit version, ``format_version``.

Saved as one safetensors file (arrays + JSON metadata in its header), so ``load(mmap=True)`` maps it
without reading the arrays into memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.errors import MoekitError, TraceError
from moekit.experts import NO_EXPERT, moe_position

FORMAT_VERSION = 1
_PER_TOKEN = ("token_ids", "doc", "pos", "domain")
_DTYPES = {
    "ids": np.int16,
    "weights": np.float32,
    "probs": np.float16,
    "token_ids": np.int32,
    "doc": np.int32,
    "pos": np.int32,
    "domain": np.int16,
}


@dataclass
class RoutingTrace:
    """Routing decisions for N tokens across the MoE layers of one model (see module docstring)."""

    ids: np.ndarray
    weights: np.ndarray
    token_ids: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    domain: np.ndarray | None = None
    probs: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids.ndim != 3:
            raise TraceError(f"ids must be [layers, tokens, k], got shape {self.ids.shape}")
        L, N, _ = self.ids.shape
        if self.weights.shape != self.ids.shape:
            raise TraceError(f"weights shape {self.weights.shape} != ids shape {self.ids.shape}")
        if self.domain is None:
            self.domain = np.full(N, -1, dtype=np.int16)
        for name in _PER_TOKEN:
            arr = getattr(self, name)
            if arr.shape != (N,):
                raise TraceError(f"{name} must have shape ({N},), got {arr.shape}")
        if self.probs is not None and self.probs.shape[:2] != (L, N):
            raise TraceError(f"probs shape {self.probs.shape} does not match [{L}, {N}, E]")
        self.meta.setdefault("format_version", FORMAT_VERSION)
        self.meta.setdefault("layers", list(range(L)))
        self.meta.setdefault("domains", [])
        if len(self.meta["layers"]) != L:
            raise TraceError(f"meta lists {len(self.meta['layers'])} layers but ids has {L}")

    # ----- shape -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[0])

    @property
    def layers(self) -> list[int]:
        """Decoder layer index of each MoE layer (axis 0)."""
        return list(self.meta["layers"])

    @property
    def num_experts(self) -> list[int]:
        """Routed experts per MoE layer."""
        ne = self.meta.get("num_experts")
        if ne is None:
            return [int(self.ids[i].max()) + 1 for i in range(self.num_layers)]
        return list(ne) if isinstance(ne, list) else [int(ne)] * self.num_layers

    @property
    def top_k(self) -> list[int]:
        """Nominal experts per token per MoE layer (the model's k, before any control)."""
        tk = self.meta.get("top_k", self.ids.shape[2])
        return list(tk) if isinstance(tk, list) else [int(tk)] * self.num_layers

    @property
    def domains(self) -> list[str]:
        return list(self.meta.get("domains", []))

    @property
    def has_domains(self) -> bool:
        return bool(self.domains) and bool((np.asarray(self.domain) >= 0).any())

    def layer_pos(self, layer: int) -> int:
        """Axis-0 position of decoder layer ``layer``; a clear error if it is not an MoE layer."""
        try:
            return moe_position(self.layers, layer, " of this trace")
        except MoekitError as exc:
            raise TraceError(str(exc)) from None

    def __len__(self) -> int:
        return self.num_tokens

    # ----- selection -----------------------------------------------------------------------------
    def select_layers(self, layers: Iterable[int]) -> RoutingTrace:
        """A trace with only the given decoder layers."""
        layers = list(layers)
        idx = [self.layer_pos(li) for li in layers]
        meta = dict(self.meta, layers=layers)
        for key in ("num_experts", "top_k"):
            if isinstance(meta.get(key), list):
                meta[key] = [meta[key][i] for i in idx]
        return RoutingTrace(
            ids=np.asarray(self.ids[idx]),
            weights=np.asarray(self.weights[idx]),
            probs=None if self.probs is None else np.asarray(self.probs[idx]),
            token_ids=np.asarray(self.token_ids),
            doc=np.asarray(self.doc),
            pos=np.asarray(self.pos),
            domain=np.asarray(self.domain),
            meta=meta,
        )

    def select_tokens(self, mask: np.ndarray) -> RoutingTrace:
        """A trace with only the tokens where ``mask`` (bool [N] or index array) holds."""
        return RoutingTrace(
            ids=np.asarray(self.ids[:, mask]),
            weights=np.asarray(self.weights[:, mask]),
            probs=None if self.probs is None else np.asarray(self.probs[:, mask]),
            token_ids=np.asarray(self.token_ids[mask]),
            doc=np.asarray(self.doc[mask]),
            pos=np.asarray(self.pos[mask]),
            domain=np.asarray(self.domain[mask]),
            meta=dict(self.meta),
        )

    def select_docs(self, docs: Iterable[int]) -> RoutingTrace:
        """A trace with only the tokens of the given document indices."""
        return self.select_tokens(np.isin(self.doc, np.fromiter(docs, dtype=np.int64)))

    def select_domain(self, name: str) -> RoutingTrace:
        """A trace with only the tokens labelled with domain ``name``."""
        if name not in self.domains:
            raise TraceError(f"domain {name!r} not in trace (domains: {self.domains})")
        return self.select_tokens(self.domain == self.domains.index(name))

    @staticmethod
    def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """Join traces of the same model along tokens; document indices and domains are renumbered."""
        if not traces:
            raise TraceError("nothing to concatenate")
        first = traces[0]
        for t in traces[1:]:
            if t.layers != first.layers or t.num_experts != first.num_experts:
                raise TraceError("cannot concatenate traces of different models (layers or experts differ)")
        K = max(t.ids.shape[2] for t in traces)
        with_probs = all(t.probs is not None for t in traces)
        domains: list[str] = []
        for t in traces:
            domains += [d for d in t.domains if d not in domains]
        ids, weights, probs, docs, doms = [], [], [], [], []
        doc_offset = 0
        for t in traces:
            pad = K - t.ids.shape[2]
            ids.append(np.pad(np.asarray(t.ids), ((0, 0), (0, 0), (0, pad)), constant_values=NO_EXPERT))
            weights.append(np.pad(np.asarray(t.weights), ((0, 0), (0, 0), (0, pad))))
            if with_probs:
                probs.append(np.asarray(t.probs))
            d = np.asarray(t.doc)
            docs.append(d + doc_offset)
            doc_offset += int(d.max()) + 1 if d.size else 0
            remap = np.array([domains.index(n) for n in t.domains] + [-1], dtype=np.int16)
            doms.append(remap[np.asarray(t.domain).astype(np.int64)])  # -1 indexes the trailing -1
        return RoutingTrace(
            ids=np.concatenate(ids, axis=1),
            weights=np.concatenate(weights, axis=1),
            probs=np.concatenate(probs, axis=1) if with_probs else None,
            token_ids=np.concatenate([np.asarray(t.token_ids) for t in traces]),
            doc=np.concatenate(docs).astype(np.int32),
            pos=np.concatenate([np.asarray(t.pos) for t in traces]),
            domain=np.concatenate(doms).astype(np.int16),
            meta=dict(first.meta, domains=domains),
        )

    @staticmethod
    def merge(parts: Sequence[RoutingTrace]) -> RoutingTrace:
        """Join shares of one run (disjoint tokens, the same documents numbering) in (document, position) order.

        The inverse of splitting a run's tokens: ``merge`` of the shares of ``trace_documents(part=...)`` is the
        single-process trace exactly. Ids are padded to the widest share with -1 (weights with 0).
        """
        if not parts:
            raise TraceError("nothing to merge")
        first = parts[0]
        for t in parts[1:]:
            if t.layers != first.layers or t.num_experts != first.num_experts:
                raise TraceError("cannot merge traces of different models (layers or experts differ)")
            if t.domains != first.domains:
                raise TraceError("cannot merge shares with different domain lists")
        full = [t for t in parts if t.num_tokens] or [first]
        K = max(t.ids.shape[2] for t in full)
        if len({t.probs is None for t in full}) > 1:
            raise TraceError("cannot merge shares where only some hold router probabilities")

        def cat(name: str, pad: float | None = None) -> np.ndarray:
            arrs = [np.asarray(getattr(t, name)) for t in full]
            if pad is not None:
                arrs = [np.pad(a, ((0, 0), (0, 0), (0, K - a.shape[2])), constant_values=pad) for a in arrs]
            return np.concatenate(arrs, axis=1 if pad is not None or name == "probs" else 0)

        doc, pos = cat("doc"), cat("pos")
        order = np.lexsort((pos, doc))
        if len(order) > 1 and not (np.diff(doc[order].astype(np.int64) * (int(pos.max()) + 1) + pos[order]) > 0).all():
            raise TraceError("the shares overlap: a (document, position) appears twice")
        probs = None if full[0].probs is None else cat("probs")[:, order]
        return RoutingTrace(
            ids=cat("ids", NO_EXPERT)[:, order], weights=cat("weights", 0.0)[:, order], probs=probs,
            token_ids=cat("token_ids")[order], doc=doc[order], pos=pos[order], domain=cat("domain")[order],
            meta=dict(first.meta),
        )

    # ----- persistence -----------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name in ("ids", "weights", "probs", *_PER_TOKEN):
            arr = getattr(self, name)
            if arr is not None:
                out[name] = np.ascontiguousarray(np.asarray(arr).astype(_DTYPES[name], copy=False))
        return out

    def save(self, path: str | os.PathLike, force: bool = True) -> Path:
        """Write the trace as one safetensors file (temp file + rename)."""
        from safetensors.numpy import save

        from moekit.io import atomic_write

        blob = save(self._arrays(), metadata={"moekit_trace": json.dumps(self.meta)})
        with atomic_write(path, force=force) as fh:
            fh.write(blob)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False) -> RoutingTrace:
        """Read a trace; with ``mmap=True`` the arrays are memory-mapped views of the file."""
        p = Path(path)
        if not p.is_file():
            raise TraceError(f"trace file not found: {p}")
        try:
            header, offset = _read_header(p)
            meta = json.loads(header.get("__metadata__", {}).get("moekit_trace", "null"))
            if not isinstance(meta, dict):
                raise TraceError(f"{p} is a safetensors file but not a moekit routing trace")
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise TraceError(
                    f"{p} has trace format {meta['format_version']}; this moekit reads up to {FORMAT_VERSION}"
                )
            size = p.stat().st_size
            arrays = {}
            raw = np.memmap(p, dtype=np.uint8, mode="r") if mmap else np.fromfile(p, dtype=np.uint8)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                if offset + end > size:
                    raise TraceError(f"{p} is truncated ({size} bytes, tensor {name!r} ends at {offset + end})")
                dtype = _ST_DTYPES[info["dtype"]]
                arrays[name] = raw[offset + start : offset + end].view(dtype).reshape(info["shape"])
        except TraceError:
            raise
        except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceError(f"{p} is not a readable routing trace ({exc.__class__.__name__}: {exc})") from None
        missing = {"ids", "weights", "token_ids", "doc", "pos"} - arrays.keys()
        if missing:
            raise TraceError(f"{p} lacks the arrays {sorted(missing)}")
        return cls(meta=meta, **arrays)


_ST_DTYPES = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "F16": np.float16, "F32": np.float32,
              "U8": np.uint8, "BOOL": np.bool_}


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise TraceError(f"{path} is truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > 100_000_000:
            raise TraceError(f"{path} is not a routing trace (bad header length)")
        raw = fh.read(n)
        if len(raw) < n:
            raise TraceError(f"{path} is truncated (header cut short)")
    return json.loads(raw), 8 + n
