"""Measuring steering effects: number-style token classes, style margins, matched random controls and
continuation loss. Shared by ``demo_step`` and ``bench/bench_steering.py``."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from moekit.data.synthetic import NUMBER_WORDS
from moekit.experts import ExpertRef
from moekit.models.compat import cache_kwargs, output_cache
from moekit.models.loading import LoadedModel
from moekit.routing import RoutingControl, route

_NUM = re.compile(r"-?\d+|[A-Za-z]+")


def number_token_classes(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids whose text (stripped) is all digits, and those that are an English number word."""
    digits, words = [], []
    for i in range(len(tokenizer)):
        t = tokenizer.decode([i]).strip().lower()
        if t.isdigit():
            digits.append(i)
        elif t in NUMBER_WORDS:
            words.append(i)
    return torch.tensor(digits), torch.tensor(words)


def classify_style(text: str) -> str:
    """'digits' or 'words' by the first number in ``text`` (digits or an English number word), else 'none'."""
    for m in _NUM.finditer(text):
        tok = m.group(0).lower()
        if tok.lstrip("-").isdigit():
            return "digits"
        if tok in NUMBER_WORDS:
            return "words"
    return "none"


@torch.no_grad()
def style_margin(lm: LoadedModel, prompts: Sequence[str], control: RoutingControl | None = None,
                 classes: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """Per prompt: ``log P(next token is digits) − log P(next token is a number word)``."""
    digits, words = classes if classes is not None else number_token_classes(lm.tokenizer)
    out = []
    ctx = route(lm, control=control) if control is not None else _null()
    with ctx:
        for p in prompts:
            ids = lm.tokenizer(p, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            out.append(float(torch.logsumexp(logp[digits], 0) - torch.logsumexp(logp[words], 0)))
    return np.array(out)


def _null():
    import contextlib

    return contextlib.nullcontext()


def matched_random(lm: LoadedModel, experts: Iterable[ExpertRef], seed: int) -> list[ExpertRef]:
    """Random experts with the same count per layer as ``experts``, none of them in ``experts``."""
    rng = random.Random(seed)
    experts = [ExpertRef.coerce(x) for x in experts]
    chosen = set(experts)
    out = []
    per_layer: dict[int, int] = {}
    for layer, _ in experts:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    for layer, n in sorted(per_layer.items()):
        pool = [e for e in range(lm.moe.layer(layer).num_experts) if ExpertRef(layer, e) not in chosen]
        out += [ExpertRef(layer, e) for e in rng.sample(pool, n)]
    return out


@torch.no_grad()
def continuation_nll(lm: LoadedModel, prefix: Sequence[int], cont: Sequence[int],
                     control: RoutingControl | None = None) -> tuple[float, int]:
    """Summed NLL of ``cont`` given ``prefix`` (and the number of tokens), under ``control``."""
    ids = torch.tensor([list(prefix) + list(cont)])
    with route(lm, control=control) if control is not None else _null():
        logits = lm.model(input_ids=ids).logits[0, len(prefix) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(list(cont)), reduction="sum")
    return float(nll), len(cont)


@torch.no_grad()
def greedy_batch(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, control: RoutingControl | None = None,
                 classes: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[str], np.ndarray]:
    """Greedy continuations (no stop tokens) and, with ``classes``, each prompt's style margin.

    Prompts are batched by token length, so no padding is needed and each row is computed as alone.
    """
    enc = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    texts: list[str] = [""] * len(prompts)
    margins = np.zeros(len(prompts))
    with route(lm, control=control) if control is not None else _null():
        for idx in groups.values():
            out = lm.model(input_ids=torch.tensor([enc[i] for i in idx], device=lm.device), use_cache=True)
            logits = out.logits[:, -1].float()
            if classes is not None:
                logp = torch.log_softmax(logits, -1)
                m = torch.logsumexp(logp[:, classes[0]], -1) - torch.logsumexp(logp[:, classes[1]], -1)
                margins[idx] = m.cpu().numpy()
            toks = []
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                toks.append(nxt)
                if step + 1 < max_new_tokens:
                    out = lm.model(input_ids=nxt[:, None], **cache_kwargs(lm.model, output_cache(out)), use_cache=True)
                    logits = out.logits[:, -1].float()
            gen = torch.stack(toks, 1).cpu()
            for j, i in enumerate(idx):
                texts[i] = lm.tokenizer.decode(gen[j].tolist())
    return texts, margins
