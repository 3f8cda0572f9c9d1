"""Config-driven training of :class:`moekit.nn.MoELM` (``moekit train --config FILE.yaml``).

A run config has three sections: ``model`` (:class:`~moekit.nn.model.MoELMConfig` fields), ``data``
(:class:`DataConfig`) and ``train`` (:class:`RunTrainConfig`, which extends ``lm_trainer.TrainConfig``).
:func:`run_training` trains with AdamW and the ``lm_trainer`` LR schedule, evaluates per-domain validation
loss, router load CV and mean active experts, writes atomic checkpoints (model, optimiser, step, RNG
state) and resumes bit-exactly: batch order is a pure function of ``(seed, step)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.errors import MoekitError
from moekit.io import atomic_output_dir, atomic_write
from moekit.nn.model import MoELM, MoELMConfig
from moekit.nn.routers import Router
from moekit.train.lm_trainer import TrainConfig, lr_at, make_readable, pack_windows, plot_loss

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
LOG_FILE = "log.json"
PLOT_FILE = "loss.png"


@dataclass
class DataConfig:
    """Data: the bundled corpus (``moekit:corpus``) packed into ``seq_len`` windows."""

    corpus: str = "moekit:corpus"
    seq_len: int = 128
    max_train_docs: int | None = None  # use only the first n training documents (tests, quick runs)
    val_windows_per_domain: int = 16  # validation windows per domain at each eval point


@dataclass
class RunTrainConfig(TrainConfig):
    """Optimisation settings plus evaluation/checkpoint cadence and router aux-loss coefficients."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 50
    save_every: int = 50
    balance_coef: float | None = None  # None: keep the model's router_kwargs
    seq_coef: float | None = None
    z_coef: float | None = None


@dataclass
class RunConfig:
    """A whole ``moekit train`` config."""

    model: MoELMConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: RunTrainConfig = field(default_factory=RunTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "data": asdict(self.data), "train": asdict(self.train)}


def _build(cls: type, section: str, values: Any) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with a one-line error."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise MoekitError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MoekitError(f"unknown {section} config keys: {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise MoekitError(f"bad {section} config: {exc}") from None


def parse_run_config(data: Any) -> RunConfig:
    """Validate a parsed YAML mapping into a :class:`RunConfig` (MoekitError on any problem)."""
    if not isinstance(data, dict):
        raise MoekitError("a train config must be a mapping with sections model, data, train")
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise MoekitError(f"unknown config sections: {', '.join(unknown)} (expected model, data, train)")
    if not isinstance(data.get("model") or {}, dict):
        raise MoekitError("config section 'model' must be a mapping")
    model = dict(data.get("model") or {})
    dcfg = _build(DataConfig, "data", data.get("data"))
    tcfg = _build(RunTrainConfig, "train", data.get("train"))
    if dcfg.corpus != "moekit:corpus":
        raise MoekitError(
            f"data.corpus {dcfg.corpus!r} is not supported; only moekit:corpus (the bundled corpus)"
        )
    model.setdefault("vocab_size", len(_tokenizer()))
    model.setdefault("max_seq", max(dcfg.seq_len, 512))
    try:
        mcfg = MoELMConfig.from_dict(model)
    except TypeError as exc:
        raise MoekitError(f"bad model config: {exc}") from None
    rk = dict(mcfg.router_kwargs)
    for key in ("balance_coef", "seq_coef", "z_coef"):
        if getattr(tcfg, key) is not None:
            rk[key] = getattr(tcfg, key)
    mcfg.router_kwargs = rk
    if tcfg.steps < 1 or tcfg.batch_size < 1 or dcfg.seq_len < 2:
        raise MoekitError("train.steps, train.batch_size must be ≥ 1 and data.seq_len ≥ 2")
    if tcfg.eval_every < 0 or tcfg.save_every < 0 or tcfg.log_every < 1:
        raise MoekitError("train.eval_every/save_every must be ≥ 0 and train.log_every ≥ 1")
    try:  # instantiate once so bad router options fail here, not mid-run
        MoELM(mcfg)
    except (TypeError, ValueError) as exc:
        raise MoekitError(f"bad model/router options: {exc}") from None
    return RunConfig(mcfg, dcfg, tcfg)


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a YAML train config."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MoekitError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = str(exc).replace("\n", " ")
        raise MoekitError(f"{p}: invalid YAML ({line})") from None
    return parse_run_config(data)


@functools.cache
def _tokenizer():
    from moekit.data import load_tokenizer

    return load_tokenizer()


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
                loss = _sync_gradients(model, loss, cfg.grad_clip, world)
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
                    full = _gathered_state_dict(model, world)  # a collective: every rank takes part
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


def _sync_gradients(model: MoELM, loss: torch.Tensor, grad_clip: float, world: Any) -> torch.Tensor:
    """Expert parallel: average replicated gradients over ranks, scale expert-shard gradients to the global
    mean loss, clip by the global norm; returns the mean loss over ranks (for logging)."""
    import torch.distributed as dist

    from moekit.nn.expert_parallel import ExpertParallelBank

    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelBank) for p in m.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    replicated = [p for p in params if id(p) not in sharded]
    flat = torch.cat([p.grad.reshape(-1) for p in replicated] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in replicated:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
    for p in params:
        if id(p) in sharded:
            p.grad /= world.size  # each rank's loss is a mean over its share: the global loss is their mean
    if grad_clip:
        sq = torch.stack([p.grad.double().pow(2).sum() for p in params if id(p) in sharded] or
                         [torch.zeros((), dtype=torch.float64)]).sum()
        dist.all_reduce(sq)
        sq += sum(p.grad.double().pow(2).sum() for p in replicated)
        coef = (grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return flat[-1]


def _gathered_state_dict(model: MoELM, world: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict: every expert-parallel shard gathered from all ranks (a collective)."""
    import torch.distributed as dist

    from moekit.nn.expert_parallel import ExpertParallelBank

    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            for pname, p in module.named_parameters():
                parts = [torch.empty_like(p.data) for _ in range(world.size)]
                dist.all_gather(parts, p.data.contiguous())
                sd[f"{name}.{pname}"] = torch.cat(parts)
    return sd
