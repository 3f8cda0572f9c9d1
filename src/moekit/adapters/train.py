"""Train an attached adapter by next-token loss on documents (plus the method's balance loss)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moekit.adapters.core import aux_loss, load_cv, reset_load
from moekit.data.batching import pad_batch, text_windows
from moekit.data.corpus import Document
from moekit.errors import MoekitError


def token_windows(tokenizer, docs: Sequence[Document | str], seq_len: int) -> list[list[int]]:
    """Every document cut into windows of ``seq_len`` tokens (overlap 1), in document order."""
    if tokenizer is None:
        raise MoekitError("the model has no tokenizer; adapter training needs one")
    out = [w.ids for w in text_windows(tokenizer, docs, seq_len, overlap=1)]
    if not out:
        raise MoekitError("no training tokens: the documents are empty or shorter than 2 tokens")
    return out


def lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the unpadded positions."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


def train_adapter(peft_model: nn.Module, tokenizer, docs: Sequence[Document | str], steps: int = 100,
                  lr: float = 1e-3, batch_size: int = 8, seq_len: int = 128, seed: int = 0,
                  pad_id: int = 0, progress: bool = True) -> dict[str, Any]:
    """AdamW on the adapter's trainable tensors for ``steps`` steps over shuffled windows of ``docs``.

    The loss is the LM loss plus each layer's ``aux_coef × balance loss`` (MixLoRA, LoRAMoE); sign-rule
    biases (FlyLoRA, SMoRA) move inside the training forwards. Returns losses, tokens/s and the load CV.
    """
    for name, value, low in (("steps", steps, 1), ("batch size", batch_size, 1), ("seq len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MoekitError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr < 10):
        raise MoekitError(f"learning rate must be a finite number in (0, 10), got {lr!r}")
    windows = token_windows(tokenizer, docs, seq_len)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise MoekitError("the adapter has no trainable parameters")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(peft_model.parameters()).device
    losses: list[float] = []
    tokens = 0
    reset_load(peft_model)
    peft_model.train()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    with Progress(TextColumn("training adapter"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[loss]}"), disable=not progress, transient=True) as prog:
        task = prog.add_task("train", total=steps, loss="")
        for _ in range(steps):
            batch = []
            for _ in range(batch_size):
                if not order:
                    order = list(range(len(windows)))
                    rng.shuffle(order)
                batch.append(windows[order.pop()])
            b = pad_batch(batch, pad_id)
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            loss = lm_loss(peft_model, ids, mask)
            extra = aux_loss(peft_model)
            total = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(loss.item())
            tokens += int(mask[:, 1:].sum())
            prog.update(task, advance=1, loss=f"loss {losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    peft_model.eval()
    return {"steps": steps, "loss": losses, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "load_cv": load_cv(peft_model), "trainable_params": sum(p.numel() for p in params)}
