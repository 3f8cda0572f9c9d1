"""``moekit inspect``: architecture, MoE layers, experts, top-k, shared experts, rule, parameters."""

from __future__ import annotations

import typer
from rich.table import Table

from moekit.cli.common import DTYPE_OPTION, MODEL_HELP, app, console, console_err, emit_json
from moekit.models.summary import describe


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
    list_architectures: bool = typer.Option(False, "--list-architectures",
                                            help="Print the support table of every MoE architecture (no MODEL)."),
) -> None:
    """Show the MoE structure of a model (from its config and safetensors headers: no weight is read).

    Examples:\n
      moekit inspect moekit:tiny\n
      moekit inspect ./my-olmoe-checkpoint --json\n
      moekit inspect allenai/OLMoE-1B-7B-0924\n
      moekit inspect --list-architectures
    """
    if list_architectures:
        _print_support(json_out)
        return
    from moekit.models import DEFAULT_MODEL
    from moekit.models.loading import load_structure, parse_dtype

    parse_dtype(dtype)
    with console_err.status(f"reading the structure of {model or DEFAULT_MODEL}"):
        lm = load_structure(model or DEFAULT_MODEL, dtype)
        info = describe(lm)
    if json_out:
        emit_json(info)
        return
    console.print(
        f"[bold]{info['model']}[/]  architecture [cyan]{info['architecture']}[/]"
        + ("  (generic mapping)" if info["generic_mapping"] else "")
        + f"  decoder layers {info['decoder_layers']}  MoE layers {info['moe_layers']}"
        + (f"  dense layers {info['dense_layers']}" if info["dense_layers"] else "")
    )
    console.print(f"parameters: total {_fmt(info['params_total'])}, active per token {_fmt(info['params_active'])}"
                  f" (routed experts {_fmt(info['params_routed_experts'])})")
    console.print(f"weights: {info['dtype']}, {info['bytes_total'] / 1e9:.2f} GB "
                  f"(routed experts {info['bytes_routed_experts'] / 1e9:.2f} GB, resident rest "
                  f"{info['bytes_resident'] / 1e9:.2f} GB)")
    table = Table("layer", "experts", "top-k", "shared", "expert width", "selection rule")
    for row in info["layers"]:
        shared = ", ".join(f"{n} ({_fmt(c)})" for n, c in row["shared"].items()) or "-"
        table.add_row(str(row["layer"]), str(row["num_experts"]), str(row["top_k"]), shared,
                      str(row["expert_hidden"]), row["rule"])
    console.print(table)


def _print_support(json_out: bool) -> None:
    """The support table of ``moekit.models.support`` (the one the tests check)."""
    from moekit.models.support import support_rows

    rows = support_rows()
    if json_out:
        emit_json(rows)
        return
    from moekit.models.support import FEATURES

    table = Table("architecture", "selection rule", *FEATURES, title="MoE architectures (docs/architectures.md: why not)")
    for r in rows:
        table.add_row(r["architecture"], r["rule"], *("yes" if f in r["works"] else "-" for f in FEATURES))
    console.print(table)
