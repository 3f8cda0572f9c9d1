"""moekit's experts under torch.compile(fullgraph=True): same numbers as eager, static-cache generation with
the same greedy tokens, no recompiles; and the custom ops behind the data-dependent paths pass opcheck."""

from __future__ import annotations

import pytest
import torch

import moekit.nn  # noqa: F401  (registers "moekit" with transformers and the moekit:: custom ops)
from moekit.nn.dispatch import expert_forward
from moekit.testing import tiny_model

pytest.importorskip("transformers")

# inductor's own import of torch.jit (inside torch) warns; that is upstream's, not something these tests call
_INDUCTOR_JIT_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


def test_grouped_mm_loop_op_passes_opcheck() -> None:
    """Schema, fake (meta) implementation and autograd of the loop op agree with its real kernel."""
    g = torch.Generator().manual_seed(0)
    E, H, N = 4, 8, 6
    x = torch.randn(10, H, generator=g, requires_grad=True)
    offsets = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # one empty group, one tail row past the groups
    for out_in in (True, False):
        shape = (E, N, H) if out_in else (E, H, N)
        w = torch.randn(*shape, generator=g, requires_grad=True)
        torch.library.opcheck(torch.ops.moekit.grouped_mm_loop.default, (x, w, offsets, out_in))
        out = torch.ops.moekit.grouped_mm_loop(x, w, offsets, out_in)
        wm = w.transpose(1, 2) if out_in else w
        ref = torch.cat([x[0:3] @ wm[0], x[3:7] @ wm[2], x[7:9] @ wm[3], torch.zeros(1, N)])
        torch.testing.assert_close(out, ref)


def test_expert_gemv_op_passes_opcheck() -> None:
    g = torch.Generator().manual_seed(1)
    E, H, N = 5, 8, 6
    ids = torch.tensor([[4, 0, 5]])  # id 5 = E: "no expert", a zero row
    w = torch.randn(E, N, H, generator=g)
    for x in (torch.randn(1, H, generator=g), torch.randn(1, 3, H, generator=g)):
        torch.library.opcheck(torch.ops.moekit.expert_gemv.default, (x, w, ids, True), test_utils=(
            "test_schema", "test_faketensor"))
        out = torch.ops.moekit.expert_gemv(x, w, ids, True)
        xs = x.expand(1, 3, H) if x.dim() == 2 else x
        ref = torch.stack([w[4] @ xs[0, 0], w[0] @ xs[0, 1], torch.zeros(N)])[None]
        torch.testing.assert_close(out, ref)
        out_t = torch.ops.moekit.expert_gemv(x, w.transpose(1, 2).contiguous(), ids, False)
        torch.testing.assert_close(out_t, ref)


@pytest.mark.slow
@pytest.mark.filterwarnings(_INDUCTOR_JIT_WARNING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_forward_fullgraph_equals_eager(dtype: torch.dtype) -> None:
    """fp32 runs the loop custom op under compile (inductor's grouped_mm takes bf16 only), bf16 grouped_mm; a
    sentinel-free prefill and a one-token step (the gemv op) both match eager."""
    torch._dynamo.reset()
    model = tiny_model("olmoe", dtype=dtype, num_hidden_layers=1)
    model.set_experts_implementation("moekit")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for inp in (ids, ids[:1, :1]):
            ref = model(inp).logits
            out = compiled(inp).logits
            assert ref.abs().max() > 0.1
            torch.testing.assert_close(out, ref, atol=tol * float(ref.abs().max()), rtol=tol)


@pytest.mark.slow
@pytest.mark.filterwarnings(_INDUCTOR_JIT_WARNING)
def test_static_cache_compiled_generate_equals_eager_without_recompiles() -> None:
    """transformers' own compiled decoding (static cache, fullgraph) gives eager's greedy tokens, and a second
    prompt of another length reuses the compiled step (error_on_recompile)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("qwen3_moe", num_hidden_layers=1)
    model.set_experts_implementation("moekit")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (1, n), generator=g) for n in (7, 4)]
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static",
                  max_length=16)
    eager = [model.generate(p, **common, disable_compile=True) for p in prompts]
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles generate's decode step on CPU only when asked
    compiled = [model.generate(prompts[0], **common, compile_config=config)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.append(model.generate(prompts[1], **common, compile_config=config))
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled (one graph, no graph breaks)
    assert not counters["graph_break"]
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)


def test_decode_step_runs_gemv_and_equals_loop() -> None:
    """auto runs the GEMV decode kernel for a one-token step on CPU; it equals the sorted loop path."""
    g = torch.Generator().manual_seed(3)
    E, H, Inter, k = 8, 16, 12, 3
    x = torch.randn(1, H, generator=g)
    w1 = torch.randn(E, 2 * Inter, H, generator=g)
    w2 = torch.randn(E, H, Inter, generator=g)
    b1, b2 = torch.randn(E, 2 * Inter, generator=g), torch.randn(E, H, generator=g)
    ids = torch.tensor([[6, 1, E]])  # one "no expert" slot
    weights = torch.rand(1, k, generator=g)
    for transposed in (False, True):
        a, b = (w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()) if transposed else (w1, w2)
        kw = dict(b_gate_up=b1, b_down=b2, transposed=transposed)
        with torch.no_grad():
            ref = expert_forward(x, ids, weights, a, b, backend="loop", **kw)
            with torch.profiler.profile() as prof:
                out = expert_forward(x, ids, weights, a, b, **kw)
            calls = [e.name for e in prof.events() if e.name.startswith("moekit::")]
        assert calls.count("moekit::expert_gemv") == 2
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _compiled_decode_ops(model) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Greedy static-cache generation of ``model`` eager and with transformers' compiled decode step (fullgraph,
    compiled once before): (eager tokens, compiled tokens, the op names the profiler saw in the compiled run). Fails
    on a graph break."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static", max_length=16)
    eager = model.generate(prompt, **common, disable_compile=True)
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    model.generate(prompt, **common, compile_config=config)  # compiles the decode step
    with torch.profiler.profile() as prof:
        compiled = model.generate(prompt, **common, compile_config=config)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    return eager, compiled, [e.name for e in prof.events()]


@pytest.mark.slow
@pytest.mark.filterwarnings(_INDUCTOR_JIT_WARNING)
def test_compiled_decode_keeps_the_linears_kernel() -> None:
    """use_for_linears under transformers' compiled static-cache decoding: one graph without breaks, the linears'
    one-row steps call the kernel op inside it (moekit::expert_gemv for every nn.Linear, not just the experts),
    and the greedy tokens equal the eager run's."""
    from torch._dynamo.utils import counters

    from moekit.nn import cpu_kernels

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("qwen3_moe", num_hidden_layers=1)
    model.set_experts_implementation("moekit")
    linears = cpu_kernels.use_for_linears(model)
    eager, compiled, names = _compiled_decode_ops(model)
    # 3 compiled decode steps, each: every linear and the experts' up projection, then their fused down + sum
    assert names.count("moekit::expert_gemv") >= 3 * (linears + 1) and names.count("moekit::expert_gemv_combine") >= 3
    assert torch.equal(compiled, eager)


@pytest.mark.slow
@pytest.mark.filterwarnings(_INDUCTOR_JIT_WARNING)
def test_compiled_decode_keeps_the_int8_kernels() -> None:
    """int8 experts and int8 linears (quantize_linears_int8, q8_0-like) under transformers' compiled static-cache
    decoding: one graph without breaks, every linear's one-row step calls moekit::int8_expert_gemv inside it (not
    F.linear on the kept float weight), and the greedy tokens equal the eager int8 run's."""
    from torch._dynamo.utils import counters

    from moekit.nn import quantize_experts_int8, quantize_linears_int8

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("qwen3_moe", num_hidden_layers=1)
    model.set_experts_implementation("moekit")
    quantize_experts_int8(model, keep_float=False)
    linears = quantize_linears_int8(model, keep_float=True)
    eager, compiled, names = _compiled_decode_ops(model)
    # 3 compiled decode steps, each: every linear and the experts' up projection, then their fused down + sum
    assert names.count("moekit::int8_expert_gemv") >= 3 * (linears + 1)
    assert names.count("moekit::int8_expert_gemv_combine") >= 3 and "aten::linear" not in names[-50:]
    assert torch.equal(compiled, eager)


def test_combine_ops_pass_opcheck() -> None:
    """The fused down-projection + weighted-sum ops (float and int8): schema and fake implementation agree with the
    kernel, and the result is the weighted sum of the per-slot GEMVs."""
    from moekit.nn.int8_experts import quantize_rows_int8

    g = torch.Generator().manual_seed(6)
    E, H, N = 5, 64, 12
    ids = torch.tensor([[4, 0, 5]])  # id 5 = E: "no expert"
    w = torch.randn(E, N, H, generator=g)
    h, weights = torch.randn(1, 3, H, generator=g), torch.rand(1, 3, generator=g)
    q, s = quantize_rows_int8(w)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.moekit.expert_gemv_combine.default, (h, w, ids, weights, True), test_utils=checks)
    torch.library.opcheck(torch.ops.moekit.int8_expert_gemv_combine.default, (h, q, s, ids, weights), test_utils=checks)
    out = torch.ops.moekit.expert_gemv_combine(h, w, ids, weights, True)
    ref = (weights[0, 0] * (w[4] @ h[0, 0]) + weights[0, 1] * (w[0] @ h[0, 1]))[None]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out_t = torch.ops.moekit.expert_gemv_combine(h, w.transpose(1, 2).contiguous(), ids, weights, False)
    torch.testing.assert_close(out_t, ref, atol=1e-5, rtol=1e-5)
    per_slot = torch.ops.moekit.int8_expert_gemv(h, q, s, ids)
    ref8 = (weights[..., None] * per_slot).sum(1)
    torch.testing.assert_close(torch.ops.moekit.int8_expert_gemv_combine(h, q, s, ids, weights), ref8, atol=1e-5, rtol=1e-5)
