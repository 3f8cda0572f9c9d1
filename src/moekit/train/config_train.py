"""Config-driven training of :class:`moekit.nn.MoELM` (``moekit train --config FILE.yaml``).

A run config has three sections: ``model`` (:class:`~moekit.nn.model.MoELMConfig` fields), ``data``
(:class:`DataConfig`) and ``train`` (:class:`RunTrainConfig`, which extends ``lm_trainer.TrainConfig``).
:func:`run_training` trains with AdamW and the ``lm_trainer`` LR schedule, evaluates per-domain validation
loss, router load CV and mean active experts, writes atomic checkpoints (model, optimiser, step, RNG
state) and resumes bit-exactly: batch order is a pure function of ``(seed, step)``.

The config classes and parsing live in ``moekit.train.run_config`` (importable from here too); the
expert-parallel gradient sync and shard gathering in ``moekit.train.parallel``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.errors import MoekitError
from moekit.io import atomic_output_dir, atomic_write
from moekit.nn.model import MoELM
from moekit.nn.routers import Router
from moekit.train.lm_trainer import lr_at, make_readable, pack_windows, plot_loss
from moekit.train.parallel import gathered_state_dict, sync_gradients
from moekit.train.run_config import (  # noqa: F401  (re-exported: the config classes' import path)
    DataConfig,
    RunConfig,
    RunTrainConfig,
    _tokenizer,
    load_run_config,
    parse_run_config,
)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
LOG_FILE = "log.json"
PLOT_FILE = "loss.png"


@functools.cache
def _tokenized(split: str, limit: int | None) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    from moekit.data import load_corpus

    docs = load_corpus(split)[:limit] if limit else load_corpus(split)
    ids = _tokenizer()([d.text for d in docs])["input_ids"]
    return tuple(tuple(x) for x in ids), tuple(d.domain for d in docs)


def train_windows(dcfg: DataConfig, seed: int) -> torch.Tensor:
    """Packed ``[n, seq_len]`` training windows of the bundled corpus."""
    ids, _ = _tokenized("train", dcfg.max_train_docs)
    w = pack_windows(ids, dcfg.seq_len, _tokenizer().eos_token_id, seed=seed)
    if len(w) == 0:
        raise MoekitError(f"not enough training text for one window of {dcfg.seq_len} tokens")
    return w


def validation_windows(dcfg: DataConfig) -> dict[str, torch.Tensor]:
    """Per-domain validation windows (at most ``val_windows_per_domain`` each)."""
    ids, doms = _tokenized("validation", None)
    out = {}
    for dom in sorted(set(doms)):
        w = pack_windows(
            [x for x, d in zip(ids, doms, strict=True) if d == dom],
            dcfg.seq_len,
            _tokenizer().eos_token_id,
            seed=0,
        )
        if len(w):
            out[dom] = w[: dcfg.val_windows_per_domain]
    return out


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Window indices of ``step``: a seeded permutation per epoch, so batches depend only on (seed, step)."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[i * batch_size : (i + 1) * batch_size]
    if len(idx) < batch_size:  # fewer windows than one batch: wrap around
        idx = np.resize(order, batch_size)
    return idx


def _routers(model: MoELM) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def evaluate(model: MoELM, val: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, Any]:
    """Per-domain validation loss, router load CV and mean active experts per token (per MoE layer)."""
    was_training = model.training
    model.eval()
    for r in _routers(model):
        r.reset_counts()
    losses, tokens = {}, 0
    for dom, w in val.items():
        total, n = 0.0, 0
        for i in range(0, len(w), batch_size):
            b = w[i : i + batch_size]
            loss, _, _ = model(b, labels=b)
            total += float(loss) * b.shape[0]
            n += b.shape[0]
            tokens += b.numel()
        losses[dom] = total / max(1, n)
    cvs, active = [], []
    for _, layer in model.moe_layers():
        routers = list(layer.routers) if hasattr(layer, "routers") else [layer.router]
        layer_active = 0.0
        for r in routers:
            c = r.reset_counts().double()
            cvs.append(float(c.std(unbiased=False) / c.mean().clamp(min=1e-9)))
            layer_active += float(c.sum()) / max(1, tokens)
        active.append(layer_active)
    model.train(was_training)
    return {
        "val_loss": losses,
        "val_loss_mean": float(np.mean(list(losses.values()))) if losses else float("nan"),
        "load_cv": float(np.mean(cvs)) if cvs else 0.0,
        "active_experts": float(np.mean(active)) if active else 0.0,
    }


def _rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)],
            "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def load_state(path: Path) -> dict[str, Any]:
    """Read a training checkpoint without unpickling code: tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a crafted or corrupt file: one line, no code run)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MoekitError(f"--resume: {path} is not a moekit training checkpoint ({first})") from None


def _optimizer(model: MoELM, cfg: RunTrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def save_state(
    out: Path, model: MoELM, opt: torch.optim.Optimizer | None, step: int, log: dict, run: RunConfig,
    state_dict: dict | None = None,
) -> Path:
    """Atomically write ``out/checkpoint/`` (state.pt with model, optimiser, step, RNG state; config.json).

    ``opt=None`` (expert-parallel runs, whose optimiser state is sharded) saves no optimiser state: such a
    checkpoint holds the whole model (``state_dict``, experts gathered) but cannot be resumed."""
    with atomic_output_dir(out / CHECKPOINT_DIR, force=True) as tmp:
        torch.save(
            {
                "model": state_dict if state_dict is not None else model.state_dict(),
                "optimizer": None if opt is None else opt.state_dict(),
                "step": step,
                "rng": _rng_state(),
                "log": log,
                "config": run.to_dict(),
            },
            tmp / STATE_FILE,
        )
        (tmp / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        make_readable(tmp)
    return out / CHECKPOINT_DIR


def _write_log(out: Path, log: dict) -> None:
    with atomic_write(out / LOG_FILE, force=True, mode="w") as fh:
        fh.write(json.dumps(log, indent=1) + "\n")
    (out / LOG_FILE).chmod(0o644)
    if log["steps"]:
        plot_loss(
            {"steps": log["steps"], "lm_loss": log["lm_loss"], "tokens_seen": log["tokens_seen"]},
            out / PLOT_FILE,
            title=f"MoELM {log['config']['model']['router']}",
        )


def run_training(
    run: RunConfig,
    out: str | os.PathLike,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    world: Any = None,
) -> dict[str, Any]:
    """Train an MoELM per ``run``, writing checkpoint, ``log.json`` and ``loss.png`` under ``out``.

    ``resume`` continues from ``out/checkpoint`` exactly; ``stop_at`` stops (with a checkpoint) after that
    many steps without changing the LR schedule. Returns the log dict.

    ``world`` (a ``moekit.distributed.runtime.World``, under torchrun): expert parallel. Every rank builds the
    same model and keeps its shard of each expert bank (``moekit.nn.shard_experts``); each step's batch is
    split over the ranks, the other gradients are averaged over them, clipping uses the global norm, and
    aux-loss-free biases step on loads summed over the ranks. Rank 0 writes the log and a checkpoint with the
    whole model (no optimiser state: such runs cannot be resumed yet).
    """
    out = Path(out)
    cfg = run.train
    parallel = world is not None and world.size > 1
    if parallel:
        if resume:
            raise MoekitError("--resume is not supported for expert-parallel (torchrun) runs yet")
        if cfg.batch_size % world.size:
            raise MoekitError(f"train.batch_size={cfg.batch_size} must be divisible by the {world.size} ranks")
    main = not parallel or world.rank == 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = MoELM(run.model)
    if parallel:
        from moekit.nn.expert_parallel import shard_experts

        shard_experts(model)
    opt = _optimizer(model, cfg)
    log: dict[str, Any] = {
        "config": run.to_dict(),
        "steps": [],
        "lm_loss": [],
        "aux": [],
        "lr": [],
        "evals": [],
        "tokens_seen": 0,
        "seconds": 0.0,
    }
    start_step = 0
    if resume:
        path = out / CHECKPOINT_DIR / STATE_FILE
        if not path.is_file():
            raise MoekitError(f"--resume: no checkpoint at {path}")
        state = load_state(path)
        if state.get("optimizer") is None:
            raise MoekitError(f"--resume: {path} was written by an expert-parallel run and holds no optimiser state")
        if state["config"] != run.to_dict():
            raise MoekitError(f"--resume: the config differs from the one {path} was trained with")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_step, log = int(state["step"]), state["log"]
        _set_rng_state(state["rng"])
    elif (out / CHECKPOINT_DIR).exists():
        raise MoekitError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    windows = train_windows(run.data, cfg.seed)
    val = validation_windows(run.data) if cfg.eval_every else {}
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    model.train()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
        disable=not (progress and main),
    )
    t0 = time.perf_counter() - log["seconds"]
    acc, n_acc = [0.0, 0.0], 0
    with prog:
        task = prog.add_task("", total=cfg.steps, completed=start_step)
        for step in range(start_step, end):
            batch = windows[batch_indices(step, len(windows), cfg.batch_size, cfg.seed)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            model.set_step(step)
            if parallel:
                share = cfg.batch_size // world.size
                loss, _, aux = model(batch[world.rank * share:(world.rank + 1) * share],
                                     labels=batch[world.rank * share:(world.rank + 1) * share])
                loss.backward()
                loss = sync_gradients(model, loss, cfg.grad_clip, world)
            else:
                loss, _, aux = model(batch, labels=batch)
                loss.backward()  # router aux losses are attached to the graph
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            acc[0] += loss.item()  # LM cross-entropy; the weighted aux terms are already in the graph
            acc[1] += float(sum(v.sum() for v in aux.values())) if aux else 0.0  # unweighted, for logging
            n_acc += 1
            log["tokens_seen"] += batch.numel()
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                log["steps"].append(done)
                log["lm_loss"].append(acc[0] / n_acc)
                log["aux"].append(acc[1] / n_acc)
                log["lr"].append(lr_at(step, cfg))
                acc, n_acc = [0.0, 0.0], 0
                prog.update(task, description=f"loss {log['lm_loss'][-1]:.3f}")
            if val and (done % cfg.eval_every == 0 or done == cfg.steps):
                rng = _rng_state()
                ev = evaluate(model, val, cfg.batch_size)
                _set_rng_state(rng)
                log["evals"].append({"step": done, **ev})
                prog.update(task, description=f"loss {log['lm_loss'][-1]:.3f} val {ev['val_loss_mean']:.3f}")
            log["seconds"] = time.perf_counter() - t0
            if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                if parallel:
                    full = gathered_state_dict(model, world)  # a collective: every rank takes part
                    if main:
                        save_state(out, model, None, done, log, run, state_dict=full)
                        _write_log(out, log)
                else:
                    save_state(out, model, opt, done, log, run)
                    _write_log(out, log)
            prog.advance(task)
    if start_step >= end and main:
        _write_log(out, log)
    return log
