"""One observer pass over calibration text collects every statistic the compression criteria need.

Per MoE layer l and expert j, over the calibration tokens S_j routed to j (the router's real output):

- ``count`` |S_j|, ``gate_sum`` Σ g_j (g = the weight the architecture actually uses),
- ``norm_sum`` Σ ‖f_j‖, ``reap_sum`` Σ g_j‖f_j‖,
- ``easy_sum`` Σ g_j‖f_j‖·max(0, 1 − cos(h, h + moe_out)) with h the residual stream entering the MoE
  sub-layer and h + moe_out the decoder layer's output (EASY-EP's token contribution),
- ``max_abs`` max |f_j| (the down_proj output; super-expert profiling), NaN when never routed,
- ``gram`` Σ_x z(x) z(x)ᵀ of the router logits z (router-logit column similarity for merging).

Expert outputs f_j come from the expert-output probe (``moekit.models.probe.expert_outputs``: the layer's
experts module itself on the routed rows with one-hot routing, weight 1), so every architecture's own expert
function is used (GPT-OSS's clamped SwiGLU and biases included). The hooks sit on modules of one decoder layer, so the same observer serves
the in-memory pass (whole model) and the low-memory pass (one layer at a time, ``lowmem.py``).
Padded positions (attention mask 0) are excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moekit.data.batching import length_sorted_batches, pad_batch
from moekit.errors import MoekitError
from moekit.models.compat import last_logits_kwargs
from moekit.models.loading import LoadedModel, windows_per_forward
from moekit.models.moe_map import MoELayerView, decoder_layers
from moekit.models.probe import expert_outputs

STAT_FIELDS = ("count", "gate_sum", "norm_sum", "reap_sum", "easy_sum", "max_abs")


@dataclass
class LayerStats:
    """Calibration statistics of one MoE layer (decoder index ``index``)."""

    index: int
    num_experts: int
    top_k: int
    count: np.ndarray = field(default=None)  # type: ignore[assignment]
    gate_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    norm_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    reap_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    easy_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    max_abs: np.ndarray = field(default=None)  # type: ignore[assignment]
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]
    tokens: int = 0

    def __post_init__(self) -> None:
        E = self.num_experts
        for name in STAT_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, np.full(E, np.nan) if name == "max_abs" else np.zeros(E))
        if self.gram is None:
            self.gram = np.zeros((E, E))

    def mean(self, name: str) -> np.ndarray:
        """``name`` divided by the routed-token count (0 for experts never routed)."""
        return np.divide(getattr(self, name), self.count, out=np.zeros(self.num_experts), where=self.count > 0)

    def logit_similarity(self) -> np.ndarray:
        """Cosine similarity of router-logit columns over the calibration tokens [E, E]."""
        d = np.sqrt(np.clip(np.diag(self.gram), 1e-30, None))
        return self.gram / d[:, None] / d[None, :]


@dataclass
class CalibStats:
    """Statistics of all MoE layers, plus what they were computed on."""

    layers: dict[int, LayerStats]
    tokens: int
    data_hash: str | None = None

    @staticmethod
    def fold(parts: Sequence[CalibStats]) -> CalibStats:
        """Statistics of consecutive runs, added in the given order: folding the per-batch statistics of a
        calibration set in batch order gives exactly (bit for bit) what one pass over all batches gives."""
        if not parts:
            raise MoekitError("no calibration statistics to combine")
        first = parts[0]
        layers = {i: LayerStats(i, s.num_experts, s.top_k) for i, s in first.layers.items()}
        for part in parts:
            if part.layers.keys() != layers.keys():
                raise MoekitError("cannot combine calibration statistics of different models")
            for i, st in layers.items():
                src = part.layers[i]
                for name in STAT_FIELDS[:-1]:
                    setattr(st, name, getattr(st, name) + getattr(src, name))
                st.max_abs = np.fmax(st.max_abs, src.max_abs)
                st.gram += src.gram
                st.tokens += src.tokens
        return CalibStats(layers, tokens=sum(p.tokens for p in parts), data_hash=first.data_hash)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The statistics as named arrays (for transport between processes)."""
        out = {"tokens": np.array([self.tokens], np.int64)}
        for i, st in self.layers.items():
            for name in (*STAT_FIELDS, "gram"):
                out[f"{i}.{name}"] = getattr(st, name)
            out[f"{i}.meta"] = np.array([st.num_experts, st.top_k, st.tokens], np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], data_hash: str | None = None) -> CalibStats:
        """Inverse of ``to_arrays``."""
        layers = {}
        for key in arrays:
            if key.endswith(".meta"):
                i = int(key.split(".")[0])
                num_experts, top_k, tokens = (int(v) for v in arrays[key])
                fields = {name: np.array(arrays[f"{i}.{name}"]) for name in (*STAT_FIELDS, "gram")}
                layers[i] = LayerStats(i, num_experts, top_k, tokens=tokens, **fields)
        return cls(dict(sorted(layers.items())), tokens=int(arrays["tokens"][0]), data_hash=data_hash)

    def stacked(self, name: str) -> np.ndarray:
        """[L, E] array of one statistic in MoE-layer order."""
        return np.stack([getattr(self.layers[i], name) for i in sorted(self.layers)])


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class LayerObserver:
    """Forward hooks on one decoder layer feeding a ``LayerStats``; ``mask`` marks real tokens."""

    def __init__(self, view: MoELayerView, layer: nn.Module, stats: LayerStats) -> None:
        self.view, self.layer, self.stats = view, layer, stats
        self.mask: torch.Tensor | None = None
        self._handles: list = []
        self._cap: dict = {}

    def attach(self) -> LayerObserver:
        v = self.view
        self._handles.append(v.router.register_forward_hook(self._on_router))
        norm = getattr(self.layer, "post_attention_layernorm", None)
        if norm is None:
            raise MoekitError(f"layer {v.index}: no post_attention_layernorm to read the residual stream from")
        self._handles.append(norm.register_forward_pre_hook(self._on_norm))
        self._handles.append(self.layer.register_forward_hook(self._on_layer))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_router(self, module, args, out) -> None:
        h = args[0]
        self._cap["h"] = h.reshape(-1, h.shape[-1])
        self._cap["logits"], self._cap["weights"], self._cap["ids"] = out[0], out[1], out[2]

    def _on_norm(self, module, args) -> None:
        self._cap["resid"] = args[0]

    @torch.no_grad()
    def _on_layer(self, module, args, out) -> None:
        cap, self._cap = self._cap, {}
        if "h" not in cap or "resid" not in cap:
            return
        o = _first(out)
        r = cap["resid"].reshape(-1, o.shape[-1])
        o = o.reshape(-1, o.shape[-1])
        keep = self.mask if self.mask is not None else torch.ones(o.shape[0], dtype=torch.bool)
        keep = keep.to(o.device)
        self.observe(cap["h"][keep], cap["ids"][keep], cap["weights"][keep], cap["logits"][keep], r[keep], o[keep])

    @torch.no_grad()
    def observe(self, h, ids, weights, logits, resid, out) -> None:
        """Add one batch of (already masked) tokens to the statistics."""
        st, experts = self.stats, self.view.experts
        contrib = (1 - torch.nn.functional.cosine_similarity(resid.float(), out.float(), dim=-1)).clamp_min(0)
        z = logits.double()
        st.gram += (z.T @ z).cpu().numpy()
        st.tokens += int(h.shape[0])
        E = st.num_experts
        for j, rows, f in expert_outputs(experts, E, h, ids):
            n = int(rows.sum())
            g = (weights.float() * (ids == j)).sum(dim=1)[rows]
            f = f.float()
            norms = f.norm(dim=-1)
            st.count[j] += n
            st.gate_sum[j] += float(g.sum())
            st.norm_sum[j] += float(norms.sum())
            st.reap_sum[j] += float((g * norms).sum())
            st.easy_sum[j] += float((g * norms * contrib[rows]).sum())
            m = float(f.abs().max())
            st.max_abs[j] = m if np.isnan(st.max_abs[j]) else max(st.max_abs[j], m)


def new_stats(lm: LoadedModel) -> dict[int, LayerStats]:
    return {v.index: LayerStats(v.index, v.num_experts, v.top_k) for v in lm.moe}


def attach_all(lm: LoadedModel, stats: dict[int, LayerStats]) -> list[LayerObserver]:
    layers = decoder_layers(lm.model)
    return [LayerObserver(v, layers[v.index], stats[v.index]).attach() for v in lm.moe]


def calibration_windows(lm: LoadedModel, docs: Sequence, seq_len: int = 256, max_tokens: int | None = None):
    """Token windows of the calibration documents; a clear error when there are none."""
    from moekit.routing.tracing import tokenize_windows

    if not docs:
        raise MoekitError("calibration data is empty: give at least one non-empty --calib file")
    windows = [w.ids for w in tokenize_windows(lm, docs, seq_len, max_tokens)]
    if not windows or sum(len(w) for w in windows) < 2:
        raise MoekitError("calibration data is empty: the --calib files contain no tokens")
    return windows


def batches_of(windows: Sequence[Sequence[int]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (longest windows first, to keep padding small)."""
    return [pad_batch([windows[i] for i in b]) for b in length_sorted_batches([len(w) for w in windows], batch_size)]


def progress_bar(enabled: bool, total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not (enabled and console.is_terminal), transient=True, console=console)
    return prog, prog.add_task(label, total=total)


@torch.no_grad()
def observe_batches(lm: LoadedModel, batches: Sequence[dict], progress: bool = False,
                    data_hash: str | None = None) -> CalibStats:
    """Run ``lm`` over ``batches`` (input_ids + attention_mask) with observers on every MoE layer."""
    stats = new_stats(lm)
    observers = attach_all(lm, stats)
    prog, task = progress_bar(progress, len(batches), "calibration")
    try:
        with prog:
            for batch in batches:
                mask = batch.get("attention_mask")
                flat = (mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool))
                for ob in observers:
                    ob.mask = flat.reshape(-1)
                lm.model(**{k: v.to(lm.device) for k, v in batch.items()}, use_cache=False,
                         **last_logits_kwargs(lm.model))  # expert statistics only: no full logits
                prog.advance(task)
    finally:
        for ob in observers:
            ob.detach()
    return CalibStats(stats, tokens=sum(int(b["attention_mask"].sum()) for b in batches), data_hash=data_hash)


def observe(lm: LoadedModel, docs: Sequence, seq_len: int = 256, max_tokens: int | None = None,
            batch_size: int = 8, progress: bool = False) -> CalibStats:
    """Calibration statistics of ``lm`` on documents (``moekit.data.read_documents`` output); ``batch_size``
    windows per forward, fewer under a memory budget whose activation share they would exceed
    (``windows_per_forward``: from the budget, the model's shape and the data, as the streamed calibration)."""
    from moekit.compress.writer import data_hash

    windows = calibration_windows(lm, docs, seq_len, max_tokens)
    return observe_batches(lm, batches_of(windows, windows_per_forward(lm, seq_len, batch_size)), progress=progress,
                           data_hash=data_hash(windows))
