"""Local routing consistency: Segment Routing Best Performance (SRP) and Segment Cache Best Hit
Rate (SCH).

Source: Liang et al. 2025, "Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models", code ljcleo/moe-lrc (``30_srp_calc.py``, ``31_srp_refine.py``,
``41_sch_calc.py``).  Definitions follow that code exactly (see
``shared/reference/anchors-offload.md`` §1):

SRP, for a segment length L_s: every window W of L_s consecutive tokens of one document (stride 1;
windows never cross documents, a document shorter than L_s has none) and every expert e give a
count c_e(W) = tokens of W whose selection contains e.  A threshold tau (0..L_s) predicts "e active
on all of W" when c_e(W) >= tau, and

    m(tau) = sum of c_e(W) over pairs with c_e(W) >= tau,
    p(tau) = L_s * #{(W, e): c_e(W) >= tau},    a = m(0),
    SRP    = max over tau of 2 m / max(p + a, 1)     (the best F1; the first best tau is reported).

Layer- and model-level SRP pool the counts of all experts (and layers) first, so they share one tau;
expert-level SRP gives each expert its own tau.  Also reported: ``p_over_a`` = p / a at the best tau
(moe-lrc's ``best_m``, 0 when a = 0) and ``act_rate`` = a / p(0) (the activation rate).

SCH, for a segment length L_s and capacities C: per document, a cache whose eviction priority is
(uses in the look-ahead window, then recency) run as a stack algorithm (one pass serves every C).
Counting exactly as moe-lrc's ``calc_fsf``: the window counts of token t's look-ahead are uses in
tokens [t, t+L_s) minus the uses of token t already processed; after token t the count of token
t+L_s is added.  A token's experts are all looked up before any of them updates the cache (hit at
capacity C when the expert's stack depth is < C); an expert never seen before in the document
counts as a hit while fewer than C distinct experts have been seen (no compulsory misses); then each
expert, in slot order, moves to the top and the others are re-ordered by the priority-stack rule
(Mattson et al. 1970): cache C evicts its lowest-priority expert.  Hit rate = hits / requests pooled
over documents (moe-lrc averages per 512-token sequence; for equal lengths that is the same).  At
model level all layers' experts of a token form one request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.analysis._common import as_ids, doc_starts, selection_mask
from moekit.errors import MoekitError

SEG_LENS: tuple[int, ...] = (4, 16, 64, 256)


# ----------------------------------------------------------------------------------------------- SRP
def segment_count_histograms(
    ids: np.ndarray, doc: np.ndarray, num_experts: int, seg_lens: Sequence[int]
) -> dict[int, np.ndarray]:
    """``{L_s: [E, L_s + 1] int64}``: ``H[e, c]`` = number of windows W (length L_s, stride 1, inside
    one document) with c_e(W) = c.  ``ids`` is one layer's ``[N, K]``.  One cumulative sum per expert
    over the token axis serves every L_s."""
    m = selection_mask(ids, num_experts)
    d = np.asarray(doc)
    if d.shape != (m.shape[0],):
        raise MoekitError(f"doc must have shape ({m.shape[0]},), got {d.shape}")
    n = m.shape[0]
    cs = np.zeros((n + 1, num_experts), dtype=np.int32)
    np.cumsum(m, axis=0, dtype=np.int32, out=cs[1:])
    out = {}
    for sl in seg_lens:
        sl = int(sl)
        if sl < 1:
            raise MoekitError(f"segment length must be >= 1, got {sl}")
        width = sl + 1
        hist = np.zeros(num_experts * width, dtype=np.int64)
        if n >= sl:
            starts = np.arange(n - sl + 1)
            starts = starts[d[starts] == d[starts + sl - 1]]  # documents are contiguous
            offs = np.arange(num_experts, dtype=np.int32) * width
            step = max(1, (1 << 22) // max(num_experts, 1))
            for s in range(0, starts.size, step):
                st = starts[s : s + step]
                c = cs[st + sl] - cs[st]
                c += offs
                hist += np.bincount(c.ravel(), minlength=num_experts * width)
        out[sl] = hist.reshape(num_experts, width)
    return out


def segment_count_histogram(ids: np.ndarray, doc: np.ndarray, num_experts: int, seg_len: int) -> np.ndarray:
    """``[E, seg_len + 1]``: :func:`segment_count_histograms` for one segment length."""
    return segment_count_histograms(ids, doc, num_experts, [seg_len])[int(seg_len)]


def srp_from_histogram(hist: np.ndarray, seg_len: int) -> dict[str, Any]:
    """SRP from a count histogram ``[..., seg_len + 1]`` (pooled over all leading axes: one shared tau).

    Returns ``srp`` (best F1; NaN when there are no windows), ``tau``, ``p_over_a``, ``act_rate``,
    ``m``, ``p``, ``a`` at the best tau and ``n_pairs`` (windows x experts)."""
    h = np.asarray(hist, dtype=np.int64).reshape(-1, seg_len + 1).sum(axis=0)
    c = np.arange(seg_len + 1, dtype=np.int64)
    m = np.cumsum((h * c)[::-1])[::-1]  # m[tau] = sum_{c >= tau} c * h[c]
    p = np.cumsum(h[::-1])[::-1] * seg_len
    a = int(m[0])
    n_pairs = int(h.sum())
    if n_pairs == 0:
        return {"srp": float("nan"), "tau": 0, "p_over_a": float("nan"), "act_rate": float("nan"),
                "m": 0, "p": 0, "a": 0, "n_pairs": 0}
    f1 = 2.0 * m / np.maximum(p + a, 1)
    tau = int(np.argmax(f1))
    return {
        "srp": float(f1[tau]),
        "tau": tau,
        "p_over_a": float(p[tau] / a) if a > 0 else 0.0,
        "act_rate": float(a / p[0]) if p[0] > 0 else 0.0,
        "m": int(m[tau]),
        "p": int(p[tau]),
        "a": a,
        "n_pairs": n_pairs,
    }


def srp(
    ids: np.ndarray,
    doc: np.ndarray,
    num_experts: int,
    seg_lens: Sequence[int] = SEG_LENS,
    per_expert: bool = False,
) -> dict[int, dict[str, Any]]:
    """SRP of one layer (``ids`` ``[N, K]``) for each segment length: ``{L_s: srp_from_histogram(...)}``.

    With ``per_expert`` each entry also has ``"experts"``: the expert-level SRP (own tau per expert),
    a list of dicts."""
    out = {}
    hists = segment_count_histograms(ids, doc, num_experts, seg_lens)
    for sl in seg_lens:
        hist = hists[int(sl)]
        res = srp_from_histogram(hist, int(sl))
        if per_expert:
            res["experts"] = [srp_from_histogram(hist[e], int(sl)) for e in range(num_experts)]
        out[int(sl)] = res
    return out


def srp_layers(
    ids: np.ndarray, doc: np.ndarray, num_experts: int | Sequence[int], seg_lens: Sequence[int] = SEG_LENS
) -> dict[str, Any]:
    """Layer-level SRP for every layer of ``ids`` ``[L, N, K]`` plus model-level SRP (counts of all
    layers and experts pooled, one tau): ``{"seg_lens", "layers": [[srp per L_s] per layer],
    "model": [srp per L_s], "tau_model": [...]}``."""
    arr = np.asarray(ids)
    if arr.ndim != 3:
        raise MoekitError(f"srp_layers expects ids [L, N, K], got shape {arr.shape}")
    ne = [int(num_experts)] * arr.shape[0] if np.isscalar(num_experts) else [int(x) for x in num_experts]
    layers = [[0.0] * len(seg_lens) for _ in range(arr.shape[0])]
    pooled = [np.zeros(int(sl) + 1, dtype=np.int64) for sl in seg_lens]
    for li in range(arr.shape[0]):
        hists = segment_count_histograms(arr[li], doc, ne[li], seg_lens)
        for j, sl in enumerate(seg_lens):
            h = hists[int(sl)].sum(axis=0)
            pooled[j] += h
            layers[li][j] = srp_from_histogram(h, int(sl))["srp"]
    model, taus = [], []
    for j, sl in enumerate(seg_lens):
        r = srp_from_histogram(pooled[j], int(sl))
        model.append(r["srp"])
        taus.append(r["tau"])
    return {"seg_lens": [int(s) for s in seg_lens], "layers": layers, "model": model, "tau_model": taus}


# ----------------------------------------------------------------------------------------------- SCH
def _pack_sequences(ids: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """``[D, T, K]`` int64: the tokens of each document, padded with -1 to the longest."""
    starts = doc_starts(doc)
    lens = np.diff(starts)
    n_docs = lens.size
    t_max = int(lens.max()) if n_docs else 0
    out = np.full((n_docs, t_max, ids.shape[1]), -1, dtype=np.int64)
    if n_docs:
        doc_of = np.repeat(np.arange(n_docs), lens)
        pos = np.arange(ids.shape[0]) - starts[doc_of]
        out[doc_of, pos] = ids
    return out


def _sch_stack(
    seqs: np.ndarray, num_experts: int, seg_len: int, depth: int, group: np.ndarray | None = None,
    n_groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Core of SCH over independent sequences ``[S, T, K]`` (-1 = nothing), simulated side by side.

    Returns (``hist`` ``[G, depth + 1]``, ``requests`` ``[G]``) where ``hist[g, r]`` counts requests of
    the sequences of group ``g`` (``group[s]``, default all 0) whose effective stack depth is r
    (r = depth means "deeper or absent"); hits at capacity C = ``hist[g, :C].sum()``.
    """
    n_seq, t_len, k = seqs.shape
    grp = np.zeros(n_seq, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    n_req = np.bincount(grp, weights=(seqs >= 0).sum(axis=(1, 2)), minlength=n_groups).astype(np.int64)
    hist = np.zeros(n_groups * (depth + 1), dtype=np.int64)
    if n_seq == 0 or t_len == 0 or n_req.sum() == 0:
        return hist.reshape(n_groups, depth + 1), n_req
    goff = np.broadcast_to((grp * (depth + 1))[:, None], seqs.shape[::2])
    e_bits = int(num_experts).bit_length()
    ts_bits = int(t_len * k + 2).bit_length()
    c_bits = int(seg_len + 1).bit_length()
    if e_bits + ts_bits + c_bits > 62:
        raise MoekitError("SCH: sequence too long for the priority encoding")
    dt = np.int32 if e_bits + ts_bits + c_bits <= 30 else np.int64
    sh_ts, sh_c = e_bits, e_bits + ts_bits
    emask = dt((1 << e_bits) - 1)  # also the expert field of the empty code -1, never a real expert
    one_c = dt(1 << sh_c)
    rows = np.arange(n_seq)
    # priority code per expert (column E absorbs -1): count << sh_c | last-use ts << sh_ts | e;
    # larger = kept.  The stack holds codes, top first; -1 = empty slot (lowest priority).
    pe = np.zeros((n_seq, num_experts + 1), dtype=dt)
    pe[:, :num_experts] = np.arange(num_experts, dtype=dt)
    seqs_c = np.where(seqs >= 0, seqs, num_experts)

    def add_window(t: int) -> None:
        for j in range(k):
            pe[rows, seqs_c[:, t, j]] += one_c

    for t in range(min(seg_len, t_len)):
        add_window(t)
    stack = np.full((n_seq, depth), -1, dtype=dt)
    seen = np.zeros((n_seq, num_experts + 1), dtype=bool)
    uni = np.zeros(n_seq, dtype=np.int64)
    pos_idx = np.arange(depth)
    i1 = pos_idx[1:][None, :]
    big = np.iinfo(dt).max
    hit_buf = np.zeros((n_seq, depth + 1), dtype=bool)
    hit_buf[:, depth] = True  # sentinel: "not in the stack" -> depth
    alt = np.empty((n_seq, depth), dtype=dt)
    ts = 0
    for t in range(t_len):
        x = seqs[:, t, :]
        valid = x >= 0
        if not valid.any():
            continue
        col = seqs_c[:, t, :]
        # codes of the stack entries as of now (window counts changed after the last token)
        stack = np.where(stack >= 0, pe[rows[:, None], np.where(stack >= 0, stack & emask, num_experts)], stack)
        elems = stack & emask
        # ---- lookups before any update
        eq = elems[:, :, None] == x[:, None, :]  # [S, depth, K]
        found = eq.any(axis=1)
        pos = np.where(found, eq.argmax(axis=1), depth)
        new = valid & ~seen[rows[:, None], col]
        rank_new = uni[:, None] + np.cumsum(new, axis=1) - new
        rank = np.minimum(np.where(new, rank_new, pos), depth)
        hist += np.bincount((rank + goff)[valid], minlength=n_groups * (depth + 1))
        seen[rows[:, None], col] = True
        seen[:, num_experts] = False
        uni += new.sum(axis=1)
        # ---- updates, slot by slot (priority-stack rule)
        for j in range(k):
            vj = valid[:, j]
            if not vj.any():
                continue
            cj = col[:, j]
            ts += 1
            code = ((((pe[rows, cj] >> sh_c) - 1) << sh_c) | (ts << sh_ts) | cj).astype(dt, copy=False)
            pe[rows, cj] = code
            # depth of x (depth when absent: sentinel column); rows without a request: 0 = no change
            np.equal(stack & emask, x[:, j, None], out=hit_buf[:, :depth])
            d = np.where(vj, hit_buf.argmax(axis=1), 0)[:, None]
            mn = np.where(pos_idx[None, :] < d, stack, big)
            step = 1
            while step < depth:  # prefix minimum along the stack by doubling (two buffers)
                alt[:, :step] = mn[:, :step]
                np.minimum(mn[:, step:], mn[:, :-step], out=alt[:, step:])
                mn, alt = alt, mn
                step <<= 1
            prev = mn[:, :-1]
            # a new prefix minimum can only occur above d (entries from d on are masked to big)
            shift = (mn[:, 1:] != prev) | (i1 == d)
            np.copyto(stack[:, 1:], prev, where=shift)
            stack[:, 0] = np.where(vj, code, stack[:, 0])
        if t + seg_len < t_len:
            add_window(t + seg_len)
    return hist.reshape(n_groups, depth + 1), n_req


def sch(
    ids: np.ndarray,
    doc: np.ndarray,
    num_experts: int,
    seg_len: int,
    capacities: Sequence[int],
) -> dict[str, Any]:
    """SCH of one layer (``ids`` ``[N, K]``) or, for ``ids`` ``[L, N, K]``, of each layer separately
    (pooled hits over layers; see :func:`sch_layers` for a per-layer table).

    Returns ``{"seg_len", "capacities", "hit_rate": [...], "hits": [...], "requests"}``."""
    arr = np.asarray(ids)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise MoekitError(f"sch expects ids [N, K] or [L, N, K], got shape {np.shape(ids)}")
    caps = [int(c) for c in capacities]
    if not caps or min(caps) < 1:
        raise MoekitError(f"capacities must be positive, got {caps}")
    seqs = np.concatenate([_pack_sequences(as_ids(a, num_experts, ndim=2), doc) for a in arr], axis=0)
    hist, n_req_arr = _sch_stack(seqs, num_experts, int(seg_len), max(caps))
    cum = np.cumsum(hist[0])
    n_req = int(n_req_arr[0])
    hits = [int(cum[c - 1]) for c in caps]
    return {"seg_len": int(seg_len), "capacities": caps, "hits": hits, "requests": n_req,
            "hit_rate": [h / n_req if n_req else float("nan") for h in hits]}


def sch_layers(
    ids: np.ndarray,
    doc: np.ndarray,
    num_experts: int,
    top_k: int,
    seg_lens: Sequence[int] = SEG_LENS,
    multipliers: Sequence[int] = (1, 2, 3, 4),
    doc_stride: int = 1,
) -> dict[str, Any]:
    """Layer-level SCH for ``ids`` ``[L, N, K]`` (every layer has ``num_experts`` experts), capacities
    ``C = m * top_k``: ``{"seg_lens", "capacities", "hit_rate": [[[per C] per layer] per L_s],
    "pooled": [[per C] per L_s], "documents"}``.  All layers and documents are simulated side by
    side.  ``doc_stride=16`` uses every 16th document, as moe-lrc does; the default uses all."""
    arr = np.asarray(ids)
    if arr.ndim != 3:
        raise MoekitError(f"sch_layers expects ids [L, N, K], got shape {arr.shape}")
    caps = [max(1, int(m * top_k)) for m in multipliers]
    n_layers = arr.shape[0]
    if doc_stride < 1:
        raise MoekitError(f"doc_stride must be >= 1, got {doc_stride}")
    packed = [_pack_sequences(as_ids(a, num_experts, ndim=2), doc)[::doc_stride] for a in arr]
    n_docs = packed[0].shape[0]
    seqs = np.concatenate(packed, axis=0)
    group = np.repeat(np.arange(n_layers), n_docs)
    out: dict[str, Any] = {"seg_lens": [int(s) for s in seg_lens], "capacities": caps, "hit_rate": [],
                           "pooled": [], "documents": int(n_docs)}
    for sl in seg_lens:
        hist, n_req = _sch_stack(seqs, num_experts, int(sl), max(caps), group, n_layers)
        cum = np.cumsum(hist, axis=1)[:, [c - 1 for c in caps]]
        with np.errstate(invalid="ignore", divide="ignore"):
            out["hit_rate"].append((cum / n_req[:, None]).tolist())
        tot = int(n_req.sum())
        out["pooled"].append([float(x / tot) if tot else float("nan") for x in cum.sum(axis=0)])
    return out


def sch_model(
    ids: np.ndarray, doc: np.ndarray, num_experts: Sequence[int] | int, seg_len: int, capacities: Sequence[int]
) -> dict[str, Any]:
    """Model-level SCH: all layers' experts of a token form one request (expert keys ``(layer, e)``);
    ``ids`` ``[L, N, K]``.  Same return as :func:`sch`.  Cost grows with L*K sequential updates per
    token, so use it on a subset of documents for large traces."""
    arr = np.asarray(ids)
    if arr.ndim != 3:
        raise MoekitError(f"sch_model expects ids [L, N, K], got shape {arr.shape}")
    ne = [int(num_experts)] * arr.shape[0] if np.isscalar(num_experts) else [int(x) for x in num_experts]
    offs = np.concatenate([[0], np.cumsum(ne)])
    flat = []
    for li in range(arr.shape[0]):
        a = as_ids(arr[li], ne[li], ndim=2)
        flat.append(np.where(a >= 0, a + offs[li], -1))
    merged = np.concatenate(flat, axis=1)
    return sch(merged, doc, int(offs[-1]), seg_len, capacities)
