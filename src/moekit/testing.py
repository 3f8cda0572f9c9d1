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


# ---- every MoE architecture of the installed transformers ------------------------------------------
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                     "n_experts", "moe_num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k", "top_k_experts",
              "num_selected_experts")
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layers")

# generic shrink: every key the config class has gets the small value (derived from hidden size 32)
_SHRINK = dict(
    vocab_size=128, unpadded_vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, kv_channels=8,
    intermediate_size=48, intermediate_size_mlp=48, ffn_hidden_size=48, dense_intermediate_size=48,
    moe_intermediate_size=16, expert_ffn_hidden_size=16, shared_expert_intermediate_size=24,
    shared_intermediate_size=24, moe_shared_expert_intermediate_size=24, router_hidden_size=16,
    max_position_embeddings=256, model_max_length=256, tie_word_embeddings=False,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=8, linear_num_heads=4, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_dt_rank=8,
    mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, mamba_chunk_size=16, chunk_size=16, n_groups=1,
    mamba_n_groups=1, sliding_window=64, attention_chunk_size=64, index_n_heads=2, index_head_dim=8,
    index_topk=8, first_k_dense_replace=1, num_dense_layers=1, n_group=4, num_expert_group=4, topk_group=2,
    num_nextn_predict_layers=0, zero_expert_num=2, layer_group_size=2,
)


def _expert_key(config) -> str | None:
    """The attribute through which ``config`` declares its number of routed experts, or None."""
    names = set(config.to_dict())
    return next((k for k in EXPERT_COUNT_KEYS if k in names), None)


def _declares_experts(config) -> bool:
    if _expert_key(config) is not None:
        return True
    return any(hasattr(v, "to_dict") and _expert_key(v) is not None for v in vars(config).values()
               if not isinstance(v, type))


def moe_architectures() -> list[str]:
    """Every model type of the installed transformers that is an MoE language model: causal-LM config
    classes that declare an expert count, and the text configs of vision-language MoE models. A new MoE
    architecture in a future transformers shows up here by itself."""
    import warnings

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in CONFIG_MAPPING_NAMES:
            try:
                config = CONFIG_MAPPING[model_type]()
            except Exception:  # noqa: BLE001  (configs that need arguments are not language models)
                continue
            text = getattr(config, "text_config", None) if "text_config" in config.to_dict() else None
            if text is not None and hasattr(text, "model_type") and _declares_experts(text):
                found.add(text.model_type)  # a multimodal model: its text tower is the MoE language model
            elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _declares_experts(config):
                found.add(model_type)
    return sorted(found)


def has_causal_lm(arch: str) -> bool:
    """Whether transformers has a causal-LM class for ``arch`` (text towers of multimodal models do not:
    ``tiny_model`` builds their base text model, whose output is the last hidden state)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _text_model_class(config) -> type:
    """The text model class of a multimodal model's text config that no auto mapping lists."""
    import importlib

    package = type(config).__module__.rsplit(".", 1)[0]
    module = importlib.import_module(f"{package}.modeling_{package.rsplit('.', 1)[1]}")
    names = [n for n, c in vars(module).items() if isinstance(c, type) and getattr(c, "config_class", None)
             is type(config) and n.endswith("Model") and not n.endswith("PreTrainedModel")]
    if not names:
        raise ValueError(f"no text model class for {config.model_type} in {module.__name__}")
    return getattr(module, sorted(names, key=len)[0])


def _pattern(values: list, n: int) -> list:
    """``n`` entries of a per-layer list that keep every distinct kind it has (first occurrences first)."""
    firsts = sorted({v: i for i, v in reversed(list(enumerate(values)))}.values())
    picks = firsts + [i for i in range(len(values)) if i not in firsts]
    return [values[i] for i in sorted(picks[:max(n, len(firsts))])]


def tiny_config(arch: str, **overrides):
    """The config of a tiny random ``arch`` model; keyword overrides win.

    The hand-tuned architectures of ``TINY_ARCHS`` keep their configs; every other MoE architecture of
    ``moe_architectures()`` is shrunk generically (small widths, 8 experts, top-2, a few layers keeping
    every layer kind of hybrid patterns) plus the per-family entries of ``FAMILY_OVERRIDES``.
    """
    from transformers import AutoConfig

    if arch in _CONFIGS:
        return AutoConfig.for_model(arch, **{**_COMMON, **_CONFIGS[arch], **overrides})
    return _generic_tiny_config(arch, overrides)


def _generic_tiny_config(arch: str, overrides: dict):
    import warnings

    from transformers import CONFIG_MAPPING

    if arch not in CONFIG_MAPPING:
        raise ValueError(f"no tiny config for {arch!r}: not a model type of the installed transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = CONFIG_MAPPING[arch]()
    d = default.to_dict()
    family = FAMILY_OVERRIDES.get(arch, {})
    kwargs = {k: v for k, v in _SHRINK.items() if k in d}
    for k in EXPERT_COUNT_KEYS:
        if k in d:
            kwargs[k] = 8
    for k in TOP_K_KEYS:
        if k in d and (d[k] is None or isinstance(d[k], int)):
            kwargs[k] = 2
    n_layers = family.get("layers", 4)
    old_n = next((d[k] for k in LAYER_COUNT_KEYS if isinstance(d.get(k), int)), None)
    for k in LAYER_COUNT_KEYS:
        if isinstance(d.get(k), int):
            kwargs[k] = n_layers
    for k, v in d.items():  # per-layer patterns (attention kind, dense/sparse MLP): keep every kind
        if isinstance(v, list) and old_n and len(v) == old_n and k not in family and k != "moe_layers":
            kwargs[k] = _pattern(v, n_layers)
    if "kv_lora_rank" in d:  # multi-head latent attention: as many key/value heads as query heads
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)
    for k, small in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if isinstance(d.get(k), int) and d[k] >= _SHRINK["vocab_size"]:
            kwargs[k] = small
    kwargs.update({k: v for k, v in family.items() if k != "layers"})
    kwargs.update(overrides)
    if any(k in kwargs and isinstance(kwargs[k], list) for k in ("layer_types", "layers_block_type")):
        for k in LAYER_COUNT_KEYS:
            pattern = kwargs.get("layer_types", kwargs.get("layers_block_type"))
            if k in kwargs and k not in overrides and k not in family:
                kwargs[k] = len(pattern)
    return type(default)(**kwargs)


# Per-family entries on top of the generic shrink (only what the generic rule cannot derive).
FAMILY_OVERRIDES: dict[str, dict] = {
    "dbrx": dict(d_model=32, n_heads=4, n_layers=3, max_seq_len=256, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
    "doge": dict(is_moe=True, num_experts=16, num_experts_per_tok=2),  # experts are a product-key bank
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16,
                        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128),
    "diffusion_gemma_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=16),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),
    "jamba": dict(attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "nemotron_h": dict(layers_block_type=["mamba", "moe", "attention", "moe"], n_group=1, topk_group=1),
    "ernie4_5_vl_moe_text": dict(moe_intermediate_size=[16, 16], rope_parameters=dict(
        rope_theta=500000.0, rope_type="default", mrope_section=[1, 1, 2])),
    "glm4v_moe_text": dict(rope_parameters=dict(rope_theta=10000.0, partial_rotary_factor=0.5, rope_type="default",
                                                mrope_section=[1, 1, 0])),
    "hy_v4_vl_text": dict(rope_parameters=dict(rope_theta=10000.0, rope_type="default", mrope_section=[2, 1, 1])),
    "deepseek_ocr2_text": dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "glm5_next_text": dict(index_topk=16, qk_rope_head_dim=0),
    "mistral_large4_text": dict(kv_source_layers=[0, 1, 2, 3]),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16,
                           indexer_compress_ratio=4),
    "zaya": dict(num_experts_per_tok=1),
    "llama4_text": dict(num_experts_per_tok=1),  # Llama 4 routes top-1
    "afmoe": dict(route_scale=2.0),
}


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random ``arch`` causal LM in eval mode; deterministic for a given seed.

    Router weights are drawn larger than the default init so that routing is decisive (random
    routers with near-zero logits make every top-k tie-prone and tests meaningless).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if has_causal_lm(arch):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:  # a multimodal model's text tower
        try:
            model = AutoModel.from_config(config, dtype=dtype)
        except ValueError:
            model = _text_model_class(config)._from_config(config, dtype=dtype)
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


def decode_logits(model, cache_kind: str = "static", steps: int = 5, prompt_len: int = 7, seed: int = 0,
                  max_cache_len: int = 32, tokens: list[int] | None = None) -> torch.Tensor:
    """Logits [steps, vocab] of ``steps`` greedy one-token steps after a random ``prompt_len``-token prompt, with a
    transformers ``StaticCache`` or ``DynamicCache`` (``cache_kind``): the decode path of a model, for comparing
    implementations step by step. ``tokens``: feed these instead of the greedy ones (one step each), so that two
    implementations whose argmax differs somewhere still see the same inputs."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(3, 100, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    cache = (StaticCache(config=model.config, max_cache_len=max_cache_len) if cache_kind == "static"
             else DynamicCache(config=model.config))
    out = []
    with torch.no_grad():
        o = model(ids, cache=cache, use_cache=True)
        for i in range(len(tokens) if tokens is not None else steps):
            nxt = torch.tensor([[tokens[i]]]) if tokens is not None else o.logits[:, -1:].argmax(-1)
            o = model(nxt, cache=cache, use_cache=True)
            out.append(o.logits[0, -1].float())
    return torch.stack(out)


def greedy_tokens(model, ids: torch.Tensor, new_tokens: int, cache_kind: str = "static") -> list[int]:
    """The ``new_tokens`` greedy tokens transformers' ``generate`` gives after ``ids`` (one sequence), with a static
    cache (``cache_kind="static"``, as bench_decode) or its default dynamic cache (as ``moekit generate``'s loop):
    for comparing decode implementations token for token."""
    kwargs = {"cache_implementation": "static"} if cache_kind == "static" else {}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, disable_compile=True, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def save_tiny_checkpoint(arch: str, path, seed: int = 0, with_tokenizer: bool = True, **overrides):
    """Write a tiny random ``arch`` model as a normal HF checkpoint directory (with the bundled
    tokenizer, so text commands work on it); returns the path."""
    from pathlib import Path

    path = Path(path)
    if with_tokenizer:
        from moekit.data import load_tokenizer

        tok = load_tokenizer()
        overrides.setdefault("vocab_size", len(tok))
    from moekit.formats.writer import write_checkpoint

    return write_checkpoint(path, model=tiny_model(arch, seed=seed, **overrides), tokenizer=tok if with_tokenizer else None)


try:  # pytest fixtures for the bundled trained models, loaded once per test session
    import pytest as _pytest
except ImportError:  # pragma: no cover - moekit.testing without pytest
    _pytest = None

if _pytest is not None:

    @_pytest.fixture(scope="session")
    def bundled_tiny():
        """``moekit.load("moekit:tiny")``, once per test session."""
        from moekit.serve.placement import load

        return load("moekit:tiny")

    @_pytest.fixture(scope="session")
    def bundled_tiny_shared():
        """``moekit.load("moekit:tiny-shared")``, once per test session."""
        from moekit.serve.placement import load

        return load("moekit:tiny-shared")
