"""``moekit prune`` / ``merge`` / ``quantize``: shrink an MoE into a checkpoint that loads anywhere."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli.choices import choice_callback, choice_help
from moekit.cli.common import (
    DTYPE_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    app,
    check_output,
    console,
    console_err,
    emit_json,
    float_option,
    int_option,
    join_ranks,
    load_model,
    open_unit_ratio,
    parse_experts,
    positive_int,
    seed_int,
)
from moekit.compress.criteria import CRITERIA, needs_calibration
from moekit.compress.merge import MERGERS
from moekit.data.corpus import CORPUS_SPEC_HELP
from moekit.errors import MoekitError, UnsupportedArchitecture

_CALIB_HELP = f"Calibration text: files (one document each), JSONL with 'text', or {CORPUS_SPEC_HELP}."


def _check_supported(lm) -> None:
    from moekit.compress.writer import expert_count_fields

    if lm.moe.generic:
        raise UnsupportedArchitecture(f"{lm.moe.model_type} is mapped generically; compression supports only the "
                                      "listed architectures (see `moekit inspect`)")
    expert_count_fields(lm.config)


def _fits(model: str | None, dtype: str | None, max_memory: str | None) -> bool:
    """True when ``model`` fits ``--max-memory`` whole (always without a budget); from the structure only."""
    if max_memory is None:
        return True
    from moekit.models.loading import load_structure, parse_dtype
    from moekit.serve.placement import parse_size, plan_budget

    parse_dtype(dtype)
    return bool(plan_budget(load_structure(model or "moekit:tiny", dtype), parse_size(max_memory))["resident_all"])


def _activation_share(max_memory: str | None) -> int | None:
    """The part of ``--max-memory`` set aside for activations (what sizes the streamed calibration batches)."""
    if max_memory is None:
        return None
    from moekit.serve.placement import ACTIVATION_SHARE, parse_size

    return int(ACTIVATION_SHARE * parse_size(max_memory))


def _local_path(model: str | None):
    """The local directory of ``model`` (the streaming, layer-by-layer paths read its safetensors files)."""
    from moekit.models.loading import resolve

    path, _ = resolve(model or "moekit:tiny")
    if path is None:
        raise MoekitError("a model larger than --max-memory must be a local checkpoint directory "
                          "(download the hub model first)")
    return path


def _read_calib(calib: list[str] | None):
    from moekit.data import read_documents

    if not calib:
        raise MoekitError("calibration data is empty: give at least one --calib file")
    docs = read_documents(calib)
    if not any(d.text.strip() for d in docs):
        raise MoekitError("calibration data is empty: the --calib files contain no text")
    return docs


def _load_resident(model: str, dtype, max_memory, docs, seq_len: int, max_tokens: int | None):
    """The in-memory path of prune/merge: join a torchrun job if there is one, load and check the model, and under
    torchrun gather the calibration statistics over the ranks; returns ``(lm, world, docs)``."""
    world = join_ranks()
    lm = load_model(model, dtype, max_memory)
    _check_supported(lm)
    if world is not None:
        docs = _observe_dp(lm, docs, world, seq_len, max_tokens)
    return lm, world, docs


def _observe_dp(lm, docs, world, seq_len: int, max_tokens: int | None):
    """Under torchrun: calibration statistics with the batches split over the ranks (exactly the one-process ones)."""
    if docs is None:
        return None
    from moekit.distributed.data_parallel import observe_dp

    return observe_dp(lm, docs, world, seq_len=seq_len, max_tokens=max_tokens)


@app.command("prune")
def prune_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    method: str = typer.Option("reap", "--method", "-m", callback=choice_callback(CRITERIA),
                               help=choice_help(CRITERIA, "Pruning criterion", {"calibration": "--calib"})),
    ratio: float = typer.Option(..., "--ratio", "-r", callback=open_unit_ratio, help="Fraction of experts to remove (0.25 = a quarter)."),
    global_budget: bool = typer.Option(False, "--global", help="One budget over all layers (scores normalised "
                                       "per layer); unequal counts need a router bias (GPT-OSS, DeepSeek-V3)."),
    protect_super: bool = typer.Option(False, "--protect-super", help="Never remove detected super experts."),
    protect: str = typer.Option(None, "--protect", help="Experts never removed: 3:5,4:1 or an expert-set JSON file "
                                "(e.g. the output of `moekit steer find`; docs/experts.md)."),
    calib: list[str] = typer.Option(None, "--calib", "-c", help=_CALIB_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    seed: int = typer.Option(0, "--seed", callback=seed_int, help="Seed of the random criterion."),
    max_tokens: int = typer.Option(65536, "--max-tokens", callback=positive_int, help="Calibration tokens at most."),
    seq_len: int = typer.Option(256, "--seq-len", callback=positive_int, help="Calibration window length."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Calibrate one decoder layer at a time from the "
                                    "safetensors files (for models larger than RAM; local checkpoints only)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Remove the least important experts and write a normal HF checkpoint.

    Examples:\n
      moekit prune moekit:tiny --method reap --ratio 0.25 --calib moekit:corpus:validation --out tiny-reap25\n
      moekit prune ./ckpt --method easy-ep --ratio 0.5 --calib code_demos.jsonl --out ckpt-code --protect-super\n
      moekit prune ./big --method frequency --ratio 0.5 --calib notes.txt --out big-half --low-memory\n
      moekit prune moekit:tiny --ratio 0.5 --calib moekit:corpus:validation --protect digits.json --out tiny-half
    """
    CRITERIA.get(method)
    protected = parse_experts(protect, "--protect expert")
    check_output(out, force, "dir")
    docs = _read_calib(calib) if (calib or needs_calibration(method, protect_super)) else None
    world = None
    if low_memory or not _fits(model, dtype, max_memory):
        from moekit.compress.lowmem import prune_lowmem

        res = prune_lowmem(_local_path(model), method, ratio, docs, out, force=force, global_budget=global_budget,
                           protect_super=protect_super, seed=seed, seq_len=seq_len, max_tokens=max_tokens,
                           progress=not json_out, dtype=dtype, protect=protected,
                           activation_bytes=_activation_share(max_memory))
    else:
        from moekit.compress.prune import prune

        lm, world, docs = _load_resident(model, dtype, max_memory, docs, seq_len, max_tokens)
        res = prune(lm, method, ratio, docs, out=out if world is None or world.is_main else None, force=force, global_budget=global_budget,
                    protect_super=protect_super, seed=seed, seq_len=seq_len, max_tokens=max_tokens,
                    progress=not json_out, protect=protected)
    if world is not None and not world.is_main:
        return
    summary = res.summary()
    if json_out:
        emit_json(summary)
    else:
        per = sorted(set(summary["kept_per_layer"].values()))
        console.print(f"wrote {out}: {method} at ratio {ratio}, kept {summary['experts_kept']} experts "
                      f"({'/'.join(map(str, per))} per layer)"
                      + (", protected " + ",".join(summary["protected"]) if summary["protected"] else ""))


@app.command("merge")
def merge_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    method: str = typer.Option("m-smoe", "--method", "-m", callback=choice_callback(MERGERS),
                               help=choice_help(MERGERS, "Merging method", {"calibration": "--calib"})),
    ratio: float = typer.Option(..., "--ratio", "-r", callback=open_unit_ratio, help="Fraction of experts merged away."),
    calib: list[str] = typer.Option(None, "--calib", "-c", help=_CALIB_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    protect_super: bool = typer.Option(False, "--protect-super", help="Super experts are always group centres."),
    protect: str = typer.Option(None, "--protect", help="Experts kept unchanged as group centres: 3:5,4:1 or an "
                                "expert-set JSON file (docs/experts.md)."),
    max_tokens: int = typer.Option(65536, "--max-tokens", callback=positive_int, help="Calibration tokens at most."),
    seq_len: int = typer.Option(256, "--seq-len", callback=positive_int, help="Calibration window length."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Merge experts (M-SMoE: frequency centres, router-logit similarity, neuron alignment).

    Examples:\n
      moekit merge moekit:tiny --ratio 0.25 --calib moekit:corpus:validation --out tiny-merged
    """
    from moekit.compress.merge import merge

    protected = parse_experts(protect, "--protect expert")
    check_output(out, force, "dir")
    docs = _read_calib(calib)
    world = None
    if not _fits(model, dtype, max_memory):
        from moekit.compress.lowmem import merge_lowmem, meta_model

        _check_supported(meta_model(_local_path(model), dtype))
        res = merge_lowmem(_local_path(model), ratio, docs, out, force=force, protect_super=protect_super,
                           seq_len=seq_len, max_tokens=max_tokens, progress=not json_out, dtype=dtype,
                           method=method, protect=protected, activation_bytes=_activation_share(max_memory))
    else:
        lm, world, docs = _load_resident(model, dtype, max_memory, docs, seq_len, max_tokens)
        res, _ = merge(lm, ratio, docs, out=out if world is None or world.is_main else None, force=force,
                       protect_super=protect_super, seq_len=seq_len, max_tokens=max_tokens, progress=not json_out,
                       method=method, protect=protected)
    if world is not None and not world.is_main:
        return
    summary = res.summary()
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: {method} at ratio {ratio}, experts per layer "
                      f"{sorted(set(summary['experts_per_layer'].values()))}")


@app.command("quantize")
def quantize_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    bits: int = typer.Option(8, "--bits", "-b", help="Expert weight bits: 8 or 4."),
    group_size: int = typer.Option(128, "--group-size", callback=int_option(2), help="Weights per scale along the input dim (32-256)."),
    avg_bits: float = typer.Option(None, "--avg-bits", callback=float_option(4.0, 8.0), help="Mixed 4/8-bit experts under this average "
                                   "(by importance; needs --calib)."),
    calib: list[str] = typer.Option(None, "--calib", "-c", help=_CALIB_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    max_tokens: int = typer.Option(65536, "--max-tokens", callback=positive_int, help="Calibration tokens at most."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Quantize expert weights (weight-only, group-wise, asymmetric); load the result with moekit.

    Examples:\n
      moekit quantize moekit:tiny --bits 4 --group-size 64 --out tiny-int4\n
      moekit quantize moekit:tiny --avg-bits 5 --calib moekit:corpus:validation --out tiny-mixed
    """
    from moekit.compress.quantize import effective_bits_on_disk, expert_params, quantize, size_on_disk

    if bits not in (4, 8):
        raise MoekitError(f"--bits must be 8 or 4, got {bits}")
    check_output(out, force, "dir")
    docs = _read_calib(calib) if (avg_bits is not None or calib) else None
    if avg_bits is not None and docs is None:
        raise MoekitError("mixed precision (--avg-bits) needs calibration data (--calib)")
    if not _fits(model, dtype, max_memory):
        from moekit.compress.lowmem import meta_model, quantize_lowmem

        lm = meta_model(_local_path(model), dtype)
        _check_supported(lm)
        res = quantize_lowmem(lm.path, bits=bits, group_size=group_size, avg_bits=avg_bits, docs=docs, out=out,
                              force=force, max_tokens=max_tokens, progress=not json_out, dtype=dtype,
                              activation_bytes=_activation_share(max_memory))
    else:
        lm = load_model(model, dtype, max_memory)
        _check_supported(lm)
        res = quantize(lm, bits=bits, group_size=group_size, avg_bits=avg_bits, calib=docs, out=out, force=force,
                       max_tokens=max_tokens, progress=not json_out)
    params = expert_params(lm)
    summary = {"out": str(out), "group_size": group_size, "average_bits": res.average_bits(params),
               "effective_bits_with_scales": effective_bits_on_disk(out), "bytes_on_disk": size_on_disk(out),
               "experts_8bit": sum(b == 8 for b in res.bits.values()),
               "experts_4bit": sum(b == 4 for b in res.bits.values())}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: experts at {summary['average_bits']:.2f} bits on average "
                      f"({summary['effective_bits_with_scales']:.2f} with scales), "
                      f"{summary['bytes_on_disk'] / 1e6:.2f} MB on disk")


__all__ = ["console_err"]
