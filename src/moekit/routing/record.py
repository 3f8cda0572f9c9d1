"""Recording routing decisions into a RoutingTrace (design §3).

``record(lm)`` captures, per token and MoE layer, the expert ids and weights actually used (after any
``route`` control), optionally the router probabilities, logits and the router's input hidden state.
Padded positions (attention mask 0) never enter a trace. During ``generate`` each decode step is
appended to the documents its prefill started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moekit.errors import MoekitError
from moekit.experts import NO_EXPERT, masked_to_trace_ids
from moekit.models.compat import forward_cache
from moekit.models.loading import LoadedModel
from moekit.models.moe_map import MoELayerView
from moekit.routing.hook import RouterHook
from moekit.trace import RoutingTrace

FIELDS = ("ids", "weights", "probs", "logits", "hidden")


class Recorder:
    """Collects router outputs forward by forward; ``trace`` assembles them in (document, position) order."""

    def __init__(self, lm: LoadedModel, fields: Sequence[str] = ("ids", "weights")) -> None:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}; choose from {FIELDS}")
        self.lm = lm
        self.fields = set(fields) | {"ids", "weights"}
        self._calls: list[dict] = []
        self._docs_seen = 0
        self._row_docs: np.ndarray = np.zeros(0, dtype=np.int64)
        self._row_len: np.ndarray = np.zeros(0, dtype=np.int64)
        self._doc_domain: dict[int, int] = {}
        self._domain_names: list[str] = []
        self._handle = None

    # ----- hooks -----------------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        B, S = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        mask = torch.ones(B, S, dtype=torch.bool) if mask is None else mask[:, -S:].detach().bool().cpu()
        past = forward_cache(kwargs)
        continuation = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        if not continuation or len(self._row_docs) != B:
            self._row_docs = np.arange(self._docs_seen, self._docs_seen + B)
            self._row_len = np.zeros(B, dtype=np.int64)
            self._docs_seen += B
        keep = mask.numpy().reshape(-1)
        rows = np.repeat(np.arange(B), S)[keep]
        m = mask.numpy().astype(np.int64)
        pos = (np.cumsum(m, axis=1) - 1 + self._row_len[:, None]).reshape(-1)[keep]
        self._row_len = self._row_len + m.sum(axis=1)
        tokens = input_ids.detach().cpu().reshape(-1).numpy()[keep] if input_ids is not None \
            else np.full(int(keep.sum()), -1)
        self._calls.append({"keep": None if keep.all() else torch.from_numpy(keep), "doc": self._row_docs[rows], "pos": pos,
                            "tokens": tokens, "layers": {}})

    def on_router(self, view: MoELayerView, hidden, logits, weights, ids, valid) -> None:
        if not self._calls:
            return  # a router called outside a recorded model forward (e.g. a probe): ignore
        call = self._calls[-1]
        keep = call["keep"]

        def rows(t: torch.Tensor) -> torch.Tensor:  # [tokens, width] without padded positions
            t = t.detach().reshape(-1, t.shape[-1])
            return t if keep is None else t[keep]

        ids_c = ids if valid is None else masked_to_trace_ids(ids, valid)
        entry = {"ids": rows(ids_c).to(torch.int16).cpu(), "weights": rows(weights).float().cpu()}
        if "probs" in self.fields:
            if view.rule is None:
                raise MoekitError(f"router probabilities need the routing rule, which moekit does not know for "
                                  f"{type(view.router).__name__} (layer {view.index}); record ids, weights or "
                                  "logits instead (no --probs)")
            entry["probs"] = rows(view.rule.probs(logits.detach())).to(torch.float16).cpu()
        if "logits" in self.fields:
            entry["logits"] = rows(logits).float().cpu()
        if "hidden" in self.fields:
            entry["hidden"] = rows(hidden).float().cpu()
        call["layers"][self.lm.moe.moe_position(view.index)] = entry

    # ----- labels ----------------------------------------------------------------------------------
    def label_documents(self, domains: Sequence[str | None], first_doc: int = 0) -> None:
        """Give documents ``first_doc, first_doc+1, ...`` the domain labels ``domains``."""
        for i, name in enumerate(domains):
            if name is None:
                continue
            if name not in self._domain_names:
                self._domain_names.append(name)
            self._doc_domain[first_doc + i] = self._domain_names.index(name)

    @property
    def num_documents(self) -> int:
        return self._docs_seen

    # ----- assembly --------------------------------------------------------------------------------
    def _order(self) -> np.ndarray:
        doc = np.concatenate([c["doc"] for c in self._calls]) if self._calls else np.zeros(0, np.int64)
        pos = np.concatenate([c["pos"] for c in self._calls]) if self._calls else np.zeros(0, np.int64)
        return np.lexsort((pos, doc))

    def _stack(self, name: str) -> list[torch.Tensor]:
        """Per MoE layer, the field ``name`` for all recorded tokens (recording order)."""
        out = []
        for li in range(len(self.lm.moe)):
            parts = [c["layers"][li][name] for c in self._calls if li in c["layers"]]
            if name in ("ids", "weights"):
                parts = _pad_columns(parts, NO_EXPERT if name == "ids" else 0.0)
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return out

    def tensor(self, name: str) -> list[torch.Tensor]:
        """A recorded field per MoE layer, in the trace's (document, position) token order."""
        if name not in self.fields:
            raise ValueError(f"field {name!r} was not recorded (fields: {sorted(self.fields)})")
        order = torch.from_numpy(self._order())
        return [t[order] for t in self._stack(name)]

    @property
    def trace(self) -> RoutingTrace:
        """The RoutingTrace of everything recorded so far."""
        if not self._calls or not self._calls[0]["layers"]:
            from moekit.errors import TraceError

            raise TraceError("nothing was recorded: run the model inside the record() block")
        order = self._order()
        ids_a = np.stack([t.numpy() for t in _pad_columns(self._stack("ids"), NO_EXPERT)])
        w_a = np.stack([t.numpy() for t in _pad_columns(self._stack("weights"), 0.0)])
        probs = np.stack([t.numpy() for t in self._stack("probs")])[:, order] if "probs" in self.fields else None
        doc = np.concatenate([c["doc"] for c in self._calls])[order]
        domain = np.array([self._doc_domain.get(int(d), -1) for d in range(self._docs_seen)], dtype=np.int16)
        meta = self.metadata()
        return RoutingTrace(
            ids=ids_a[:, order], weights=w_a[:, order], probs=probs,
            token_ids=np.concatenate([c["tokens"] for c in self._calls])[order].astype(np.int32),
            doc=doc.astype(np.int32),
            pos=np.concatenate([c["pos"] for c in self._calls])[order].astype(np.int32),
            domain=domain[doc] if len(domain) else np.zeros(0, np.int16), meta=meta,
        )


    def metadata(self) -> dict:
        """The trace metadata of this model (model id, architecture, MoE layers, experts, top-k, domains)."""
        from moekit.version import __version__

        moe = self.lm.moe
        return {
            "model": self.lm.name, "architecture": moe.model_type, "layers": moe.indices,
            "num_experts": [v.num_experts for v in moe], "top_k": [v.top_k for v in moe],
            "domains": list(self._domain_names), "moekit_version": __version__,
        }


def _pad_columns(parts: list[torch.Tensor], fill: float) -> list[torch.Tensor]:
    """Right-pad ``[N, K_i]`` tensors to the widest K with ``fill`` (top-p and layers with other k differ)."""
    width = max(p.shape[1] for p in parts)
    if all(p.shape[1] == width for p in parts):
        return parts
    return [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]


@contextlib.contextmanager
def record(lm: LoadedModel, fields: Sequence[str] = ("ids", "weights")) -> Iterator[Recorder]:
    """Record routing for every forward of ``lm.model`` inside the block; read ``rec.trace`` after."""
    rec = Recorder(lm, fields)
    hook = RouterHook.of(lm)
    handle = lm.model.register_forward_pre_hook(rec._pre_forward, with_kwargs=True)
    hook.add_recorder(rec)
    try:
        yield rec
    finally:
        handle.remove()
        hook.remove_recorder(rec)
