"""Expert dispatch: sort (token, expert) pairs by expert, run each expert's FFN on a contiguous block.

The pipeline is the one transformers' ``grouped_mm`` experts use, written for moekit:
flatten ids → ``torch.sort`` → gather rows → per-expert counts (no host sync) → ``F.grouped_mm``
(or a sorted per-expert ``mm`` loop with one host sync) → weight → un-permute → sum over k in fp32.
Ids ≥ E mean "no expert" (null experts, dropped tokens, expert-parallel sentinels) and contribute zero.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "grouped_mm", "loop"]
_BACKENDS = ("auto", "grouped_mm", "loop")
_default_backend: Backend = os.environ.get("MOEKIT_EXPERTS_BACKEND", "auto")  # type: ignore[assignment]


def set_backend(backend: Backend) -> None:
    """Choose how grouped matmuls run: ``auto`` (grouped_mm when it works, else loop), or force one."""
    global _default_backend
    if backend not in _BACKENDS:
        raise ValueError(f"unknown experts backend {backend!r}; choose one of {_BACKENDS}")
    _default_backend = backend


def get_backend() -> Backend:
    """The backend ``expert_forward`` uses when none is passed."""
    return _default_backend


def _torch_at_least(major: int, minor: int) -> bool:
    """True when the running torch is at least ``major.minor`` (dev/local suffixes ignored)."""
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# CPU grouped_mm is unreliable before torch 2.11 (transformers PR #46743); use the loop there.
_CPU_GROUPED_MM_OK = _HAS_GROUPED_MM and _torch_at_least(2, 11)


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned data and 16-byte multiple strides (except unit strides)."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _can_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm(x, w)`` is expected to run on this device, dtype and layout."""
    if not _HAS_GROUPED_MM or x.dtype != w.dtype:
        return False
    if w.device.type == "cpu":
        if not _CPU_GROUPED_MM_OK:
            return False
    elif w.device.type == "cuda":
        if torch.cuda.get_device_capability(w.device) < (8, 0):
            return False
    else:
        return False
    return _aligned(x) and _aligned(w)


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert as int64 ``[E]``, ids ≥ E ignored, computed on device without a host sync."""
    flat = ids.reshape(-1).long().clamp(min=0, max=num_experts)  # overflow bucket E for "no expert"
    if flat.device.type == "cpu":  # no device to sync with; bincount is a single sequential pass
        return torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    # bincount would sync to size its output; a fixed-size scatter-add does not.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[:num_experts]


class _LoopGroupedMM(torch.autograd.Function):
    """Grouped matmul as a per-expert ``mm`` loop over contiguous row blocks; rows past the groups are zero.

    Outputs and gradients are allocated uninitialised and written in place by ``mm(out=...)``; only rows and
    experts that no group covers are zeroed. ``grad_w`` takes ``w``'s strides, so the gradient of a transposed
    view lands in the parameter's own layout and ``AccumulateGrad`` need not copy it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bounds: list[int]) -> torch.Tensor:  # type: ignore[override]
        out = x.new_empty(x.shape[0], w.shape[2])
        start = 0
        for e, end in enumerate(bounds):
            if end > start:
                torch.mm(x[start:end], w[e], out=out[start:end])
            start = end
        out[start:].zero_()
        ctx.save_for_backward(x, w)
        ctx.bounds = bounds
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(w) if need_w else None  # keeps w's strides
        start = 0
        for e, end in enumerate(ctx.bounds):
            if end > start:
                g = grad_out[start:end]
                if grad_x is not None:
                    torch.mm(g, w[e].t(), out=grad_x[start:end])
                if grad_w is not None:
                    torch.mm(x[start:end].t(), g, out=grad_w[e])
            elif grad_w is not None:
                grad_w[e].zero_()
            start = end
        if grad_x is not None:
            grad_x[start:].zero_()
        return grad_x, grad_w, None


def _grouped(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, bounds: list[int] | None, use_gmm: bool
) -> torch.Tensor:
    """``x[rows of group e] @ w[e]`` for every expert e; ``w`` is ``[E, in, out]`` (any strides)."""
    if use_gmm:
        return F.grouped_mm(x, w, offs=offsets)
    assert bounds is not None
    return _LoopGroupedMM.apply(x, w, bounds)


def expert_forward(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    *,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    transposed: bool = False,
    has_gate: bool = True,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Sum over k of ``weights[t,k] · expert_{ids[t,k]}(x[t])``, sorted by expert; ids ≥ E add nothing.

    Shapes: ``x [T,H]``, ``ids``/``weights [T,k]``. Weights follow ``nn.Linear`` (out×in) layout,
    ``w_gate_up [E, 2I, H]`` (gate;up concatenated) and ``w_down [E, H, I]``, or, with
    ``transposed=True``, ``[E, H, 2I]`` and ``[E, I, H]``. ``has_gate=False`` means ``w_gate_up`` is a
    plain up projection followed by ``act``. ``gate_fn`` replaces ``act(gate) * up`` (GPT-OSS).
    """
    num_tokens, hidden = x.shape
    top_k = ids.shape[-1]
    num_experts = w_gate_up.shape[0]
    backend = backend or _default_backend
    if backend not in _BACKENDS:
        raise ValueError(f"unknown experts backend {backend!r}; choose one of {_BACKENDS}")

    # [E, in, out] views of the weights, whatever the storage layout.
    w1 = w_gate_up if transposed else w_gate_up.transpose(-2, -1)
    w2 = w_down if transposed else w_down.transpose(-2, -1)
    compute_dtype = w1.dtype

    if num_tokens == 0 or top_k == 0:
        return x.new_zeros(x.shape) + 0.0 * weights.sum()  # keeps the graph connected for autograd
    flat_ids = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat_ids)
    x_g = x[perm // top_k].to(compute_dtype)
    counts = expert_counts(sorted_ids, num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    # Sentinels (ids ≥ E) sort to the tail. On CPU, checking for them costs nothing; elsewhere assume
    # they may be present rather than sync.
    maybe_sentinels = sorted_ids.device.type != "cpu" or bool(sorted_ids[-1] >= num_experts)
    valid = (sorted_ids < num_experts).unsqueeze(-1) if maybe_sentinels else None

    use_gmm = backend == "grouped_mm" or (
        backend == "auto" and _can_grouped_mm(x_g, w1) and _can_grouped_mm(x_g, w2)
    )
    bounds = None if use_gmm else offsets.tolist()  # the one host sync of the loop path
    if use_gmm and valid is not None:
        # grouped_mm leaves tail rows (ids ≥ E) uninitialised, in the output and in d_input: mask both.
        x_g = x_g.masked_fill(~valid, 0.0)

    h = _grouped(x_g, w1, offsets, bounds, use_gmm)
    bias_rows = sorted_ids.clamp(max=num_experts - 1) if valid is not None else sorted_ids
    if b_gate_up is not None:
        h = h + b_gate_up[bias_rows].to(h.dtype)
    if use_gmm and valid is not None:
        h = h.masked_fill(~valid, 0.0)
    if gate_fn is not None:
        h = gate_fn(h)
    elif has_gate:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    y = _grouped(h, w2, offsets, bounds, use_gmm)
    if b_down is not None:
        y = y + b_down[bias_rows].to(y.dtype)
    if post_fn is not None:
        y = post_fn(y)
    if valid is not None:
        y = torch.where(valid, y, 0.0)  # "no expert" rows are exactly zero (also kills kernel garbage / NaN)
    # Un-permute to (token, k) order, then weight and sum the k slots as one fp32 [1,k]x[k,H] product per
    # token: fp32 accumulation, deterministic (no atomics), and two fewer passes over [T·k, H] than
    # weighting, un-permuting and summing separately.
    y_tok = torch.empty_like(y).index_copy(0, perm, y).view(num_tokens, top_k, hidden)
    out = torch.bmm(weights.reshape(num_tokens, 1, top_k).float(), y_tok.float()).squeeze(1)
    return out.to(x.dtype)


def moekit_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers experts-interface entry point: reads the module's layout flags and calls ``expert_forward``."""
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    w1 = self.gate_up_proj if has_gate else self.up_proj
    b1 = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    b2 = self.down_proj_bias if has_bias else None
    gate_fn = self._apply_gate if has_gate and hasattr(self, "_apply_gate") else None
    post_fn = self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None
    return expert_forward(
        hidden_states,
        top_k_index,
        top_k_weights,
        w1,
        self.down_proj,
        getattr(self, "act_fn", F.silu),
        b_gate_up=b1,
        b_down=b2,
        transposed=getattr(self, "is_transposed", False),
        has_gate=has_gate,
        gate_fn=gate_fn,
        post_fn=post_fn,
    )


def register_with_transformers() -> bool:
    """Register ``"moekit"`` in transformers' experts registry (idempotent); False if transformers lacks it."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register("moekit", moekit_experts_forward)
    return True
