"""float16 expert GEMMs on AMX-BF16 (moekit.nn.cpu_kernels_amx): the exact hi/lo bf16 split gives the correctly
rounded fp16 product within one ulp, the same error as torch's fp16 GEMM, at any thread count; ``auto`` takes it for
fp16 prefill only (not bf16/fp32, gradients, compile, small groups); a fp16 model's logits equal eager's within
fp16 tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moekit.nn
from moekit.nn import cpu_kernels_amx
from moekit.nn.dispatch import AMX_MIN_ROWS_PER_EXPERT, _choose_path, expert_counts, expert_forward
from moekit.testing import tiny_model

pytestmark = pytest.mark.skipif(not cpu_kernels_amx.available(), reason="no AMX-BF16 here (or no compiler)")

COUNTS = [0, 3, 17, 40, 1, 0, 31, 32, 33, 16]  # empty experts, partial 16-row tiles, an odd number of tiles


def _grouped_inputs(seed: int = 0, n: int = 48, k: int = 96, tail: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(len(COUNTS), n, k, generator=g) / k**0.5).half()
    x = torch.randn(sum(COUNTS) + tail, k, generator=g).half()  # tail: rows past the last group (sentinel ids)
    offsets = torch.cumsum(torch.tensor(COUNTS), 0).to(torch.int32)
    return x, w, offsets


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp64 ``x[r] @ w[e(r)].T`` per group, zero past the last one."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    start = 0
    for e, c in enumerate(COUNTS):
        out[start : start + c] = x[start : start + c].double() @ w[e].double().t()
        start += c
    return out


def _ulps_off(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """How many fp16 ulps ``got`` is from the correctly rounded ``ref`` (ulp of the rounded value's binade)."""
    rounded = ref.half().double()
    exponent = torch.floor(torch.log2(rounded.abs().clamp(min=2.0**-14)))
    return (got.double() - rounded).abs() / 2.0 ** (exponent - 10)


def test_within_one_ulp_of_the_correctly_rounded_product() -> None:
    x, w, offsets = _grouped_inputs()
    out = cpu_kernels_amx.f16_grouped_mm(x, w, offsets)
    ref = _reference(x, w)
    used = sum(COUNTS)
    assert out.dtype == torch.float16 and out.shape == (x.shape[0], w.shape[1])
    assert torch.equal(out[used:], torch.zeros_like(out[used:]))
    off = _ulps_off(out[:used], ref[:used])
    assert off.max() <= 1.0
    assert (off == 0).float().mean() > 0.99  # mostly the correctly rounded value itself
    torch_out = F.grouped_mm(x, w.transpose(1, 2), offs=offsets)[:used]
    err, torch_err = (out[:used].double() - ref[:used]).abs(), (torch_out.double() - ref[:used]).abs()
    assert err.mean() <= 1.01 * torch_err.mean()  # torch's fp16 GEMM (fp32 sums) is no more exact


def test_split_is_exact_for_extreme_fp16_values() -> None:
    """Largest, smallest normal and subnormal fp16 values: hi + lo represent them exactly (an identity weight
    returns the input bit for bit)."""
    k = 32
    vals = torch.tensor([65504.0, -65504.0, 2.0**-14, 2.0**-24, -(2.0**-24) * 3, 1.0 + 2.0**-10, 0.1, -1 / 3],
                        dtype=torch.float16)
    extreme = vals.repeat(64).reshape(16, k)  # 16 rows × 32 columns of the extreme values
    eye = torch.eye(k, dtype=torch.float16)
    one_group = torch.tensor([16], dtype=torch.int32)
    out = cpu_kernels_amx.f16_grouped_mm(extreme, eye.reshape(1, k, k), one_group)  # the input's split
    assert torch.equal(out, extreme)
    out = cpu_kernels_amx.f16_grouped_mm(eye[:16].contiguous(), extreme.reshape(1, 16, k), one_group)  # the weights'
    assert torch.equal(out, extreme.t()[:16])


def test_same_result_at_any_thread_count() -> None:
    x, w, offsets = _grouped_inputs(seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels_amx.f16_grouped_mm(x, w, offsets)
        torch.set_num_threads(2)
        two = cpu_kernels_amx.f16_grouped_mm(x, w, offsets)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_refuses_what_it_cannot_run() -> None:
    x, w, offsets = _grouped_inputs()
    assert cpu_kernels_amx.f16_grouped_mm(x.bfloat16(), w.bfloat16(), offsets) is None  # bf16: torch's AMX GEMM
    assert cpu_kernels_amx.f16_grouped_mm(x[:, :80].contiguous(), w[:, :, :80].contiguous(), offsets) is None  # K % 32
    assert cpu_kernels_amx.f16_grouped_mm(x, w[:, :40], offsets) is None  # N % 16
    assert cpu_kernels_amx.f16_grouped_mm(x, w.transpose(1, 2).contiguous().transpose(1, 2), offsets) is None


def _path(dtype: torch.dtype, rows_per_expert: int, needs_grad: bool = False, compiling: bool = False,
          backend: str = "auto") -> str:
    E, H, inter = 8, 2048, 1024  # too large for the padded bmm: the choice is amx or per-expert GEMMs
    w1 = torch.empty(E, 2 * inter, H, dtype=dtype).transpose(1, 2)  # [E, H, 2I] views of nn.Linear storage
    w2 = torch.empty(E, H, inter, dtype=dtype).transpose(1, 2)
    slots = E * rows_per_expert
    ids = torch.arange(slots) % E
    return _choose_path(backend, torch.empty(slots, H, dtype=dtype), w1, w2, expert_counts(ids, E), slots, needs_grad,
                        compiling)


def test_auto_takes_amx_for_fp16_prefill_only() -> None:
    assert _path(torch.float16, AMX_MIN_ROWS_PER_EXPERT) == "amx"
    assert _path(torch.float16, 64) == "amx"
    assert _path(torch.float16, AMX_MIN_ROWS_PER_EXPERT - 1) != "amx"  # small groups: grouped_mm is as fast
    assert _path(torch.bfloat16, 64) != "amx" and _path(torch.float32, 64) != "amx"
    assert _path(torch.float16, 64, needs_grad=True) != "amx"  # no backward
    assert _path(torch.float16, 64, compiling=True) != "amx"
    assert _path(torch.float16, 4, backend="amx") == "amx"  # forced
    assert _path(torch.float16, 64, needs_grad=True, backend="amx") in ("grouped_mm", "loop")  # forced, cannot run


def test_expert_forward_amx_equals_grouped_mm_within_fp16_rounding() -> None:
    g = torch.Generator().manual_seed(4)
    T, H, inter, E, k = 96, 64, 32, 6, 2
    x = torch.randn(T, H, generator=g).half()
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[5, 1] = E  # a "no expert" sentinel slot: adds nothing
    weights = torch.rand(T, k, generator=g).half()
    w1 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).half()
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).half()
    amx = expert_forward(x, ids, weights, w1, w2, backend="amx")
    ref = expert_forward(x.double(), ids, weights.double(), w1.double(), w2.double(), backend="loop")
    fp16 = expert_forward(x, ids, weights, w1, w2, backend="loop")
    err, fp16_err = (amx.double() - ref).abs(), (fp16.double() - ref).abs()
    assert err.max() <= 2 * fp16_err.max() and err.mean() <= 1.1 * fp16_err.mean()
    torch.testing.assert_close(amx, fp16, atol=4e-3, rtol=4e-3)


def test_fp16_model_logits_equal_eager() -> None:
    """An OLMoE-shaped fp16 model (sizes the tiles take) at a prefill of 256 tokens: moekit (auto → amx) against
    transformers' eager experts, and both against the fp32 model."""
    model = tiny_model("olmoe", dtype=torch.float16, hidden_size=64, intermediate_size=32)
    ids = torch.randint(3, 128, (1, 256), generator=torch.Generator().manual_seed(5))
    experts = model.model.layers[0].mlp.experts
    w1, w2 = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
    slots = torch.arange(512) % w1.shape[0]  # 256 tokens × top-2 over 8 experts
    x = torch.empty(512, 64, dtype=torch.float16)
    assert _choose_path("auto", x, w1, w2, expert_counts(slots, w1.shape[0]), 512, False) == "amx"
    with torch.no_grad():
        model.set_experts_implementation("eager")
        eager = model(ids).logits.float()
        moekit.nn.register_with_transformers()
        model.set_experts_implementation("moekit")
        ours = model(ids).logits.float()
        model.float().set_experts_implementation("eager")
        fp32 = model(ids).logits
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(ours, eager, atol=2e-2, rtol=2e-2)
    assert (ours - fp32).abs().mean() <= 1.1 * (eager - fp32).abs().mean()


def test_linears_fp16_prefill_runs_on_amx() -> None:
    """``use_for_linears``: a float16 prefill of at least AMX_MIN_ROWS rows takes the AMX kernel (within one ulp of
    the correctly rounded product); fewer rows, bf16 and gradients keep F.linear exactly."""
    from moekit.nn import cpu_kernels

    g = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(64, 48, bias=True).half()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) / 8)
    assert cpu_kernels.use_for_linears(lin) == 1
    x = torch.randn(2, cpu_kernels_amx.AMX_MIN_ROWS, 64, generator=g).half()
    with torch.no_grad():
        y = lin(x)
        raw = cpu_kernels_amx.f16_grouped_mm(x.reshape(-1, 64), lin.weight.unsqueeze(0),
                                             torch.tensor([x.shape[0] * x.shape[1]], dtype=torch.int32))
        assert torch.equal(y, raw.reshape(2, -1, 48) + lin.bias)
        assert _ulps_off(raw, x.reshape(-1, 64).double() @ lin.weight.double().t()).max() <= 1.0
        few = x[:, :3]
        assert torch.equal(lin(few), F.linear(few, lin.weight, lin.bias))
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # gradients on: F.linear
