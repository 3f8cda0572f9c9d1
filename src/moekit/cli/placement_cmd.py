"""``moekit placement plan|simulate|apply``: expert placement across ranks from a routing trace."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli.choices import choice_callback, choice_help
from moekit.cli.common import MODEL_HELP, app, console, emit_json, load_model
from moekit.distributed.placement import PLACEMENTS

placement_app = typer.Typer(help="Plan which experts live on which rank from a trace, simulate the traffic, and "
                                 "permute a checkpoint to the plan.", no_args_is_help=True)
app.add_typer(placement_app, name="placement")

_METHOD_HELP = choice_help(PLACEMENTS, "Placement method")
_BYTES_HELP = "Bytes one token's hidden state takes on the wire (hidden size × dtype bytes) to report bytes too."


def _table(rows: list[dict]) -> Table:
    table = Table("method", "ranks", "a2a transfers/token", "coherent transfers/token", "load max/mean (mean, worst layer)")
    for r in rows:
        table.add_row(r["method"], str(r["ranks"]), f"{r['a2a_transfers_per_token']:.3f}", f"{r['coherent_transfers_per_token']:.3f}",
                      f"{r['imbalance_mean']:.3f}, {r['imbalance_max']:.3f}")
    return table


def _load_trace(path: Path):
    from moekit.trace import RoutingTrace

    return RoutingTrace.load(path, mmap=True)


@placement_app.command("plan")
def plan_command(
    trace: Path = typer.Argument(..., help="Routing trace (from `moekit trace`)."),
    ranks: int = typer.Option(..., "--ranks", "-r", help="Number of ranks (must divide every layer's expert count)."),
    method: str = typer.Option("affinity", "--method", "-m", callback=choice_callback(PLACEMENTS), help=_METHOD_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output placement file (JSON)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random method."),
    bytes_per_token: float = typer.Option(None, "--bytes-per-token", help=_BYTES_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print the simulation as JSON."),
) -> None:
    """Plan a placement and simulate it on the trace next to the contiguous default and a random plan.

    Examples:\n
      moekit placement plan c.trace --ranks 4 --method affinity --out place.json\n
      moekit placement plan c.trace --ranks 2 --method least-loaded --out place.json --json
    """
    from moekit.distributed.placement import check_ranks, plan, simulate
    from moekit.io import check_writable

    PLACEMENTS.get(method)
    check_writable(out, force)
    t = _load_trace(trace)
    check_ranks(ranks, t.num_experts)
    placement = plan(t, ranks, method, seed)
    rows = [simulate(t, placement, bytes_per_token)]
    for base in ("contiguous", "random"):
        if base != method:
            rows.append(simulate(t, plan(t, ranks, base, seed), bytes_per_token))
    placement.meta["simulation"] = rows
    placement.save(out, force=force)
    if json_out:
        emit_json({"out": str(out), "simulation": rows})
        return
    console.print(_table(rows))
    console.print(f"wrote {out}: {method} placement of {t.num_layers} MoE layers on {ranks} ranks")


@placement_app.command("simulate")
def simulate_command(
    trace: Path = typer.Argument(..., help="Routing trace (from `moekit trace`)."),
    placement: list[Path] = typer.Argument(None, help="Placement files to simulate (default: none)."),
    ranks: int = typer.Option(None, "--ranks", "-r", help="Also plan every registered method for this many ranks."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random method."),
    bytes_per_token: float = typer.Option(None, "--bytes-per-token", help=_BYTES_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Simulate all-to-all volume and load imbalance of placements on a trace (e.g. a held-out one).

    Examples:\n
      moekit placement simulate test.trace place.json\n
      moekit placement simulate test.trace --ranks 4
    """
    from moekit.distributed.placement import Placement, compare, simulate
    from moekit.errors import MoekitError

    if not placement and ranks is None:
        raise MoekitError("give placement files or --ranks N")
    t = _load_trace(trace)
    rows = [dict(simulate(t, Placement.load(p), bytes_per_token), file=str(p)) for p in placement or []]
    if ranks is not None:
        rows += compare(t, ranks, seed=seed, bytes_per_token=bytes_per_token)
    if json_out:
        emit_json(rows)
    else:
        console.print(_table(rows))


@placement_app.command("apply")
def apply_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    placement: Path = typer.Argument(..., help="Placement file (from `moekit placement plan`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Permute every MoE layer's experts so that contiguous sharding gives the planned placement (exact).

    Examples:\n
      moekit placement apply ./olmoe place.json --out ./olmoe-placed
    """
    from moekit.distributed.apply import check_placement, write_placed
    from moekit.distributed.placement import Placement
    from moekit.io import check_writable

    check_writable(out, force)
    p = Placement.load(placement)
    lm = load_model(model)
    check_placement(lm, p)
    write_placed(lm, p, out, force=force)
    summary = {"out": str(out), "method": p.method, "ranks": p.ranks, "moe_layers": len(p.layers),
               "moved_experts": sum(int(sum(o != e for e, o in enumerate(p.order(i)))) for i in range(len(p.layers)))}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: experts of {summary['moe_layers']} MoE layers permuted for {p.ranks} ranks "
                      f"({summary['moved_experts']} moved)")
