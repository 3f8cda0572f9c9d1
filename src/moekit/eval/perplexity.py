"""Token-weighted perplexity per document source and domain, a unigram baseline, and KL to a reference.

Every document is tokenized with the model's tokenizer (no special tokens) and cut into windows of
``seq_len`` tokens that overlap by one token, so every token but the first of each document is
predicted exactly once, with up to ``seq_len - 1`` tokens of context. Windows are batched with right
padding; padded positions are masked out, so results do not depend on ``batch_size``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moekit.data.batching import Window, document_token_ids, pad_batch, text_windows
from moekit.data.corpus import Document
from moekit.errors import MoekitError


def _as_documents(docs: Sequence[Document | str]) -> list[Document]:
    out = []
    for i, d in enumerate(docs):
        out.append(d if isinstance(d, Document) else Document(str(d), "text", f"text:{i}", "<text>"))
    return out


def _windows(lm, docs: list[Document], seq_len: int, max_tokens: int | None) -> list[Window]:
    """Windows of ``seq_len`` overlapping by one token, up to ``max_tokens`` predicted tokens in all."""
    if lm.tokenizer is None:
        raise MoekitError(f"model {lm.name} has no tokenizer; perplexity needs one")
    return text_windows(lm.tokenizer, docs, seq_len, max_tokens, overlap=1)


def _batches(windows: Sequence[Window], batch_size: int, pad_id: int) -> Iterator[tuple]:
    """Consecutive windows in batches (window order: document order, so results are summed in that order)."""
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        batch = pad_batch([w.ids for w in chunk], pad_id)
        yield [w.doc for w in chunk], batch["input_ids"], batch["attention_mask"]


def _progress(enabled: bool, total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)
    return prog, prog.add_task(label, total=total)


def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def _summary(nll: dict[str, float], count: dict[str, int]) -> dict[str, dict]:
    out = {}
    for key in sorted(count):
        n = count[key]
        mean = nll[key] / n if n else float("nan")
        out[key] = {"tokens": n, "nll": mean, "perplexity": math.exp(mean) if n else float("nan")}
    return out


@torch.no_grad()
def perplexity(
    lm,
    docs: Sequence[Document | str],
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    progress: bool = True,
) -> dict:
    """Token-weighted mean NLL and perplexity of ``lm`` on ``docs``: overall, per domain, per source file.

    ``max_tokens`` caps the number of predicted tokens (documents are taken in order).
    Returns ``{"model", "tokens", "nll", "perplexity", "by_domain": {...}, "by_source": {...}}``.
    """
    losses = window_losses(lm, docs, max_tokens, batch_size, seq_len, progress)
    return aggregate_windows(lm.name, docs, losses)


@dataclass
class WindowLosses:
    """Per evaluation window: its document, summed NLL (fp32, as computed) and predicted tokens; ``done`` marks
    the windows this process ran (all of them, unless ``part`` split the batches)."""

    doc: np.ndarray
    nll: np.ndarray
    n: np.ndarray
    done: np.ndarray


def _row_nll(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Summed next-token NLL of each row, upcasting one row's logits to fp32 at a time: the fp32
    log-softmax is ``[seq, vocab]``, not ``[batch, seq, vocab]`` (issue 13's activation allowance)."""
    out = np.zeros(logits.shape[0], np.float32)
    for r in range(logits.shape[0]):
        logp = torch.log_softmax(logits[r, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[r, 1:, None]).squeeze(-1)
        out[r] = float((nll * valid[r]).sum())
    return out


@torch.no_grad()
def window_losses(
    lm,
    docs: Sequence[Document | str],
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    progress: bool = True,
    part: tuple[int, int] | None = None,
    lockstep: bool = False,
) -> WindowLosses:
    """Summed NLL of every window of ``docs``; ``part=(i, n)`` runs only batches ``b`` with ``b mod n == i``
    (``lockstep``: and as many forwards as the largest part, for models sharded over the ranks)."""
    from moekit.models.loading import windows_per_forward

    windows = _windows(lm, _as_documents(docs), seq_len, max_tokens)
    if not windows:
        raise MoekitError("no tokens to evaluate: documents are empty or shorter than 2 tokens")
    batch_size = windows_per_forward(lm, seq_len, batch_size, with_logits=True)  # fewer under a memory budget
    model = lm.model
    out = WindowLosses(np.array([w.doc for w in windows], dtype=np.int64), np.zeros(len(windows), np.float32),
                       np.zeros(len(windows), np.int64), np.zeros(len(windows), bool))
    starts = list(range(0, len(windows), batch_size))
    fill = 0
    if part is not None:
        fill = -(-len(starts) // part[1]) - len(starts[part[0]::part[1]]) if lockstep else 0
        starts = starts[part[0]::part[1]]
    prog, task = _progress(progress, sum(min(batch_size, len(windows) - s) for s in starts), f"perplexity {lm.name}")
    with prog:
        for start in starts:
            _, ids, mask = next(_batches(windows[start:start + batch_size], batch_size, _pad_id(lm.tokenizer)))
            ids, mask = ids.to(lm.device), mask.to(lm.device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            valid = mask[:, 1:].bool()
            rows = slice(start, start + ids.shape[0])
            out.nll[rows] = _row_nll(logits, ids, valid)
            out.n[rows] = valid.sum(1).cpu().numpy()
            out.done[rows] = True
            prog.advance(task, ids.shape[0])
    for _ in range(fill):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=lm.device), use_cache=False)
    return out


def aggregate_windows(name: str, docs: Sequence[Document | str], losses: WindowLosses) -> dict:
    """The perplexity result from every window's loss, summed per document in window order."""
    if not losses.done.all():
        raise MoekitError(f"{int((~losses.done).sum())} evaluation windows have no result")
    per_doc_nll = np.zeros(len(docs))
    per_doc_n = np.zeros(len(docs), dtype=np.int64)
    for d, nll, n in zip(losses.doc, losses.nll, losses.n, strict=True):
        per_doc_nll[d] += nll
        per_doc_n[d] += n
    return _aggregate(name, _as_documents(docs), per_doc_nll, per_doc_n)


def _aggregate(name: str, docs: list[Document], per_doc_nll: np.ndarray, per_doc_n: np.ndarray) -> dict:
    by = {"by_domain": (Counter(), Counter()), "by_source": (Counter(), Counter())}
    for d, doc in enumerate(docs):
        if per_doc_n[d] == 0:
            continue
        for field, key in (("by_domain", doc.domain), ("by_source", doc.source)):
            by[field][0][key] += float(per_doc_nll[d])
            by[field][1][key] += int(per_doc_n[d])
    total_n = int(per_doc_n.sum())
    mean = float(per_doc_nll.sum() / total_n)
    return {"model": name, "tokens": total_n, "nll": mean, "perplexity": math.exp(mean),
            **{k: _summary(*v) for k, v in by.items()}}


def unigram_perplexity(tokenizer, train_docs: Sequence[Document | str], docs: Sequence[Document | str],
                       seq_len: int = 256) -> dict:
    """Perplexity of an add-one-smoothed unigram model (token counts of ``train_docs``) on ``docs``.

    Predicts exactly the tokens :func:`perplexity` predicts (all but each document's first token),
    so the two are directly comparable. Same return layout as :func:`perplexity`.
    """
    vocab = len(tokenizer)
    counts = np.ones(vocab, dtype=np.float64)
    for ids in document_token_ids(tokenizer, _as_documents(train_docs)):
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    docs = _as_documents(docs)
    per_doc_nll = np.zeros(len(docs))
    per_doc_n = np.zeros(len(docs), dtype=np.int64)
    for d, doc_ids in enumerate(document_token_ids(tokenizer, docs)):
        ids = np.asarray(doc_ids[1:], dtype=np.int64)
        per_doc_nll[d] = -logp[ids].sum()
        per_doc_n[d] = len(ids)
    return _aggregate("unigram", docs, per_doc_nll, per_doc_n)


def _row_kl(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Summed per-token KL(b || a) of each row, one row upcast to fp32 at a time (as ``_row_nll``)."""
    out = np.zeros(a.shape[0], np.float32)
    for r in range(a.shape[0]):
        logq = torch.log_softmax(a[r, :-1].float().cpu(), -1)
        logp = torch.log_softmax(b[r, :-1].float().cpu(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
        out[r] = float((kl * valid[r]).sum())
    return out


@torch.no_grad()
def kl_to_reference(
    lm,
    ref_lm,
    docs: Sequence[Document | str],
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    progress: bool = True,
) -> dict:
    """Mean per-token KL(ref || lm) of next-token distributions over the same windows as :func:`perplexity`.

    Both models must share the vocabulary; ``lm``'s tokenizer cuts the text. Returns
    ``{"kl", "tokens", "by_domain": {domain: {"kl", "tokens"}}}``.
    """
    docs = _as_documents(docs)
    windows = _windows(lm, docs, seq_len, max_tokens)
    if not windows:
        raise MoekitError("no tokens to evaluate: documents are empty or shorter than 2 tokens")
    total = Counter()
    count = Counter()
    prog, task = _progress(progress, len(windows), f"KL {ref_lm.name} || {lm.name}")
    with prog:
        for doc_idx, ids, mask in _batches(windows, batch_size, _pad_id(lm.tokenizer)):
            a = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
            b = ref_lm.model(input_ids=ids.to(ref_lm.device), attention_mask=mask.to(ref_lm.device),
                             use_cache=False).logits
            if a.shape[-1] != b.shape[-1]:
                raise MoekitError(f"vocabulary sizes differ: {a.shape[-1]} vs {b.shape[-1]}")
            valid = mask[:, 1:].bool()
            kl_rows = _row_kl(a, b, valid)
            n_rows = valid.sum(1).numpy()
            for r, d in enumerate(doc_idx):
                total[docs[d].domain] += float(kl_rows[r])
                count[docs[d].domain] += int(n_rows[r])
            prog.advance(task, len(doc_idx))
    n = sum(count.values())
    return {"kl": sum(total.values()) / n, "tokens": n,
            "by_domain": {k: {"kl": total[k] / count[k], "tokens": count[k]} for k in sorted(count)}}
