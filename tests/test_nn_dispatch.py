"""moekit's expert dispatch equals transformers' eager experts on every converted architecture."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.nn  # noqa: F401  (registers "moekit" with transformers)
from moekit.nn.dispatch import expert_counts, expert_forward, moekit_experts_forward
from moekit.testing import TINY_ARCHS, tiny_model

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402


def _converted(arch: str) -> bool:
    """Whether this transformers has the arch with its experts behind ``@use_experts_implementation``."""
    try:
        mod = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    except ImportError:
        return False
    return "@use_experts_implementation" in inspect.getsource(mod)


def _experts_fn(model: torch.nn.Module):
    """The experts function the model's config currently dispatches to."""
    return ALL_EXPERTS_FUNCTIONS.get_interface(model.config._experts_implementation, None)


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    if not _converted(request.param):
        pytest.skip(
            f"{request.param}: experts not converted with @use_experts_implementation in this transformers"
        )
    return request.param


def test_registered() -> None:
    assert ALL_EXPERTS_FUNCTIONS["moekit"] is moekit_experts_forward
    moekit.nn.register_with_transformers()  # idempotent
    assert ALL_EXPERTS_FUNCTIONS["moekit"] is moekit_experts_forward


@pytest.mark.parametrize("backend", ["auto", "loop", "padded", "grouped_mm"])
def test_model_forward_backward_equals_eager(arch: str, backend: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))

    def run(impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.set_experts_implementation(impl)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    logits_ref, grads_ref = run("eager")
    moekit.nn.set_backend(backend)
    try:
        logits, grads = run("moekit")
        assert _experts_fn(model) is moekit_experts_forward
    finally:
        moekit.nn.set_backend("auto")
    assert logits.abs().max() > 0.1
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    assert any(".experts." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def _experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's experts modules (those whose forward goes through the experts registry)."""
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


def test_experts_bf16_close_to_fp32(arch: str) -> None:
    model = tiny_model(arch)
    experts = _experts_modules(model)[0]
    E = experts.num_experts
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, model.config.hidden_size, generator=g)
    ids = torch.randint(0, E, (40, 2), generator=g)  # routing fixed (GPT-OSS eager rejects id E)
    weights = torch.rand(40, 2, generator=g)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        ref = experts(x, ids, weights)
        model.to(torch.bfloat16)
        eager_bf16 = experts(x.bfloat16(), ids, weights.bfloat16()).float()
        model.set_experts_implementation("moekit")
        got = experts(x.bfloat16(), ids, weights.bfloat16())
    assert got.dtype == torch.bfloat16
    err, eager_err = (got.float() - ref).abs().max(), (eager_bf16 - ref).abs().max()
    scale = ref.abs().max()
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%); two matmuls and an activation stay within 3%,
    # and moekit (fp32 accumulation over k) is no worse than transformers' eager in bf16.
    assert err <= 0.03 * scale
    assert err <= eager_err * 1.25


def _naive(x, ids, w, w1, w2, b1=None, b2=None, has_gate=True):
    """Per-token, per-slot reference: loops over (t, j) and applies expert ids[t, j] if it exists."""
    num_experts = w1.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= num_experts:
                continue
            h = w1[e].double() @ x[t].double()
            if b1 is not None:
                h = h + b1[e].double()
            if has_gate:
                g, u = h.chunk(2)
                h = F.silu(g) * u
            else:
                h = F.silu(h)
            y = w2[e].double() @ h
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += float(w[t, j]) * y
    return out


def test_ids_at_or_above_e_contribute_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    T, H, Inter, E, k = 6, 16, 8, 4, 3
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, 2 * Inter, H, generator=g)
    w2 = torch.randn(E, H, Inter, generator=g)
    ids = torch.tensor([[0, 4, 1], [5, 2, 9], [4, 4, 4], [3, 3, 0], [7, 1, 2], [0, 1, 2]])
    weights = torch.rand(T, k, generator=g)
    for backend in ("loop", "grouped_mm", "padded"):
        out = expert_forward(x, ids, weights, w1, w2, backend=backend)
        assert torch.equal(out[2], torch.zeros(H))  # only "no expert" slots
        # the same as dropping the invalid slots (weight 0, id 0) by hand
        keep = ids < E
        dropped = expert_forward(x, torch.where(keep, ids, 0), weights * keep, w1, w2, backend=backend)
        torch.testing.assert_close(out, dropped, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.double(), _naive(x, ids, weights, w1, w2), atol=1e-4, rtol=1e-4)


def test_known_sentinel_free_calls_skip_the_masks_with_the_same_result() -> None:
    """``sentinels=False`` (transformers' experts outside expert parallelism) gives the auto result bit for bit and
    runs no masking op; ``sentinels=True`` masks even where the ids happen to hold no sentinel."""
    g = torch.Generator().manual_seed(5)
    T, H, Inter, E, k = 9, 16, 8, 4, 2
    x = torch.randn(T, H, generator=g)
    w1, w2 = torch.randn(E, 2 * Inter, H, generator=g), torch.randn(E, H, Inter, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g)
    for backend in ("loop", "grouped_mm", "padded"):
        ref = expert_forward(x, ids, weights, w1, w2, backend=backend)
        for sentinels, masks in ((False, 0), (True, 1)):
            with torch.profiler.profile() as prof:
                out = expert_forward(x, ids, weights, w1, w2, backend=backend, sentinels=sentinels)
            names = [e.name for e in prof.events()]
            assert (names.count("aten::where") + names.count("aten::masked_fill") > 0) == bool(masks), backend
            assert torch.equal(out, ref), (backend, sentinels)


def test_transformers_experts_pass_their_expert_parallel_flag() -> None:
    """An experts module that transformers' expert parallelism marked (``_is_expert_parallel``) gets ids ≥ E
    dropped; the unmarked module runs the sentinel-free path with eager's numbers."""
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    assert experts._is_expert_parallel is False
    E = experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, experts.gate_up_proj.shape[-1], generator=g)
    ids = torch.randint(0, E, (5, 2), generator=g)
    weights = torch.rand(5, 2, generator=g)
    with torch.no_grad():
        ref = ALL_EXPERTS_FUNCTIONS["grouped_mm"](experts, x, ids, weights)
        torch.testing.assert_close(moekit_experts_forward(experts, x, ids, weights), ref, atol=1e-5, rtol=1e-5)
        experts._is_expert_parallel = True
        try:
            with_sentinel = ids.clone()
            with_sentinel[1, 0] = E
            out = moekit_experts_forward(experts, x, with_sentinel, weights)
            dropped = moekit_experts_forward(experts, x, torch.where(with_sentinel < E, with_sentinel, 0),
                                             weights * (with_sentinel < E), )
        finally:
            experts._is_expert_parallel = False
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dropped, atol=1e-6, rtol=1e-6)


def test_no_expert_gradients_are_zero_and_finite() -> None:
    g = torch.Generator().manual_seed(3)
    T, H, Inter, E, k = 8, 16, 8, 4, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w1 = torch.randn(E, 2 * Inter, H, generator=g, requires_grad=True)
    w2 = torch.randn(E, H, Inter, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 4]] * 4 + [[4, 4]] * 4)
    weights = torch.rand(T, k, generator=g, requires_grad=True)
    for backend in ("loop", "grouped_mm", "padded"):
        grads = torch.autograd.grad(
            expert_forward(x, ids, weights, w1, w2, backend=backend).sum(), [x, weights, w1, w2]
        )
        assert all(torch.isfinite(t).all() for t in grads)
        assert torch.equal(grads[0][4:], torch.zeros(4, H))  # tokens with no expert get no gradient
        assert torch.equal(grads[1][:, 1][:4], torch.zeros(4)) and torch.equal(
            grads[1][4:], torch.zeros(4, k)
        )
        assert torch.equal(grads[2][1:], torch.zeros(E - 1, 2 * Inter, H))  # unused experts untouched


def test_expert_counts() -> None:
    ids = torch.tensor([[0, 2], [2, 5], [3, 4], [2, 0]])
    assert expert_counts(ids, 4).tolist() == [2, 0, 3, 1]
    assert expert_counts(ids, 4).dtype == torch.long
    # the accelerator path (fixed-size scatter-add, no host sync) counts the same, ids ≥ E included
    many = torch.randint(0, 11, (257, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(expert_counts(many, 9, sync_free=True), expert_counts(many, 9, sync_free=False))
    assert expert_counts(ids, 4, sync_free=True).tolist() == [2, 0, 3, 1]


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 9),
    E=st.integers(1, 6),
    k=st.integers(1, 3),
    has_bias=st.booleans(),
    has_gate=st.booleans(),
    transposed=st.booleans(),
    backend=st.sampled_from(["auto", "loop", "padded", "grouped_mm"]),
    seed=st.integers(0, 2**16),
)
def test_expert_forward_matches_naive(T, E, k, has_bias, has_gate, transposed, backend, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    H, Inter = 8, 4
    up = 2 * Inter if has_gate else Inter
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, up, H, generator=g)
    w2 = torch.randn(E, H, Inter, generator=g)
    b1 = torch.randn(E, up, generator=g) if has_bias else None
    b2 = torch.randn(E, H, generator=g) if has_bias else None
    ids = torch.randint(0, E + 2, (T, k), generator=g)  # includes ids ≥ E
    weights = torch.rand(T, k, generator=g)
    args = (w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()) if transposed else (w1, w2)
    out = expert_forward(
        x,
        ids,
        weights,
        *args,
        b_gate_up=b1,
        b_down=b2,
        transposed=transposed,
        has_gate=has_gate,
        backend=backend,
    )
    ref = _naive(x, ids, weights, w1, w2, b1, b2, has_gate)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_auto_path_choice_on_cpu() -> None:
    """auto takes one padded bmm for small balanced CPU groups (larger ones in inference than in training),
    per-expert GEMMs for big groups, sparse use and decode."""
    from moekit.nn.dispatch import _choose_path

    E, H = 8, 16
    w1 = torch.randn(E, H, 32)
    w2 = torch.randn(E, 16, H)

    def path(slots: int, ids: torch.Tensor, needs_grad: bool) -> str:
        return _choose_path("auto", torch.randn(slots, H), w1, w2, expert_counts(ids, E), slots, needs_grad)

    small = torch.arange(128) % E  # 16 rows per expert, no padding
    assert path(128, small, needs_grad=False) == "padded"
    assert path(128, small, needs_grad=True) == "padded"
    medium = torch.arange(512) % E  # 64 rows per expert: inference only
    assert path(512, medium, needs_grad=False) == "padded"
    assert path(512, medium, needs_grad=True) in ("grouped_mm", "loop")
    big = torch.arange(4096) % E  # 512 rows per expert: per-expert GEMMs are as fast
    assert path(4096, big, needs_grad=False) in ("grouped_mm", "loop")
    one_hot = torch.zeros(128, dtype=torch.long)  # 7 empty experts: too much padding
    assert path(128, one_hot, needs_grad=False) != "padded"
    decode = torch.tensor([3, 5])  # one token: 2 of 8 experts used
    assert path(2, decode, needs_grad=False) != "padded"
    assert _choose_path("loop", torch.randn(128, H), w1, w2, expert_counts(small, E), 128, False) == "loop"


def test_auto_path_skips_padding_for_large_experts() -> None:
    """At OLMoE-1B-7B's expert size (H·I = 2048·1024 > PADDED_MAX_EXPERT_WEIGHTS) per-expert GEMMs beat the padded
    bmm at every prefill size (docs/nn.md): auto never pads there, and pads the same groups of a smaller expert."""
    from moekit.nn.dispatch import PADDED_MAX_EXPERT_WEIGHTS, _choose_path

    E = 8
    ids = torch.arange(128) % E  # 16 rows per expert, no padding needed
    for hidden, inter, padded in ((2048, 1024, False), (1024, 512, True)):
        assert (hidden * inter > PADDED_MAX_EXPERT_WEIGHTS) != padded
        w1 = torch.empty(E, 2 * inter, hidden, dtype=torch.bfloat16).transpose(1, 2)  # [E, H, 2I] views, as dispatch
        w2 = torch.empty(E, hidden, inter, dtype=torch.bfloat16).transpose(1, 2)
        x = torch.empty(128, hidden, dtype=torch.bfloat16)
        got = _choose_path("auto", x, w1, w2, expert_counts(ids, E), 128, False)
        assert (got == "padded") == padded, (hidden, inter, got)


def test_padded_backward_writes_weight_gradients_in_parameter_layout() -> None:
    g = torch.Generator().manual_seed(6)
    T, H, Inter, E, k = 32, 16, 8, 4, 2
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w1 = torch.randn(E, 2 * Inter, H, generator=g, requires_grad=True)  # nn.Linear layout: used transposed
    w2 = torch.randn(E, H, Inter, generator=g, requires_grad=True)
    ids = torch.randint(0, E, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g)
    grads = {}
    for backend in ("padded", "loop"):
        for t in (x, w1, w2):
            t.grad = None
        expert_forward(x, ids, weights, w1, w2, backend=backend).square().sum().backward()
        grads[backend] = [t.grad for t in (x, w1, w2)]
    assert grads["padded"][1].stride() == w1.stride() and grads["padded"][2].stride() == w2.stride()
    for a, b in zip(grads["padded"], grads["loop"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_path_equals_grouped_under_no_grad(dtype: torch.dtype) -> None:
    """The padded inference path gives the grouped path's output bit for bit up to GEMM rounding."""
    g = torch.Generator().manual_seed(5)
    T, H, Inter, E, k = 48, 32, 16, 8, 2
    x = torch.randn(T, H, generator=g).to(dtype)
    w1 = torch.randn(E, 2 * Inter, H, generator=g).to(dtype)
    w2 = torch.randn(E, H, Inter, generator=g).to(dtype)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[0, 1] = E  # one "no expert" slot
    weights = torch.rand(T, k, generator=g).to(dtype)
    with torch.no_grad():
        padded = expert_forward(x, ids, weights, w1, w2, backend="padded")
        loop = expert_forward(x, ids, weights, w1, w2, backend="loop")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(padded, loop, atol=tol * float(loop.abs().max()), rtol=tol)
    ref = _naive(x, ids, weights, w1, w2)
    scale = float(ref.abs().max())
    torch.testing.assert_close(padded.double(), ref, atol=(1e-5 if dtype == torch.float32 else 0.03) * scale, rtol=0)


def test_decode_step_gemv_equals_eager(arch: str) -> None:
    """A one-token step (auto → the GEMV decode op, no sort) equals eager per layer: 1e-5 in fp32; in bf16 within
    3% of the fp32 output's scale and no worse than eager's own bf16 error (+25%)."""
    model = tiny_model(arch)
    experts = _experts_modules(model)[0]
    E = experts.num_experts
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, model.config.hidden_size, generator=g)
    ids = torch.randperm(E, generator=g)[:2][None]
    weights = torch.rand(1, 2, generator=g)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model.set_experts_implementation("eager")
        ref = experts(x, ids, weights)
        model.set_experts_implementation("moekit")
        got = experts(x, ids, weights)
        model.to(torch.bfloat16)
        got_bf16 = experts(x.bfloat16(), ids, weights.bfloat16())
        model.set_experts_implementation("eager")
        eager_bf16 = experts(x.bfloat16(), ids, weights.bfloat16()).float()
    calls = [e.name for e in prof.events()]
    fused = calls.count("moekit::expert_gemv_combine")  # down projection + weighted sum in one op (no down bias)
    assert calls.count("moekit::expert_gemv") + fused == 4  # gate/up and down, fp32 and bf16
    assert fused == (0 if getattr(experts, "has_bias", False) else 2)
    assert ref.abs().max() > 0.01
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    err, eager_err = (got_bf16.float() - ref).abs().max(), (eager_bf16 - ref).abs().max()
    assert err <= 0.03 * ref.abs().max()
    assert err <= eager_err * 1.25


def test_quantize_rows_int8_error_bound() -> None:
    from moekit.nn import quantize_rows_int8

    w = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(7))
    w[0, 1] = 0.0  # an all-zero row: finite scale, zero codes
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3, 5) and int(q.abs().max()) == 127
    assert torch.all((q.float() * s[..., None] - w).abs() <= s[..., None] / 2 + 1e-7)
    assert torch.all(q[0, 1] == 0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen2_moe"])
def test_int8_experts_equal_eager_on_dequantized_weights(arch: str) -> None:
    """After quantize_experts_int8, "moekit" runs the int8 kernels; its logits equal eager's on the dequantized
    weights (prefill: grouped calls; one token: per-slot GEMVs). The float weights can be dropped."""
    from moekit.nn import quantize_experts_int8

    model = tiny_model(arch)
    ref_model = tiny_model(arch)
    assert quantize_experts_int8(model, keep_float=False) == len(_experts_modules(ref_model)) > 0
    with torch.no_grad():
        for mod, ref in zip(_experts_modules(model), _experts_modules(ref_model), strict=True):
            transposed = getattr(ref, "is_transposed", False)
            for qname, name in (("gate_up", "gate_up_proj" if ref.has_gate else "up_proj"), ("down", "down_proj")):
                deq = getattr(mod, f"moekit_int8_{qname}").float() * getattr(mod, f"moekit_int8_{qname}_scale")[..., None]
                getattr(ref, name).copy_(deq.transpose(1, 2) if transposed else deq)
            assert mod.down_proj.numel() == 0
    model.set_experts_implementation("moekit")
    ref_model.set_experts_implementation("eager")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), torch.profiler.profile() as prof:
        # 80 tokens: groups of ≥ INT8_DEQUANT_MIN_ROWS dequantize; 6 tokens: the int8 kernel; 1 token: the GEMVs
        for inp in (ids, ids[:, :3], ids[:1, :1]):
            ref = ref_model(inp).logits
            torch.testing.assert_close(model(inp).logits, ref, atol=1e-4, rtol=1e-4)
    names = [e.name for e in prof.events()]
    assert "moekit::int8_grouped_mm" in names and "moekit::int8_expert_gemv" in names
