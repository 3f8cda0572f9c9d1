"""``moekit train --config FILE.yaml``: train a config-driven MoELM on the bundled corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli.common import app, console, emit_json, join_ranks, positive_int


@app.command("train")
def train_command(
    config: str = typer.Option(
        ..., "--config", "-c", help="YAML run config with model:, data:, train: sections."
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Output directory (default: runs/<config name>)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint exactly."),
    stop_at: int | None = typer.Option(
        None,
        "--stop-at",
        callback=positive_int,
        help="Stop (and checkpoint) after this step; the LR schedule still spans train.steps.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    json_out: bool = typer.Option(False, "--json", help="Print the final evaluation as JSON."),
) -> None:
    """Train an MoELM (router research model): checkpoints, resume, per-domain validation, loss plot.

    Writes OUT/checkpoint/ (model, optimiser, step, RNG state), OUT/log.json and OUT/loss.png.

    Examples:\n
      moekit train --config configs/router_topk.yaml --out runs/topk\n
      moekit train --config configs/router_topk.yaml --out runs/topk --resume\n
      torchrun --nproc-per-node 2 -m moekit train --config configs/router_aux_free.yaml --out runs/ep
    """
    from moekit.errors import MoekitError
    from moekit.io import check_parent
    from moekit.train.config_train import load_run_config, run_training

    out_dir = Path(out) if out else Path("runs") / Path(config).stem
    if out_dir.exists() and not out_dir.is_dir():
        raise MoekitError(f"--out {out_dir} is a file; training writes a directory")
    check_parent(out_dir)
    run = load_run_config(config)
    world = join_ranks()
    log = run_training(run, out_dir, resume=resume, stop_at=stop_at, progress=not no_progress, world=world)
    if world is not None and not world.is_main:
        return
    last = log["evals"][-1] if log["evals"] else None
    if json_out:
        emit_json(
            {
                "out": str(out_dir),
                "step": log["steps"][-1] if log["steps"] else 0,
                "train_loss": log["lm_loss"][-1] if log["lm_loss"] else None,
                "eval": last,
            }
        )
        return
    if log["steps"]:
        console.print(
            f"step {log['steps'][-1]}: train loss {log['lm_loss'][-1]:.3f} "
            f"({log['tokens_seen']:,} tokens, {log['seconds']:.0f}s)"
        )
    if last:
        per = ", ".join(f"{d} {v:.3f}" for d, v in last["val_loss"].items())
        console.print(
            f"validation (step {last['step']}): mean {last['val_loss_mean']:.3f} ({per}); "
            f"load CV {last['load_cv']:.3f}; active experts/token {last['active_experts']:.2f}"
        )
    console.print(f"checkpoint, log.json and loss.png in {out_dir}")
