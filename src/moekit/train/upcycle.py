"""Sparse upcycling: turn a dense decoder LM into a standard Hugging Face MoE checkpoint.

Every dense FFN ``f(x) = down(act(gate(x)) * up(x))`` of width ``I`` is cut along its hidden
dimension into ``m`` slices of width ``I/m`` (``granularity``; ``m = 1`` is plain copy-upcycling).
The slices of one FFN sum exactly to ``f``. ``S`` of them (``shared``) become always-on shared
experts (DeepSeekMoE), the other ``m - S`` are copied ``N`` times (``num_experts``) into
``R = N (m - S)`` routed experts, of which ``k (m - S)`` are active per token (``top_k`` counts
FFN copies, so active width = ``(k (m - S) + S) I / m``). A new router is drawn with std 0.02
(or zero). Routed experts' ``down_proj`` is multiplied by ``m - S``:

* with every routed expert active and a zero router, each of the ``R`` experts gets weight ``1/R``
  after top-k renormalisation, so the routed part is ``(m - S) / R * N * sum(routed slices) =
  sum(routed slices)``; plus the shared slices, that is ``f`` exactly;
* when ``m - S == 1`` (copy-upcycling, or all but one slice shared) every routed expert is the same
  function and the renormalised weights sum to 1, so the output is ``f`` for any ``k`` and any router;
* otherwise a uniformly random selection reproduces ``f`` in expectation.

Targets (the attention weights copy exactly; see ``SUPPORT`` and docs/upcycling.md):

================  =====================  ==============================================
source            ``shared = 0``         ``shared > 0``
================  =====================  ==============================================
llama, mistral    mixtral                glm4_moe (no q/k norm, full rotary, sigmoid router)
qwen2             qwen2_moe (no shared)  qwen2_moe (gate 0 → sigmoid 1/2, down_proj × 2)
qwen3             qwen3_moe              dots1 (qwen3 attention + DeepSeek-V3 MoE)
================  =====================  ==============================================
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.formats.writer import write_checkpoint
from moekit.io import check_writable

SOURCES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORT: dict[str, tuple[str, str]] = {  # source -> (target without shared experts, target with shared experts)
    "llama": ("mixtral", "glm4_moe"),
    "mistral": ("mixtral", "glm4_moe"),
    "qwen2": ("qwen2_moe", "qwen2_moe"),
    "qwen3": ("qwen3_moe", "dots1"),
}
ROUTER_INITS = ("random", "zero")
_COPIED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "attention_dropout",
           "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


@dataclass(frozen=True)
class UpcyclePlan:
    """What an upcycling run will build; ``plan`` validates the request and fills it in."""

    source: str
    target: str
    num_experts: int  # N: copies of the FFN
    top_k: int  # k: copies' worth of routed experts active per token
    granularity: int  # m: slices per FFN
    shared: int  # S: slices kept as always-on shared experts
    dense_width: int  # I
    expert_width: int  # I / m
    routed_experts: int  # R = N (m - S)
    routed_top_k: int  # k (m - S)
    scale: float  # factor applied to each routed expert's down_proj (m - S)

    @property
    def exact_for_any_router(self) -> bool:
        """True when the init reproduces the dense logits whatever the router (copies of one function)."""
        return self.granularity - self.shared == 1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact_for_any_router": self.exact_for_any_router,
                "exact_with_zero_router": self.exact_for_any_router or self.routed_top_k == self.routed_experts}


def _get(config, name: str, default=None):
    return getattr(config, name, default)


def plan(config, num_experts: int, top_k: int, granularity: int = 1, shared: int = 0) -> UpcyclePlan:
    """Validate an upcycling request against a dense ``config``; raises ``MoekitError`` (one line)."""
    mt = _get(config, "model_type", type(config).__name__)
    if mt not in SUPPORT:
        kind = "is already a Mixture-of-Experts model" if any(
            _get(config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts")
        ) else "is not a supported dense architecture"
        raise MoekitError(f"cannot upcycle a {mt} checkpoint: {mt} {kind}; supported: {', '.join(SOURCES)}")
    for name, value, low in (("--experts", num_experts, 1), ("--top-k", top_k, 1), ("--granularity", granularity, 1),
                             ("--shared", shared, 0)):
        if int(value) != value or value < low:
            raise MoekitError(f"{name} must be an integer >= {low}, got {value}")
    if num_experts < top_k:
        raise MoekitError(f"--top-k {top_k} is larger than --experts {num_experts}; need experts >= top-k")
    width = int(config.intermediate_size)
    if width % granularity:
        raise MoekitError(f"--granularity {granularity} does not divide the FFN width {width} of this {mt} model")
    if shared >= granularity:
        raise MoekitError(f"--shared {shared} must be smaller than --granularity {granularity}: shared experts are "
                          "slices of the dense FFN (e.g. --granularity 4 --shared 1)")
    if _get(config, "mlp_bias", False):
        raise MoekitError(f"this {mt} model has FFN biases (mlp_bias=True); MoE experts have none")
    if mt == "llama" and _get(config, "attention_bias", False):
        raise MoekitError("this llama model has attention biases (attention_bias=True); no MoE target copies them")
    if mt in ("qwen2", "qwen3") and _get(config, "sliding_window") is not None:
        raise MoekitError(f"this {mt} model uses sliding-window attention; upcycling supports full attention only")
    target = SUPPORT[mt][1 if shared else 0]
    window = _get(config, "sliding_window")
    if target == "glm4_moe" and window is not None and window < _get(config, "max_position_embeddings", 0):
        raise MoekitError(f"--shared with a sliding-window {mt} model (sliding_window={window}): the shared-expert "
                          "target glm4_moe has full attention only; use --shared 0 (mixtral)")
    routed = num_experts * (granularity - shared)
    if target in ("glm4_moe", "dots1") and routed < 2:
        raise MoekitError(f"{target} needs at least 2 routed experts; got {routed} (--experts x (granularity - shared))")
    return UpcyclePlan(source=mt, target=target, num_experts=num_experts, top_k=top_k, granularity=granularity,
                       shared=shared, dense_width=width, expert_width=width // granularity, routed_experts=routed,
                       routed_top_k=top_k * (granularity - shared), scale=float(granularity - shared))


def target_config(config, p: UpcyclePlan):
    """The transformers config of the MoE model ``p`` describes, built from the dense ``config``."""
    from transformers import AutoConfig

    kw: dict[str, Any] = {k: _get(config, k) for k in _COPIED if hasattr(config, k)}
    head_dim = _get(config, "head_dim") or config.hidden_size // config.num_attention_heads
    kw["head_dim"] = head_dim
    rope = dict(_get(config, "rope_parameters") or {})
    if rope:
        kw["rope_parameters"] = rope
    moe: dict[str, Any]
    if p.target == "mixtral":
        moe = dict(num_local_experts=p.routed_experts, num_experts_per_tok=p.routed_top_k,
                   intermediate_size=p.expert_width, sliding_window=_get(config, "sliding_window"),
                   router_jitter_noise=0.0)
    elif p.target == "qwen3_moe":
        moe = dict(num_experts=p.routed_experts, num_experts_per_tok=p.routed_top_k,
                   moe_intermediate_size=p.expert_width, intermediate_size=p.dense_width, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], attention_bias=_get(config, "attention_bias", False),
                   use_sliding_window=False)
    elif p.target == "qwen2_moe":
        moe = dict(num_experts=p.routed_experts, num_experts_per_tok=p.routed_top_k,
                   moe_intermediate_size=p.expert_width, intermediate_size=p.dense_width,
                   shared_expert_intermediate_size=p.shared * p.expert_width, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False)
        kw.pop("head_dim")
        if head_dim != config.hidden_size // config.num_attention_heads:
            raise MoekitError("this qwen2 model has a custom head_dim; qwen2_moe derives it from hidden_size")
    elif p.target == "glm4_moe":
        moe = dict(n_routed_experts=p.routed_experts, num_experts_per_tok=p.routed_top_k, n_shared_experts=p.shared,
                   moe_intermediate_size=p.expert_width, intermediate_size=p.dense_width, first_k_dense_replace=0,
                   n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, use_qk_norm=False,
                   attention_bias=False)
        kw["rope_parameters"] = {**rope, "partial_rotary_factor": 1.0}
    elif p.target == "dots1":
        moe = dict(n_routed_experts=p.routed_experts, num_experts_per_tok=p.routed_top_k, n_shared_experts=p.shared,
                   moe_intermediate_size=p.expert_width, intermediate_size=p.dense_width, first_k_dense_replace=0,
                   n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                   attention_bias=_get(config, "attention_bias", False), sliding_window=None,
                   layer_types=["full_attention"] * config.num_hidden_layers)
    else:  # pragma: no cover - SUPPORT and this function are kept in step
        raise AssertionError(p.target)
    return AutoConfig.for_model(p.target, **kw, **moe)


def _dense_mlps(model: nn.Module) -> list[nn.Module]:
    layers = model.model.layers
    return [layer.mlp for layer in layers]


@torch.no_grad()
def upcycle(dense_model: nn.Module, num_experts: int, top_k: int, granularity: int = 1, shared: int = 0,
            seed: int = 0, router: str = "random", router_std: float = 0.02) -> nn.Module:
    """Build the MoE model (eval mode, same dtype as ``dense_model``) upcycled from ``dense_model``.

    ``router``: ``"random"`` (normal, std ``router_std``, seeded) or ``"zero"`` (all logits equal).
    """
    from transformers import AutoModelForCausalLM

    if router not in ROUTER_INITS:
        raise MoekitError(f"unknown router init {router!r}; choose from {', '.join(ROUTER_INITS)}")
    p = plan(dense_model.config, num_experts, top_k, granularity, shared)
    cfg = target_config(dense_model.config, p)
    dtype = next(dense_model.parameters()).dtype
    with warnings.catch_warnings():  # qwen2_moe without shared experts has a zero-width shared_expert
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        moe = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = {k: v for k, v in dense_model.state_dict().items() if ".mlp." not in k}
    result = moe.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if ".mlp." not in k]
    if result.unexpected_keys or missing:
        raise MoekitError(f"{p.source} → {p.target}: weights do not line up "
                          f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")
    gen = torch.Generator().manual_seed(seed)
    w, m, s = p.expert_width, p.granularity, p.shared
    for layer, mlp in zip(moe.model.layers, _dense_mlps(dense_model), strict=True):
        block = layer.mlp
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I,H], [I,H], [H,I]
        gate_up, downs = [], []
        for _copy in range(p.num_experts):
            for j in range(s, m):
                sl = slice(j * w, (j + 1) * w)
                gate_up.append(torch.cat([gate[sl], up[sl]], 0))
                downs.append(down[:, sl] * p.scale)
        block.experts.gate_up_proj.copy_(torch.stack(gate_up))
        block.experts.down_proj.copy_(torch.stack(downs))
        r = block.gate.weight
        r.copy_(torch.zeros_like(r) if router == "zero"
                else (torch.randn(r.shape, generator=gen) * router_std).to(r.dtype))
        if hasattr(block.gate, "e_score_correction_bias"):
            block.gate.e_score_correction_bias.zero_()
        sl = slice(0, s * w)
        if p.target == "qwen2_moe":
            se = block.shared_expert
            se.gate_proj.weight.copy_(gate[sl])
            se.up_proj.weight.copy_(up[sl])
            se.down_proj.weight.copy_(down[:, sl] * 2.0)  # sigmoid(0) = 1/2, exactly compensated
            block.shared_expert_gate.weight.zero_()
        elif s:
            se = block.shared_experts
            se.gate_proj.weight.copy_(gate[sl])
            se.up_proj.weight.copy_(up[sl])
            se.down_proj.weight.copy_(down[:, sl])
    if getattr(dense_model, "generation_config", None) is not None:
        moe.generation_config = dense_model.generation_config
    moe.config.moekit_upcycle = p.as_dict() | {"router_init": router, "seed": seed}
    return moe.to(next(dense_model.parameters()).device).eval()


def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, force: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a normal HF checkpoint directory, atomically."""
    return write_checkpoint(out, force=force, model=model, tokenizer=tokenizer)


def load_dense_config(spec: str | os.PathLike):
    """The config of a dense checkpoint (local dir or hub id), with one-line errors."""
    from transformers import AutoConfig

    from moekit.models import resolve

    path, name = resolve(spec)
    try:
        return AutoConfig.from_pretrained(str(path) if path is not None else name)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoekitError(f"could not read the config of {spec}: {first}") from None


def upcycle_checkpoint(dense: str | os.PathLike, out: str | os.PathLike, num_experts: int, top_k: int,
                       granularity: int = 1, shared: int = 0, seed: int = 0, router: str = "random",
                       force: bool = False) -> dict[str, Any]:
    """Upcycle the checkpoint ``dense`` into ``out``; returns the plan and parameter counts.

    All argument checks (architecture, N >= k, granularity, output dir) happen before any weight is read.
    """
    from transformers import AutoModelForCausalLM

    from moekit.formats.tokenizer import load_tokenizer_from
    from moekit.models import resolve

    config = load_dense_config(dense)
    p = plan(config, num_experts, top_k, granularity, shared)
    if router not in ROUTER_INITS:
        raise MoekitError(f"unknown router init {router!r}; choose from {', '.join(ROUTER_INITS)}")
    check_writable(out, force)
    path, name = resolve(dense)
    source = str(path) if path is not None else name
    dense_model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    tokenizer = load_tokenizer_from(source)
    moe = upcycle(dense_model, num_experts, top_k, granularity, shared, seed=seed, router=router)
    save(moe, out, tokenizer=tokenizer, force=force)
    total = sum(t.numel() for t in moe.parameters())
    routed = sum(t.numel() for n, t in moe.named_parameters() if ".experts." in n)
    return {**p.as_dict(), "out": str(out), "router_init": router, "seed": seed,
            "params_dense": sum(t.numel() for t in dense_model.parameters()), "params_total": total,
            "params_active": total - routed + routed * p.routed_top_k // p.routed_experts}
