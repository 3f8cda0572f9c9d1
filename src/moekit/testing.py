"""Small random MoE models of every supported architecture, and pytest fixtures for the bundled ones.

``tiny_model(arch)`` builds a transformers model from its config class with a few layers, a small
hidden size and random weights (seeded), so every code path can be tested in milliseconds.
"""

from __future__ import annotations

import torch

TINY_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
              "granitemoe", "phimoe", "glm4_moe", "dots1")

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, tie_word_embeddings=False)

_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, mlp_only_layers=[1], head_dim=8),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                        n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    sliding_window=64, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granitemoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "glm4_moe": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8),
    "dots1": dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8),
}


def tiny_config(arch: str, **overrides):
    """The config of a tiny random ``arch`` model (see ``TINY_ARCHS``); keyword overrides win."""
    from transformers import AutoConfig

    if arch not in _CONFIGS:
        raise ValueError(f"no tiny config for {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    kwargs = {**_COMMON, **_CONFIGS[arch], **overrides}
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random ``arch`` causal LM in eval mode; deterministic for a given seed.

    Router weights are drawn larger than the default init so that routing is decisive (random
    routers with near-zero logits make every top-k tie-prone and tests meaningless).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or name.endswith(("gate.weight", "router.weight")) or "expert" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * (0.5 if p.dim() < 3 else 0.1))
            elif name.endswith(("router.bias", "_bias")):
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


def tiny_lm(arch: str, seed: int = 0, **overrides):
    """``tiny_model`` wrapped as a moekit ``LoadedModel`` (no tokenizer)."""
    from moekit.models import from_model

    return from_model(tiny_model(arch, seed=seed, **overrides), name=f"tiny-{arch}")


def random_batch(vocab: int = 128, batch: int = 2, seq: int = 12, seed: int = 0, pad_last: int = 0) -> dict:
    """input_ids and attention_mask; the last row gets ``pad_last`` left-padding positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, :pad_last] = 0
    return {"input_ids": ids, "attention_mask": mask}


def save_tiny_checkpoint(arch: str, path, seed: int = 0, with_tokenizer: bool = True, **overrides):
    """Write a tiny random ``arch`` model as a normal HF checkpoint directory (with the bundled
    tokenizer, so text commands work on it); returns the path."""
    from pathlib import Path

    path = Path(path)
    if with_tokenizer:
        from moekit.data import load_tokenizer

        tok = load_tokenizer()
        overrides.setdefault("vocab_size", len(tok))
    model = tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return path


try:  # pytest fixtures for the bundled trained models, loaded once per test session
    import pytest as _pytest
except ImportError:  # pragma: no cover - moekit.testing without pytest
    _pytest = None

if _pytest is not None:

    @_pytest.fixture(scope="session")
    def bundled_tiny():
        """``moekit.load("moekit:tiny")``, once per test session."""
        import moekit

        return moekit.load("moekit:tiny")

    @_pytest.fixture(scope="session")
    def bundled_tiny_shared():
        """``moekit.load("moekit:tiny-shared")``, once per test session."""
        import moekit

        return moekit.load("moekit:tiny-shared")
