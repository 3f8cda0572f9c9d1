"""Load moekit's weight-only quantized checkpoints (format: ``moekit.formats.quantized``) as the standard HF
model with dequantized experts, or with int4 experts kept packed; ``moekit.load`` calls this for such a
directory."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from moekit.errors import MoekitError
from moekit.formats.quantized import (
    int4_buffer_names,
    int4_packable,
    is_quantized_checkpoint,
    read_int4_banks,
    read_quant_meta,
    read_quantized,
    stack_int4,
)

__all__ = ["is_quantized_checkpoint", "load_quantized"]


def packed_int4_banks(meta: dict) -> dict[str, list[str]]:
    """Experts modules of a quantized checkpoint whose banks can all stay packed as int4 in memory
    (``{module name: [its expert parameter names]}``): every expert 4-bit, inputs a whole number of groups."""
    gs = int(meta["group_size"])
    modules: dict[str, list[str]] = {}
    for name in meta["tensors"]:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return {m: names for m, names in modules.items()
            if len(names) == 2 and all(int4_packable(tuple(meta["tensors"][n]["shape"][1:]), meta["tensors"][n]["bits"],
                                                     gs) for n in names)}


def load_quantized(path: str | Path, dtype: torch.dtype | str | None = None, keep_packed: bool = False,
                   packed_experts: bool = False):
    """The standard HF model of a moekit quantized checkpoint, experts dequantized to ``dtype`` (default: the
    dtype it was quantized from).

    ``keep_packed=True`` also attaches the packed codes as ``model._moekit_packed``
    (``{expert parameter name: [QTensor per expert]}``) and the format record as
    ``model._moekit_quantization``, for expert stores that keep experts compressed.

    ``packed_experts=True`` keeps every all-int4 experts module packed in memory instead (codes, fp16 group
    scales and zero points as buffers, ``formats.quantized.INT4_BUFFERS``; its float expert weights are empty)
    and switches the model to moekit's experts implementation, which runs them with the int4 decode kernel:
    0.5 + 3/group_size bytes per expert weight. Modules with 8-bit experts, or inputs that are not a whole number
    of groups, load dequantized as before (with none left to pack: ``MoekitError``). Inference only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    path = Path(path)
    dtype = dtype or getattr(torch, read_quant_meta(path).get("dtype", "float32"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    banks = packed_int4_banks(read_quant_meta(path)) if packed_experts else {}
    if packed_experts and not banks:
        raise MoekitError(f"{path}: no experts module can stay packed: that needs all-int4 experts whose input sizes "
                          f"are multiples of the group size ({read_quant_meta(path)['group_size']})")
    packed_only = {name for names in banks.values() for name in names}
    meta, sd, packed = read_quantized(path, dtype, keep_packed, packed_only)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in packed_only]
    if missing or unexpected:
        raise MoekitError(f"{path}: quantized checkpoint does not match its config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    with contextlib.suppress(OSError):  # a checkpoint without generation_config.json keeps the default
        model.generation_config = GenerationConfig.from_pretrained(path)
    read_banks = {} if keep_packed else read_int4_banks(path, sorted(packed_only))
    for module_name, names in banks.items():
        module = model.get_submodule(module_name)
        if not (hasattr(module, "has_gate") and hasattr(module, "down_proj")):
            raise MoekitError(f"{path}: {module_name} is not an experts module; load without packed experts")
        for name in names:
            bank = stack_int4(packed[name]) if keep_packed else read_banks.pop(name)
            for buf, t in zip(int4_buffer_names(name), bank, strict=True):
                module.register_buffer(buf, t, persistent=False)
            pname = name.rsplit(".", 1)[1]
            w = getattr(module, pname)  # an empty [E, 0, 0] placeholder: still a bank of E experts to moekit's map
            setattr(module, pname, torch.nn.Parameter(w.new_empty(w.shape[0], 0, 0), requires_grad=False))
    if banks:
        model.set_experts_implementation("moekit")  # registered by `import moekit`; the only one that runs them
    if keep_packed:
        model._moekit_packed = packed
        model._moekit_quantization = meta
    return model.eval()
