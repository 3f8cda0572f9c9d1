"""Expert dispatch with each active expert's weights supplied one at a time by a provider (an expert cache that
loads them), or a decode step's slots computed in parts on banks of resident experts: what the offload engine
computes through. Sort, un-permute, the decode kernel and combine are ``moekit.nn.dispatch``'s."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from moekit.nn import cpu_kernels
from moekit.nn.dispatch import (
    _activate,
    _gemv_down,
    _gemv_hidden,
    _use_gemv,
    _weighted_sum,
    combine_slots,
    get_backend,
)


class ExpertWeights(NamedTuple):
    """One expert's matrices in the bank's per-expert layout (``[2I, H]``/``[H, I]``, or transposed), biases or None."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


#: ``provide(experts)`` yields ``(expert, ExpertWeights)`` once for every id in ``experts``, in any order.
WeightProvider = Callable[[list[int]], Iterable[tuple[int, ExpertWeights]]]


def expert_forward_provided(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    provide: WeightProvider,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    *,
    transposed: bool = False,
    has_gate: bool = True,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    combine: Literal["gemm", "sum"] = "gemm",
    num_experts: int | None = None,
) -> torch.Tensor:
    """``expert_forward`` with the weights of each active expert supplied one at a time by ``provide`` (an expert
    cache that loads them): sort the (token, slot) pairs by expert, run each expert's rows as it arrives (one ``mm``
    per projection, as the ``loop`` path; a GEMV for one row), then un-permute and sum over k. Inference only; ids
    outside [0, ``num_experts``) are never provided and add zero. ``combine="sum"`` weights each row and sums the
    k slots as transformers' ``grouped_mm`` experts do (bit for bit); ``"gemm"`` is ``combine_slots``."""
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1)
    if num_tokens == 1:  # decode: no sort (k distinct ids); slot order is the row order
        sorted_ids, perm = flat_ids, torch.arange(top_k)
    else:
        sorted_ids, perm = torch.sort(flat_ids)
    x_g = x[perm // top_k]
    uniq = sorted_ids.tolist()
    bounds: dict[int, tuple[int, int]] = {}
    for i, e in enumerate(uniq):
        if e >= 0 and (num_experts is None or e < num_experts):
            a, _ = bounds.get(e, (i, i))
            bounds[e] = (a, i + 1)
    y = x_g.new_empty(x_g.shape[0], x.shape[-1])
    if sum(b - a for a, b in bounds.values()) < len(uniq):
        y.zero_()
    for e, w in provide(list(bounds)):
        a, b = bounds[e]
        rows = x_g[a:b].to(w.gate_up.dtype)
        # one row (decode): a matrix-vector product on the storage rows (same result as mm, faster on CPU)
        h = (torch.mv(w.gate_up, rows[0]).unsqueeze(0) if b - a == 1 and not transposed
             else torch.mm(rows, w.gate_up if transposed else w.gate_up.t()))
        if w.gate_up_bias is not None:
            h.add_(w.gate_up_bias)
        h = _activate(h, act, has_gate, gate_fn)
        same = y.dtype == h.dtype
        out = y[a:b] if same else h.new_empty(b - a, y.shape[1])
        if b - a == 1 and not transposed:
            torch.mv(w.down, h[0], out=out[0])
        else:
            torch.mm(h, w.down if transposed else w.down.t(), out=out)
        if w.down_bias is not None:
            out.add_(w.down_bias)
        if not same:
            y[a:b] = out
    if post_fn is not None:
        y = post_fn(y)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    if combine == "gemm":
        return combine_slots(y, inv, weights).to(x.dtype)
    weighted = y * weights.reshape(-1)[perm].unsqueeze(-1)
    return weighted[inv].view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def decodes_by_gemv(bank: torch.Tensor) -> bool:
    """Whether ``expert_forward`` runs a one-token step on experts stored like ``bank`` with the decode kernel (the
    ``gemv`` path: the current backend, the device), i.e. whether ``expert_forward_parts`` reproduces it."""
    return _use_gemv(get_backend(), bank, 1, False)


def expert_forward_parts(
    x: torch.Tensor,
    weights: torch.Tensor,
    parts: Iterable[tuple[torch.Tensor, ExpertWeights]],
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    *,
    transposed: bool = False,
    has_gate: bool = True,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``expert_forward``'s decode path (per-slot GEMVs on the weights' storage, then the weighted sum over k) with
    the k slots computed in parts, each on its own bank as it becomes ready: the offload engine's cache hits on the
    slot bank while the misses are read, then the misses. ``parts`` yields at least one ``(ids [T, k], bank)``:
    each slot's index into that bank, or one outside it for the slots of other parts. A slot's output does not
    depend on the others, so the result equals one ``expert_forward`` over all slots bit for bit."""
    parts = list(parts)
    if not parts:
        raise ValueError("expert_forward_parts needs at least one part")
    h = None
    for ids, bank in parts:  # each bank's up projections as it becomes ready
        h_p = _gemv_hidden(x, ids, bank.gate_up, act, bank.gate_up_bias, not transposed, has_gate, gate_fn)
        v_p = ((ids >= 0) & (ids < bank.gate_up.shape[0])).unsqueeze(-1)
        h = h_p if h is None else torch.where(v_p, h_p, h)
    assert h is not None
    fused = post_fn is None and all(bank.down_bias is None for _, bank in parts)  # as _gemv_forward: one pass
    if fused and not transposed:
        out = cpu_kernels.combine_banks(h.contiguous(), [(ids, bank.down, None) for ids, bank in parts], weights)
        if out is not None:
            return out.to(x.dtype)
    y = valid = None
    for ids, bank in parts:
        y_p, v_p = _gemv_down(h, ids, bank.down, bank.down_bias, not transposed, post_fn)
        y, valid = (y_p, v_p) if y is None or valid is None else (torch.where(v_p, y_p, y), valid | v_p)
    assert y is not None and valid is not None
    out = _weighted_sum(y, weights, valid)
    return (out.to(h.dtype) if fused else out).to(x.dtype)  # the fused op's fallback rounds to h's dtype first
