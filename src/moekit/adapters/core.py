"""Build, attach, save and load moekit adapters as ordinary PEFT LoRA adapters."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.adapters.config import MoekitLoraConfig
from moekit.adapters.layers import MoRALinear, _MoekitLoraLinear
from moekit.adapters.methods import METHODS
from moekit.errors import MoekitError
from moekit.io import atomic_output_dir

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = {"attention": "q_proj, k_proj, v_proj, o_proj of every attention block",
           "experts": "the fused 3-D expert tensors gate_up_proj and down_proj (LoRA only)",
           "all-linear": "every nn.Linear except the output head"}


@contextlib.contextmanager
def quiet_peft():
    """PEFT 0.21 calls a transformers method that transformers 5.24 deprecates (a FutureWarning per wrap)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model an adapter was trained on: shapes and a hash of the embedding's first rows."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    digest = hashlib.sha256(emb[: min(8, emb.shape[0])].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    return {"model_type": cfg.model_type, "hidden_size": int(cfg.hidden_size),
            "num_hidden_layers": int(cfg.num_hidden_layers), "vocab_size": int(emb.shape[0]), "embedding": digest}


def expert_target_parameters(model: nn.Module) -> list[str]:
    """Full names of every fused 3-D expert tensor (``...experts.gate_up_proj`` / ``down_proj``)."""
    names = [n for n, p in model.named_parameters() if p.dim() == 3 and n.rsplit(".", 1)[-1] in
             ("gate_up_proj", "down_proj")]
    if not names:
        raise MoekitError("this model has no fused 3-D expert tensors (gate_up_proj/down_proj); "
                          "use --target attention or all-linear")
    return names


def _check_number(name: str, value: float, low: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise MoekitError(f"{name} must be a finite number ≥ {low}, got {value!r}")
    if integer and int(value) != value:
        raise MoekitError(f"{name} must be an integer, got {value!r}")


def _target_dims(model: nn.Module, target_modules: Any) -> list[tuple[str, int, int]]:
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear":
            if mod is model.get_output_embeddings():
                continue
        elif leaf not in target_modules:
            continue
        out.append((name, mod.in_features, mod.out_features))
    return out


def make_config(model: nn.Module, method: str = "lora", rank: int = 8, active: int | None = None,
                target: str = "attention", alpha: float | None = None, seed: int = 0,
                **settings: Any) -> MoekitLoraConfig:
    """A validated config for ``method`` on ``model``: bad ranks/budgets/targets → one-line MoekitError.

    ``target``: ``attention``, ``experts``, ``all-linear`` or comma-separated module leaf names.
    ``alpha`` defaults to 2·rank (FlyLoRA's and common LoRA practice).
    """
    spec = METHODS.get(method)
    _check_number("rank", rank, 1, integer=True)
    hidden = int(model.config.hidden_size)
    if rank > hidden:
        raise MoekitError(f"rank {rank} is larger than the hidden size {hidden}")
    if alpha is not None:
        _check_number("alpha", alpha, 0)
    moekit: dict[str, Any] = {"method": method, **spec.defaults, "seed": int(seed)}
    for key, value in settings.items():
        if value is not None:
            moekit[key] = value
    if spec.uses_active:
        if active is None:
            active = max(1, rank // 4)
        _check_number("active", active, 1, integer=True)
        if active > rank:
            raise MoekitError(f"--active {active} is larger than the rank {rank}")
        moekit["active"] = int(active)
    elif active is not None:
        raise MoekitError(f"--active applies to flylora, smora and mora, not {method}")
    if spec.uses_experts:
        _check_number("experts", moekit["experts"], 1, integer=True)
        _check_number("top_k", moekit.get("top_k") or 0, 0, integer=True)
        if (moekit.get("top_k") or 0) > moekit["experts"]:
            raise MoekitError(f"top-k {moekit['top_k']} is larger than the number of experts {moekit['experts']}")
    for key in ("bias_lr", "aux_coef", "balance_delta"):
        if key in moekit:
            _check_number(key, moekit[key], 0)
    moekit["base"] = base_fingerprint(model)
    common = dict(r=int(rank), lora_alpha=float(alpha if alpha is not None else 2 * rank), lora_dropout=0.0,
                  moekit=moekit)
    if target == "experts":
        if spec.layer is not None:
            raise MoekitError(f"--target experts supports --method lora only (got {method})")
        return MoekitLoraConfig(target_modules=[], target_parameters=expert_target_parameters(model), **common)
    modules: Any = "all-linear" if target == "all-linear" else (
        list(ATTENTION) if target == "attention" else [t.strip() for t in target.split(",") if t.strip()])
    dims = _target_dims(model, modules)
    if not dims:
        raise MoekitError(f"--target {target!r} matches no linear layer of this model; choose "
                          f"{', '.join(TARGETS)} or module names")
    return MoekitLoraConfig(target_modules=modules, **common)


def attach(model: nn.Module, config: MoekitLoraConfig, adapter_name: str = "default"):
    """Wrap ``model`` with a new trainable adapter (``peft.get_peft_model``); base weights stay frozen."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, config, adapter_name=adapter_name)


def save_adapter(peft_model, out: str | os.PathLike, force: bool = False, extra: dict | None = None) -> Path:
    """``save_pretrained`` into ``out`` atomically (no overwrite without ``force``); ``extra`` → moekit.json."""
    with atomic_output_dir(out, force=force) as tmp:
        peft_model.save_pretrained(str(tmp))
        if extra is not None:
            (tmp / "moekit.json").write_text(json.dumps(extra, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(out)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The saved ``adapter_config.json`` of an adapter directory, or a one-line error."""
    p = Path(path)
    cfg = p / "adapter_config.json"
    if not cfg.is_file():
        raise MoekitError(f"{p} is not an adapter directory (no adapter_config.json)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoekitError(f"cannot read {cfg}: {exc}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise MoekitError(f"{cfg} is not a LoRA adapter config")
    return data


def check_base(model: nn.Module, adapter_config: dict[str, Any], where: str) -> None:
    """Refuse an adapter trained on a different base model (shapes or embedding hash differ)."""
    saved = (adapter_config.get("moekit") or {}).get("base")
    if saved is None:
        return
    here = base_fingerprint(model)
    diff = [k for k in saved if saved[k] != here.get(k)]
    if diff:
        raise MoekitError(f"adapter {where} was trained on a different base model ({', '.join(diff)} differ: "
                          f"{ {k: saved[k] for k in diff} } vs { {k: here.get(k) for k in diff} })")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False):
    """``PeftModel.from_pretrained`` after checking that ``path`` is an adapter for this base model."""
    from peft import PeftModel

    check_base(model, read_adapter_config(path), str(path))
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=trainable)


def moe_layers(model: nn.Module) -> list[_MoekitLoraLinear]:
    """Every moekit adapter layer in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _MoekitLoraLinear)]


def reset_load(model: nn.Module) -> None:
    """Forget the routing counts the layers have accumulated."""
    for m in moe_layers(model):
        m.moe_load.clear()


def load_cv(model: nn.Module, adapter: str = "default") -> float | None:
    """Mean over layers of the coefficient of variation of rank/expert selection counts (None: no routing)."""
    cvs = []
    for m in moe_layers(model):
        c = m.moe_load.get(adapter)
        if c is not None and c.sum() > 0:
            c = c.double()
            cvs.append(float(c.std(unbiased=False) / c.mean()))
    return sum(cvs) / len(cvs) if cvs else None


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over layers of coefficient × balance loss stored by the last training forward (None: none)."""
    total = None
    for m in moe_layers(model):
        for adapter, loss in m.moe_aux.items():
            coef = float(m.moe_settings[adapter].get("aux_coef", 0.0))
            if coef:
                total = loss * coef if total is None else total + loss * coef
        m.moe_aux.clear()
    return total


def set_sample_types(model: nn.Module, types: torch.Tensor | None) -> None:
    """LoRAMoE's localized balancing: 0 = world-knowledge sample, 1 = task sample, per sample or per token
    of the next training batch (None: every token is task data)."""
    from moekit.adapters.layers import LoraMoELinear

    for m in moe_layers(model):
        if isinstance(m, LoraMoELinear):
            m.moe_group_types = types


def prune_ranks(model: nn.Module, keep: int, adapter: str = "default") -> int:
    """MoRA rank pruning: keep the ``keep`` most important rank-1 experts in every MoRA layer; returns layers."""
    layers = [m for m in moe_layers(model) if isinstance(m, MoRALinear) and adapter in m.lora_A]
    for m in layers:
        if not 1 <= keep <= m.r[adapter]:
            raise MoekitError(f"keep must be between 1 and the rank {m.r[adapter]}, got {keep}")
        m.prune(adapter, keep)
    return len(layers)
