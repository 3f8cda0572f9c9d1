"""moekit's training entry point for small causal LMs in standard Hugging Face architectures.

``model_config(preset)`` builds a transformers config (``tiny``: qwen3_moe, ``tiny-shared``: qwen2_moe
with fine-grained experts plus a shared expert, ``dense``: qwen3 with the same active parameters per
token), ``pack_windows`` turns documents into packed token windows, ``train_lm`` runs AdamW with a
cosine schedule and the router load-balancing loss, and ``save_checkpoint`` writes a checkpoint that
plain ``AutoModelForCausalLM.from_pretrained`` loads offline.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.formats.writer import write_checkpoint

HIDDEN = 128
LAYERS = 4
EXPERT_WIDTH = 160  # tiny: 16 experts x 160, top-2 -> 320 active FFN width per token

_COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
               head_dim=HIDDEN // 4, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-6, use_cache=True, attention_dropout=0.0)

PRESETS: dict[str, tuple[str, dict]] = {
    # no shared experts: 16 routed experts, top-2, every layer sparse
    "tiny": ("qwen3_moe", dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=EXPERT_WIDTH,
                               intermediate_size=2 * EXPERT_WIDTH, decoder_sparse_step=1, mlp_only_layers=[],
                               norm_topk_prob=True, router_aux_loss_coef=0.05, output_router_logits=False)),
    # DeepSeekMoE: experts split in two (32 x 80), top-4 of which one is made shared -> 3 routed + 1 shared
    "tiny-shared": ("qwen2_moe", dict(num_experts=32, num_experts_per_tok=3, moe_intermediate_size=EXPERT_WIDTH // 2,
                                      shared_expert_intermediate_size=EXPERT_WIDTH // 2,
                                      intermediate_size=2 * EXPERT_WIDTH, decoder_sparse_step=1, mlp_only_layers=[],
                                      norm_topk_prob=False, router_aux_loss_coef=0.05, output_router_logits=False,
                                      qkv_bias=False)),
    # dense baseline with the same active FFN width (320) as both MoE presets
    "dense": ("qwen3", dict(intermediate_size=2 * EXPERT_WIDTH)),
}


def model_config(preset: str, vocab_size: int, **overrides):
    """The transformers config of a named preset (``tiny``, ``tiny-shared``, ``dense``)."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    arch, kwargs = PRESETS[preset]
    kwargs = {**_COMMON, **kwargs, "vocab_size": vocab_size, **overrides}
    if arch == "qwen2_moe":
        kwargs.pop("head_dim", None)
    return AutoConfig.for_model(arch, **kwargs)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and active-per-token parameters (embeddings counted once when tied)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    active = total
    experts = getattr(cfg, "num_experts", None)
    if experts:
        k = cfg.num_experts_per_tok
        routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        active = total - routed + routed * k // experts
    return {"total": total, "active": active}


def pack_windows(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int, seed: int = 0) -> torch.Tensor:
    """Shuffle documents (fixed seed), join them with EOS and cut into ``[n, seq_len]`` windows."""
    order = np.random.default_rng(seed).permutation(len(token_lists))
    stream: list[int] = []
    for i in order:
        stream.extend(token_lists[i])
        stream.append(eos_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class TrainConfig:
    """Optimisation settings of :func:`train_lm`."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    aux_loss: bool = True


@dataclass
class TrainHistory:
    """What a training run logged: steps, loss (total, LM, aux), learning rate, throughput."""

    config: dict
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lm_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _is_moe(model: torch.nn.Module) -> bool:
    return bool(getattr(model.config, "num_experts", None))


def train_lm(
    model: torch.nn.Module,
    windows: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = True,
    log_path: str | os.PathLike | None = None,
    on_log: Callable[[int, float], None] | None = None,
    deadline: float | None = None,
) -> TrainHistory:
    """Train ``model`` in place on packed ``windows`` ([n, seq_len]); returns the logged history.

    Batches walk through the windows in a seeded random order (reshuffled every epoch). For MoE models
    ``output_router_logits=True`` makes transformers add ``router_aux_loss_coef * aux_loss`` to the loss.
    ``deadline`` (a ``time.time()`` value) stops the run early, after a logged step, once passed.
    """
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    order, pos = rng.permutation(len(windows)), 0
    hist = TrainHistory(config=asdict(cfg))
    moe = _is_moe(model) and cfg.aux_loss
    model.train()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                    TimeRemainingColumn(), disable=not progress)
    start = time.perf_counter()
    acc = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "n": 0}
    with prog:
        task = prog.add_task("", total=cfg.steps)
        for step in range(cfg.steps):
            if pos + cfg.batch_size > len(order):
                order, pos = rng.permutation(len(windows)), 0
            batch = windows[order[pos : pos + cfg.batch_size]]
            pos += cfg.batch_size
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            kwargs = {"output_router_logits": True} if moe else {}
            out = model(input_ids=batch, labels=batch, use_cache=False, **kwargs)
            out.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else 0.0
            coef = float(getattr(model.config, "router_aux_loss_coef", 0.0)) if moe else 0.0
            acc["loss"] += out.loss.item()
            acc["aux"] += aux
            acc["lm"] += out.loss.item() - coef * aux
            acc["n"] += 1
            hist.tokens_seen += batch.numel()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                n = acc["n"]
                hist.steps.append(step + 1)
                hist.loss.append(acc["loss"] / n)
                hist.lm_loss.append(acc["lm"] / n)
                hist.aux_loss.append(acc["aux"] / n)
                hist.lr.append(lr_at(step, cfg))
                hist.seconds = time.perf_counter() - start
                acc = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "n": 0}
                prog.update(task, description=f"loss {hist.lm_loss[-1]:.3f}")
                if log_path is not None:
                    Path(log_path).write_text(json.dumps(hist.to_json()) + "\n")
                if on_log is not None:
                    on_log(step + 1, hist.lm_loss[-1])
                if deadline is not None and time.time() > deadline:
                    break
            prog.advance(task)
    hist.seconds = time.perf_counter() - start
    model.eval()
    return hist


def plot_loss(hist: TrainHistory | dict, path: str | os.PathLike, title: str = "") -> Path:
    """Save a small loss-curve PNG (LM loss vs tokens seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = hist.to_json() if isinstance(hist, TrainHistory) else hist
    tokens_per_step = h["tokens_seen"] / max(1, h["steps"][-1])
    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=80)
    ax.plot(np.array(h["steps"]) * tokens_per_step / 1e6, h["lm_loss"], lw=1.2)
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("train LM loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_checkpoint(model: torch.nn.Module, tokenizer, path: str | os.PathLike, force: bool = True,
                    extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write model (safetensors, fp32), config and tokenizer files atomically into ``path``."""
    model.config.use_cache = True
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(model.config, key, getattr(tokenizer, key))
            setattr(model.generation_config, key, getattr(tokenizer, key))
    write_checkpoint(path, force=force, model=model, tokenizer=tokenizer, extra_files=extra_files)
    make_readable(path)
    return Path(path)


def make_readable(path: str | os.PathLike) -> None:
    """chmod a checkpoint folder to 755 and its files to 644 (temp dirs and files are created private)."""
    root = Path(path)
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
