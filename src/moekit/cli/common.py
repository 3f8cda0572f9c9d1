"""Shared pieces of the CLI: the app, consoles, option parsing helpers, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from moekit.errors import MoekitError

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


def parse_experts(text: str | None) -> list[tuple[int, int]]:
    """``"3:5,4:1"`` → [(3, 5), (4, 1)] with a one-line error on bad syntax."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            layer, expert = item.split(":")
            out.append((int(layer), int(expert)))
        except ValueError:
            raise MoekitError(f"bad expert {item!r}: write LAYER:EXPERT, e.g. 3:5") from None
    return out


def parse_expert_values(text: str | None) -> dict[tuple[int, int], float]:
    """``"3:5=2.0,4:1=0.5"`` → {(3, 5): 2.0, (4, 1): 0.5}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        item = item.strip()
        try:
            key, value = item.split("=")
            (layer, expert), = parse_experts(key)
            out[(layer, expert)] = float(value)
        except ValueError:
            raise MoekitError(f"bad expert value {item!r}: write LAYER:EXPERT=X, e.g. 3:5=2.0") from None
    return out


def load_model(spec: str | None):
    """Load a model for a command, with a status spinner."""
    import moekit
    from moekit.models import DEFAULT_MODEL

    with console_err.status(f"loading {spec or DEFAULT_MODEL}"):
        return moekit.load(spec or DEFAULT_MODEL)


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
