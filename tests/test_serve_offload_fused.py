"""Offloaded experts in the whole-layer fused decode step (``fused_decode.EXPERTS_PROVIDER``): the native call runs
attention and router and, when every chosen expert is resident, the experts on the cache's slot bank; a miss hands
the experts to the engine. Decode logits and greedy tokens equal the in-memory fused model's, and the engine's
statistics and LRU state equal those of the per-module path (``use_fused_decode(enable=False)``) on the same steps;
packed int4 slots run in the native step too (misses through the engine) and equal the in-memory packed model."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

import moekit
from cli_helpers import run_cli
from moekit.compress.quantize import quantize
from moekit.formats.writer import write_checkpoint
from moekit.nn import fused_decode
from moekit.nn.cpu_kernels import use_for_linears
from moekit.nn.dispatch import use_moekit_experts
from moekit.serve.engine import OffloadEngine
from moekit.serve.store import load_offloaded, store_for
from moekit.testing import decode_logits, save_tiny_checkpoint, tiny_model

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the fused ops are off")
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # as tests/test_nn_fused_decode.py
STEPS = 6


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moekit-cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-ckpts")
    paths = {a: save_tiny_checkpoint(a, root / a, with_tokenizer=False) for a in ("olmoe", "qwen3_moe", "mixtral")}
    qwen2 = tiny_model("qwen2_moe")  # with random q/k/v biases (its init leaves them 0) and its shared expert
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in qwen2.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.copy_(torch.randn(p.bias.shape, generator=g) * 0.5)
    paths["qwen2_moe"] = write_checkpoint(root / "qwen2_moe", model=qwen2)
    glm4 = tiny_model("glm4_moe", attention_bias=True)  # biases, partial rotary, DeepSeek-V3's router, shared expert
    with torch.no_grad():
        for layer in glm4.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.copy_(torch.randn(p.bias.shape, generator=g) * 0.5)
    paths["glm4_moe"] = write_checkpoint(root / "glm4_moe", model=glm4)
    return paths


def _fast(model) -> None:
    """What ``moekit generate`` sets up (``use_fast_decode`` without huge pages)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    use_moekit_experts(model)
    use_for_linears(model)
    fused_decode.use_fused_decode(model)


MODES = ("fused", "modules", "unfused")
"""fused: whole layers with the engine's experts; modules: the per-module fused ops (the engine's experts forward
from the experts module, as before whole layers took offloaded experts); unfused: the modules' own forwards."""


def _offloaded(path, dtype, slots: int, policy: str, mode: str, warm: bool, zero_copy: bool = True) -> OffloadEngine:
    lm = load_offloaded(path, dtype=dtype, with_tokenizer=False)
    _fast(lm.model)
    if mode == "unfused":
        fused_decode.use_fused_decode(lm.model, enable=False)
    engine = OffloadEngine(lm, store_for(lm), slots=slots, policy=policy, zero_copy=zero_copy).start()
    if mode == "modules":
        for v in lm.moe:
            delattr(v.experts, fused_decode.EXPERTS_PROVIDER)
    if warm:
        for v in lm.moe:
            engine.access(v.index, list(range(v.num_experts)), decode=False)
    return engine


def _state(engine: OffloadEngine) -> tuple:
    """The engine's counts and every layer's cache contents and recency order, once the copies of page-cache misses
    into their slots (in the background) have finished."""
    for _ in range(1000):
        with engine.lock:
            if not any(lc.loading for lc in engine.layers.values()):
                break
        time.sleep(0.01)
    s = engine.stats(belady=False)
    keys = ("requests", "hits", "misses", "decode_requests", "decode_hits", "decode_misses", "prefetch_issued")
    with engine.lock:
        layers = {i: (dict(lc.slot_of), list(lc.policy.recency), lc.forwards) for i, lc in engine.layers.items()}
    return {k: s.get(k) for k in keys}, layers


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "mixtral", "qwen2_moe", "glm4_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
@pytest.mark.parametrize("cached", ["all", "half"])
def test_offloaded_whole_layer_steps_equal_in_memory_and_the_per_module_path(checkpoints, arch, dtype, cache_kind,
                                                                              cached) -> None:
    """Every expert cached (warm): each MoE layer's decode step is one native call on the slot bank; bf16 logits are
    the in-memory fused model's bit for bit (the same kernels on the same weights; fp32: the offloaded prefill's
    experts sum in another order, 1e-7). Half of each layer's experts (cold, LRU): the hits run in the native call,
    the steps with a miss go to the engine (its reads, claims and evictions), logits within the fused ops' tolerance.
    Either way the engine counts the same hits and misses and ends with the same slots and recency as the per-module
    fused ops (and, fp32, the modules' own forwards: bf16 rounding there changes greedy tokens) on the same steps."""
    path = checkpoints[arch]
    memory = moekit.load(path, dtype=dtype, with_tokenizer=False).model
    _fast(memory)
    reference = decode_logits(memory, cache_kind, STEPS)
    num_experts = getattr(memory.config, "num_experts", None) or memory.config.n_routed_experts
    slots, warm = (num_experts, True) if cached == "all" else (num_experts // 2, False)
    states, logits = {}, {}
    # Half cached: misses read into their slots before the step goes on (no zero-copy misses). With zero-copy misses
    # the slot copy ends in the background, and whether it ends before or after the step's release decides an
    # expert's LRU position (LayerCache.finish inserts it as the most recent): the order then depends on the
    # machine's timing (seen for Qwen2-MoE on every run, for OLMoE under a busy test run), in every mode alike. A
    # run with zero-copy misses allowed ("fused-zero-copy", fp32: the checkpoint's dtype, which the engine can map)
    # is checked for its logits only.
    runs = [(mode, True) for mode in (MODES if dtype == torch.float32 else MODES[:2])]
    if cached == "half":
        runs = [(mode, False) for mode, _ in runs] + ([("fused-zero-copy", True)] if dtype == torch.float32 else [])
    for mode, zero_copy in runs:
        engine = _offloaded(path, dtype, slots, "lru", mode.removesuffix("-zero-copy"), warm, zero_copy)
        try:
            fused_decode.calls.clear()
            logits[mode] = decode_logits(engine.lm.model, cache_kind, STEPS)
            if mode == "fused-zero-copy":  # (Mixtral's checkpoint keeps w1 and w3 apart: nothing to map as gate;up)
                assert (engine.stats(belady=False)["zero_copy_misses"] > 0) == (arch != "mixtral")
                continue
            states[mode] = _state(engine)
            if mode == "fused":
                calls = fused_decode.calls.copy()
                moe_layers = len(engine.layers)
        finally:
            engine.stop()
    exact = cached == "all" and dtype == torch.bfloat16
    for mode, got in logits.items():
        torch.testing.assert_close(got, reference, rtol=0, atol=0 if exact and mode == "fused" else ATOL[dtype])
        assert mode not in states or states[mode] == states["fused"], mode
    counts, _ = states["fused"]
    assert counts["decode_requests"] > 0 and (counts["decode_misses"] > 0) == (cached == "half")
    assert calls["layer"] == STEPS * moe_layers  # every MoE layer's decode step in the native call (or two)
    assert calls["layer_slots"] + calls["layer_split"] == STEPS * moe_layers
    if cached == "all":
        assert calls["layer_split"] == 0
    else:  # a step with a miss goes to the engine; the others ran on the slots
        assert 0 < calls["layer_split"] < STEPS * moe_layers and calls["layer_slots"] > 0
    assert calls["experts"] == calls["router"] == 0


def test_prefetch_predictions_and_greedy_tokens_match_the_per_module_path(checkpoints) -> None:
    """lru+prefetch with every expert cached: the cross-layer predictions (made after the native step, from its MoE
    input) count the same as the per-module path's, and generate's greedy tokens are the in-memory model's."""
    path = checkpoints["olmoe"]
    memory = moekit.load(path, dtype=torch.bfloat16, with_tokenizer=False).model
    _fast(memory)
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = memory.generate(ids, max_new_tokens=10, do_sample=False, disable_compile=True)[0, 7:].tolist()
    got, pred = {}, {}
    for mode in MODES[:2]:
        engine = _offloaded(path, torch.bfloat16, memory.config.num_experts, "lru+prefetch", mode, True)
        try:
            fused_decode.calls.clear()
            with torch.no_grad():
                out = engine.lm.model.generate(ids, max_new_tokens=10, do_sample=False, disable_compile=True)
            got[mode] = out[0, 7:].tolist()
            c = engine.counters
            pred[mode] = (c.pred_hits, c.pred_requests, c.pred_total, _state(engine))
            if mode == "fused":
                layers = fused_decode.calls["layer_slots"]
        finally:
            engine.stop()
    assert got["fused"] == got["modules"] == ref
    assert pred["fused"] == pred["modules"] and pred["fused"][1] > 0
    assert layers == 9 * memory.config.num_hidden_layers  # 9 decode steps after the prefill


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """A tiny qwen3_moe (8 experts, top-2, expert inputs 128) quantized to int4 in groups of 128."""
    root = tmp_path_factory.mktemp("q4-fused")
    src = save_tiny_checkpoint("qwen3_moe", root / "src", with_tokenizer=False, hidden_size=128,
                               moe_intermediate_size=128)
    quantize(moekit.load(src, with_tokenizer=False), bits=4, group_size=128, out=root / "q4")
    return root / "q4"


@pytest.mark.parametrize("cached", ["all", "half"])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_packed_int4_slots_run_in_the_native_step(q4, cache_kind, cached) -> None:
    """Packed int4 slots: a step whose experts are all cached runs them with the int4 kernel on the slots inside the
    native call, the in-memory packed model's computation on the same codes (its logits bit for bit); a step with a
    miss stops after the router for the engine's int4 forward (logits within the fused ops' fp32 tolerance)."""
    memory = moekit.load(q4, with_tokenizer=False, packed_experts=True).model
    _fast(memory)
    reference = decode_logits(memory, cache_kind, STEPS)
    lm = load_offloaded(q4, with_tokenizer=False, packed_experts=True)
    _fast(lm.model)
    num_experts = lm.model.config.num_experts
    engine = OffloadEngine(lm, store_for(lm), slots=num_experts if cached == "all" else num_experts // 2).start()
    try:
        if cached == "all":
            for v in lm.moe:
                engine.access(v.index, list(range(v.num_experts)), decode=False)
        fused_decode.calls.clear()
        got = decode_logits(lm.model, cache_kind, STEPS)
        moe_layers = len(engine.layers)
        hit_rate = engine.stats(belady=False)["decode_hit_rate"]
    finally:
        engine.stop()
    assert fused_decode.calls["layer"] == fused_decode.calls["layer_slots"] + fused_decode.calls["layer_split"]
    assert fused_decode.calls["layer"] == STEPS * moe_layers
    if cached == "all":
        assert hit_rate == 1.0 and fused_decode.calls["layer_slots"] == STEPS * moe_layers
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
    else:
        assert hit_rate < 1.0 and fused_decode.calls["layer_split"] > 0 and fused_decode.calls["layer_slots"] > 0
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


def test_cli_generate_offloaded_runs_whole_layer_steps(tmp_path) -> None:
    """``moekit generate --offload --stats`` (its default cache: 2·k experts per layer, lru+prefetch; transformers'
    dynamic cache): every decode step of every layer is a whole-layer native step (the hits on the slots, the steps
    with a miss through the engine), and the tokens are the in-memory model's."""
    ckpt = save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    argv = ["generate", ckpt, "--prompt", "The river", "--max-tokens", "10", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    fused_decode.calls.clear()
    code, got, err = run_cli([*argv, "--offload", "--stats"])
    assert code == 0, err
    ref, got = json.loads(out), json.loads(got)
    assert got["token_ids"] == ref["token_ids"] and len(ref["token_ids"]) > 1
    steps = len(got["token_ids"]) - 1  # (the first token comes from the prefill)
    layers = moekit.load(ckpt, with_tokenizer=False).model.config.num_hidden_layers
    assert fused_decode.calls["layer"] == steps * layers
    assert fused_decode.calls["layer_slots"] + fused_decode.calls["layer_split"] == steps * layers
    assert got["offload"]["decode_requests"] > 0 and got["offload"]["decode_misses"] > 0
