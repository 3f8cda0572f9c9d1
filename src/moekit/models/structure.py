"""A model's structure without weights, and its weights read tensor by tensor from the checkpoint.

``load_structure``/``skeleton`` build the model from its config with every parameter on the meta device (for
``inspect``, size estimates, placement planning, offloading); ``read_weights`` then fills the meta
parameters from a ``formats.Checkpoint`` one tensor at a time; ``bank_keys``/``footprint`` name and size the
routed-expert banks.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.formats.tokenizer import load_tokenizer_from
from moekit.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    _first_line,
    hub_snapshot,
    quiet_transformers,
    resolve,
    resolve_dtype,
)
from moekit.models.moe_map import MoEMap, build_moe_map

EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias", "down_proj", "down_proj_bias")


def expert_param_names(experts: nn.Module) -> list[str]:
    """Names of the fused per-expert tensors of an expert bank (parameters with a leading E axis)."""
    E = int(experts.num_experts)
    return [n for n in EXPERT_PARAMS
            if isinstance(getattr(experts, n, None), torch.Tensor) and getattr(experts, n).shape[:1] == (E,)]


def bank_keys(model: nn.Module, moe: MoEMap | None = None) -> dict[int, dict[str, str]]:
    """Decoder layer → {param name → state-dict key} of every routed-expert bank of ``model``."""
    moe = moe or build_moe_map(model)
    names = {id(m): n for n, m in model.named_modules()}
    return {v.index: {p: f"{names[id(v.experts)]}.{p}" for p in expert_param_names(v.experts)} for v in moe}


@contextlib.contextmanager
def _params_on_meta():
    """Every parameter created inside lands on the meta device (buffers stay real: rotary tables are computed)."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def skeleton(path: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model built from its config with every parameter on the meta device (no weight
    memory, no weight read); buffers are real."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise MoekitError(f"could not read the config of {path}: {_first_line(exc)}") from None
    with _params_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # from_config leaves tied weights (lm_head = embed_tokens) as two tensors: tie them as from_pretrained does,
    # so that sizes, plans and writers see the one tensor the checkpoint stores
    model.tie_weights()
    return model.eval()


def load_structure(spec: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str | None = "auto",
                   with_tokenizer: bool = False) -> LoadedModel:
    """``spec``'s model with its MoEMap and no weights (meta device): for ``inspect``, size estimates and
    planning; reads config.json and, for ``dtype="auto"`` without a declared dtype, safetensors headers."""
    path, name = resolve(spec)
    if path is None:
        path = Path(hub_snapshot(name))
    model = skeleton(path, resolve_dtype(dtype, path))
    return LoadedModel(model=model, tokenizer=load_tokenizer_from(path) if with_tokenizer else None, moe=build_moe_map(model),
                       name=name, path=path)


def footprint(lm: LoadedModel) -> dict[str, int]:
    """Bytes of ``lm``'s weights in its dtype: ``total``, ``experts`` (routed banks), ``resident`` (the rest)."""
    keys = {k for d in bank_keys(lm.model, lm.moe).values() for k in d.values()}
    seen, total, experts = set(), 0, 0
    for k, t in lm.model.state_dict(keep_vars=True).items():
        ident = id(t)
        if ident in seen:  # tied weights count once
            continue
        seen.add(ident)
        n = t.numel() * t.element_size()
        total += n
        if k in keys:
            experts += n
    return {"total": total, "experts": experts, "resident": total - experts}


def read_weights(model: nn.Module, ckpt, skip: set[str] = frozenset(), drop_cache: bool = True) -> None:
    """Give every meta parameter of ``model`` (except the state-dict keys in ``skip``) its tensor from
    ``ckpt`` (a ``formats.Checkpoint``), one tensor at a time with ``pread`` (no mmap, no second copy)."""
    plan = ckpt.plan(model)
    loaded: set[str] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key in skip:
            continue
        tgt = plan.get(key)
        if tgt is None:
            continue
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        buf = torch.empty(tgt.shape, dtype=t.dtype)
        ckpt.read_target(tgt, buf, drop=drop_cache)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(buf, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = buf
        loaded.add(key)
    if getattr(model.config, "tie_word_embeddings", False) or hasattr(model, "tie_weights"):
        model.tie_weights()
    still = sorted(k for k, t in model.state_dict(keep_vars=True).items() if k not in skip and t.is_meta)
    if still:
        raise MoekitError(f"could not find {len(still)} tensors in {ckpt.path} (e.g. {still[0]})")

