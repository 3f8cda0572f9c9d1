"""moekit.nn.fused_decode's whole-layer step with quantized weights: int8 linears (``quantize_linears_int8``) and
int8 (``quantize_experts_int8``) or packed int4 experts (``quantize_experts_int4``, a packed ``moekit quantize
--bits 4`` load) run the same kernels as their per-module forwards, so a decode step's logits equal the unfused
model's and greedy tokens are identical; what the step does not support takes the per-module path."""

from __future__ import annotations

import shutil

import pytest
import torch

import moekit
from moekit.nn import (
    dequantize_linears_int8,
    fused_decode,
    quantize_experts_int4,
    quantize_experts_int8,
    quantize_linears_int8,
)
from moekit.nn.cpu_kernels import use_for_linears
from moekit.nn.dispatch import use_moekit_experts
from moekit.testing import decode_logits, greedy_tokens, save_tiny_checkpoint, tiny_model

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the fused ops are off")

# widths of 128 so that every input is whole blocks of 64 (the int8 kernels' q8_0-style activations, the int4
# kernel's VNNI path at groups of 128) and int4 groups of 32 (its other loops) fit too
INNER = {"olmoe": "intermediate_size", "qwen3_moe": "moe_intermediate_size", "mixtral": "intermediate_size"}
FORMATS = ("int8", "int4-g128", "int4-g32")


def _model(arch: str, dtype: torch.dtype, experts: str, linears: bool = True):
    """A tiny model with int8 linears (all of them, lm_head too) and ``experts`` quantized, on moekit's kernels."""
    m = tiny_model(arch, dtype=dtype, hidden_size=128, **{INNER[arch]: 128})
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    use_moekit_experts(m)
    if linears:
        quantize_linears_int8(m)
    use_for_linears(m)  # (the float linears left, if any)
    if experts == "int8":
        quantize_experts_int8(m, keep_float=False)
    else:
        quantize_experts_int4(m, group_size=int(experts.split("-g")[1]), keep_float=False)
    return m


def _whole_layers(m) -> int:
    """Decoder layers with a sparse MoE block (the ones the whole-layer step can run)."""
    return sum(type(mod).__name__ in fused_decode.ROUTER_CLASSES for mod in m.modules())


def _decode(m, fused: bool, cache_kind: str, tokens: list[int] | None = None) -> torch.Tensor:
    """Logits of 5 greedy one-token steps after a 7-token prompt (or of the given ``tokens`` fed in turn)."""
    fused_decode.use_fused_decode(m, enable=fused)
    return decode_logits(m, cache_kind, tokens=tokens)


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("experts", FORMATS)
def test_quantized_layer_step_equals_the_modules(monkeypatch, arch: str, experts: str) -> None:
    """fp32 with float activations (the int8 and int4 kernels then see their input as it is): each decode step's
    logits through whole fused layers equal the per-module path's up to the attention's fp32 sum order (1e-5, as
    for float weights), with a static and a dynamic cache; the layers counted, no per-module experts call."""
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    m = _model(arch, torch.float32, experts)
    for cache_kind in ("static", "dynamic"):
        reference = _decode(m, False, cache_kind)
        fused_decode.calls.clear()
        fused = _decode(m, True, cache_kind)
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
        assert fused_decode.calls["layer"] == 5 * _whole_layers(m) > 0
        assert fused_decode.calls["experts"] == fused_decode.calls["router"] == 0


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("experts", ["int8", "int4-g128"])
def test_quantized_layer_step_greedy_tokens_identical(arch: str, experts: str) -> None:
    """With the default int8 activations (q8_0-style blocks where the CPU has VNNI): transformers' greedy generate
    gives the same tokens with and without the fused layers, static and dynamic cache."""
    m = _model(arch, torch.float32, experts)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    tokens = {}
    for fused in (False, True):
        fused_decode.use_fused_decode(m, enable=fused)
        for cache in ("static", "dynamic"):
            fused_decode.calls.clear()
            tokens[fused, cache] = greedy_tokens(m, ids, 10, cache)
            assert fused_decode.calls["layer"] == (9 * _whole_layers(m) if fused else 0)
    assert tokens[True, "static"] == tokens[False, "static"] == tokens[True, "dynamic"] == tokens[False, "dynamic"]


@pytest.mark.parametrize("experts", FORMATS)
def test_quantized_layer_step_bf16(experts: str) -> None:
    """bf16 with int8 activations, the same tokens fed to both paths: the attention's rounding (SDPA's bf16
    probabilities) moves a bf16 input by an ulp now and then, which can move its block's int8 codes, so logits
    agree within 0.15 and on average within 0.015 (|logit| < 1), as measured on OLMoE, Qwen3-MoE and Mixtral;
    a wrong scale, group or slot would move them by the logits' own size."""
    tokens = [5, 17, 33, 90, 2, 64, 11, 100]
    m = _model("olmoe", torch.bfloat16, experts)
    reference = _decode(m, False, "static", tokens)
    fused_decode.calls.clear()
    fused = _decode(m, True, "static", tokens)
    assert fused_decode.calls["layer"] == len(tokens) * _whole_layers(m)
    diff = (fused - reference).abs()
    assert diff.max() < 0.15 and diff.mean() < 0.015
    assert reference.abs().max() > 0.3  # (logits of a size those bounds mean something against)


def test_mixed_linear_formats_take_the_modules_path(monkeypatch) -> None:
    """A layer whose projections are not all in one format (one o_proj back to float) runs its modules' forwards;
    the other layers still run whole, and the logits are the per-module path's."""
    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    m = _model("olmoe", torch.float32, "int8")
    assert dequantize_linears_int8(m.model.layers[1].self_attn.o_proj) == 1  # (its float weight was kept)
    use_for_linears(m)  # that o_proj on the float kernel, the others stay int8
    reference = _decode(m, False, "static")
    fused_decode.calls.clear()
    fused = _decode(m, True, "static")
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    assert fused_decode.calls["layer"] == 5 * (m.config.num_hidden_layers - 1)
    assert fused_decode.calls["attention"] == 5  # layer 1: the attention's fused op, its int8 q/k/v one by one


def test_packed_int4_checkpoint_decodes_through_whole_layers(tmp_path, monkeypatch) -> None:
    """``moekit quantize --bits 4`` loaded with packed experts and ``use_fast_decode`` (what ``moekit generate``
    runs): every MoE layer's decode step is one native call with the int4 kernel, logits as the per-module path's;
    ``--bits 8`` (asymmetric int8 groups) loads dequantized, so its layers take the float step."""
    from moekit.cli.common import use_fast_decode
    from moekit.compress.quantize import quantize

    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False, hidden_size=128,
                               moe_intermediate_size=128)
    for bits in (4, 8):
        quantize(moekit.load(src, with_tokenizer=False), bits=bits, group_size=64, out=tmp_path / f"q{bits}")
        lm = moekit.load(tmp_path / f"q{bits}", with_tokenizer=False, packed_experts=bits == 4)
        use_fast_decode(lm)
        experts = [mod for mod in lm.model.modules() if type(mod).__name__ in fused_decode.EXPERTS_CLASSES]
        assert all(hasattr(e, "moekit_int4_gate_up") == (bits == 4) for e in experts) and experts
        reference = _decode(lm.model, False, "dynamic")
        fused_decode.calls.clear()
        fused = _decode(lm.model, True, "dynamic")
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
        assert fused_decode.calls["layer"] == 5 * _whole_layers(lm.model) > 0


def test_offloaded_packed_int4_with_int8_linears_runs_in_the_native_step(tmp_path, monkeypatch) -> None:
    """Offloaded packed int4 experts (every expert in the cache's slots) with int8 attention linears: the native
    call runs the int8 attention, the router and the int4 experts on the slots; logits equal the in-memory packed
    model's whole int4 layers (fp32, float activations: the fused ops' tolerance)."""
    from moekit.compress.quantize import quantize
    from moekit.serve.engine import OffloadEngine
    from moekit.serve.store import load_offloaded, store_for

    monkeypatch.setenv("MOEKIT_INT8_ACTIVATIONS", "float")
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "moekit-cache"))
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False, hidden_size=128,
                               moe_intermediate_size=128)
    quantize(moekit.load(src, with_tokenizer=False), bits=4, group_size=128, out=tmp_path / "q4")
    memory = moekit.load(tmp_path / "q4", with_tokenizer=False, packed_experts=True).model
    lm = load_offloaded(tmp_path / "q4", with_tokenizer=False, packed_experts=True)
    for m in (memory, lm.model):
        use_moekit_experts(m)
        quantize_linears_int8(m)
        fused_decode.use_fused_decode(m)
    fused_decode.calls.clear()
    reference = decode_logits(memory, "static")
    assert fused_decode.calls["layer"] == 5 * _whole_layers(memory) > 0 and not fused_decode.calls["layer_split"]
    engine = OffloadEngine(lm, store_for(lm), slots=lm.model.config.num_experts).start()
    try:
        for v in lm.moe:
            engine.access(v.index, list(range(v.num_experts)), decode=False)
        fused_decode.calls.clear()
        got = decode_logits(lm.model, "static")
    finally:
        engine.stop()
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    # every expert cached: the int4 kernel runs on the slots inside the native call, with the int8 linears
    assert fused_decode.calls["layer"] == fused_decode.calls["layer_slots"] == 5 * _whole_layers(lm.model)
