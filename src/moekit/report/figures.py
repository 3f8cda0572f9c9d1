"""Matplotlib figures of the report, each returned as a PNG ``data:`` URI (so the HTML is self-contained).

Every function takes parts of the ``moekit.analysis.summarize`` dict (plain lists) and draws them; no
metric is computed here.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.dpi": _DPI})
    return plt


def to_data_uri(fig: Any) -> str:
    """Render ``fig`` as PNG and return it as a base64 ``data:image/png`` URI; closes the figure."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _arr(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """A ragged list-of-lists (None = NaN) as a float array padded with NaN."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [np.nan if v is None else v for v in r]
    return out


def _log_colorbar(fig: Any, im: Any, ax: Any, label: str) -> None:
    """A colorbar with plain-number tick labels (0.5, 1, 2) for a log-normed image."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    cb = fig.colorbar(im, ax=ax, label=label, fraction=0.04, pad=0.02)
    cb.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    cb.ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    cb.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _ticks(n: int, max_labels: int = 32) -> list[int]:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def load_heatmap(load: Sequence[Sequence[int]], layers: Sequence[int]) -> str:
    """Layer x expert heatmap of load relative to uniform (1.0 = the expert gets its fair share)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    counts = _arr(load)
    rel = counts / np.nansum(counts, axis=1, keepdims=True) * np.sum(np.isfinite(counts), axis=1, keepdims=True)
    shown = np.where(rel > 0, rel, np.nan)
    lo = max(float(np.nanmin(shown)) if np.isfinite(shown).any() else 0.1, 1e-2)
    hi = max(float(np.nanmax(shown)) if np.isfinite(shown).any() else 10.0, 1.01)
    lim = min(max(1 / lo, hi, 2.0), 10.0)  # beyond 10x either way the colour saturates
    n_l, n_e = rel.shape
    fig, ax = plt.subplots(figsize=(min(12, 5 + 0.16 * n_e), 1.4 + 0.3 * n_l))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#222222")
    im = ax.imshow(np.where(rel > 0, rel, np.nan), aspect="auto", cmap=cmap, norm=LogNorm(1 / lim, lim),
                   interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(n_l), [str(x) for x in layers])
    ax.set_xticks(_ticks(n_e))
    _log_colorbar(fig, im, ax, "load / fair share (log)")
    ax.set_title("Expert load per layer (black = never selected)")
    return to_data_uri(fig)


def coactivation_heatmaps(coact: dict[str, Any], affinity: dict[str, Any] | None, tokens: int) -> str:
    """Co-activation counts of one layer (diagonal hidden) and, when present, the row-normalised
    affinity to the next MoE layer."""
    plt = _plt()
    c = np.asarray(coact["counts"], dtype=float)
    n_e = c.shape[0]
    panels = 2 if affinity is not None else 1
    side = min(6.0, 3.6 + 0.05 * n_e)
    fig, axes = plt.subplots(1, panels, figsize=(side * panels + 1.0 * panels, side), squeeze=False)
    ax = axes[0, 0]
    frac = c / max(tokens, 1)
    np.fill_diagonal(frac, np.nan)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = ax.imshow(frac, cmap=cmap, interpolation="nearest")
    ax.set_title(f"Co-activation, layer {coact['layer']}")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_xticks(_ticks(n_e, 16))
    ax.set_yticks(_ticks(n_e, 16))
    fig.colorbar(im, ax=ax, label="fraction of tokens selecting both", fraction=0.046, pad=0.03)
    if affinity is not None:
        ax = axes[0, 1]
        p = np.asarray(affinity["p"], dtype=float)
        im = ax.imshow(p, cmap="magma", interpolation="nearest", vmin=0)
        ax.set_title(f"Affinity layer {affinity['layer']} → {affinity['next_layer']}")
        ax.set_xlabel(f"expert at layer {affinity['next_layer']}")
        ax.set_ylabel(f"expert at layer {affinity['layer']}")
        ax.set_xticks(_ticks(p.shape[1], 16))
        ax.set_yticks(_ticks(p.shape[0], 16))
        fig.colorbar(im, ax=ax, label="P(next-layer expert | this expert)", fraction=0.046, pad=0.03)
    fig.tight_layout()
    return to_data_uri(fig)


def domain_heatmap(domains: dict[str, Any]) -> str:
    """(layer, domain) x expert lift heatmap (frequency / mean frequency over domains; log colour)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    names = domains["names"]
    rows, labels, seps = [], [], []
    for lay in domains["layers"]:
        f = _arr(lay["frequency"])
        avg = np.nanmean(f, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(avg > 0, f / np.where(avg > 0, avg, 1), np.nan)
        rows.append(lift)
        labels += [f"L{lay['layer']} {n}" for n in names]
        seps.append(len(labels))
    m = np.vstack(rows)
    shown = np.where(m > 0, m, np.nan)
    hi = float(np.nanmax(shown)) if np.isfinite(shown).any() else 2.0
    lo = float(np.nanmin(shown)) if np.isfinite(shown).any() else 0.5
    lim = min(max(hi, 1 / max(lo, 1e-3), 1.5), 10.0)  # beyond 10x either way the colour saturates
    n_r, n_e = m.shape
    fig, ax = plt.subplots(figsize=(min(12, 5.5 + 0.16 * n_e), 1.2 + 0.2 * n_r))
    cmap = plt.get_cmap("PuOr_r").with_extremes(bad="#222222")
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=LogNorm(1 / lim, lim), interpolation="nearest")
    for s in seps[:-1]:
        ax.axhline(s - 0.5, color="white", lw=1.5)
    ax.set_yticks(range(n_r), labels, fontsize=7 if n_r > 30 else 8)
    ax.set_xticks(_ticks(n_e))
    ax.set_xlabel("expert")
    _log_colorbar(fig, im, ax, "lift (log)")
    ax.set_title("Domain specialisation (per layer, one row per domain)")
    return to_data_uri(fig)


def mi_bars(domains: dict[str, Any]) -> str:
    """Mutual information I(expert; domain) per layer against the shuffled-routing control."""
    plt = _plt()
    lays = domains["layers"]
    x = np.arange(len(lays))
    mi = [(row["mi"] or {}).get("mi_bits") or 0.0 for row in lays]
    sh = [(row["shuffled_mi"] or {}).get("mi_bits") or 0.0 for row in lays]
    fig, ax = plt.subplots(figsize=(min(12, 3 + 0.35 * len(lays)), 2.6))
    ax.bar(x - 0.2, mi, 0.4, label="MI(expert; domain)", color="#3b6fb6")
    ax.bar(x + 0.2, sh, 0.4, label="shuffled routing (bias floor)", color="#bbbbbb")
    ax.set_xticks(x, [str(r["layer"]) for r in lays])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits")
    ax.legend(frameon=False)
    ax.set_title("How much the expert choice tells about the domain")
    return to_data_uri(fig)


def entropy_dynamic_k(layer_rows: Sequence[dict[str, Any]], dynamic_k: dict[str, Any] | None) -> str:
    """Router entropy (or load entropy without probabilities) and dynamic-k per layer."""
    plt = _plt()
    layers = [r["layer"] for r in layer_rows]
    x = np.arange(len(layers))
    panels = 2 if dynamic_k is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.0), squeeze=False)
    ax = axes[0, 0]
    e = max(r["num_experts"] for r in layer_rows)
    k = max(r["top_k"] for r in layer_rows)
    if any(r.get("router_entropy") is not None for r in layer_rows):
        ax.plot(x, [np.nan if r["router_entropy"] is None else r["router_entropy"] for r in layer_rows], "o-",
                label="router entropy per token")
    ax.plot(x, [np.nan if r["load_entropy"] is None else r["load_entropy"] for r in layer_rows], "s--",
            label="entropy of the load")
    ax.axhline(math.log(e), color="grey", lw=0.8, ls=":")
    ax.text(x[-1], math.log(e), f" log E = {math.log(e):.2f}", va="bottom", ha="right", fontsize=8, color="grey")
    ax.axhline(math.log(k), color="grey", lw=0.8, ls=":")
    ax.text(x[-1], math.log(k), f" log k = {math.log(k):.2f}", va="bottom", ha="right", fontsize=8, color="grey")
    ax.set_xticks(x, [str(v) for v in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("nats")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Router entropy")
    if dynamic_k is not None:
        ax = axes[0, 1]
        for p, means in zip(dynamic_k["ps"], dynamic_k["mean"], strict=True):
            ax.plot(x, [np.nan if v is None else v for v in means], "o-", label=f"mass p = {p:g}")
        ax.axhline(k, color="grey", lw=0.8, ls=":")
        ax.text(x[-1], k, f" top-k = {k}", va="bottom", ha="right", fontsize=8, color="grey")
        ax.set_xticks(x, [str(v) for v in layers])
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean experts needed")
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False, fontsize=8)
        ax.set_title("Dynamic k: experts to reach router mass p")
    fig.tight_layout()
    return to_data_uri(fig)


def super_expert_map(maxima: np.ndarray, layers: Sequence[int], marked: Sequence[tuple[int, int]]) -> str:
    """Layer x expert max |down_proj output| (log colour), detected super experts circled."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    m = np.where(np.asarray(maxima) > 0, maxima, np.nan)
    n_l, n_e = m.shape
    fig, ax = plt.subplots(figsize=(min(12, 5 + 0.16 * n_e), 1.4 + 0.3 * n_l))
    cmap = plt.get_cmap("inferno").with_extremes(bad="#cccccc")
    fin = m[np.isfinite(m)]
    norm = LogNorm(float(fin.min()), float(fin.max())) if fin.size and fin.max() > fin.min() else None
    im = ax.imshow(m, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for li, e in marked:
        ax.plot(e, li, "o", mfc="none", mec="#00d0ff", ms=12, mew=2)
    ax.set_yticks(range(n_l), [str(x) for x in layers])
    ax.set_xticks(_ticks(n_e))
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    if norm is not None:
        _log_colorbar(fig, im, ax, "max |output| (log)")
    else:
        fig.colorbar(im, ax=ax, label="max |output|", fraction=0.04, pad=0.02)
    ax.set_title("Largest expert output per expert" + (" (circles: super experts)" if marked else ""))
    return to_data_uri(fig)


def _segment_axes(ax, seg_lens, ylabel: str, title: str) -> None:
    """A fraction (0..1) against segment length on a log2 axis, legend and title: the SRP and SCH panels."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(seg_lens, [str(s) for s in seg_lens])
    ax.set_ylim(0, 1)
    ax.set_xlabel("segment length (tokens)")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title)


def locality_curves(srp: dict[str, Any], sch: dict[str, Any] | None) -> str:
    """SRP per layer and model vs segment length; SCH (pooled over layers) per capacity vs segment length."""
    plt = _plt()
    panels = 2 if sch is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.2), squeeze=False)
    ax = axes[0, 0]
    seg = srp["seg_lens"]
    for row in srp["layers"]:
        ax.plot(seg, [np.nan if v is None else v for v in row], color="#9bb7dd", lw=0.8)
    ax.plot([], [], color="#9bb7dd", lw=0.8, label="one MoE layer")
    ax.plot(seg, [np.nan if v is None else v for v in srp["model"]], "o-", color="#1f4e96", lw=2, label="model")
    _segment_axes(ax, seg, "SRP (best F1)", "Segment routing best performance")
    if sch is not None:
        ax = axes[0, 1]
        sl = sch["seg_lens"]
        for ci, c in enumerate(sch["capacities"]):
            ax.plot(sl, [np.nan if row[ci] is None else row[ci] for row in sch["pooled"]], "o-", label=f"C = {c}")
        _segment_axes(ax, sl, "hit rate", "Segment cache best hit rate (per layer, pooled)")
    fig.tight_layout()
    return to_data_uri(fig)


_POLICY_STYLE = {"lru": ("LRU", "o-"), "lfu": ("LFU", "s-"), "static": ("static top-C (oracle counts)", "^--"),
                 "belady": ("Belady MIN", "k-"), "belady_bypass": ("Belady with bypass", "k:")}


def cache_curves_figure(cache: dict[str, Any], num_layers: int) -> str:
    """Hit rate vs cache size (in multiples of k) per policy, per-layer and global caches."""
    plt = _plt()
    scopes = [s for s in ("layer", "global") if s in cache]
    fig, axes = plt.subplots(1, len(scopes), figsize=(5.2 * len(scopes), 3.3), squeeze=False)
    mult = cache["multipliers"]
    for ax, scope in zip(axes[0], scopes, strict=True):
        tab = cache[scope]
        for pol, (label, style) in _POLICY_STYLE.items():
            if pol in tab:
                ax.plot(mult, [np.nan if v is None else v for v in tab[pol]["hit_rate"]], style, label=label, ms=4)
        ax.set_xticks(mult, [f"{m:g}" for m in mult])
        ax.set_ylim(0, 1)
        ax.set_xlabel("cache size C / k" + (" (per layer)" if scope == "layer" else f" (× {num_layers} layers)"))
        ax.set_ylabel("hit rate")
        ax.set_title("One cache per layer" if scope == "layer" else "One global cache over all layers")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return to_data_uri(fig)
