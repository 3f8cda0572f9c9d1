"""moekit.nn.fused_decode: a one-token step's RMSNorms, attention, router and experts' glue in one native call each
equal transformers' own modules (logits of decode steps, greedy tokens) on tiny models of every supported family,
and every other call (prefill, grads, float masks, hooks, switched off) takes the module's own forward."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from moekit.nn import fused_decode
from moekit.nn.cpu_kernels import use_for_linears
from moekit.nn.dispatch import use_moekit_experts
from moekit.testing import decode_logits, greedy_tokens, tiny_model

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the fused ops are off")

ARCHS = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral", "glm4_moe", "dots1")
# bf16: SDPA's CPU kernel rounds its probabilities to bf16 before the value product, the fused op keeps them in
# fp32; with the sums' order that moves a logit by a few bf16 ulps (|logit| < 0.5 here: ulp 2^-9)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _model(arch: str, dtype: torch.dtype):
    m = tiny_model(arch, dtype=dtype)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    use_moekit_experts(m)
    use_for_linears(m)
    return m


def _decode(m, fused: bool, cache_kind: str, steps: int = 5, prompt_len: int = 7) -> torch.Tensor:
    """Logits of ``steps`` greedy one-token steps after a prompt, fused ops on or off."""
    fused_decode.use_fused_decode(m, enable=fused)
    return decode_logits(m, cache_kind, steps, prompt_len)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_decode_logits_equal_transformers_modules(arch: str, dtype: torch.dtype, cache_kind: str) -> None:
    m = _model(arch, dtype)
    reference = _decode(m, False, cache_kind)
    fused_decode.calls.clear()
    fused = _decode(m, True, cache_kind)
    torch.testing.assert_close(fused, reference, rtol=0, atol=ATOL[dtype])
    layers = m.config.num_hidden_layers
    moe_layers = sum(type(mod).__name__ in fused_decode.ROUTER_CLASSES for mod in m.modules())
    # whole decoder layers in one call (two around a dynamic cache's append), except where a piece does not qualify
    # (Qwen3-MoE's, GLM4-MoE's and dots1's dense layers); those run the modules' fused ops
    whole = {"olmoe": layers, "mixtral": layers, "qwen2_moe": layers}.get(arch, moe_layers)
    assert fused_decode.calls["layer"] == 5 * whole
    assert fused_decode.calls["attention"] == 5 * (layers - whole)  # every other decode step, none of the prefill
    # input and post-attention norms of the other layers, and the final norm
    assert fused_decode.calls["rmsnorm"] == 5 * (2 * (layers - whole) + 1)
    assert fused_decode.calls["rope"] == 5
    # q, k, v in one kernel call (with Qwen2-MoE's biases too)
    assert fused_decode.calls["qkv"] == 5 * (layers - whole)
    assert fused_decode.calls["router"] == fused_decode.calls["experts"] == 5 * (moe_layers - whole)
    assert moe_layers > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_every_norm_weight_reaches_its_place(arch: str, cache_kind: str) -> None:
    """Random weights in every RMSNorm (input, post-attention, q/k norms, final), each different: a whole-layer step
    that read one norm's weight for another's (the tiny models' norms start at ones) would not match in fp32."""
    m = _model(arch, torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ in fused_decode.RMSNORM_CLASSES:
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
    reference = _decode(m, False, cache_kind)
    fused_decode.calls.clear()
    fused = _decode(m, True, cache_kind)
    assert fused_decode.calls["layer"] > 0
    torch.testing.assert_close(fused, reference, rtol=0, atol=ATOL[torch.float32])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_tokens_identical(arch: str) -> None:
    """transformers' generate (static cache, as bench_decode; and its default dynamic cache, as moekit generate's
    loop uses): the same greedy tokens with and without the fused ops."""
    m = _model(arch, torch.bfloat16)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    tokens = {}
    for fused in (False, True):
        fused_decode.use_fused_decode(m, enable=fused)
        for cache in ("static", "dynamic"):
            tokens[fused, cache] = greedy_tokens(m, ids, 12, cache)
    assert tokens[True, "static"] == tokens[False, "static"] == tokens[True, "dynamic"] == tokens[False, "dynamic"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_equals_the_module(dtype: torch.dtype) -> None:
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    norm = OlmoeRMSNorm(300, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(300, generator=torch.Generator().manual_seed(0)).to(dtype))
    x = (torch.randn(1, 1, 300, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    reference = norm(x)
    out = fused_decode.rmsnorm(x, norm.weight, norm.variance_epsilon)
    # one rounding of the normalised value and one of the product, as the module; the fp32 sum of squares in
    # another order (and 1/sqrt against torch's rsqrt) moves at most the last bits
    torch.testing.assert_close(out, reference, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    if dtype != torch.float32:  # in half precision the two roundings hide that: almost every value is identical
        assert (out != reference).float().mean() < 0.05
    assert fused_decode.rmsnorm(x.float(), norm.weight, norm.variance_epsilon) is None or dtype == torch.float32


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_router_step_equals_the_module(arch: str) -> None:
    m = tiny_model(arch, dtype=torch.bfloat16)
    router = next(mod for mod in m.modules() if type(mod).__name__ in fused_decode.ROUTER_CLASSES)
    x = torch.randn(1, 1, m.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    logits, scores, ids = type(router).forward(router, x)
    fused_decode.use_fused_decode(m)
    fused_decode.calls.clear()
    f_logits, f_scores, f_ids = router(x)
    assert fused_decode.calls["router"] == 1
    assert f_scores.dtype == scores.dtype  # Mixtral keeps fp32 scores, the others the model's dtype
    assert torch.equal(f_ids, ids)
    torch.testing.assert_close(f_logits, logits, rtol=2**-7, atol=0)
    torch.testing.assert_close(f_scores, scores, rtol=2**-7, atol=0)


def test_prefill_grads_and_float_masks_take_the_modules_own_forward() -> None:
    m = _model("olmoe", torch.float32)
    fused_decode.use_fused_decode(m)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    fused_decode.calls.clear()
    with torch.no_grad():
        m(ids)  # prefill: several tokens
    assert sum(fused_decode.calls.values()) == 0
    one = ids[:, :1]
    m(one).logits.sum().backward()  # a one-token step with gradients: the modules' own forwards
    assert sum(fused_decode.calls.values()) == 0
    assert m.model.layers[0].self_attn.q_norm.weight.grad is not None
    m.zero_grad()
    m.set_attn_implementation("eager")  # additive float masks: the attention's own forward
    reference = _decode(m, False, "static")
    fused_decode.calls.clear()
    fused = _decode(m, True, "static")
    assert fused_decode.calls["attention"] == fused_decode.calls["layer"] == 0 and fused_decode.calls["rmsnorm"] > 0
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


def test_padded_prompt_masks_the_same_positions() -> None:
    """A left-padded prompt: the boolean mask has False at the padding, which the fused attention skips as SDPA does."""
    m = _model("qwen3_moe", torch.float32)
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = {}
    for fused in (False, True):
        fused_decode.use_fused_decode(m, enable=fused)
        fused_decode.calls.clear()
        with torch.no_grad():
            out[fused] = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, disable_compile=True,
                                    cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    assert fused_decode.calls["attention"] + fused_decode.calls["layer"] == 5 * m.config.num_hidden_layers
    assert fused_decode.calls["layer"] > 0
    assert out[True].sequences.tolist() == out[False].sequences.tolist()
    torch.testing.assert_close(torch.stack(out[True].logits), torch.stack(out[False].logits), rtol=0, atol=1e-5)


def test_a_hook_on_a_router_sees_its_call() -> None:
    """Forward hooks (routing controls, transformers' output recorders) see the modules' calls: a hooked layer
    takes the per-module path."""
    m = _model("olmoe", torch.float32)
    seen = []
    handle = m.model.layers[1].mlp.gate.register_forward_hook(lambda mod, args, out: seen.append(out[2].clone()))
    reference = _decode(m, False, "static")
    seen.clear()
    fused_decode.calls.clear()
    fused = _decode(m, True, "static")
    handle.remove()
    assert len(seen) == 5 + 1  # prefill and every decode step
    assert fused_decode.calls["layer"] == 5 * (m.config.num_hidden_layers - 1) and fused_decode.calls["router"] == 5
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


def test_quantized_experts_run_in_the_whole_layer_step() -> None:
    """int8 experts: the whole-layer step runs them with the int8 kernel (tests/test_nn_fused_decode_quantized.py);
    the experts' own fused op is for float weights only, so a layer whose router is hooked runs them through
    moekit's dispatch."""
    from moekit.nn import quantize_experts_int8

    m = _model("olmoe", torch.float32)
    quantize_experts_int8(m)
    reference = _decode(m, False, "static")
    fused_decode.calls.clear()
    fused = _decode(m, True, "static")
    assert fused_decode.calls["layer"] == 5 * m.config.num_hidden_layers and fused_decode.calls["experts"] == 0
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    handle = m.model.layers[0].mlp.gate.register_forward_hook(lambda *args: None)
    fused_decode.calls.clear()
    hooked = _decode(m, True, "static")
    handle.remove()
    assert fused_decode.calls["layer"] == 5 * (m.config.num_hidden_layers - 1) and fused_decode.calls["experts"] == 0
    assert fused_decode.calls["router"] == fused_decode.calls["attention"] == 5
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-5)


def test_switch_off_and_restore(monkeypatch) -> None:
    m = _model("mixtral", torch.float32)
    swapped = fused_decode.use_fused_decode(m)
    assert swapped == sum(type(mod).__name__ in (*fused_decode.RMSNORM_CLASSES, *fused_decode.ATTENTION_CLASSES,
                                                 *fused_decode.ROUTER_CLASSES, *fused_decode.EXPERTS_CLASSES,
                                                 *fused_decode.ROTARY_CLASSES, *fused_decode.LAYER_CLASSES)
                          for mod in m.modules())
    assert fused_decode.use_fused_decode(m, enable=False) == swapped
    assert not any("forward" in mod.__dict__ for mod in m.modules() if type(mod).__name__ != "Linear")
    monkeypatch.setenv("MOEKIT_FUSED_DECODE", "0")
    assert fused_decode.use_fused_decode(m) == 0


def test_use_fast_decode_switches_them_on(tmp_path) -> None:
    from moekit.cli.common import load_model, use_fast_decode
    from moekit.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint("olmoe", tmp_path / "m", with_tokenizer=False)
    lm = load_model(str(path), "float32")
    use_fast_decode(lm)
    attn = lm.model.model.layers[0].self_attn
    assert attn.forward.__func__ is fused_decode._attention_forward


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "mixtral"])
def test_routing_controls_and_recorders_see_every_fused_step(tmp_path, arch: str) -> None:
    """Under ``moekit.route`` (routing controls) and ``record`` (traces), which wrap the router, a fused decode gives
    the unfused model's tokens and trace (the whole-layer step stands aside; the router's own fused op runs through
    the wrapper), and once the context ends the fused forwards are back and the whole-layer step runs again."""
    import moekit
    from moekit.cli.common import use_fast_decode
    from moekit.generation import generate
    from moekit.routing import RoutingControl, record
    from moekit.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint(arch, tmp_path / arch)
    lm = moekit.load(path)
    use_fast_decode(lm)
    control = RoutingControl.make(disable=[(v.index, e) for v in lm.moe for e in range(4)])
    routers = [v.router for v in lm.moe]

    def run() -> tuple[list[int], list[int], np.ndarray]:
        plain = generate(lm, "The river", max_new_tokens=6).token_ids
        steered = generate(lm, "The river", max_new_tokens=6, control=control).token_ids
        with record(lm) as rec:
            generate(lm, "The river", max_new_tokens=6)
        return plain, steered, rec.trace.ids

    fused_decode.calls.clear()
    fused = run()
    assert fused_decode.calls["layer"] > 0  # the whole-layer step ran outside the contexts
    assert all(r.forward.__func__ is fused_decode._router_forward for r in routers)  # restored after them
    fused_decode.use_fused_decode(lm.model, enable=False)
    plain = run()
    assert fused[0] == plain[0] and fused[1] == plain[1] and fused[1] != fused[0]
    assert np.array_equal(fused[2], plain[2])


def _qwen2_with_biases(dtype: torch.dtype):
    """The tiny Qwen2-MoE with random q/k/v biases (its init leaves them 0), on moekit's kernels."""
    m = _model("qwen2_moe", dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.copy_((torch.randn(p.bias.shape, generator=g) * 0.5).to(dtype))
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_qwen2_moe_whole_layer_step_equals_the_per_module_path(dtype: torch.dtype, cache_kind: str) -> None:
    """Qwen2-MoE (q/k/v biases, a shared expert behind a sigmoid gate) in the whole-layer step: decode logits equal
    the per-module fused ops' (bf16 bit for bit: the same kernels and roundings; fp32 1e-5) and transformers' own
    modules' (fp32 1e-5, bf16 the fused ops' tolerance), and every decode step of every layer is one native call."""
    m = _qwen2_with_biases(dtype)
    plain = _qwen2_with_biases(dtype)  # transformers' modules alone: eager experts, F.linear
    use_for_linears(plain, enable=False)
    plain.set_experts_implementation("eager")
    transformers_own = decode_logits(plain, cache_kind)
    reference = _decode(m, False, cache_kind)
    fused_decode.calls.clear()
    whole = _decode(m, True, cache_kind)
    layers = m.config.num_hidden_layers
    assert fused_decode.calls["layer"] == 5 * layers
    assert fused_decode.calls["attention"] == fused_decode.calls["experts"] == fused_decode.calls["qkv"] == 0
    for layer in m.model.layers:  # the per-module fused ops: the layers' own forwards
        del layer.forward
    fused_decode.calls.clear()
    modules = decode_logits(m, cache_kind)
    assert fused_decode.calls["layer"] == 0 and fused_decode.calls["qkv"] == fused_decode.calls["attention"] == 5 * layers
    if dtype == torch.bfloat16:
        assert torch.equal(whole, modules)
    else:
        torch.testing.assert_close(whole, modules, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, reference, rtol=0, atol=ATOL[dtype])
    torch.testing.assert_close(whole, transformers_own, rtol=0, atol=ATOL[dtype])
    assert (whole - transformers_own).abs().max() < 0.2 * ATOL[dtype] or dtype == torch.bfloat16


def test_qwen2_moe_greedy_tokens_and_the_shared_expert_matter() -> None:
    """Greedy generate with the whole-layer step gives the per-module path's tokens (static and dynamic caches); the
    shared expert's gate and the biases count: zeroing the gate changes the logits, and a hook on the shared expert
    sees its call (that layer takes the per-module path)."""
    m = _qwen2_with_biases(torch.bfloat16)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    tokens = {}
    for fused in (False, True):
        fused_decode.use_fused_decode(m, enable=fused)
        for cache in ("static", "dynamic"):
            fused_decode.calls.clear()
            tokens[fused, cache] = greedy_tokens(m, ids, 12, cache)
            assert fused_decode.calls["layer"] == (11 * m.config.num_hidden_layers if fused else 0)
    assert len(set(map(tuple, tokens.values()))) == 1
    m = _qwen2_with_biases(torch.float32)
    fused_decode.use_fused_decode(m)
    base = decode_logits(m)
    seen = []
    handle = m.model.layers[1].mlp.shared_expert.register_forward_hook(lambda mod, args, out: seen.append(out))
    fused_decode.calls.clear()
    hooked = decode_logits(m)
    handle.remove()
    assert len(seen) == 5 + 1 and fused_decode.calls["layer"] == 5 * (m.config.num_hidden_layers - 1)
    torch.testing.assert_close(hooked, base, rtol=0, atol=1e-5)
    with torch.no_grad():
        m.model.layers[1].mlp.shared_expert_gate.weight.fill_(-30.0)  # sigmoid ~ 0: the shared expert drops out
        for layer in m.model.layers:
            layer.self_attn.q_proj.bias.zero_()
    assert not torch.allclose(decode_logits(m), base, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkv_biases_are_added_before_the_one_rounding(dtype: torch.dtype) -> None:
    """q/k/v with biases in one kernel call: bias + the kernel's fp32 sum, rounded once (as F.linear), not the
    kernel's rounded output plus the bias (two roundings)."""
    from moekit.nn.cpu_kernels import _linear_step

    m = _qwen2_with_biases(torch.float32)
    attn = m.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.bias.mul_(8.0)
    attn.to(dtype)
    x = torch.randn(1, 1, m.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = fused_decode._qkv(attn, x)
    assert got is not None
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    sums = [_linear_step(x.view(1, -1).float(), p.weight.float()).view(-1) for p in projs]
    once = [(s + p.bias.float()).to(dtype) for s, p in zip(sums, projs, strict=True)]
    twice = [s.to(dtype) + p.bias for s, p in zip(sums, projs, strict=True)]
    assert all(torch.equal(g, o) for g, o in zip(got, once, strict=True))
    assert not all(torch.equal(g, t) for g, t in zip(got, twice, strict=True))


def _on_kernels_quantized(m, experts: str) -> None:
    """moekit's experts and linear kernels on ``m``, its experts int8 or packed int4 (groups of 128), floats dropped."""
    from moekit.nn import quantize_experts_int4, quantize_experts_int8

    use_moekit_experts(m)
    use_for_linears(m)
    if experts == "int8":
        quantize_experts_int8(m, keep_float=False)
    else:
        quantize_experts_int4(m, group_size=128, keep_float=False)


@pytest.mark.parametrize("experts", ["int8", "int4"])
def test_qwen2_moe_with_quantized_experts_and_int8_linears(monkeypatch, experts: str) -> None:
    """Qwen2-MoE with int8 or packed int4 experts and float linears (biases, shared expert): whole layers, logits of the per-module
    path (fp32, float activations: 1e-5); with int8 linears too, its biased q/k/v projections (int8 linears add the
    bias after the kernel's rounding, which the native step does not do) keep the per-module path, same logits."""
    from moekit.nn import quantize_linears_int8

    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    m = tiny_model("qwen2_moe", hidden_size=128, moe_intermediate_size=128)
    m.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.copy_(torch.randn(p.bias.shape, generator=g) * 0.5)
    _on_kernels_quantized(m, experts)
    layers = m.config.num_hidden_layers
    for int8_linears in (False, True):
        if int8_linears:
            use_for_linears(m, enable=False)
            assert quantize_linears_int8(m) > 0 and hasattr(m.model.layers[0].self_attn.q_proj, "moekit_int8_weight")
        reference = _decode(m, False, "static")
        fused_decode.calls.clear()
        fused = _decode(m, True, "static")
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
        assert fused_decode.calls["layer"] == (0 if int8_linears else 5 * layers)
        assert fused_decode.calls["attention"] == (5 * layers if int8_linears else 0)


def _glm4(arch: str, dtype: torch.dtype, **overrides):
    """The tiny GLM4-MoE (partial rotary, a dense first layer, a shared expert, DeepSeek-V3's router with groups)
    or dots1 with random q/k/v biases (``attention_bias``; dots1 has no o_proj bias here: that layer would take the
    per-module path), on moekit's kernels."""
    m = tiny_model(arch, dtype=dtype, **overrides)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    use_moekit_experts(m)
    use_for_linears(m)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if p.bias is not None:
                    p.bias.copy_((torch.randn(p.bias.shape, generator=g) * 0.5).to(dtype))
    return m


GLM4_VARIANTS = {"glm4_moe": ("glm4_moe", dict(attention_bias=True)),  # GLM-4.5(-Air): biases, no q/k norms
                 "glm4_moe-qk-norm": ("glm4_moe", dict(attention_bias=True, use_qk_norm=True)),  # GLM-4.5 (355B)
                 "dots1": ("dots1", dict())}


@pytest.mark.parametrize("variant", list(GLM4_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_glm4_moe_whole_layer_matches_eager(variant: str, dtype: torch.dtype, cache_kind: str) -> None:
    """GLM4-MoE / dots1 MoE layers in the whole-layer step (DeepSeek-V3's sigmoid router with its selection bias and
    groups, an ungated shared expert, q/k/v biases, partial rotary): decode logits equal the per-module fused ops'
    (bf16 bit for bit; fp32 1e-5) and transformers' own modules' (eager experts, F.linear: the fused ops'
    tolerance); every MoE layer's decode step is one native call, the dense first layer takes the fused modules."""
    arch, overrides = GLM4_VARIANTS[variant]
    m = _glm4(arch, dtype, **overrides)
    plain = _glm4(arch, dtype, **overrides)
    use_for_linears(plain, enable=False)
    plain.set_experts_implementation("eager")
    transformers_own = decode_logits(plain, cache_kind)
    fused_decode.calls.clear()
    whole = _decode(m, True, cache_kind)
    layers, dense = m.config.num_hidden_layers, m.config.first_k_dense_replace
    assert dense == 1 and layers == 3
    assert fused_decode.calls["layer"] == 5 * (layers - dense)
    assert fused_decode.calls["attention"] == fused_decode.calls["qkv"] == 5 * dense
    assert fused_decode.calls["router"] == fused_decode.calls["experts"] == 0
    assert fused_decode.calls["rope"] == 5 and fused_decode.calls["rmsnorm"] == 5 * (2 * dense + 1)
    for layer in m.model.layers:  # the per-module fused ops: the layers' own forwards
        layer.__dict__.pop("forward", None)
    fused_decode.calls.clear()
    modules = decode_logits(m, cache_kind)
    assert fused_decode.calls["layer"] == 0 and fused_decode.calls["router"] == 5 * (layers - dense)
    assert fused_decode.calls["attention"] == 5 * layers
    if dtype == torch.bfloat16:
        assert torch.equal(whole, modules)
    else:
        torch.testing.assert_close(whole, modules, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, transformers_own, rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_glm4_moe_every_part_counts(cache_kind: str) -> None:
    """fp32, against transformers' own modules (1e-5): random RMSNorm weights (each norm in its place), a strong
    selection bias (it picks the experts but is not in their weights), routed scaling; each changes the logits."""
    m = _glm4("glm4_moe", torch.float32, attention_bias=True, use_qk_norm=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ in fused_decode.RMSNORM_CLASSES:
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
            if type(mod).__name__ == "Glm4MoeTopkRouter":
                mod.e_score_correction_bias.copy_(torch.randn(mod.e_score_correction_bias.shape, generator=g))
    reference = _decode(m, False, cache_kind)
    fused_decode.calls.clear()
    fused = _decode(m, True, cache_kind)
    assert fused_decode.calls["layer"] == 5 * 2
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    router = m.model.layers[1].mlp.gate
    for name, value in (("routed_scaling_factor", 1.0), ("topk_group", 4)):
        old = getattr(router, name)
        setattr(router, name, value)
        changed = _decode(m, True, cache_kind)
        torch.testing.assert_close(changed, _decode(m, False, cache_kind), rtol=0, atol=1e-5)
        assert not torch.allclose(changed, fused, rtol=0, atol=1e-3), name
        setattr(router, name, old)


@pytest.mark.parametrize("arch", ["glm4_moe", "dots1", "deepseek_v3"])
@pytest.mark.parametrize("shape", [(8, 3, 4, 2), (128, 8, 1, 1), (256, 8, 8, 4), (64, 1, 1, 1)])
def test_sigmoid_router_step_equals_the_module(arch: str, shape: tuple) -> None:
    """DeepSeek-V3's router (GLM4-MoE, dots1) in one call: over 100 random bf16 inputs the same expert ids in the same
    order (torch.topk's: partial_sort or nth_element, unsorted), fp32 weights and logits within their fp32 sums'
    order (a few ulps), for groups of experts, GLM-4.5's single group and DeepSeek-V3's 8 groups of 32."""
    from transformers import AutoModelForCausalLM

    from moekit.testing import tiny_config

    E, k, G, tg = shape
    cfg = tiny_config(arch, n_routed_experts=E, num_experts_per_tok=k, n_group=G, topk_group=tg, hidden_size=64,
                      num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(cfg)
    router = model.model.layers[1].mlp.gate
    assert type(router).__name__ in fused_decode.ROUTER_CLASSES and router.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(E)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    fused_decode.use_fused_decode(model)
    fused_decode.calls.clear()
    for _ in range(100):
        x = torch.randn(1, 1, 64, generator=g).to(torch.bfloat16)
        logits, weights, ids = type(router).forward(router, x)
        f_logits, f_weights, f_ids = router(x)
        assert torch.equal(f_ids, ids)
        assert f_weights.dtype == f_logits.dtype == torch.float32
        torch.testing.assert_close(f_weights, weights, rtol=4e-6, atol=0)
        torch.testing.assert_close(f_logits, logits, rtol=0, atol=4e-6)
    assert fused_decode.calls["router"] == 100
    router.topk_group = G + 1  # a layout torch refuses: the module's own forward (and its error)
    with pytest.raises(RuntimeError):
        router(x)


@pytest.mark.parametrize("experts", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glm4_moe_with_quantized_experts_and_int8_linears(monkeypatch, experts: str, dtype: torch.dtype) -> None:
    """GLM4-MoE with int8 or packed int4 experts, float or int8 linears (the shared expert's too: its int8 kernel
    in the native step): whole MoE layers with the per-module path's logits (fp32 with float activations: 1e-5, and
    the unfused modules'; bf16 with int8 activations, the default: bit for bit)."""
    from moekit.nn import quantize_linears_int8

    if dtype == torch.float32:
        monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    m = tiny_model("glm4_moe", dtype=dtype, hidden_size=128, moe_intermediate_size=128, intermediate_size=128)
    m.generation_config.eos_token_id = None
    _on_kernels_quantized(m, experts)
    for int8_linears in (False, True):
        if int8_linears:
            use_for_linears(m, enable=False)
            assert quantize_linears_int8(m) > 0
            assert hasattr(m.model.layers[1].mlp.shared_experts.down_proj, "moekit_int8_weight")
        fused_decode.use_fused_decode(m)
        fused_decode.calls.clear()
        fused = decode_logits(m)
        assert fused_decode.calls["layer"] == 5 * 2 and fused_decode.calls["experts"] == 0
        for layer in m.model.layers:
            layer.__dict__.pop("forward", None)
        modules = decode_logits(m)
        if dtype == torch.bfloat16:
            assert torch.equal(fused, modules)
        else:  # and the modules' own forwards (the int8 and int4 kernels too)
            torch.testing.assert_close(fused, modules, rtol=0, atol=1e-5)
            torch.testing.assert_close(fused, _decode(m, False, "static"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_deepseek_v3_router_runs_as_one_call(dtype: torch.dtype, cache_kind: str) -> None:
    """DeepSeek-V3 (MLA attention: its own forward, no whole-layer step): the sigmoid router, the RMSNorms (the
    low-rank q/kv norms too), rotary and the experts' glue are one call each, logits those of the modules' own
    forwards (bf16 bit for bit: the router's fp32 weights pick the same experts; fp32 1e-5)."""
    m = _model("deepseek_v3", dtype)
    reference = _decode(m, False, cache_kind)
    fused_decode.calls.clear()
    fused = _decode(m, True, cache_kind)
    moe_layers = m.config.num_hidden_layers - m.config.first_k_dense_replace
    assert fused_decode.calls["router"] == fused_decode.calls["experts"] == 5 * moe_layers > 0
    assert fused_decode.calls["layer"] == fused_decode.calls["attention"] == 0
    assert fused_decode.calls["rmsnorm"] == 5 * (4 * m.config.num_hidden_layers + 1)  # + q_a and kv_a norms
    if dtype == torch.bfloat16:
        assert torch.equal(fused, reference)
    else:
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(fused_decode.SIGMOID_ROUTER_TWINS))
def test_sigmoid_router_twins_are_glm4s_word_for_word(name: str) -> None:
    """The other families' routers that take the fused sigmoid router have GLM4-MoE's ``__init__`` and ``forward``
    source (config class names aside): a transformers release that changes one fails here, not in silence."""
    import importlib
    import inspect
    import re

    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    package = fused_decode.SIGMOID_ROUTER_TWINS[name]
    cls = getattr(importlib.import_module(f"transformers.models.{package}.modeling_{package}"), name)
    for method in ("__init__", "forward"):
        ours, theirs = (re.sub(r"\w+Config\b", "Config", inspect.getsource(getattr(c, method)))
                        for c in (Glm4MoeTopkRouter, cls))
        assert ours == theirs, (name, method)
