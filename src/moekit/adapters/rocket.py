"""ROCKET: K-shot selection of LoRA experts from a pool and their assembly into a token-level MoE.

"Leveraging Open Knowledge for Advancing Task Expertise in Large Language Models" (arXiv 2408.15915;
code Yaphabates/Rocket). (1) Rank every pool adapter on the K task examples by perplexity and exact
match; keep the best M. (2) Among those, pick the N-subset of largest diversity, 1 − mean pairwise
cosine of the flattened weight updates ΔW = s·B·A. (3) Initialise a top-k MoE of the N LoRAs with a
trained router (softmax top-k; moekit's ``mixlora`` layer). (4) Optionally add training examples
retrieved by embedding similarity to the K shots, de-duplicated at cosine τ (SemDeDup). (5) Train
experts and router together.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.adapters.core import (
    attach,
    check_base,
    load_adapter,
    make_config,
    quiet_peft,
    read_adapter_config,
)
from moekit.adapters.layers import LoraMoELinear
from moekit.data.corpus import Document, jsonl_rows, read_text_file
from moekit.errors import MoekitError


@dataclasses.dataclass(frozen=True)
class Shot:
    """One K-shot example: a prompt and its answer (``answer`` empty: plain text, perplexity only)."""

    prompt: str
    answer: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def read_shots(path: str | os.PathLike, k: int | None = None) -> list[Shot]:
    """K-shot examples from JSONL (``{"prompt","answer"}`` or ``{"text"}``) or plain text (one per line)."""
    p = Path(path)
    text = read_text_file(p, "task file")
    shots: list[Shot] = []
    if p.suffix.lower() == ".jsonl":
        for lineno, row in jsonl_rows(p, text):
            if isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str):
                shots.append(Shot(row["prompt"], row["answer"]))
            elif isinstance(row.get("text"), str):
                shots.append(Shot(row["text"]))
            else:
                raise MoekitError(f'{p}:{lineno}: expected "prompt" and "answer" strings, or a "text" string')
    else:
        shots = [Shot(line) for line in text.splitlines() if line.strip()]
    if k is not None:
        if k < 1:
            raise MoekitError(f"--shots must be at least 1, got {k}")
        shots = shots[:k]
    return shots


def pool_adapters(pool: str | os.PathLike) -> list[Path]:
    """The adapter directories directly under ``pool`` (or ``pool`` itself); none → one-line error."""
    p = Path(pool)
    if not p.is_dir():
        raise MoekitError(f"pool {p} is not a directory")
    dirs = [p] if (p / "adapter_config.json").is_file() else sorted(
        d for d in p.iterdir() if (d / "adapter_config.json").is_file())
    if not dirs:
        raise MoekitError(f"pool {p} holds no adapters (no */adapter_config.json)")
    return dirs


@torch.no_grad()
def shot_scores(model: nn.Module, tokenizer, shots: Sequence[Shot]) -> dict[str, float | None]:
    """Token-weighted perplexity of prompt+answer and exact match of the greedy answer (None: no answers)."""
    device = next(model.parameters()).device
    nll, count, hits, answered = 0.0, 0, 0, 0
    for shot in shots:
        p_ids = list(tokenizer(shot.prompt, add_special_tokens=False)["input_ids"])
        ids = list(tokenizer(shot.text, add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float()[0, :-1], -1)
        nll -= float(logp.gather(-1, x[0, 1:, None]).sum())
        count += len(ids) - 1
        if shot.answer and ids[: len(p_ids)] == p_ids and len(ids) > len(p_ids):
            answered += 1
            want = ids[len(p_ids):]
            cur = list(p_ids)
            for _ in range(len(want)):  # greedy decoding, token by token (no cache: short answers)
                nxt = int(model(input_ids=torch.tensor([cur], device=device), use_cache=False).logits[0, -1].argmax())
                cur.append(nxt)
            hits += int(cur[len(p_ids):] == want)
    if not count:
        raise MoekitError("the K-shot examples have no tokens to score")
    return {"perplexity": math.exp(nll / count), "exact_match": hits / answered if answered else None}


def delta_vector(path: str | os.PathLike) -> torch.Tensor:
    """All of an adapter's weight updates s·B·A (per expert for fused 3-D targets), flattened and concatenated."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    if (cfg.get("moekit") or {}).get("method", "lora") != "lora":
        raise MoekitError(f"{path}: ROCKET pools hold plain LoRA adapters, not {cfg['moekit']['method']}")
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise MoekitError(f"{path} has no adapter_model.safetensors")
    sd = load_file(str(file))
    r, scale = int(cfg["r"]), float(cfg["lora_alpha"]) / int(cfg["r"])
    parts = []
    for key in sorted(k for k in sd if k.endswith("lora_A.weight")):
        a, b = sd[key].float(), sd[key.replace("lora_A.weight", "lora_B.weight")].float()
        e = a.shape[0] // r
        if e > 1:  # fused experts: A [E·r, in], B [out, r·E] (PEFT's ParamWrapper layout)
            parts.append(torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], r, e), a.reshape(e, r, -1)).flatten())
        else:
            parts.append((b @ a).flatten())
    return torch.cat(parts) * scale


def diversity(vectors: Sequence[torch.Tensor]) -> float:
    """1 − mean pairwise cosine similarity (ROCKET's group diversity)."""
    if len(vectors) < 2:
        return 0.0
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2)]
    return 1.0 - sum(cos) / len(cos)


def select(lm, pool: str | os.PathLike, shots: Sequence[Shot], keep: int, candidates: int | None = None,
           progress: bool = True) -> dict[str, Any]:
    """ROCKET steps 1–2: rank the pool on the shots, keep ``candidates``, return the most diverse ``keep``."""
    dirs = pool_adapters(pool)
    if keep < 1:
        raise MoekitError(f"--keep must be at least 1, got {keep}")
    if keep > len(dirs):
        raise MoekitError(f"--keep {keep} is larger than the pool ({len(dirs)} adapters)")
    m = min(len(dirs), candidates or max(2 * keep, keep))
    if m < keep:
        raise MoekitError(f"--candidates {m} is smaller than --keep {keep}")
    for d in dirs:
        check_base(lm.model, read_adapter_config(d), str(d))
    rows = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as prog:
        task = prog.add_task("scoring adapters", total=len(dirs))
        for d in dirs:
            peft_model = load_adapter(lm.model, d, adapter_name="rocket_candidate")
            try:
                rows.append({"adapter": str(d), **shot_scores(peft_model, lm.tokenizer, shots)})
            finally:
                quiet_unload(peft_model)
            prog.advance(task)
    rows.sort(key=lambda r: (-(r["exact_match"] or 0.0), r["perplexity"]))
    top = rows[:m]
    vec = {r["adapter"]: delta_vector(r["adapter"]) for r in top}
    sizes = {v.numel() for v in vec.values()}
    if len(sizes) > 1:
        raise MoekitError("the pool's adapters target different layers or ranks; ROCKET needs one shape")
    best, best_div = None, -math.inf
    for combo in itertools.combinations([r["adapter"] for r in top], keep):
        div = diversity([vec[a] for a in combo])
        if div > best_div + 1e-12:
            best, best_div = combo, div
    return {"method": "rocket", "shots": len(shots), "experts": list(best or []), "diversity": best_div,
            "candidates": [r["adapter"] for r in top], "ranking": rows}


def read_selection(path: str | os.PathLike) -> list[Path]:
    """The expert adapter directories listed in a ``select`` output (JSON with an "experts" list)."""
    p = Path(path)
    try:
        data = json.loads(read_text_file(p, "experts file"))
    except ValueError as exc:
        raise MoekitError(f"{p} is not valid JSON ({exc})") from None
    experts = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(experts, list) or not experts or not all(isinstance(e, str) for e in experts):
        raise MoekitError(f'{p}: expected {{"experts": [adapter directories...]}} with at least one entry')
    return [Path(e) for e in experts]


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int = 128) -> torch.Tensor:
    """Mean of the base model's last hidden states over each text's first ``max_tokens`` tokens, unit length."""
    device = next(model.parameters()).device
    out = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])[:max_tokens] or [0]
        h = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True,
                  use_cache=False).hidden_states[-1][0].float().mean(0)
        out.append(torch.nn.functional.normalize(h, dim=0))
    return torch.stack(out)


def retrieve(lm, shots: Sequence[Shot], pool: Sequence[Document], budget: int, dedup: float = 0.9
             ) -> list[Document]:
    """ROCKET step 4: the ``budget`` pool documents most similar to any shot, skipping near-duplicates."""
    if budget < 1 or not pool:
        return []
    if not 0 < dedup <= 1:
        raise MoekitError(f"--dedup must be in (0, 1], got {dedup}")
    q = embed(lm.model, lm.tokenizer, [s.text for s in shots])
    e = embed(lm.model, lm.tokenizer, [d.text for d in pool])
    score = (e @ q.T).max(1).values
    chosen: list[int] = []
    for i in score.argsort(descending=True).tolist():
        if all(float(e[i] @ e[j]) < dedup for j in chosen):
            chosen.append(i)
            if len(chosen) == budget:
                break
    return [pool[i] for i in chosen]


def compose(lm, experts: Sequence[str | os.PathLike], top_k: int = 2, seed: int = 0):
    """ROCKET step 3: a ``mixlora`` adapter whose N experts start as the given LoRAs; router random."""
    from safetensors.torch import load_file

    if not experts:
        raise MoekitError("no experts to compose")
    cfgs = [read_adapter_config(e) for e in experts]
    for e, c in zip(experts, cfgs, strict=True):
        check_base(lm.model, c, str(e))
        if (c.get("moekit") or {}).get("method", "lora") != "lora" or c.get("target_parameters"):
            raise MoekitError(f"{e}: compose takes plain LoRA adapters on linear layers")
    shape = {(c["r"], c["lora_alpha"], tuple(sorted(c["target_modules"] if isinstance(c["target_modules"], list)
                                                     else [c["target_modules"]]))) for c in cfgs}
    if len(shape) > 1:
        raise MoekitError("the experts differ in rank, alpha or target modules; compose needs them equal")
    (r, alpha, targets), = shape
    if not 1 <= top_k <= len(experts):
        raise MoekitError(f"--top-k must be between 1 and the number of experts ({len(experts)}), got {top_k}")
    target = "all-linear" if targets == ("all-linear",) else ",".join(targets)
    config = make_config(lm.model, "mixlora", rank=int(r), target=target, alpha=float(alpha), seed=seed,
                         experts=len(experts), top_k=int(top_k),
                         sources=[str(e) for e in experts])
    peft_model = attach(lm.model, config)
    states = [load_file(str(Path(e) / "adapter_model.safetensors")) for e in experts]
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if not isinstance(mod, LoraMoELinear):
                continue
            for j, sd in enumerate(states):
                try:
                    a, b = sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]
                except KeyError:
                    raise MoekitError(f"{experts[j]} has no LoRA weights for {name}") from None
                mod.lora_A["default"].weight[j * r:(j + 1) * r].copy_(a)
                mod.lora_B["default"].weight[:, j * r:(j + 1) * r].copy_(b)
    return peft_model


def quiet_unload(peft_model) -> nn.Module:
    """The base model back, adapter layers removed (no merge)."""
    with quiet_peft():
        return peft_model.unload()
