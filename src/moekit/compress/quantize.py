"""Weight-only group-wise quantization of routed experts (int8 / int4), with mixed precision per expert.

The codec (asymmetric scale + zero point per group of ``group_size`` weights along the input dimension,
|w − ŵ| ≤ s/2 in every group, int4 packed two per byte) and the on-disk format are in
``moekit.formats.quantized``; ``moekit.load`` reads such a checkpoint (``moekit.models.quantized``). This module
chooses the bits and writes the checkpoint. Asymmetric was chosen over symmetric because it uses all 16 int4
levels on skewed groups; for int8 the difference is negligible. Everything else (attention, embeddings,
routers, shared experts, expert biases) stays in the model's dtype.

Mixed precision (MC-MoE's idea, greedy instead of an ILP): importance_j = frequency_j × mean gate_j ×
relative reconstruction error of expert j at 4 bits; starting from 4 bits everywhere, the most
important experts are raised to 8 bits while the parameter-weighted average stays ≤ ``avg_bits``.

transformers' own quantization configs (bitsandbytes, HQQ, torchao, compressed-tensors...) quantize
``nn.Linear`` modules; v5 MoE experts are fused 3-D parameters, so none of them applies to the experts
here without a custom integration — which is why moekit uses its own small format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moekit.errors import MoekitError
from moekit.experts import expert_values_json
from moekit.formats.quantized import (
    FORMAT,
    FORMAT_VERSION,
    QUANT_CONFIG,
    QUANT_WEIGHTS,
    SUPPORTED_BITS,
    QTensor,
    dequantize,
    pack_int4,
    quantize_matrix,
    unpack_int4,
)
from moekit.models.loading import LoadedModel
from moekit.models.moe_map import MoELayerView


def expert_matrices(view: MoELayerView) -> dict[str, tuple[torch.Tensor, bool]]:
    """The experts module's weight tensors [E, out, in] (nn.Linear convention) and whether the stored
    parameter is transposed relative to that (GPT-OSS)."""
    ex = view.experts
    t = view.expert_layout == "gpt_oss"
    out = {}
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(ex, name)
        out[name] = (p.transpose(1, 2) if t else p, t)
    return out


def relative_error(view: MoELayerView, e: int, bits: int, group_size: int) -> float:
    """‖W − Q(W)‖ / ‖W‖ over expert ``e``'s matrices at ``bits``."""
    num = den = 0.0
    for w, _ in expert_matrices(view).values():
        m = w[e].detach().float()
        num += float((m - quantize_matrix(m, bits, group_size).dequantize()).pow(2).sum())
        den += float(m.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def allocate_bits(importance: Mapping[tuple[int, int], float], params: Mapping[tuple[int, int], int],
                  avg_bits: float, low: int = 4, high: int = 8) -> dict[tuple[int, int], int]:
    """Greedy: everything at ``low`` bits, then the most important experts at ``high`` bits while the
    parameter-weighted mean stays ≤ ``avg_bits``."""
    if not low <= avg_bits <= high:
        raise MoekitError(f"--avg-bits must be between {low} and {high}, got {avg_bits}")
    bits = {k: low for k in params}
    total = sum(params.values())
    used = low * total
    for k in sorted(params, key=lambda k: (-importance.get(k, 0.0), k)):
        extra = (high - low) * params[k]
        if used + extra <= avg_bits * total + 1e-9:
            bits[k] = high
            used += extra
    return bits


def average_bits(bits: Mapping[tuple[int, int], int], params: Mapping[tuple[int, int], int]) -> float:
    return sum(bits[k] * params[k] for k in params) / sum(params.values())


def expert_params(lm: LoadedModel) -> dict[tuple[int, int], int]:
    """Quantized weights per expert (the matrices, not biases)."""
    out = {}
    for v in lm.moe:
        n = sum(w[0].numel() for w in expert_matrices(v).values())
        out.update({(v.index, e): n for e in range(v.num_experts)})
    return out


def importance(lm: LoadedModel, stats, group_size: int, views: Sequence[MoELayerView] | None = None
               ) -> dict[tuple[int, int], float]:
    """frequency × mean gate × relative 4-bit reconstruction error, per (layer, expert) of ``views``
    (default: every MoE layer)."""
    out = {}
    for v in (lm.moe if views is None else views):
        st = stats.layers[v.index]
        freq = st.count / max(st.tokens, 1)
        gate = st.mean("gate_sum")
        for e in range(v.num_experts):
            out[(v.index, e)] = float(freq[e] * gate[e] * relative_error(v, e, 4, group_size))
    return out


@dataclass
class QuantResult:
    bits: dict[tuple[int, int], int]
    group_size: int
    packed: dict[str, list[QTensor]] = field(default_factory=dict)
    out: Path | None = None

    def average_bits(self, params: Mapping[tuple[int, int], int]) -> float:
        return average_bits(self.bits, params)


@torch.no_grad()
def quantize_experts(lm: LoadedModel, bits: Mapping[tuple[int, int], int] | int, group_size: int = 128
                     ) -> dict[str, list[QTensor]]:
    """Quantize every expert matrix; keys are the experts-module parameter names of the model."""
    names = {id(m): n for n, m in lm.model.named_modules()}
    packed = {}
    for v in lm.moe:
        prefix = names[id(v.experts)]
        for pname, (w, _) in expert_matrices(v).items():
            b = [bits if isinstance(bits, int) else bits[(v.index, e)] for e in range(v.num_experts)]
            packed[f"{prefix}.{pname}"] = [quantize_matrix(w[e], b[e], group_size) for e in range(v.num_experts)]
    return packed


@torch.no_grad()
def apply_dequantized(lm: LoadedModel, packed: Mapping[str, Sequence[QTensor]], model=None) -> None:
    """Replace expert weights of ``model`` (default ``lm.model``) by their dequantized values, in place."""
    model = model or lm.model
    params = dict(model.named_parameters())
    transposed = {f"{n}": t for n, t in _transposed_flags(lm).items()}
    for key, qts in packed.items():
        p = params[key]
        full = torch.stack([qt.dequantize(p.dtype) for qt in qts])
        p.copy_(full.transpose(1, 2) if transposed[key] else full)


def _transposed_flags(lm: LoadedModel) -> dict[str, bool]:
    names = {id(m): n for n, m in lm.model.named_modules()}
    out = {}
    for v in lm.moe:
        for pname, (_, t) in expert_matrices(v).items():
            out[f"{names[id(v.experts)]}.{pname}"] = t
    return out


def quantized_copy(lm: LoadedModel, bits, group_size: int = 128):
    """A deep copy of ``lm.model`` with dequantized experts (for quality measurements)."""
    import copy

    model = copy.deepcopy(lm.model)
    for attr in ("_moekit_router_hook",):
        if hasattr(model, attr):
            delattr(model, attr)
    apply_dequantized(lm, quantize_experts(lm, bits, group_size), model)
    return model


def quant_record(lm: LoadedModel, bits_per: Mapping[str, Sequence[int]], group_size: int, tied: Mapping[str, str],
                 extra: Mapping | None = None) -> dict:
    """The ``moekit_quantization.json`` record (without ``tokenizer_copied``): format, scheme, and per expert
    parameter its bits per expert, shape [E, out, in] and whether it is stored transposed."""
    from moekit.compress.writer import module_names
    from moekit.version import __version__

    flags = _transposed_flags(lm)
    names = module_names(lm.model)
    mats = {f"{names[id(v.experts)]}.{p}": w for v in lm.moe
            for p, (w, _) in expert_matrices(v).items()}
    return {"format": FORMAT, "version": FORMAT_VERSION, "scheme": "asymmetric", "scale_dtype": "float16",
            "zero_dtype": "uint8", "group_size": group_size,
            "int4_packing": "two per byte, low nibble = even column",
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "tensors": {k: {"bits": list(bits_per[k]), "shape": list(mats[k].shape), "transposed": flags[k]}
                        for k in bits_per},
            "tied": dict(tied), "moekit_version": __version__, **(extra or {})}


def qtensor_specs(out_dim: int, in_dim: int, bits: int, group_size: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """dtype and shape of the ``qweight`` / ``scales`` / ``zeros`` that ``quantize_matrix`` makes of an
    (out, in) matrix (known before quantizing, for writers that declare a file's tensors first)."""
    cols = in_dim + in_dim % 2
    groups = -(-in_dim // group_size)
    return {"qweight": (torch.uint8, (out_dim, cols // 2 if bits == 4 else cols)),
            "scales": (torch.float16, (out_dim, groups)), "zeros": (torch.uint8, (out_dim, groups))}


def write_quantized(lm: LoadedModel, packed: Mapping[str, Sequence[QTensor]], out: str | Path, force: bool = False,
                    extra: Mapping | None = None) -> Path:
    """Write a moekit quantized checkpoint directory (atomic)."""
    from moekit.compress.writer import tokenizer_source
    from moekit.formats.writer import write_checkpoint

    sd = lm.model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, t in sd.items():
        if k in packed:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:  # tied weights (embeddings / lm_head) are stored once
            tied[k] = seen[ident]
            continue
        seen[ident] = k
        tensors[k] = t.detach().clone().contiguous()
    for key, qts in packed.items():
        for e, qt in enumerate(qts):
            tensors[f"{key}.{e}.qweight"] = qt.qweight.contiguous()
            tensors[f"{key}.{e}.scales"] = qt.scales.contiguous()
            tensors[f"{key}.{e}.zeros"] = qt.zeros.contiguous()
    meta = quant_record(lm, {k: [qt.bits for qt in qts] for k, qts in packed.items()},
                        next(iter(packed.values()))[0].group_size, tied, extra)
    return write_checkpoint(out, force=force, tensors=tensors.items(), config=lm.model.config,
                            dtype=next(lm.model.parameters()).dtype,
                            generation_config=getattr(lm.model, "generation_config", None),
                            tokenizer=tokenizer_source(lm), record=(QUANT_CONFIG, meta), shard_bytes=None,
                            weights_name=QUANT_WEIGHTS, weights_metadata={"format": FORMAT})


def quant_extra(lm: LoadedModel, alloc: Mapping[tuple[int, int], int], params: Mapping[tuple[int, int], int],
                avg_bits: float | None) -> dict:
    """The allocation part of the quantization record: average bits, the budget and bits per expert."""
    return {"average_bits": average_bits(alloc, params), "avg_bits_budget": avg_bits,
            "bits_per_expert": expert_values_json(alloc)}


def check_quant_args(bits: int, group_size: int) -> None:
    """Refuse unsupported bits / group sizes before any work."""
    if bits not in SUPPORTED_BITS:
        raise MoekitError(f"--bits must be 8 or 4, got {bits}")
    if group_size not in (32, 64, 128, 256):
        raise MoekitError(f"--group-size must be 32, 64, 128 or 256, got {group_size}")


def quantize(lm: LoadedModel, bits: int = 8, group_size: int = 128, avg_bits: float | None = None,
             calib=None, out: str | Path | None = None, force: bool = False, seq_len: int = 256,
             max_tokens: int | None = None, progress: bool = False) -> QuantResult:
    """Quantize ``lm``'s experts (uniform ``bits`` or mixed 4/8 under ``avg_bits``); write when ``out``."""
    check_quant_args(bits, group_size)
    if out is not None:
        from moekit.io import check_writable

        check_writable(out, force)
    params = expert_params(lm)
    if avg_bits is not None:
        if calib is None:
            raise MoekitError("mixed precision (--avg-bits) needs calibration data (--calib)")
        from moekit.compress.observer import CalibStats, observe

        stats = calib if isinstance(calib, CalibStats) else observe(lm, calib, seq_len=seq_len,
                                                                    max_tokens=max_tokens, progress=progress)
        alloc = allocate_bits(importance(lm, stats, group_size), params, avg_bits)
    else:
        alloc = {k: bits for k in params}
    packed = quantize_experts(lm, alloc, group_size)
    res = QuantResult(alloc, group_size, packed)
    if out is not None:
        res.out = write_quantized(lm, packed, out, force, quant_extra(lm, alloc, params, avg_bits))
    return res


def size_on_disk(path: str | Path) -> int:
    """Total bytes of the files in a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def expert_bytes(packed: Mapping[str, Sequence[QTensor]]) -> int:
    return sum(qt.nbytes for qts in packed.values() for qt in qts)


def effective_bits(packed: Mapping[str, Sequence[QTensor]]) -> float:
    """Bits per expert weight including scales and zero points."""
    n = sum(qt.shape[0] * qt.shape[1] for qts in packed.values() for qt in qts)
    return 8 * expert_bytes(packed) / n


def effective_bits_on_disk(path: str | Path) -> float:
    """``effective_bits`` of a written quantized checkpoint, from its safetensors header (no weight read)."""
    from moekit.formats import tensor_infos
    from moekit.formats.quantized import read_quant_meta

    path = Path(path)
    meta = read_quant_meta(path)
    infos = tensor_infos(path / QUANT_WEIGHTS)
    nbytes = sum(i.nbytes for k, i in infos.items() if k.endswith((".qweight", ".scales", ".zeros")))
    n = sum(E * o * i for E, o, i in (t["shape"] for t in meta["tensors"].values()))
    return 8 * nbytes / n


__all__ = ["FORMAT", "FORMAT_VERSION", "QUANT_CONFIG", "QUANT_WEIGHTS", "SUPPORTED_BITS", "QTensor", "QuantResult",
           "allocate_bits", "dequantize", "np", "pack_int4", "quantize", "quantize_matrix", "unpack_int4",
           "write_quantized"]
