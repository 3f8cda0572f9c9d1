"""Find the experts tied to a behaviour: rank (layer, expert) by how routing differs between two sets.

Examples are teacher-forced (prompt + response); only *target* tokens are counted — the response tokens
when a prompt is given, every token otherwise. Per MoE layer and expert we count, on each set, the
tokens that selected the expert (``a``), those that did not (``d``), the summed routing weight, and
(with marker tokens) the co-occurrence with markers. Detectors turn these counts into scores:

- ``risk_diff`` (SteerMoE): ``a₁/(a₁+d₁) − a₂/(a₂+d₂)``;
- ``contrast`` (fTRI-style, MoTE): mean routing weight on set 1 minus on set 2 (0 when not selected);
- ``npmi`` (RICE): ``nPMI(x, E) = log(p(x,E)/(p(x)p(E))) / −log p(x,E)`` over all counted tokens, x =
  "the token is (part of) a marker".

Entries are ranked by score, highest first: the top entries are the experts most tied to set 1
(``--pos``) or to the markers. Swap the sets to rank the other side. The file's ``experts`` key holds the
``top`` entries with a positive score as an expert set (``moekit.experts``), so the file is valid input
wherever moekit reads experts (``prune --protect``, ``generate --disable``, ...).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.data.batching import pad_batch
from moekit.data.corpus import CorpusSpec, corpus_documents, jsonl_rows, parse_corpus_spec, read_text_file
from moekit.errors import MoekitError
from moekit.experts import ExpertSet, to_dispatch_ids
from moekit.models.compat import last_logits_kwargs
from moekit.models.loading import LoadedModel
from moekit.registry import Registry
from moekit.routing import record

EXPERTS_FORMAT = 1


@dataclass(frozen=True)
class Example:
    """One teacher-forced example: an optional prompt (not counted) and the response (counted)."""

    response: str
    prompt: str | None = None


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Examples from a file: JSONL rows with ``response`` (+ optional ``prompt``) or ``text``; any other
    file is plain text with one example per non-empty line. A corpus spec
    (``moekit:corpus[:SPLIT[:DOMAIN[,DOMAIN...]]]``) gives the bundled documents, one example each."""
    spec = parse_corpus_spec(str(path))
    if spec is not None:
        return _corpus_examples(spec)
    p = Path(path)
    text = read_text_file(p, "examples file")
    out: list[Example] = []
    if p.suffix.lower() == ".jsonl":
        for lineno, row in jsonl_rows(p, text):
            resp = row.get("response", row.get("text"))
            prompt = row.get("prompt")
            if not isinstance(resp, str) or (prompt is not None and not isinstance(prompt, str)):
                raise MoekitError(f'{p}:{lineno}: expected string "response" (or "text") and optional "prompt"')
            out.append(Example(resp, prompt))
    else:
        out = [Example(line) for line in text.splitlines() if line.strip()]
    if not out:
        raise MoekitError(f"examples file {p} holds no examples")
    return out


def _corpus_examples(spec: CorpusSpec) -> list[Example]:
    return [Example(d.text) for d in corpus_documents(spec)]


def _as_examples(items: Sequence[Example | str | tuple]) -> list[Example]:
    out = []
    for it in items:
        if isinstance(it, Example):
            out.append(it)
        elif isinstance(it, str):
            out.append(Example(it))
        else:
            prompt, response = it
            out.append(Example(response, prompt))
    return out


def _find_runs(ids: list[int], pattern: list[int]) -> list[int]:
    """Positions covered by occurrences of ``pattern`` in ``ids``."""
    n, m = len(ids), len(pattern)
    hit = []
    for s in range(n - m + 1):
        if ids[s:s + m] == pattern:
            hit.extend(range(s, s + m))
    return hit


def marker_patterns(lm: LoadedModel, markers: Sequence[str]) -> list[list[int]]:
    """Token sequences of each marker, as written and with a leading space."""
    tok = _tokenizer(lm)
    pats = []
    for mk in markers:
        for variant in (mk, " " + mk):
            ids = tok(variant, add_special_tokens=False)["input_ids"]
            if ids and ids not in pats:
                pats.append(list(ids))
    if not pats:
        raise MoekitError("no marker tokens: --markers needs at least one non-empty string")
    return pats


def _tokenizer(lm: LoadedModel):
    if lm.tokenizer is None:
        raise MoekitError(f"{lm.name} has no tokenizer; expert detection on text needs one")
    return lm.tokenizer


@dataclass
class SetCounts:
    """Counts over the target tokens of one example set, per MoE layer (rows) and expert (columns)."""

    tokens: int
    selected: np.ndarray          # [L, E] tokens that selected the expert (a)
    weight: np.ndarray            # [L, E] summed routing weight
    marker_tokens: int = 0
    marker_selected: np.ndarray | None = None  # [L, E] marker tokens that selected the expert
    examples: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def not_selected(self) -> np.ndarray:
        """``d``: target tokens that did not select the expert."""
        return self.tokens - self.selected


def _encode(lm: LoadedModel, ex: Example, max_len: int) -> tuple[list[int], list[bool]]:
    tok = _tokenizer(lm)
    p = tok(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
    r = tok(ex.response, add_special_tokens=False)["input_ids"]
    ids = (list(p) + list(r))[:max_len]
    mask = ([False] * len(p) + [True] * len(r))[:max_len]
    return ids, mask


@torch.no_grad()
def count_routing(
    lm: LoadedModel,
    examples: Sequence[Example | str | tuple],
    markers: Sequence[str] | None = None,
    max_len: int = 256,
    batch_size: int = 16,
) -> SetCounts:
    """Teacher-force ``examples`` and count, per (layer, expert), target-token selections and weights."""
    exs = _as_examples(examples)
    if not exs:
        raise MoekitError("no examples to count")
    pats = marker_patterns(lm, markers) if markers else []
    L = len(lm.moe)
    E = max(v.num_experts for v in lm.moe)
    sel = np.zeros((L, E), dtype=np.int64)
    wsum = np.zeros((L, E), dtype=np.float64)
    msel = np.zeros((L, E), dtype=np.int64)
    n_tok = n_mark = 0
    encoded = [_encode(lm, ex, max_len) for ex in exs]
    encoded = [e for e in encoded if e[0]]
    if not encoded:
        raise MoekitError("the examples are empty after tokenization")
    pad = int(getattr(lm.tokenizer, "pad_token_id", None) or 0)
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b:b + batch_size]
        batch = pad_batch([c[0] for c in chunk], pad)
        with record(lm) as rec:
            lm.model(**{k: v.to(lm.device) for k, v in batch.items()}, use_cache=False,
                     **last_logits_kwargs(lm.model))  # routing only: no [batch, seq, vocab] logits
        trace = rec.trace  # tokens of row 0, then row 1, ... (padding dropped)
        target = np.concatenate([np.asarray(c[1], dtype=bool) for c in chunk])
        marker = np.zeros_like(target)
        if pats:
            off = 0
            for ids, _ in chunk:
                for pat in pats:
                    for i in _find_runs(ids, pat):
                        marker[off + i] = True
                off += len(ids)
        marker &= target
        ids = trace.ids[:, target].astype(np.int64)    # [L, n, K]
        w = trace.weights[:, target].astype(np.float64)
        mk = marker[target]
        for li in range(L):
            valid = ids[li] >= 0
            e = ids[li][valid]
            sel[li] += _dedup_bincount(ids[li], E)
            wsum[li] += np.bincount(e, weights=w[li][valid], minlength=E)
            if pats:
                msel[li] += _dedup_bincount(ids[li][mk], E)
        n_tok += int(target.sum())
        n_mark += int(mk.sum())
    if n_tok == 0:
        raise MoekitError("no target tokens: every example is prompt only")
    return SetCounts(n_tok, sel, wsum, n_mark, msel if pats else None, examples=len(encoded))


def _dedup_bincount(ids: np.ndarray, E: int) -> np.ndarray:
    """Tokens that selected each expert (an expert repeated in a token's slots counts once)."""
    if ids.size == 0:
        return np.zeros(E, dtype=np.int64)
    m = np.zeros((ids.shape[0], E + 1), dtype=bool)
    m[np.repeat(np.arange(ids.shape[0]), ids.shape[1]), to_dispatch_ids(ids, E).ravel()] = True
    return m[:, :E].sum(0)


# ----- detectors ---------------------------------------------------------------------------------------
Detector = Callable[[SetCounts, SetCounts | None], tuple[np.ndarray, dict[str, np.ndarray]]]
DETECTORS: Registry[Detector] = Registry("detection method")


INPUT_OPTIONS = {"negative": "--neg", "markers": "--markers"}


def check_inputs(method: str, has_neg: bool, has_markers: bool) -> None:
    """Fail before any work when ``method`` needs an input that is missing (the registry entry's needs)."""
    given = {"negative"} if has_neg else set()
    DETECTORS.check_needs(method, given | ({"markers"} if has_markers else set()), INPUT_OPTIONS)


def _need_neg(neg: SetCounts | None, method: str) -> SetCounts:
    if neg is None:
        raise MoekitError(f"method {method} needs a second example set (--neg)")
    return neg


@DETECTORS.register("risk_diff", needs=["negative"],
                    help="SteerMoE: selection rate on the examples minus on the contrasting set")
def risk_diff(pos: SetCounts, neg: SetCounts | None) -> tuple[np.ndarray, dict]:
    """SteerMoE: ``a₁/(a₁+d₁) − a₂/(a₂+d₂)`` (selection rate on set 1 minus on set 2)."""
    neg = _need_neg(neg, "risk_diff")
    score = pos.selected / pos.tokens - neg.selected / neg.tokens
    return score, {"a_pos": pos.selected, "d_pos": pos.not_selected, "a_neg": neg.selected,
                   "d_neg": neg.not_selected}


@DETECTORS.register("contrast", needs=["negative"],
                    help="activation contrast (fTRI-style): mean routing weight per target token, examples minus "
                    "contrasting set")
def activation_contrast(pos: SetCounts, neg: SetCounts | None) -> tuple[np.ndarray, dict]:
    """fTRI-style activation contrast: mean routing weight per target token on set 1 minus on set 2."""
    neg = _need_neg(neg, "contrast")
    mp, mn = pos.weight / pos.tokens, neg.weight / neg.tokens
    return mp - mn, {"mean_weight_pos": mp, "mean_weight_neg": mn, "a_pos": pos.selected, "a_neg": neg.selected}


def npmi_counts(n: int, n_x: int, n_e: np.ndarray, n_xe: np.ndarray) -> np.ndarray:
    """nPMI(x, E) from counts over ``n`` tokens; -1 where x and E never co-occur, +1 where p(x,E) = 1."""
    n_e = np.asarray(n_e, dtype=np.float64)
    n_xe = np.asarray(n_xe, dtype=np.float64)
    out = np.full(n_e.shape, -1.0)
    ok = n_xe > 0
    p_xe = n_xe[ok] / n
    pmi = np.log(p_xe) - np.log(n_e[ok] / n) - math.log(n_x / n)
    denom = -np.log(p_xe)
    full = denom <= 0
    out[ok] = np.clip(np.where(full, 1.0, pmi / np.where(full, 1.0, denom)), -1.0, 1.0)
    return out


@DETECTORS.register("npmi", needs=["markers"],
                    help="RICE: nPMI between 'token is a marker' and 'token selected the expert' (contrasting set "
                    "optional)")
def npmi(pos: SetCounts, neg: SetCounts | None) -> tuple[np.ndarray, dict]:
    """RICE: nPMI between "token is a marker" and "token selected the expert" over all counted tokens."""
    sets = [s for s in (pos, neg) if s is not None]
    if any(s.marker_selected is None for s in sets):
        raise MoekitError("method npmi needs marker tokens (--markers)")
    n = sum(s.tokens for s in sets)
    n_x = sum(s.marker_tokens for s in sets)
    if n_x == 0:
        raise MoekitError("no marker token occurs in the target tokens of the examples")
    n_e = sum(s.selected for s in sets)
    n_xe = sum(s.marker_selected for s in sets)
    return npmi_counts(n, n_x, n_e, n_xe), {"n_xe": n_xe, "n_e": n_e}


# ----- the experts file ---------------------------------------------------------------------------------
def model_signature(lm: LoadedModel) -> dict:
    """What an experts file records about its model, to check it against the model it is used with."""
    moe = lm.moe
    return {
        "model": lm.name, "architecture": moe.model_type, "layers": moe.indices,
        "num_experts": [v.num_experts for v in moe], "top_k": [v.top_k for v in moe],
        "router_norms": [[round(float(x), 5) for x in v.router.weight.detach().float().norm(dim=1)] for v in moe],
    }


def find_experts(
    lm: LoadedModel,
    pos: Sequence[Example | str | tuple],
    neg: Sequence[Example | str | tuple] | None = None,
    method: str = "risk_diff",
    markers: Sequence[str] | None = None,
    top: int = 10,
    max_len: int = 256,
    batch_size: int = 16,
) -> dict:
    """Rank every (layer, expert) by ``method``; returns the experts-file dict (see ``save_experts``)."""
    check_inputs(method, neg is not None, bool(markers))
    if top < 1:
        raise MoekitError("--top must be at least 1")
    pc = count_routing(lm, pos, markers, max_len, batch_size)
    nc = count_routing(lm, neg, markers, max_len, batch_size) if neg else None
    return rank_experts(lm, pc, nc, method, top, markers)


def rank_experts(lm: LoadedModel, pc: SetCounts, nc: SetCounts | None, method: str = "risk_diff", top: int = 10,
                 markers: Sequence[str] | None = None) -> dict:
    """The experts-file dict for already counted sets (several methods can share one counting pass)."""
    score, counts = DETECTORS.get(method)(pc, nc)
    entries = []
    for li, view in enumerate(lm.moe):
        for e in range(view.num_experts):
            row = {"layer": view.index, "expert": e, "score": float(score[li, e])}
            for name, arr in counts.items():
                v = arr[li, e]
                row[name] = int(v) if np.issubdtype(np.asarray(arr).dtype, np.integer) else float(v)
            entries.append(row)
    entries.sort(key=lambda r: (-r["score"], r["layer"], r["expert"]))
    for rank, row in enumerate(entries):
        row["rank"] = rank
    sets = {"pos": {"examples": pc.examples, "tokens": pc.tokens, "marker_tokens": pc.marker_tokens}}
    if nc is not None:
        sets["neg"] = {"examples": nc.examples, "tokens": nc.tokens, "marker_tokens": nc.marker_tokens}
    chosen = ExpertSet([r for r in entries if r["score"] > 0][:top])  # what --steer FILE:off switches off
    return {"format": EXPERTS_FORMAT, **model_signature(lm), "method": method, "top": int(top),
            "markers": list(markers or []), "sets": sets, **chosen.to_json(), "entries": entries}


def save_experts(result: dict, path: str | os.PathLike, force: bool = True) -> Path:
    """Write an experts file (JSON) atomically."""
    from moekit.io import atomic_write

    with atomic_write(path, force=force, mode="w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    return Path(path)
