"""Offloaded int4 experts kept packed in the expert cache (``load_offloaded(..., packed_experts=True)``): the slots
hold codes, fp16 group scales and zero points, a budget holds ~3.8x the experts of float slots, and decode and prefill
run moekit's int4 experts on the slot bank: with every expert cached, the same numbers as the in-memory packed model."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from cli_helpers import one_error, run_cli
from moekit.compress.quantize import quantize
from moekit.errors import MoekitError
from moekit.formats.quantized import INT4_BUFFERS
from moekit.serve.engine import OffloadEngine
from moekit.serve.store import load_offloaded, store_for
from moekit.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """A tiny qwen3_moe (8 experts, top-2, expert inputs 128) quantized to int4 in groups of 128."""
    root = tmp_path_factory.mktemp("q4")
    src = save_tiny_checkpoint("qwen3_moe", root / "src", hidden_size=128, moe_intermediate_size=128)
    quantize(moekit.load(src), bits=4, group_size=128, out=root / "q4")
    return root / "q4"


def _engine(path, slots: int, packed: bool = True, warm: bool = False) -> OffloadEngine:
    lm = load_offloaded(path, with_tokenizer=False, packed_experts=packed)
    lm.model.set_experts_implementation("moekit")
    engine = OffloadEngine(lm, store_for(lm), slots=slots).start()
    if warm:
        for v in lm.moe:
            engine.access(v.index, list(range(v.num_experts)), decode=False)
    return engine


def test_packed_slots_hold_codes_and_decode_equals_the_in_memory_packed_model(q4) -> None:
    """Warm cache: every slot bank tensor is the packed layout (uint8 codes [out, in/2], fp16 scales, uint8 zeros),
    an expert costs 0.5 + 3/128 bytes per weight in the budget, and a one-token forward (the decode path) gives the
    in-memory packed model's logits bit for bit (the same int4 kernel on the same codes)."""
    memory = moekit.load(q4, with_tokenizer=False, packed_experts=True).model
    engine = _engine(q4, slots=8, warm=True)
    try:
        lc = next(iter(engine.layers.values()))
        assert sorted(lc.bank) == sorted(INT4_BUFFERS)
        mod = next(m for m in memory.modules() if hasattr(m, INT4_BUFFERS[0]))
        for name in INT4_BUFFERS:
            assert lc.bank[name].dtype == getattr(mod, name).dtype and lc.bank[name].shape == getattr(mod, name).shape
        weights = sum(2 * lc.bank[n][0].numel() for n in (INT4_BUFFERS[0], INT4_BUFFERS[3]))  # two codes a byte
        packed_bytes = sum(t[0].numel() * t.element_size() for t in lc.bank.values())
        assert engine.store.expert_bytes[lc.layer] == packed_bytes
        itemsize = engine.lm.model.dtype.itemsize
        assert weights * itemsize / packed_bytes == pytest.approx(itemsize / (0.5 + 3 / 128))
        ids = torch.tensor([[5]])
        for token in range(3, 40, 6):
            ids[0, 0] = token
            with torch.no_grad():
                assert torch.equal(engine.lm.model(ids).logits, memory(ids).logits)
        assert engine.stats(belady=False)["decode_hit_rate"] == 1.0
    finally:
        engine.stop()


def test_packed_slots_prefill_equals_the_in_memory_packed_model_and_misses_stay_close(q4) -> None:
    """A prefill on packed slots runs the in-memory packed model's int4 experts (the kernel for small expert groups,
    no dequantized copy of the bank): with room for every expert, the same logits bit for bit. A 1-slot cache
    (top-2: every step has a part on the slot bank and experts read into scratch) decodes the same greedy tokens,
    its logits within fp32 summation of the parts."""
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    memory = moekit.load(q4, with_tokenizer=False, packed_experts=True).model
    full = _engine(q4, slots=8)
    try:
        with torch.no_grad():
            assert torch.equal(full.lm.model(ids).logits, memory(ids).logits)
    finally:
        full.stop()
    small = _engine(q4, slots=1)
    try:
        common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            got = small.lm.model.generate(ids, **common, output_logits=True, return_dict_in_generate=True)
            ref = memory.generate(ids, **common, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(got.sequences, ref.sequences)
        for a, b in zip(got.logits, ref.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        st = small.stats(belady=False)
        assert st["decode_hit_rate"] < 1.0 and st["bytes_read"] > 0
    finally:
        small.stop()


def test_packed_experts_offloaded_need_an_int4_checkpoint(q4, tmp_path) -> None:
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False)
    with pytest.raises(MoekitError, match="packed experts need a moekit quantized checkpoint"):
        load_offloaded(src, with_tokenizer=False, packed_experts=True)
    quantize(moekit.load(src, with_tokenizer=False), bits=8, group_size=32, out=tmp_path / "q8")
    with pytest.raises(MoekitError, match="no experts can stay packed"):
        load_offloaded(tmp_path / "q8", with_tokenizer=False, packed_experts=True)


def test_cli_generate_offloaded_with_packed_experts(q4) -> None:
    """`moekit generate Q4 --packed-experts --offload`: the greedy tokens of the in-memory packed run, with the cache's
    statistics; --rewire stays refused."""
    args = ["generate", q4, "--prompt", "The river", "--max-tokens", "6", "--json", "--packed-experts"]
    code, out, err = run_cli(args)
    assert code == 0, err
    code2, out2, err2 = run_cli([*args, "--offload", "--cache-mb", "1", "--stats"])
    assert code2 == 0, err2
    code3, out3, err3 = run_cli([a for a in args if a != "--packed-experts"] + ["--offload", "--cache-mb", "1", "--stats"])
    assert code3 == 0, err3
    memory, offloaded, dequantized = json.loads(out), json.loads(out2), json.loads(out3)
    assert len(memory["token_ids"]) == 6 and offloaded["token_ids"] == memory["token_ids"]
    # a packed slot holds 0.5 + 3/128 bytes per weight against 4 (fp32) in a dequantized one: 7.6x the slots in 1 MB
    ratio = dequantized["offload"]["expert_bytes"] / offloaded["offload"]["expert_bytes"]
    assert ratio == pytest.approx(4 / (0.5 + 3 / 128))
    assert offloaded["offload"]["slots_per_layer"] > dequantized["offload"]["slots_per_layer"]
    one_error(*run_cli([*args, "--rewire"])[::2], "--rewire")


def test_budget_plan_sizes_packed_experts_as_packed(q4) -> None:
    """``max_memory`` with ``packed_experts`` sizes the int4 banks by their packed bytes (the header's codes, scales and
    zero points), not by their float weights: a budget between the two totals keeps the packed model resident (no
    engine), with the in-memory packed model's logits, while the float plan offloads."""
    from moekit.formats.quantized import QUANT_WEIGHTS
    from moekit.formats.safetensors import read_header
    from moekit.models.loading import load_structure
    from moekit.serve.placement import ACTIVATION_SHARE, RESERVE, _packed_banks, plan_budget

    meta = load_structure(q4)
    packed = _packed_banks(q4)
    header = read_header(q4 / QUANT_WEIGHTS)[0]
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
                 if k.rpartition(".")[2] in ("qweight", "scales", "zeros"))
    assert sum(packed.values()) == stored and len(packed) == 2 * len(meta.moe)
    float_plan, packed_plan = plan_budget(meta, 10**12), plan_budget(meta, 10**12, packed)
    assert packed_plan["resident"] == float_plan["resident"]
    assert packed_plan["experts"] == stored < float_plan["experts"] / 3
    view = next(iter(meta.moe))
    E, k = view.num_experts, view.top_k
    assert packed_plan["min_cache_bytes"] == stored // E * k  # k slots in every layer
    usable = (packed_plan["total"] + float_plan["total"]) // 2
    budget = int((usable + RESERVE) / (1 - ACTIVATION_SHARE)) + 1
    assert not plan_budget(meta, budget)["resident_all"] and plan_budget(meta, budget, packed)["resident_all"]
    lm = moekit.load(q4, with_tokenizer=False, packed_experts=True, max_memory=budget)
    assert getattr(lm, "engine", None) is None and any(hasattr(m, INT4_BUFFERS[0]) for m in lm.model.modules())
    ref = moekit.load(q4, with_tokenizer=False, packed_experts=True).model
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)
