"""Expert dispatch: sort (token, expert) pairs by expert, run each expert's FFN on a contiguous block.

The pipeline is the one transformers' ``grouped_mm`` experts use, written for moekit:
flatten ids → ``torch.sort`` → gather rows → per-expert counts (no host sync) → two grouped matmuls →
un-permute, weight and sum over k in one GEMM (``combine_slots``). The grouped matmuls run as ``F.grouped_mm``
(GPU), one ``bmm`` over zero-padded per-expert blocks (CPU, small groups), or a per-expert ``mm`` loop with one
host sync (where ``grouped_mm`` is missing), or for float16 on a CPU with AMX-BF16 ``cpu_kernels_amx`` (exact
bf16 hi/lo split, four exact bf16 products, fp32 sums); ``_choose_path`` picks per call. A one-token step (decode) skips the
sort and runs one matrix-vector product per active expert straight on the weights' storage (``gemv``).
Ids ≥ E mean "no expert" (null experts, dropped tokens, expert-parallel sentinels) and contribute zero.

Under ``torch.compile`` nothing reads tensor values on the host: the data-dependent loops (``loop``, ``gemv``)
run as ``torch.library`` custom ops (``moekit::grouped_mm_loop``, ``moekit::expert_gemv``) with fake
implementations, ``grouped_mm`` is used only in bf16 (what inductor accepts), and sentinel masks always apply.

One module of ~620 lines on purpose: the eager and compiled paths, their custom ops and the path rule are one
pipeline sharing layout conventions (``out_in``, sentinel ids); the int8 and int4 variants are ``int8_experts``
and ``int4_experts``, and the provider-fed variant the offload engine uses is ``provided``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from moekit.nn import cpu_kernels, cpu_kernels_amx
from moekit.registry import Registry

Backend = Literal["auto", "grouped_mm", "loop", "padded", "gemv", "amx"]
BACKENDS: Registry[str] = Registry("experts backend")
for _name, _help in (
    ("auto", "picks per call: gemv for a one-token CPU step, amx for float16 prefill on a CPU with AMX-BF16, "
             "padded for small CPU groups, else grouped_mm where it runs, else loop"),
    ("grouped_mm", "torch's F.grouped_mm over the expert-sorted rows (GPU; bf16 under torch.compile)"),
    ("loop", "one matmul per expert, one host sync (runs everywhere)"),
    ("padded", "one bmm over zero-padded per-expert blocks (CPU, small groups)"),
    ("gemv", "one matrix-vector product per active expert on the weights' storage (decode, inference only)"),
    ("amx", "float16 experts on AMX-BF16 (CPU, inference): each fp16 value split exactly into two bf16, four "
            "exact bf16 products summed in fp32; auto picks it for fp16 prefill where the CPU has AMX"),
):
    BACKENDS.add(_name, _name, help=_help)
_default_backend: Backend = os.environ.get("MOEKIT_EXPERTS_BACKEND", "auto")  # type: ignore[assignment]


def set_backend(backend: Backend) -> None:
    """Choose how grouped matmuls run: ``auto`` (picks per call, see ``_choose_path``), or force one."""
    global _default_backend
    _default_backend = BACKENDS.canonical(backend)  # type: ignore[assignment]


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


def _aligned_strides(t: torch.Tensor) -> bool:
    """Every stride is 1 or a multiple of 16 bytes (grouped_mm's layout rule)."""
    size = t.element_size()
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned data and 16-byte multiple strides (except unit strides)."""
    return t.data_ptr() % 16 == 0 and _aligned_strides(t)


@functools.cache
def _cuda_capability(index: int | None) -> tuple[int, int]:
    """The GPU's compute capability, asked once per device (a per-call query costs launch-bound decode time)."""
    return torch.cuda.get_device_capability(index)


def _can_grouped_mm(x: torch.Tensor, w: torch.Tensor, compiling: bool = False) -> bool:
    """Whether ``F.grouped_mm(x, w)`` is expected to run on this device, dtype and layout.

    Under ``torch.compile`` only bf16 (inductor's grouped_mm lowering and fake kernel accept no other dtype), and
    only strides are checked: a fake tensor has no data pointer (parameters and fresh buffers are aligned).
    """
    if not _HAS_GROUPED_MM or x.dtype != w.dtype:
        return False
    if compiling and w.dtype != torch.bfloat16:
        return False
    if w.device.type == "cpu":
        if not _CPU_GROUPED_MM_OK:
            return False
    elif w.device.type == "cuda":
        if _cuda_capability(w.device.index) < (8, 0):
            return False
    else:
        return False
    if compiling:
        return all(_aligned_strides(t) for t in (x, w))
    return _aligned(x) and _aligned(w)


def expert_counts(ids: torch.Tensor, num_experts: int, sync_free: bool | None = None) -> torch.Tensor:
    """Tokens per expert as int64 ``[E]``, ids ≥ E ignored, computed on device without a host sync.

    ``sync_free`` (default: off CPU, and under ``torch.compile``) counts with a fixed-size scatter-add: ``bincount``
    sizes its output from the data (a sync on an accelerator, a data-dependent shape under compile), while on CPU,
    with no device to sync with, it is a single sequential pass.
    """
    flat = ids.reshape(-1).long().clamp(min=0, max=num_experts)  # overflow bucket E for "no expert"
    if sync_free is None:
        sync_free = flat.device.type != "cpu" or torch.compiler.is_compiling()
    if not sync_free:
        return torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
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


class _PaddedBmm(torch.autograd.Function):
    """``bmm`` of E zero-padded row blocks with ``w [E, in, out]``; the weight gradient is computed directly in
    ``w``'s storage layout (a transposed view of an ``[E, out, in]`` parameter included), so nothing is copied
    into the parameter's layout afterwards. Padding rows are zero, so they add nothing to it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return torch.bmm(x, w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad_out, w.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if w.stride(-2) == 1:  # w is the transpose of a contiguous [E, out, in] tensor
                grad_w = torch.bmm(grad_out.transpose(1, 2), x).transpose(1, 2)
            else:
                grad_w = torch.bmm(x.transpose(1, 2), grad_out)
        return grad_x, grad_w


# Custom ops: the data-dependent loops as opaque operators, so that torch.compile(fullgraph=True) traces through
# the dispatch (torch.compiler.disable cannot be used with fullgraph). Their fake implementations give the output
# shapes, which depend on the inputs' shapes only. Weights come in their storage layout with ``out_in`` saying
# whether it is nn.Linear's [E, out, in] (else [E, in, out]), so no op sees a strided view it would have to copy.


def _expert_matrix(w: torch.Tensor, e: int, out_in: bool) -> torch.Tensor:
    """Expert e's weight as an [in, out] matrix view."""
    return w[e].t() if out_in else w[e]


@torch.library.custom_op("moekit::grouped_mm_loop", mutates_args=())
def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out_in: bool) -> torch.Tensor:
    """Grouped matmul of sorted rows ``x [S, in]`` with experts ``w`` over int ``offsets [E]``: one ``mm`` per
    non-empty group after one read of the offsets; rows past the last group are zero."""
    out_dim = w.shape[1] if out_in else w.shape[2]
    out = x.new_empty(x.shape[0], out_dim)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], _expert_matrix(w, e, out_in), out=out[start:end])
        start = end
    out[start:].zero_()
    return out


@_grouped_mm_loop.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out_in: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1] if out_in else w.shape[2])


@torch.library.custom_op("moekit::grouped_mm_loop_backward", mutates_args=())
def _grouped_mm_loop_backward(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out_in: bool, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``moekit::grouped_mm_loop`` for x and w (w's own layout); empty groups get zero."""
    grad_x = torch.zeros_like(x)
    grad_w = torch.zeros_like(w)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            g = grad_out[start:end]
            torch.mm(g, _expert_matrix(w, e, out_in).t(), out=grad_x[start:end])
            if out_in:
                torch.mm(g.t(), x[start:end], out=grad_w[e])
            else:
                torch.mm(x[start:end].t(), g, out=grad_w[e])
        start = end
    return grad_x, grad_w


@_grouped_mm_loop_backward.register_fake
def _(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out_in: bool, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(w)


def _grouped_mm_loop_setup(ctx, inputs, output) -> None:
    x, w, offsets, out_in = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.out_in = out_in


def _grouped_mm_loop_grad(ctx, grad_out: torch.Tensor):
    x, w, offsets = ctx.saved_tensors
    grad_x, grad_w = torch.ops.moekit.grouped_mm_loop_backward(x, w, offsets, ctx.out_in, grad_out)
    return grad_x, grad_w, None, None


_grouped_mm_loop.register_autograd(_grouped_mm_loop_grad, setup_context=_grouped_mm_loop_setup)


def eager_or_op(op_name: str, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``torch.ops.moekit.<op_name>(*args)`` under ``torch.compile`` (the custom op keeps the kernel in the graph),
    else ``fn(*args)``, the op's own implementation: in eager mode the dispatcher's per-call work (autograd wrapper,
    alias checks, dynamo guard) costs ~20-40 µs per call, and a decode step makes two such calls per MoE layer. Only
    for inference paths (the decode ops have no backward). Profiles still show the call as ``moekit::<op_name>``."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.moekit, op_name)(*args)
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):  # named in profiles (~10 µs: only then)
        with torch.profiler.record_function(f"moekit::{op_name}"):
            return fn(*args)
    return fn(*args)


def expert_gemv_impl(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, out_in: bool) -> torch.Tensor:
    """``out[t, j] = x[t] (or x[t, j]) @ expert ids[t, j]`` as one matrix-vector product per slot, straight on the
    weights' storage (no gather, no sort): the decode kernel. Slots with ids outside [0, E) are zero.

    ``x`` is ``[T, in]`` (shared by the k slots of a token) or ``[T, k, in]``; the result is ``[T, k, out]``.
    With nn.Linear's layout on CPU all products run as one call of moekit's compiled kernel (``cpu_kernels``: rows
    split across threads); otherwise one ``torch.mv`` per slot, each reading contiguous rows where it can.
    """
    if out_in:
        fast = cpu_kernels.expert_gemv(x, w, ids)
        if fast is not None:
            return fast
    num_experts = w.shape[0]
    out = x.new_empty(*ids.shape, w.shape[1] if out_in else w.shape[2])
    per_slot = x.dim() == 3
    for t, row in enumerate(ids.tolist()):
        for j, e in enumerate(row):
            if 0 <= e < num_experts:
                torch.mv(w[e] if out_in else w[e].t(), x[t, j] if per_slot else x[t], out=out[t, j])
            else:
                out[t, j].zero_()
    return out


@torch.library.custom_op("moekit::expert_gemv", mutates_args=())
def _expert_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, out_in: bool) -> torch.Tensor:
    """``expert_gemv_impl`` as a custom op (compiled graphs call it; eager mode calls the function)."""
    return expert_gemv_impl(x, w, ids, out_in)


@_expert_gemv.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, out_in: bool) -> torch.Tensor:
    return x.new_empty(*ids.shape, w.shape[1] if out_in else w.shape[2])


def expert_gemv_combine_impl(
    h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out_in: bool
) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · h[t, j] @ expert ids[t, j]``: a decode step's down projection and its weighted
    sum over the k slots, ``[T, out]`` in ``h``'s dtype; slots with ids outside [0, E) add nothing. On CPU with
    nn.Linear's layout one kernel call (no ``[T, k, out]`` intermediate, one rounding); otherwise the GEMV op and
    the weighted sum."""
    if out_in:
        fast = cpu_kernels.expert_gemv_combine(h, w, ids, weights)
        if fast is not None:
            return fast
    return slot_sum(expert_gemv_impl(h, w, ids, out_in), ids, weights, w.shape[0]).to(h.dtype)


@torch.library.custom_op("moekit::expert_gemv_combine", mutates_args=())
def _expert_gemv_combine(
    h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out_in: bool
) -> torch.Tensor:
    """``expert_gemv_combine_impl`` as a custom op (compiled graphs call it; eager mode calls the function)."""
    return expert_gemv_combine_impl(h, w, ids, weights, out_in)


@_expert_gemv_combine.register_fake
def _(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out_in: bool) -> torch.Tensor:
    return h.new_empty(ids.shape[0], w.shape[1] if out_in else w.shape[2])


def _grouped(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    bounds: list[int] | None,
    path: str,
    w_storage: torch.Tensor,
    out_in: bool,
) -> torch.Tensor:
    """``x[rows of group e] @ w[e]`` for every expert e; ``w`` is ``[E, in, out]`` (any strides), a view of
    ``w_storage`` (``[E, out, in]`` when ``out_in``).

    ``padded``: ``x`` holds E equal blocks of rows (one per expert, zero-padded) and one ``bmm`` runs them.
    ``loop`` without ``bounds`` (under compile): the custom op, which reads the offsets itself.
    """
    if path == "grouped_mm":
        return F.grouped_mm(x, w, offs=offsets)
    if path == "amx":
        out = cpu_kernels_amx.f16_grouped_mm(x, w_storage, offsets)
        if out is not None:
            return out
        bounds = offsets.tolist()  # (the kernel refused: _choose_path checked what it needs, so not expected)
    if path == "padded":
        num_experts = w.shape[0]
        return _PaddedBmm.apply(x.view(num_experts, -1, x.shape[1]), w).view(x.shape[0], w.shape[2])
    if bounds is None:
        return torch.ops.moekit.grouped_mm_loop(x, w_storage, offsets, out_in)
    return _LoopGroupedMM.apply(x, w, bounds)


# CPU: one bmm over the experts' row blocks, each zero-padded to the largest group, beats per-expert GEMMs (a
# loop, or CPU grouped_mm, which is one) when groups are small: bmm splits the batch of experts across cores
# instead of splitting each small GEMM. It pays for the padding rows and reads every expert's weights, so it is
# used while most experts have tokens, padding stays under PADDED_MAX_WASTE × the real rows, and groups are
# small (training: the backward's three GEMMs per expert gain less, so a lower limit). Measured in docs/nn.md.
PADDED_MAX_WASTE = 3.0
PADDED_MIN_USED = 0.75
PADDED_MAX_ROWS_INFERENCE = 256
PADDED_MAX_ROWS_TRAINING = 32
# ... and only for small experts: from about a million weights per matrix (H·I; OLMoE-1B-7B's 2048×1024) one GEMM
# per expert (grouped_mm, or the loop) runs each expert's rows fast enough that padding only costs (measured in
# docs/nn.md, "Prefill at OLMoE's published shape": bench_experts.py --shape olmoe-1b-7b --paths ...).
PADDED_MAX_EXPERT_WEIGHTS = 2**20
# float16 on a CPU with AMX-BF16: torch's fp16 GEMM runs on AVX-512 FMA at fp32 speed; ``cpu_kernels_amx`` runs the
# same products (each fp16 split exactly into bf16 hi + lo, four exact bf16 products, fp32 sums) on AMX tiles. It pads
# each expert's rows to 16 and converts its weights per call, so it pays from about 32 rows per used expert
# (measured in docs/nn.md, "float16 prefill on AMX": 0.9-1.1x of grouped_mm at 16 rows, 1.3-1.8x at 64-256; faster
# than the padded bmm at the small shapes that take it, so it is checked first).
AMX_MIN_ROWS_PER_EXPERT = cpu_kernels_amx.AMX_MIN_ROWS


def _use_gemv(backend: Backend, w1: torch.Tensor, num_tokens: int, needs_grad: bool) -> bool:
    """Whether this call runs the decode kernel: one GEMV per active expert, no sort (inference only).

    ``auto`` takes it for a one-token step on CPU, where decode is bound by reading the k experts' weights once;
    on a GPU the per-slot launches and the read of the ids lose to one ``grouped_mm``. With gradients a forced
    ``gemv`` runs the ``loop`` path instead (the GEMV op has no backward).
    """
    if needs_grad:
        return False
    if backend == "gemv":
        return True
    return backend == "auto" and num_tokens == 1 and w1.device.type == "cpu"


def _choose_path(
    backend: Backend,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    counts: torch.Tensor,
    num_slots: int,
    needs_grad: bool,
    compiling: bool = False,
) -> str:
    """The grouped-matmul path for this call: the forced backend, or for ``auto`` the fastest that works.

    Under ``torch.compile`` nothing may read tensor values: ``padded`` (sized from the counts) becomes ``loop``
    (a custom op), and ``auto`` never looks at the counts.
    """
    if backend == "gemv":  # reached only with gradients (see _use_gemv)
        return "loop"
    amx = (
        not compiling and not needs_grad and backend in ("auto", "amx")
        and cpu_kernels_amx.fits(x, w1.transpose(-2, -1)) and cpu_kernels_amx.fits(x.new_empty(0, w2.shape[1]),
                                                                                   w2.transpose(-2, -1))
        and cpu_kernels_amx.available()
    )
    if backend == "amx":  # forced: where the kernel cannot run (grad, dtype, layout, CPU), auto's other choice
        if amx:
            return "amx"
        backend = "auto"
    elif backend != "auto":
        return "loop" if compiling and backend == "padded" else backend
    num_experts = w1.shape[0]
    if amx and num_slots >= AMX_MIN_ROWS_PER_EXPERT * int((counts > 0).sum()):  # (before padded: faster there too)
        return "amx"
    # (fewer slots than PADDED_MIN_USED × E cannot use enough experts: decode skips the check entirely)
    if (
        not compiling
        and w1.device.type == "cpu"
        and x.dtype == w1.dtype
        and num_slots >= PADDED_MIN_USED * num_experts
        and w1.shape[1] * w1.shape[2] <= 2 * PADDED_MAX_EXPERT_WEIGHTS  # w1 is [E, H, 2I]
    ):
        per_expert = counts.tolist()  # on CPU, reading counts is not a device sync
        used = sum(c > 0 for c in per_expert)
        max_rows = PADDED_MAX_ROWS_TRAINING if needs_grad else PADDED_MAX_ROWS_INFERENCE
        if (
            num_experts * max(per_expert) <= PADDED_MAX_WASTE * num_slots
            and used >= PADDED_MIN_USED * num_experts
            and sum(per_expert) <= max_rows * used
        ):
            return "padded"
    ok = _can_grouped_mm(x, w1, compiling) and _can_grouped_mm(x, w2, compiling)
    return "grouped_mm" if ok else "loop"


def _gemv_forward(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    out_in: bool,
    has_gate: bool,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """The decode path: per (token, slot) GEMVs on the experts' storage, then the down projection and the weighted
    sum over k in one pass (``moekit::expert_gemv_combine``), or per slot and summed when the experts have a down
    bias or a post-function."""
    h = _gemv_hidden(x, ids, w_gate_up, act, b_gate_up, out_in, has_gate, gate_fn)
    if b_down is None and post_fn is None:
        return eager_or_op("expert_gemv_combine", expert_gemv_combine_impl, h.contiguous(), w_down, ids, weights,
                           out_in).to(x.dtype)
    y, valid = _gemv_down(h, ids, w_down, b_down, out_in, post_fn)
    return _weighted_sum(y, weights, valid).to(x.dtype)


def _gemv_hidden(
    x: torch.Tensor,
    ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    b_gate_up: torch.Tensor | None,
    out_in: bool,
    has_gate: bool,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Each (token, slot)'s activated up projection ``h [T, k, I]`` (invalid slots hold anything). Every slot's value
    depends on its own id and row only (the kernel computes each product alone), so computing a step's slots in
    several calls, the others as sentinels, gives the same numbers."""
    h = eager_or_op("expert_gemv", expert_gemv_impl, x.to(w_gate_up.dtype), w_gate_up, ids, out_in)  # [T, k, 2I]
    if b_gate_up is not None:
        h = h + b_gate_up[ids.clamp(0, w_gate_up.shape[0] - 1)].to(h.dtype)
    return _activate(h, act, has_gate, gate_fn)


def _gemv_down(
    h: torch.Tensor,
    ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    out_in: bool,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's expert output ``y [T, k, H]`` (unweighted) and ``valid [T, k, 1]`` (ids in [0, E)); per slot like
    ``_gemv_hidden``."""
    num_experts = w_down.shape[0]
    y = eager_or_op("expert_gemv", expert_gemv_impl, h.contiguous(), w_down, ids, out_in)  # [T, k, H]
    if b_down is not None:
        y = y + b_down[ids.clamp(0, num_experts - 1)].to(y.dtype)
    if post_fn is not None:
        y = post_fn(y)
    valid = ((ids >= 0) & (ids < num_experts)).unsqueeze(-1)  # masked always: cheaper than asking
    return y, valid


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
    sentinels: bool | None = None,
) -> torch.Tensor:
    """Sum over k of ``weights[t,k] · expert_{ids[t,k]}(x[t])``, sorted by expert; ids ≥ E add nothing.

    Shapes: ``x [T,H]``, ``ids``/``weights [T,k]``. Weights follow ``nn.Linear`` (out×in) layout,
    ``w_gate_up [E, 2I, H]`` (gate;up concatenated) and ``w_down [E, H, I]``, or, with
    ``transposed=True``, ``[E, H, 2I]`` and ``[E, I, H]``. ``has_gate=False`` means ``w_gate_up`` is a
    plain up projection followed by ``act``. ``gate_fn`` replaces ``act(gate) * up`` (GPT-OSS).
    Traceable by ``torch.compile(fullgraph=True)``: no tensor value is read on the host under compile.
    ``sentinels``: whether ids ≥ E ("no expert") may occur; None finds out (on CPU in eager by reading the largest
    id, elsewhere by assuming they may); False, from a caller that knows (transformers' experts outside expert
    parallelism), skips the masking passes that keep such rows out of the sums — on a GPU, three passes over the
    ``[T·k, H]`` rows and their kernel launches.
    """
    num_tokens, hidden = x.shape
    top_k = ids.shape[-1]
    num_experts = w_gate_up.shape[0]
    backend = backend or _default_backend
    if backend not in BACKENDS:
        BACKENDS.canonical(backend)  # the one-line error naming every backend
    compiling = torch.compiler.is_compiling()

    # [E, in, out] views of the weights, whatever the storage layout.
    w1 = w_gate_up if transposed else w_gate_up.transpose(-2, -1)
    w2 = w_down if transposed else w_down.transpose(-2, -1)
    compute_dtype = w1.dtype

    if num_tokens == 0 or top_k == 0:
        return x.new_zeros(x.shape) + 0.0 * weights.sum()  # keeps the graph connected for autograd
    tensors = (x, weights, w1, w2, b_gate_up, b_down)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if _use_gemv(backend, w1, num_tokens, needs_grad):
        return _gemv_forward(
            x, ids, weights, w_gate_up, w_down, act, b_gate_up, b_down, not transposed, has_gate, gate_fn, post_fn
        )

    flat_ids = ids.reshape(-1)
    num_slots = flat_ids.numel()
    sorted_ids, perm = torch.sort(flat_ids)
    # index_select, not x[idx]: a plain row gather, several times faster on CPU, with an index_add backward.
    x_g = x.index_select(0, perm // top_k).to(compute_dtype)
    counts = expert_counts(sorted_ids, num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    # Sentinels (ids ≥ E) sort to the tail. In eager on CPU, checking for them costs nothing; elsewhere (an
    # accelerator, or under compile, where no value may be read) assume they may be present.
    if sentinels is None:
        maybe_sentinels = compiling or sorted_ids.device.type != "cpu" or bool(sorted_ids[-1] >= num_experts)
    else:
        maybe_sentinels = sentinels
    valid = (sorted_ids < num_experts).unsqueeze(-1) if maybe_sentinels else None
    bias_rows = sorted_ids.clamp(max=num_experts - 1) if valid is not None else sorted_ids

    path = _choose_path(backend, x_g, w1, w2, counts, num_slots, needs_grad, compiling)
    if path == "padded":
        # Row i of the sorted pairs goes to row (i - start of its expert) of that expert's [m, in] block.
        block = max(int(counts.max()), 1)
        starts = offsets - counts
        rows = torch.arange(num_slots, device=x.device) - starts[bias_rows] + bias_rows * block
        num_valid = int(offsets[-1])
        x_in = x_g.new_zeros(num_experts * block, x_g.shape[1])
        x_in.index_copy_(0, rows[:num_valid], x_g[:num_valid])
        bias_rows = torch.arange(num_experts, device=x.device).repeat_interleave(block)
        rows = rows if valid is None else rows.masked_fill(~valid.squeeze(-1), 0)
    else:
        x_in, rows = x_g, None
        if path == "grouped_mm" and valid is not None:
            # grouped_mm leaves tail rows (ids ≥ E) uninitialised, in the output and in d_input: mask both.
            x_in = x_in.masked_fill(~valid, 0.0)
    # the one host sync of the eager loop path; under compile the custom op reads the offsets itself
    bounds = offsets.tolist() if path == "loop" and not compiling else None

    out_in = not transposed
    h = _grouped(x_in, w1, offsets, bounds, path, w_gate_up, out_in)
    if b_gate_up is not None:
        h = h + b_gate_up[bias_rows].to(h.dtype)
    if path == "grouped_mm" and valid is not None:
        h = h.masked_fill(~valid, 0.0)
    h = _activate(h, act, has_gate, gate_fn)
    y = _grouped(h, w2, offsets, bounds, path, w_down, out_in)
    if b_down is not None:
        y = y + b_down[bias_rows].to(y.dtype)
    if post_fn is not None:
        y = post_fn(y)
    # Un-permute with one row gather: slot j of token t reads the output row of its (expert, position).
    slot_rows = torch.empty_like(perm)
    slot_rows[perm] = torch.arange(num_slots, device=perm.device) if rows is None else rows
    slot_valid = None if valid is None else ids.reshape(num_tokens, top_k, 1) < num_experts
    return combine_slots(y, slot_rows, weights, slot_valid).to(x.dtype)


def combine_slots(
    y: torch.Tensor, slot_rows: torch.Tensor, weights: torch.Tensor, slot_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = Σ_j weights[t,j] · y[slot_rows[t·k + j]]``: un-permute the expert outputs and sum the k slots.

    One row gather, then one ``[1,k]×[k,H]`` product per token: the GEMM accumulates in fp32 and rounds once
    (bf16/fp16 included), is deterministic (no atomics) and takes one pass over ``[T·k, H]``. Slots where
    ``slot_valid`` (``[T,k,1]``) is False add exactly zero, whatever their rows hold (kernel garbage, NaN).
    """
    num_tokens, top_k = weights.shape
    y_tok = y.index_select(0, slot_rows).view(num_tokens, top_k, y.shape[-1])
    return _weighted_sum(y_tok, weights, slot_valid)


def _weighted_sum(y_tok: torch.Tensor, weights: torch.Tensor, slot_valid: torch.Tensor | None) -> torch.Tensor:
    """``Σ_j weights[t,j] · y_tok[t,j]`` as one ``[1,k]×[k,H]`` GEMM per token; invalid slots add exactly zero."""
    num_tokens, top_k = weights.shape
    if slot_valid is not None:
        y_tok = torch.where(slot_valid, y_tok, 0.0)
    if y_tok.device.type != "cpu":
        # an accelerator: one multiply (in fp32: the weights are fp32 or made so) and a sum; fewer launches than
        # the casts and cuBLAS's batched GEMM, with the same single rounding of the fp32 result
        return (y_tok * weights.unsqueeze(-1).float()).sum(1)
    if weights.dtype != y_tok.dtype:
        weights, y_tok = weights.float(), y_tok.float()
    return torch.bmm(weights.reshape(num_tokens, 1, top_k), y_tok).squeeze(1)


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
    if hasattr(self, _int4.INT4_BUFFERS[0]):  # packed int4 experts (quantize_experts_int4, or a packed load)
        return _int4.expert_forward_int4(
            hidden_states, top_k_index, top_k_weights, tuple(getattr(self, name) for name in _int4.INT4_BUFFERS),
            getattr(self, "act_fn", F.silu), b_gate_up=b1, b_down=b2, has_gate=has_gate, gate_fn=gate_fn,
            post_fn=post_fn,
        )
    if hasattr(self, _int8.INT8_BUFFERS[0]):  # quantize_experts_int8 ran on this module
        q1, s1, q2, s2 = (getattr(self, name) for name in _int8.INT8_BUFFERS)
        return _int8.expert_forward_int8(
            hidden_states, top_k_index, top_k_weights, q1, s1, q2, s2, getattr(self, "act_fn", F.silu),
            b_gate_up=b1, b_down=b2, has_gate=has_gate, gate_fn=gate_fn, post_fn=post_fn,
        )
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
        # transformers marks experts sharded by its expert parallelism, whose routers emit ids ≥ E; others never do
        sentinels=getattr(self, "_is_expert_parallel", None),
    )


def use_moekit_experts(model: torch.nn.Module) -> bool:
    """Run ``model``'s experts with moekit's dispatch (on CPU, the decode kernel of ``nn.cpu_kernels``) when they
    use transformers' experts interface; returns False, leaving the model as it is, when they do not."""
    config = getattr(model, "config", None)
    if not hasattr(model, "set_experts_implementation") or not hasattr(config, "_experts_implementation"):
        return False
    if not register_with_transformers():
        return False
    try:
        model.set_experts_implementation("moekit")
    except (ValueError, RuntimeError, AttributeError, KeyError):  # experts outside the interface, or load-locked
        return False
    return config._experts_implementation == "moekit"


def register_with_transformers() -> bool:
    """Register ``"moekit"`` in transformers' experts registry (idempotent); False if transformers lacks it."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register("moekit", moekit_experts_forward)
    return True


def expert_forward_codes(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    gemv: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
    grouped: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    *,
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    has_gate: bool = True,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``expert_forward``'s pipeline for experts held as codes (int8, packed int4): the representation supplies
    ``gemv(x, p, ids) → [T, k, out]`` (one token's slots; projection ``p`` 0 = gate/up, 1 = down) and
    ``grouped(x_sorted, p, offsets) → rows`` (sorted rows of every expert), optionally ``combine(h, ids, weights)``
    (down projection + weighted sum in one pass); this does the activation, biases, sort and weighted sum."""
    num_tokens, top_k = ids.shape

    def ffn(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if b_gate_up is not None:
            h = h + b_gate_up[rows].to(h.dtype)
        return _activate(h, act, has_gate, gate_fn)

    def down_extras(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if b_down is not None:
            y = y + b_down[rows].to(y.dtype)
        return y if post_fn is None else post_fn(y)

    if num_tokens == 0 or top_k == 0:
        return x.new_zeros(x.shape)
    if num_tokens == 1:
        safe_ids = ids.clamp(0, num_experts - 1)
        h = ffn(gemv(x, 0, ids), safe_ids).contiguous()
        if combine is not None and b_down is None and post_fn is None:  # down projection and weighted sum at once
            return combine(h, ids, weights).to(x.dtype)
        return slot_sum(down_extras(gemv(h, 1, ids), safe_ids), ids, weights, num_experts).to(x.dtype)
    flat_ids = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat_ids)
    x_g = x.index_select(0, perm // top_k)
    offsets = torch.cumsum(expert_counts(sorted_ids, num_experts), dim=0, dtype=torch.int32)
    bias_rows = sorted_ids.clamp(max=num_experts - 1)
    h = ffn(grouped(x_g, 0, offsets), bias_rows)
    y = down_extras(grouped(h.contiguous(), 1, offsets), bias_rows)
    slot_rows = torch.empty_like(perm)
    slot_rows[perm] = torch.arange(flat_ids.numel(), device=perm.device)
    slot_valid = ids.reshape(num_tokens, top_k, 1) < num_experts
    return combine_slots(y, slot_rows, weights, slot_valid).to(x.dtype)


def slot_sum(y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``Σ_j weights[t, j] · y[t, j]`` over the slots whose ids are in [0, E); the others add exactly zero."""
    return _weighted_sum(y, weights, ((ids >= 0) & (ids < num_experts)).unsqueeze(-1))


def per_slot_products(
    x: torch.Tensor, ids: torch.Tensor, num_experts: int, out_features: int,
    product: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """``[T, k, out]``: ``product(x_row [1, in], e)`` for each slot (``x [T, in]`` or ``[T, k, in]``), zero for ids
    outside [0, E): the decode ops' fallback when their compiled kernel cannot run."""
    out = x.new_empty(*ids.shape, out_features)
    per_slot = x.dim() == 3
    for t, row in enumerate(ids.tolist()):
        for j, e in enumerate(row):
            if 0 <= e < num_experts:
                out[t, j] = product(x[t, j : j + 1] if per_slot else x[t : t + 1], e).reshape(-1)
            else:
                out[t, j].zero_()
    return out


def _activate(h: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor], has_gate: bool,
              gate_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """The expert's nonlinearity on its up projection: ``gate_fn``, ``act(gate) * up`` or ``act``."""
    if gate_fn is not None:
        return gate_fn(h)
    if has_gate:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


# int8 / int4 experts and per-expert weight providers live in their own modules (they use this module's helpers); the
# names stay importable from here
from moekit.nn import int4_experts as _int4  # noqa: E402
from moekit.nn import int8_experts as _int8  # noqa: E402
from moekit.nn.int4_experts import INT4_DEQUANT_MIN_ROWS, expert_forward_int4, quantize_experts_int4  # noqa: E402,F401
from moekit.nn.int8_experts import (  # noqa: E402,F401
    INT8_BUFFERS,
    INT8_DEQUANT_MIN_ROWS,
    expert_forward_int8,
    quantize_experts_int8,
    quantize_rows_int8,
)
from moekit.nn.provided import ExpertWeights, WeightProvider, expert_forward_provided  # noqa: E402,F401
