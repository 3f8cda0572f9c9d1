"""The ``moekit train`` run config: its three sections (``model``, ``data``, ``train``) as dataclasses, and
parsing a YAML/JSON file or dict into them with one-line errors for unknown keys and bad values."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError
from moekit.nn.model import MoELM, MoELMConfig
from moekit.train.lm_trainer import TrainConfig


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
