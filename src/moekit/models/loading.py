"""Load a model by hub id, local directory or bundled name, with its tokenizer and MoEMap."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.models.moe_map import MoEMap, build_moe_map

BUNDLED_PREFIX = "moekit:"
DEFAULT_MODEL = "moekit:tiny"


@dataclass
class LoadedModel:
    """A model ready for moekit: the HF model (eval mode), its tokenizer (or None) and its MoEMap."""

    model: nn.Module
    tokenizer: object | None
    moe: MoEMap
    name: str
    path: Path | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def zoo_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "zoo"


def bundled_names() -> list[str]:
    """Names of the trained models shipped in the package (``moekit:<name>``)."""
    root = zoo_dir()
    if not root.is_dir():
        return []
    return sorted(BUNDLED_PREFIX + p.name for p in root.iterdir() if (p / "config.json").is_file())


def resolve(spec: str | os.PathLike) -> tuple[Path | None, str]:
    """Turn a model spec into (local directory or None for a hub id, display name)."""
    s = str(spec)
    if s.startswith(BUNDLED_PREFIX):
        path = zoo_dir() / s[len(BUNDLED_PREFIX):]
        if not (path / "config.json").is_file():
            names = ", ".join(bundled_names()) or "none built yet"
            raise MoekitError(f"unknown bundled model {s!r}; bundled models: {names}")
        return path, s
    p = Path(s).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise MoekitError(f"{p} is not a model directory (no config.json)")
        return p, s
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return None, s  # hub id
    raise MoekitError(f"model {s!r} not found: give a local checkpoint directory, a hub id or a bundled name")


def load(
    spec: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load ``spec`` (hub id, local directory or ``moekit:<name>``) in eval mode and map its experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve(spec)
    source = str(path) if path is not None else name
    from moekit.compress.quantized import is_quantized_checkpoint, load_quantized  # noqa: PLC0415

    try:
        if path is not None and is_quantized_checkpoint(path):
            model = load_quantized(path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except MoekitError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if path is None:
            raise MoekitError(
                f"could not load {name!r} from the Hugging Face hub ({_first_line(exc)}); "
                "if you are offline, download it and pass its local directory instead"
            ) from None
        raise MoekitError(f"could not load the model in {path}: {_first_line(exc)}") from None
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None
    return LoadedModel(model=model, tokenizer=tokenizer, moe=build_moe_map(model), name=name, path=path)


def from_model(model: nn.Module, tokenizer=None, name: str | None = None) -> LoadedModel:
    """Wrap an already-built HF model (e.g. from ``moekit.testing.tiny_model``)."""
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, moe=build_moe_map(model),
                       name=name or getattr(model.config, "model_type", "model"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__
