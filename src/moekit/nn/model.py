"""MoELM: a small config-driven decoder-only MoE language model for router research."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import MoekitError
from moekit.nn.layers import CoELayer, GatedMLP, MoELayer
from moekit.nn.routers import ROUTERS


@dataclass
class MoELMConfig:
    """Everything that defines an MoELM; ``from_dict`` builds one from a YAML/JSON mapping."""

    vocab_size: int = 256
    hidden: int = 128
    num_layers: int = 4
    num_heads: int = 4
    inter: int = 256  # width of one routed expert (before fine-grained splitting)
    num_experts: int = 8
    top_k: int = 2
    router: str = "softmax_then_topk"
    router_kwargs: dict[str, Any] = field(default_factory=lambda: {"balance_coef": 0.01})
    num_shared: int = 0
    granularity: int = 1  # DeepSeekMoE fine-grained split m: m·E experts of width I/m, m·k active
    coe_iterations: int = 1  # > 1: Chain-of-Experts layers with this many iterations
    moe_every: int = 1  # every n-th layer is MoE, the others dense
    dense_inter: int | None = None  # width of the dense FFNs (default: top_k · inter, same active params)
    first_dense: int = 0  # the first n layers are dense (DeepSeek's first_k_dense_replace)
    max_seq: int = 512
    rope: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoELMConfig:
        """Build a config, rejecting unknown keys and routers with a one-line MoekitError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MoekitError(f"unknown MoELM config keys: {', '.join(unknown)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise MoekitError on an inconsistent config."""
        if self.router not in ROUTERS:
            ROUTERS.get(self.router)  # raises the listing error
        if self.hidden % self.num_heads:
            raise MoekitError(f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise MoekitError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.inter % self.granularity:
            raise MoekitError(f"granularity {self.granularity} does not divide the expert width {self.inter}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` is an MoE layer."""
        return i >= self.first_dense and (i - self.first_dense) % self.moe_every == 0


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope_tables(seq: int, dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq, dim]`` for rotary embeddings (rotate-half convention)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, S, d]`` by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through ``F.scaled_dot_product_attention``, optional rotary positions."""

    def __init__(self, cfg: MoELMConfig) -> None:
        super().__init__()
        self.heads, self.head_dim, self.rope, self.theta = (
            cfg.num_heads,
            cfg.hidden // cfg.num_heads,
            cfg.rope,
            cfg.rope_theta,
        )
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            cos, sin = _rope_tables(s, self.head_dim, self.theta, x.device)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``, the FFN an MoE, CoE or dense MLP."""

    def __init__(self, cfg: MoELMConfig, index: int) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps), RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.is_moe = cfg.is_moe_layer(index)
        m = cfg.granularity
        kw = dict(router=cfg.router, num_shared=cfg.num_shared, router_kwargs=dict(cfg.router_kwargs))
        if not self.is_moe:
            self.ffn: nn.Module = GatedMLP(cfg.hidden, cfg.dense_inter or cfg.top_k * cfg.inter)
        elif cfg.coe_iterations > 1:
            self.ffn = CoELayer(
                cfg.hidden,
                cfg.inter // m,
                cfg.num_experts * m,
                cfg.top_k * m,
                iterations=cfg.coe_iterations,
                **kw,
            )
        else:
            self.ffn = MoELayer.fine_grained(cfg.hidden, cfg.inter, cfg.num_experts, cfg.top_k, m, **kw)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        h = self.ffn_norm(x)
        return x + (self.ffn(h, mask) if self.is_moe else self.ffn(h))


class MoELM(nn.Module):
    """Decoder-only MoE LM: ``forward(input_ids, labels=None) -> (loss, logits, aux)``.

    ``loss`` is the next-token cross-entropy (labels as in transformers: same positions as ``input_ids``,
    shifted inside, -100 ignored); router aux losses are already attached to the graph, so
    ``loss.backward()`` trains them. ``aux`` maps ``layer{i}/{name}`` to detached per-layer values.
    """

    def __init__(self, cfg: MoELMConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers))

    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        """``(decoder layer index, MoE/CoE layer)`` for every MoE layer."""
        return [(i, block.ffn) for i, block in enumerate(self.layers) if block.is_moe]

    def set_step(self, step: int) -> None:
        """Forward the training step to routers with a schedule (SMoE-Dropout's growing k)."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_step"):
                module.set_step(step)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
        if input_ids.shape[1] > self.cfg.max_seq:
            raise MoekitError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq={self.cfg.max_seq}")
        mask = None if attention_mask is None else attention_mask.bool()
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, mask)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        aux = {f"layer{i}/{k}": v for i, layer in self.moe_layers() for k, v in layer.last_aux.items()}
        return loss, logits, aux
