"""Sparse upcycling: exactness at init, standard checkpoints, CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moekit
from moekit.cli import main
from moekit.errors import MoekitError
from moekit.train.upcycle import SUPPORT, plan, upcycle

DENSE_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def dense_config(arch: str, **overrides):
    extra: dict = {"head_dim": 8} if arch != "qwen2" else {}
    if arch == "mistral":
        extra["sliding_window"] = None
    return AutoConfig.for_model(arch, **{**_COMMON, **extra, **overrides})


def dense_model(arch: str, seed: int = 0, **overrides):
    """A tiny random dense model whose weights are large enough for logits of order 1."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(dense_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, _COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=DENSE_ARCHS)
def dense(request):
    return request.param, dense_model(request.param)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("n,k", [(4, 1), (4, 2), (8, 3), (4, 4)])
def test_copy_upcycling_is_exact_for_any_k(dense, ids, n, k):
    arch, model = dense
    moe = upcycle(model, n, k, seed=3)
    assert moe.config.model_type == SUPPORT[arch][0]
    assert _max_diff(moe, model, ids) < 1e-5


@pytest.mark.parametrize("n,m,s", [(2, 4, 0), (3, 2, 0), (2, 4, 1), (3, 3, 2), (2, 2, 1)])
def test_fine_grained_all_active_zero_router_is_exact(dense, ids, n, m, s):
    arch, model = dense
    moe = upcycle(model, n, n, granularity=m, shared=s, router="zero")
    assert moe.config.model_type == SUPPORT[arch][1 if s else 0]
    p = plan(model.config, n, n, m, s)
    assert p.routed_experts == n * (m - s) and p.routed_top_k == p.routed_experts
    assert _max_diff(moe, model, ids) < 1e-5


def test_one_routed_slice_is_exact_for_any_router_and_k(dense, ids):
    _, model = dense
    moe = upcycle(model, 6, 2, granularity=2, shared=1, seed=5)  # routed experts are copies of one slice
    assert _max_diff(moe, model, ids) < 1e-5


def test_fine_grained_partial_selection_is_not_exact(dense, ids):
    """Negative control: the tests above would see a difference if there were one."""
    _, model = dense
    moe = upcycle(model, 4, 1, granularity=4, router="random", router_std=1.0)
    assert _max_diff(moe, model, ids) > 1e-3


def test_expert_count_and_router_init():
    model = dense_model("qwen3")
    moe = upcycle(model, 8, 2, granularity=2, seed=0)
    block = moe.model.layers[0].mlp
    assert block.experts.gate_up_proj.shape == (16, 2 * 24, 32)
    assert moe.config.num_experts_per_tok == 4
    std = block.gate.weight.std().item()
    assert 0.01 < std < 0.04
    assert torch.equal(upcycle(model, 8, 2, granularity=2, seed=0).model.layers[0].mlp.gate.weight, block.gate.weight)
    assert not upcycle(model, 8, 2, router="zero").model.layers[1].mlp.gate.weight.any()


@pytest.mark.parametrize("arch,shared", [("llama", 0), ("llama", 1), ("qwen2", 0), ("qwen2", 1), ("qwen3", 0),
                                         ("qwen3", 1), ("mistral", 0)])
def test_checkpoint_loads_with_transformers_and_moekit(tmp_path, ids, arch, shared):
    model = dense_model(arch)
    src = tmp_path / "dense"
    model.save_pretrained(src)
    out = tmp_path / "moe"
    args = ["upcycle", str(src), "--experts", "4", "--top-k", "2", "--out", str(out)]
    if shared:
        args += ["--granularity", "2", "--shared", "1"]
    assert main(args) == 0
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.model_type == SUPPORT[arch][1 if shared else 0]
    assert _max_diff(plain, model, ids) < 1e-5
    lm = moekit.load(out)
    assert len(lm.moe) == 2 and lm.moe.layers[0].num_experts == 4 * (2 - shared if shared else 1)
    assert _max_diff(lm.model, model, ids) < 1e-5


def test_cli_json_and_force(tmp_path, capsys):
    src = tmp_path / "dense"
    dense_model("qwen3").save_pretrained(src)
    out = tmp_path / "moe"
    base = ["upcycle", str(src), "-n", "4", "-k", "4", "-m", "2", "--router", "zero", "--out", str(out)]
    assert main([*base, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target"] == "qwen3_moe" and info["routed_experts"] == 8 and info["exact_with_zero_router"]
    assert main(base) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main([*base, "--force"]) == 0


@pytest.mark.parametrize("args,message", [
    (["-n", "2", "-k", "4"], "larger than --experts"),
    (["-n", "4", "-k", "2", "-m", "5"], "does not divide the FFN width 48"),
    (["-n", "4", "-k", "2", "-m", "2", "-s", "2"], "must be smaller than --granularity"),
    (["-n", "0", "-k", "0"], ">= 1"),
    (["-n", "4", "-k", "2", "--router", "uniform"], "unknown router init"),
])
def test_cli_bad_arguments(tmp_path, capsys, args, message):
    src = tmp_path / "dense"
    dense_model("llama").save_pretrained(src)
    assert main(["upcycle", str(src), *args, "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("arch,overrides", [("gpt2", {}), ("qwen3_moe", {}), ("phi3", {})])
def test_cli_unsupported_architecture(tmp_path, capsys, arch, overrides):
    src = tmp_path / arch
    if arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=96, n_positions=64)
    elif arch == "phi3":
        cfg = AutoConfig.for_model("phi3", **{**_COMMON, "pad_token_id": 0})
    else:
        cfg = AutoConfig.for_model("qwen3_moe", **_COMMON, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16)
    cfg.save_pretrained(src)  # the config alone: the check happens before any weight is read
    assert main(["upcycle", str(src), "-n", "4", "-k", "2", "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err
    assert "cannot upcycle" in err and "supported: llama, mistral, qwen2, qwen3" in err
    if arch == "qwen3_moe":
        assert "already a Mixture-of-Experts" in err


@pytest.mark.parametrize("arch,overrides,message", [
    ("llama", {"mlp_bias": True}, "FFN biases"),
    ("llama", {"attention_bias": True}, "attention biases"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
])
def test_plan_refuses_inexact_sources(arch, overrides, message):
    with pytest.raises(MoekitError, match=message):
        plan(dense_config(arch, **overrides), 4, 2)


def test_sliding_window_mistral_with_shared_is_refused_but_mixtral_keeps_it(ids):
    cfg = dense_config("mistral", sliding_window=8)
    with pytest.raises(MoekitError, match="glm4_moe has full attention only"):
        plan(cfg, 4, 2, granularity=2, shared=1)
    model = dense_model("mistral", sliding_window=8)
    moe = upcycle(model, 4, 2)
    assert moe.config.sliding_window == 8
    assert _max_diff(moe, model, ids) < 1e-5  # 12 tokens > window: the mask is the same


def test_tied_embeddings_and_bf16(ids):
    model = dense_model("qwen3", tie_word_embeddings=True)
    moe = upcycle(model, 4, 2)
    assert moe.config.tie_word_embeddings and moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    assert _max_diff(moe, model, ids) < 1e-5
    half = upcycle(model.to(torch.bfloat16), 4, 2)
    assert next(half.parameters()).dtype == torch.bfloat16
