"""int8 experts (inference): per-output-row symmetric int8 codes with one scale per row, run by torch's int8
weight-only kernel or moekit's CPU decode kernel; the sort/combine pipeline is ``moekit.nn.dispatch``'s."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moekit.nn import cpu_kernels
from moekit.nn.dispatch import eager_or_op, expert_forward_codes, per_slot_products, slot_sum

# int8 experts (inference): per-output-row symmetric int8 codes with one scale per row, run by torch's int8
# weight-only kernel (``_weight_int8pack_mm``: int8 rows × bf16/fp16/fp32 activations). Half the bytes of bf16 to
# read per token, so a decode step bound by memory reads can run up to twice as fast.


# torch's int8 weight-only kernel is built for few rows (decode); from this many rows on, a group dequantizes its
# expert and runs a GEMM (in bf16, 3.6x faster at 64 rows per expert in bench_decode's 128-token prefill).
INT8_DEQUANT_MIN_ROWS = 16


@torch.library.custom_op("moekit::int8_grouped_mm", mutates_args=())
def _int8_grouped_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sorted rows ``x [S, in]`` times int8 experts ``q [E, out, in]`` (row scales ``[E, out]``), one kernel call
    per non-empty group; rows past the last group are zero."""
    out = x.new_empty(x.shape[0], q.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end - start >= INT8_DEQUANT_MIN_ROWS:  # a GEMM: dequantizing the expert once costs less than the kernel
            torch.mm(x[start:end], (q[e].to(x.dtype) * scale[e].unsqueeze(-1)).t(), out=out[start:end])
        elif end > start:
            out[start:end] = torch._weight_int8pack_mm(x[start:end], q[e], scale[e])
        start = end
    out[start:].zero_()
    return out


@_int8_grouped_mm.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[1])


def int8_expert_gemv_impl(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The int8 decode kernel: ``moekit::expert_gemv`` with int8 experts (``x [T, in]`` or ``[T, k, in]``)."""
    fast = cpu_kernels.expert_gemv(x, q, ids, scale)
    if fast is not None:
        return fast
    return per_slot_products(x, ids, q.shape[0], q.shape[1], lambda xv, e: torch._weight_int8pack_mm(xv, q[e], scale[e]))


@torch.library.custom_op("moekit::int8_expert_gemv", mutates_args=())
def _int8_expert_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``int8_expert_gemv_impl`` as a custom op (compiled graphs call it; eager mode calls the function)."""
    return int8_expert_gemv_impl(x, q, scale, ids)


@_int8_expert_gemv.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*ids.shape, q.shape[1])


def int8_expert_gemv_combine_impl(
    h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``moekit::expert_gemv_combine`` with int8 experts: down projection and weighted sum of a decode step."""
    fast = cpu_kernels.expert_gemv_combine(h, q, ids, weights, scale)
    if fast is not None:
        return fast
    return slot_sum(int8_expert_gemv_impl(h, q, scale, ids), ids, weights, q.shape[0]).to(h.dtype)


@torch.library.custom_op("moekit::int8_expert_gemv_combine", mutates_args=())
def _int8_expert_gemv_combine(
    h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``int8_expert_gemv_combine_impl`` as a custom op (compiled graphs call it; eager mode calls the function)."""
    return int8_expert_gemv_combine_impl(h, q, scale, ids, weights)


@_int8_expert_gemv_combine.register_fake
def _(h: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return h.new_empty(ids.shape[0], q.shape[1])


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., out, in]`` → (int8 codes, per-row scales in ``w``'s dtype): symmetric, scale = max|row| / 127, so
    every weight is within scale/2 of its code × scale."""
    amax = w.detach().abs().amax(-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = amax / 127.0
    q = torch.round(w.detach().float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1).to(w.dtype)


INT8_BUFFERS = ("moekit_int8_gate_up", "moekit_int8_gate_up_scale", "moekit_int8_down", "moekit_int8_down_scale")


def quantize_experts_int8(model: torch.nn.Module, keep_float: bool = True) -> int:
    """Give every transformers experts module int8 copies of its expert weights, which the ``moekit``
    implementation then runs (inference only); returns how many modules were converted.

    ``keep_float=False`` frees the float weights (then only ``"moekit"`` can run the experts). Memory: 1 byte per
    weight plus one scale per output row, on top of the float weights unless they are dropped.
    """
    converted = 0
    for module in model.modules():
        if not (hasattr(module, "has_gate") and hasattr(module, "down_proj")):
            continue
        has_gate = getattr(module, "has_gate", True)
        transposed = getattr(module, "is_transposed", False)
        name1 = "gate_up_proj" if has_gate else "up_proj"
        for name, buffers in ((name1, INT8_BUFFERS[:2]), ("down_proj", INT8_BUFFERS[2:])):
            w = getattr(module, name)
            codes, scales = [], []
            for e in range(w.shape[0]):  # one expert at a time: no float32 copy of the whole bank
                q, s = quantize_rows_int8(w[e].t() if transposed else w[e])
                codes.append(q.contiguous())
                scales.append(s)
            module.register_buffer(buffers[0], torch.stack(codes), persistent=False)
            module.register_buffer(buffers[1], torch.stack(scales), persistent=False)
            if not keep_float:
                setattr(module, name, torch.nn.Parameter(w.new_empty(0), requires_grad=False))
        converted += 1
    return converted


INT8_LINEAR_BUFFERS = ("moekit_int8_weight", "moekit_int8_weight_scale")
_ONE_SLOT = torch.zeros(1, 1, dtype=torch.int64)


def int8_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward on its int8 codes: a one-row CPU input (a decode step) through the int8 decode kernel;
    other inputs through the float weight when it was kept, else the dequantized codes."""
    q, s = getattr(self, INT8_LINEAR_BUFFERS[0]), getattr(self, INT8_LINEAR_BUFFERS[1])
    if x.numel() == x.shape[-1] and x.device.type == "cpu" and x.dtype == s.dtype:
        if torch.compiler.is_compiling():  # the custom op keeps the int8 kernel in a compiled decode step
            y = torch.ops.moekit.int8_expert_gemv(x.reshape(1, -1), q.unsqueeze(0), s.unsqueeze(0), _ONE_SLOT)
        else:
            y = cpu_kernels.expert_gemv(x.reshape(1, -1), q.unsqueeze(0), _ONE_SLOT, s.unsqueeze(0))
        if y is not None:
            y = y.reshape(*x.shape[:-1], q.shape[0])
            return y if self.bias is None else y + self.bias
    w = self.weight if self.weight.numel() else (q.to(x.dtype) * s.to(x.dtype).unsqueeze(-1))
    return F.linear(x, w, self.bias)


def quantize_linears_int8(model: torch.nn.Module, keep_float: bool = True) -> int:
    """Give every ``nn.Linear`` of ``model`` (attention, dense MLPs, routers that are Linears, ``lm_head``) int8
    codes with one scale per output row (``quantize_rows_int8``) and run its decode steps on them; returns how many
    modules changed. With the int8 experts this reads about one byte per weight per token, like llama.cpp's q8_0.

    ``keep_float=True`` keeps the float weight for multi-row inputs (prefill unchanged); ``False`` frees it
    (unless it is shared, e.g. an ``lm_head`` tied to the embeddings) and multi-row inputs use the dequantized
    codes. Inference only. Memory: 1 byte per weight + one scale per row (plus the float weight if kept).
    """
    import types

    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    changed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
            continue
        q, scale = quantize_rows_int8(module.weight)
        module.register_buffer(INT8_LINEAR_BUFFERS[0], q.contiguous(), persistent=False)
        module.register_buffer(INT8_LINEAR_BUFFERS[1], scale.contiguous(), persistent=False)
        module.forward = types.MethodType(int8_linear_forward, module)
        if not keep_float and id(module.weight) not in shared:
            module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
        changed += 1
    return changed


def dequantize_linears_int8(model: torch.nn.Module) -> int:
    """Undo ``quantize_linears_int8`` on modules that kept their float weight; returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and hasattr(module, INT8_LINEAR_BUFFERS[0]) and module.weight.numel():
            for name in INT8_LINEAR_BUFFERS:
                delattr(module, name)
            module.__dict__.pop("forward", None)
            changed += 1
    return changed


def expert_forward_int8(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    q_gate_up: torch.Tensor,
    s_gate_up: torch.Tensor,
    q_down: torch.Tensor,
    s_down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    *,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    has_gate: bool = True,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``expert_forward`` on int8 experts (``q [E, out, in]`` int8, ``s [E, out]``; see ``quantize_rows_int8``):
    per-slot GEMVs for one token (down projection and weighted sum fused), per-expert kernel calls on sorted rows
    otherwise, computed in the scales' dtype. Inference only."""
    codes, scales = (q_gate_up, q_down), (s_gate_up, s_down)
    compute_dtype = s_gate_up.dtype
    return expert_forward_codes(
        x.to(compute_dtype), ids, weights, q_gate_up.shape[0],
        lambda v, p, slot_ids: eager_or_op("int8_expert_gemv", int8_expert_gemv_impl, v, codes[p], scales[p], slot_ids),
        lambda v, p, offsets: torch.ops.moekit.int8_grouped_mm(v, codes[p], scales[p], offsets),
        act, combine=lambda h, slot_ids, w: eager_or_op("int8_expert_gemv_combine", int8_expert_gemv_combine_impl, h,
                                                        q_down, s_down, slot_ids, w),
        b_gate_up=b_gate_up, b_down=b_down, has_gate=has_gate, gate_fn=gate_fn, post_fn=post_fn,
    ).to(x.dtype)
