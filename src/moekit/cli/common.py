"""Shared pieces of the CLI: the app, consoles, option parsing helpers, JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet, expert_values
from moekit.validate import SEED_MAX, finite_float, integer, parse_float

app = typer.Typer(
    name="moekit",
    help="See, steer, compress, serve and build Mixture-of-Experts language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
console_err = Console(stderr=True)

MODEL_HELP = "Hub id, local checkpoint directory or bundled name (moekit:tiny, moekit:tiny-shared)."
DTYPE_OPTION = typer.Option("auto", "--dtype", help="Weights dtype: auto (the checkpoint's), bfloat16, float16 "
                            "or float32.")
MAX_MEMORY_OPTION = typer.Option(None, "--max-memory", help="Peak memory to stay under, e.g. 6GB: experts are "
                                 "served from the checkpoint through a cache when the model does not fit.")
PACKED_EXPERTS_OPTION = typer.Option(False, "--packed-experts", help="A moekit int4 checkpoint (moekit quantize "
                                     "--bits 4): keep its experts packed (0.52 bytes per weight at groups of 128), "
                                     "in memory or, offloaded, in the expert cache, run by moekit's int4 decode "
                                     "kernel.")


def emit_json(obj: Any) -> None:
    """Print a machine-readable result on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def parse_experts(text: str | None, option: str = "expert") -> ExpertSet:
    """An expert option: ``"3:5,4:1"`` or an expert-set JSON file (``moekit steer find`` output, ...);
    a one-line error on bad syntax, a negative or huge index, or an unreadable file."""
    return ExpertSet.from_option(text, option)


def parse_expert_values(text: str | None, option: str = "expert value", lo: float | None = None,
                        hi: float | None = None) -> dict[ExpertRef, float]:
    """``"3:5=2.0,4:1=0.5"`` (or ``FILE=X``: every expert of an expert-set file) → {ExpertRef: value};
    values finite and within [lo, hi]."""
    return {ref: finite_float(f"{option} {ref}", parse_float(f"{option} {ref}={value}", value), lo, hi)
            for ref, value in expert_values(text, option).items()}


# ----- option validation: typer callbacks that run while the command line is parsed, before any work -----
def _option_name(param) -> str:
    opts = list(getattr(param, "opts", None) or []) or [getattr(param, "name", "value")]
    return max(opts, key=len)


def int_option(lo: int | None = 1, hi: int | None = None) -> Callable:
    """A typer callback: the option is an integer in [lo, hi] (None passes: the option was not given)."""

    def callback(param: typer.CallbackParam, value: int | None) -> int | None:
        return None if value is None else integer(_option_name(param), value, lo, hi)

    return callback


def float_option(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> Callable:
    """A typer callback: the option is a finite number in the interval (NaN and ±inf are refused)."""

    def callback(param: typer.CallbackParam, value: float | None) -> float | None:
        return None if value is None else finite_float(_option_name(param), value, lo, hi, lo_open, hi_open)

    return callback


positive_int = int_option(1)
"""Counts that must be at least 1: --seq-len, --batch-size, --max-tokens, --top, ..."""
non_negative_int = int_option(0)
seed_int = int_option(0, SEED_MAX)
finite_non_negative = float_option(0.0)
open_unit_ratio = float_option(0.0, 1.0, lo_open=True, hi_open=True)
"""Fractions strictly between 0 and 1: --ratio."""
probability_mass = float_option(0.0, 1.0, lo_open=True)
"""Top-p style masses in (0, 1]: --top-p, --sample-top-p."""


def check_output(path, force: bool, kind: str = "file"):
    """Validate an ``--out`` before the work starts (see ``moekit.io.check_writable``)."""
    from moekit.io import check_writable

    return check_writable(path, force, kind=kind)


EP_HELP = ("Under torchrun: shard every MoE layer's experts over the ranks with transformers' expert parallelism "
           "(DistributedConfig ep_size = ranks) instead of a whole model per rank.")


def load_model(spec: str | None, dtype: str | None = "auto", max_memory: str | None = None, world=None,
               expert_parallel: bool = False, packed_experts: bool = False):
    """Load a model for a command (``--dtype``, ``--max-memory``), with a status spinner; ``expert_parallel``
    shards it over ``world``'s ranks; ``packed_experts`` keeps a quantized checkpoint's int4 experts packed."""
    from moekit.models import DEFAULT_MODEL
    from moekit.models.loading import parse_dtype
    from moekit.serve.placement import load, parse_size

    parse_dtype(dtype)  # bad input fails before any work
    if max_memory is not None:
        parse_size(max_memory)
    if expert_parallel:
        if world is None:
            raise MoekitError("--expert-parallel needs several ranks: start the command with torchrun --nproc-per-node N")
        if max_memory is not None:
            raise MoekitError("give --expert-parallel or --max-memory, not both")
        if packed_experts:
            raise MoekitError("give --expert-parallel or --packed-experts, not both")
        from moekit.distributed.data_parallel import load_expert_parallel

        return load_expert_parallel(spec or DEFAULT_MODEL, world, dtype=parse_dtype(dtype))
    with console_err.status(f"loading {spec or DEFAULT_MODEL}"):
        return load(spec or DEFAULT_MODEL, dtype=dtype, max_memory=max_memory, packed_experts=packed_experts)


def use_fast_decode(lm) -> None:
    """moekit's dispatch and CPU decode kernel for the experts, on the expert cache's slots when they are offloaded
    (``lm.engine``, or an engine started later), and for the attention and lm_head linears (docs/nn.md, serving.md);
    a one-token step's RMSNorms, attention, router and experts' glue in one native call each (``fused_decode``).
    Without a memory budget's engine the resident CPU weights also move onto 2 MiB pages (``to_huge_pages``: 1.08-1.14x
    decode in bench_decode, docs/nn.md "Where a decode step goes")."""
    from moekit.nn.cpu_kernels import use_for_linears
    from moekit.nn.dispatch import use_moekit_experts
    from moekit.nn.fused_decode import use_fused_decode
    from moekit.nn.huge_pages import to_huge_pages

    if lm.engine is not None:
        lm.engine.set_experts_implementation("moekit")
    else:
        use_moekit_experts(lm.model)
        to_huge_pages(lm.model)  # CPU tensors of >= 2 MiB (meta/offloaded banks and GPU tensors are skipped)
    use_for_linears(lm.model)
    use_fused_decode(lm.model)


def join_ranks():
    """Under ``torchrun``: join the job and return its ``World`` (data parallel: every rank holds the whole model
    and runs a share of the batches); None in a single process."""
    from moekit.distributed.runtime import init

    return init()


def fail(message: str) -> None:
    raise MoekitError(message)


def version_callback(value: bool) -> None:
    if value:
        import moekit

        typer.echo(moekit.__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """moekit: see, steer, compress, serve and build Mixture-of-Experts language models."""
