"""Weight-only expert quantization: error bounds, int4 packing, mixed precision, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.compress import observe_batches
from moekit.compress.quantize import (
    QUANT_CONFIG,
    allocate_bits,
    average_bits,
    expert_params,
    pack_int4,
    quantize,
    quantize_matrix,
    unpack_int4,
)
from moekit.testing import random_batch, save_tiny_checkpoint, tiny_lm


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [64, 128])
def test_round_trip_error_is_at_most_half_a_step_per_group(bits, group_size):
    gen = torch.Generator().manual_seed(bits + group_size)
    w = torch.randn(24, 200, generator=gen) * torch.linspace(0.01, 3, 200)  # 200: a padded last group
    w[3, :64] += 5.0  # a skewed group
    qt = quantize_matrix(w, bits, group_size)
    err = (qt.dequantize() - w).abs()
    n_groups = -(-200 // group_size)
    assert qt.scales.shape == (24, n_groups) and qt.scales.dtype == torch.float16
    step = qt.scales.float().repeat_interleave(group_size, dim=1)[:, :200]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert qt.qweight.shape == (24, 200 // (2 if bits == 4 else 1))  # a short last group is not padded on disk


def test_int4_packing_round_trip_is_exact():
    q = torch.arange(16, dtype=torch.uint8).repeat(3, 4)
    p = pack_int4(q)
    assert p.shape == (3, 32) and p.dtype == torch.uint8
    assert p[0, 0].item() == 0 | (1 << 4) and p[0, 7].item() == 14 | (15 << 4)
    assert torch.equal(unpack_int4(p), q)


def test_int8_and_int4_error_ordering():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    e8 = (quantize_matrix(w, 8, 64).dequantize() - w).pow(2).mean()
    e4 = (quantize_matrix(w, 4, 64).dequantize() - w).pow(2).mean()
    assert e8 < e4 / 100


def test_mixed_precision_meets_the_budget_and_prefers_important_experts():
    params = {(1, e): 100 for e in range(8)}
    imp = {(1, e): float(e) for e in range(8)}
    bits = allocate_bits(imp, params, 5.0)
    assert average_bits(bits, params) == 5.0
    assert [bits[(1, e)] for e in range(8)] == [4, 4, 4, 4, 4, 4, 8, 8]
    bits = allocate_bits(imp, params, 4.9)
    assert average_bits(bits, params) <= 4.9 and sum(b == 8 for b in bits.values()) == 1


def test_mixed_precision_on_a_model_meets_the_budget():
    lm = tiny_lm("qwen2_moe")
    stats = observe_batches(lm, [random_batch(seed=s) for s in range(2)])
    res = quantize(lm, group_size=32, avg_bits=6.0, calib=stats)
    params = expert_params(lm)
    assert average_bits(res.bits, params) <= 6.0
    assert sum(b == 8 for b in res.bits.values()) == len(params) // 2


@pytest.mark.parametrize("arch,bits,tol", [("qwen3_moe", 8, 0.02), ("gpt_oss", 8, 0.02), ("qwen3_moe", 4, 0.5)])
def test_quantized_checkpoint_loads_via_moekit_load(arch, bits, tol, tmp_path):
    src = save_tiny_checkpoint(arch, tmp_path / "src", with_tokenizer=False)
    lm = moekit.load(src, with_tokenizer=False)
    out = tmp_path / "q"
    res = quantize(lm, bits=bits, group_size=32, out=out)
    meta = json.loads((out / QUANT_CONFIG).read_text())
    assert meta["scheme"] == "asymmetric" and meta["average_bits"] == bits
    qlm = moekit.load(out, with_tokenizer=False)
    b = random_batch(seed=1)
    with torch.no_grad():
        ref, got = lm.model(**b).logits, qlm.model(**b).logits
    err = (ref - got).abs().max().item()
    assert 0 < err < tol
    # experts are exactly the dequantized codes; everything else is bit-identical
    for name, p in qlm.model.named_parameters():
        if name in res.packed:
            continue
        assert torch.equal(p, dict(lm.model.named_parameters())[name]), name
    from moekit.models.quantized import load_quantized

    packed = load_quantized(out, keep_packed=True)._moekit_packed
    assert set(packed) == set(res.packed)
    assert all(torch.equal(a.qweight, b.qweight) for k in packed for a, b in zip(packed[k], res.packed[k], strict=True))


def test_int4_checkpoint_is_smaller_than_int8(tmp_path):
    from moekit.compress.quantize import size_on_disk

    lm = tiny_lm("olmoe")
    quantize(lm, bits=8, group_size=32, out=tmp_path / "q8")
    quantize(lm, bits=4, group_size=32, out=tmp_path / "q4")
    assert size_on_disk(tmp_path / "q4") < size_on_disk(tmp_path / "q8")


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    src = save_tiny_checkpoint("qwen3_moe", tmp_path / "src", with_tokenizer=False, tie_word_embeddings=True)
    lm = moekit.load(src, with_tokenizer=False)
    quantize(lm, bits=8, group_size=32, out=tmp_path / "q")
    meta = json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    q = moekit.load(tmp_path / "q", with_tokenizer=False).model
    assert torch.equal(q.lm_head.weight, lm.model.lm_head.weight)
    assert q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()
