"""int4 experts (inference): moekit's int4 codec kept packed in memory — two codes per byte, per group of ``gs``
weights along ``in`` one float16 scale and one uint8 zero point (``moekit.formats.quantized``) — and run by the
int4 decode kernel (``cpu_kernels_int4``); the sort/combine pipeline is ``moekit.nn.dispatch``'s.

Memory: 0.5 + 3/gs bytes per expert weight (0.52 at gs=128, 3.8× less than bf16), so a decode step bound by
memory reads can run up to ~3.8× faster on its expert share. The same layout comes from a quantized checkpoint
loaded with packed experts (``moekit.models.load_quantized(..., packed_experts=True)``) or from
``quantize_experts_int4`` on a float model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moekit.errors import MoekitError
from moekit.formats.quantized import (
    INT4_BUFFERS,
    QTensor,
    dequantize,
    int4_packable,
    quantize_matrix,
    stack_int4,
)
from moekit.nn import cpu_kernels_int4
from moekit.nn.dispatch import eager_or_op, expert_forward_codes, per_slot_products

# From this many rows an expert's group dequantizes the expert (to the activations' dtype) and runs one GEMM; fewer
# rows run the int4 kernel, which reads the packed codes once per row.
INT4_DEQUANT_MIN_ROWS = 16


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert's ``[out, in]`` matrix from its packed codes ``[out, in/2]``, scales and zeros ``[out, G]``
    (the format's codec: (q − z)·s computed in fp32, then cast to ``dtype``)."""
    out_dim, groups = scale.shape
    in_dim = 2 * q.shape[-1]
    return dequantize(QTensor(q, scale, zero, 4, in_dim // groups, (out_dim, in_dim)), dtype)


def int4_expert_gemv_impl(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor,
    activations: str | None = None,
) -> torch.Tensor:
    """The int4 decode kernel: ``out[t, j] = x[t] (or x[t, j]) @ W[ids[t, j]].T`` (``[T, k, out]``, ``x``'s dtype),
    the input quantized per 64-block where the kernel takes int8 activations (``activations``, default
    ``cpu_kernels_int4.int4_activations()``); without the compiled kernel, each slot's expert is dequantized to fp32
    and multiplied in fp32 (same codes, same fp32 accumulation, so the two agree to fp32 rounding with float
    activations)."""
    fast = cpu_kernels_int4.expert_gemv_int4(x, q, scale, zero, ids, activations)
    if fast is not None:
        return fast
    return per_slot_products(
        x, ids, q.shape[0], q.shape[1],
        lambda xv, e: (dequantize_int4(q[e], scale[e], zero[e], torch.float32) @ xv[0].float()).to(x.dtype),
    )


@torch.library.custom_op("moekit::int4_expert_gemv", mutates_args=())
def _int4_expert_gemv(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """``int4_expert_gemv_impl`` as a custom op (compiled graphs call it; eager mode calls the function)."""
    return int4_expert_gemv_impl(x, q, scale, zero, ids)


@_int4_expert_gemv.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*ids.shape, q.shape[1])


@torch.library.custom_op("moekit::int4_grouped_mm", mutates_args=())
def _int4_grouped_mm(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Sorted rows ``x [S, in]`` times int4 experts over int ``offsets [E]``: a group of at least
    ``INT4_DEQUANT_MIN_ROWS`` rows dequantizes its expert to ``x``'s dtype and runs one GEMM, a smaller one runs the
    int4 kernel on its rows with float activations (a prefill's numbers do not depend on how its rows group, as with
    int8 experts: int8 activations are for decode steps); rows past the last group are zero."""
    out = x.new_empty(x.shape[0], q.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end - start >= INT4_DEQUANT_MIN_ROWS:
            torch.mm(x[start:end], dequantize_int4(q[e], scale[e], zero[e], x.dtype).t(), out=out[start:end])
        elif end > start:
            ids = torch.full((end - start, 1), e, dtype=torch.int64)
            out[start:end] = int4_expert_gemv_impl(x[start:end].unsqueeze(1), q, scale, zero, ids, "float")[:, 0]
        start = end
    out[start:].zero_()
    return out


@_int4_grouped_mm.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[1])


def attach_int4(module: torch.nn.Module, gate_up: list[QTensor], down: list[QTensor], keep_float: bool = True) -> None:
    """Register one experts module's packed int4 banks (``INT4_BUFFERS``), from per-expert (out, in) QTensors;
    ``keep_float=False`` frees its float expert weights (then only moekit's experts implementation runs it)."""
    has_gate = getattr(module, "has_gate", True)
    for qts, names, pname in ((gate_up, INT4_BUFFERS[:3], "gate_up_proj" if has_gate else "up_proj"),
                              (down, INT4_BUFFERS[3:], "down_proj")):
        for name, t in zip(names, stack_int4(qts), strict=True):
            module.register_buffer(name, t, persistent=False)
        if not keep_float:
            w = getattr(module, pname)
            setattr(module, pname, torch.nn.Parameter(w.new_empty(w.shape[0], 0, 0), requires_grad=False))


def quantize_experts_int4(model: torch.nn.Module, group_size: int = 128, keep_float: bool = True) -> int:
    """Give every transformers experts module packed int4 copies of its expert weights (moekit's codec, groups of
    ``group_size`` along ``in``), which the ``moekit`` implementation then runs (inference only); returns how many
    modules were converted.

    Memory: 0.5 byte per weight + 3 bytes per group (fp16 scale, uint8 zero point), on top of the float weights
    unless ``keep_float=False`` drops them. Every expert matrix's input size must be a multiple of ``group_size``.
    """
    if group_size < 2 or group_size % 2:
        raise MoekitError(f"group size must be an even number >= 2, got {group_size}")
    modules = [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]
    for module in modules:  # validate every module before changing any
        transposed = getattr(module, "is_transposed", False)
        for name in ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj"):
            w = getattr(module, name)
            in_dim = w.shape[1] if transposed else w.shape[2]
            if not int4_packable((0, in_dim), (4,), group_size):
                raise MoekitError(f"int4 experts: {name} has {in_dim} inputs, not a multiple of the group size "
                                  f"{group_size}")
    for module in modules:
        transposed = getattr(module, "is_transposed", False)
        banks = []
        for name in ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj"):
            w = getattr(module, name)  # one expert at a time: no float32 copy of the whole bank
            banks.append([quantize_matrix(w[e].t() if transposed else w[e], 4, group_size) for e in range(w.shape[0])])
        attach_int4(module, banks[0], banks[1], keep_float)
    return len(modules)


def expert_forward_int4(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    int4_banks: tuple[torch.Tensor, ...],
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    *,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    has_gate: bool = True,
    gate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``expert_forward`` on packed int4 experts (``int4_banks``: the six ``INT4_BUFFERS`` tensors), computed in
    ``x``'s dtype: per-slot GEMVs for one token, per-expert groups on sorted rows otherwise. Inference only."""
    banks = (int4_banks[:3], int4_banks[3:])  # (codes, scales, zero points) of gate/up and of down
    return expert_forward_codes(
        x, ids, weights, int4_banks[0].shape[0],
        lambda v, p, slot_ids: eager_or_op("int4_expert_gemv", int4_expert_gemv_impl, v, *banks[p], slot_ids),
        lambda v, p, offsets: torch.ops.moekit.int4_grouped_mm(v, *banks[p], offsets),
        act, b_gate_up=b_gate_up, b_down=b_down, has_gate=has_gate, gate_fn=gate_fn, post_fn=post_fn,
    )


def int4_expert_bytes(model: torch.nn.Module) -> int:
    """Bytes the packed int4 experts of ``model`` hold in memory (codes, scales and zero points)."""
    return sum(getattr(m, n).nbytes for m in model.modules() if hasattr(m, INT4_BUFFERS[0]) for n in INT4_BUFFERS)
