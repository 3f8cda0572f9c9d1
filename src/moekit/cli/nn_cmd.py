"""Commands that build models: ``moekit upcycle`` (dense → MoE checkpoint).

Each command lives in its own function below; add new ones (e.g. ``moekit train``) as separate functions.
"""

from __future__ import annotations

import typer

from moekit.cli.common import (
    app,
    check_output,
    console,
    console_err,
    emit_json,
    non_negative_int,
    positive_int,
    seed_int,
)

# --------------------------------------------------------------------------------------------------
# moekit upcycle
# --------------------------------------------------------------------------------------------------


@app.command("upcycle")
def upcycle_command(
    dense: str = typer.Argument(..., help="Dense checkpoint (local directory or hub id): llama, mistral, qwen2, qwen3."),
    experts: int = typer.Option(..., "--experts", "-n", callback=positive_int, help="N: copies of each dense FFN."),
    top_k: int = typer.Option(..., "--top-k", "-k", callback=positive_int, help="k: FFN copies' worth of routed experts active per token."),
    granularity: int = typer.Option(1, "--granularity", "-m", callback=positive_int,
                                    help="m: split each FFN along its hidden dimension into m experts of width I/m."),
    shared: int = typer.Option(0, "--shared", "-s", callback=non_negative_int, help="S: of the m slices, keep S as always-on shared experts."),
    out: str = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    router: str = typer.Option("random", "--router", help="Router init: random (std 0.02) or zero."),
    seed: int = typer.Option(0, "--seed", callback=seed_int, help="Seed of the random router."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Turn a dense model into a Hugging Face MoE checkpoint (sparse upcycling, fine-grained splitting).

    Targets: llama/mistral → mixtral (glm4_moe with --shared), qwen2 → qwen2_moe, qwen3 → qwen3_moe
    (dots1 with --shared). The routed experts are N·(m−S) slices of width I/m, k·(m−S) active.

    Examples:\n
      moekit upcycle ./dense-qwen3 --experts 8 --top-k 2 --out ./qwen3-8x\n
      moekit upcycle ./llama --experts 4 --top-k 1 --granularity 4 --shared 1 --out ./llama-ft
    """
    from moekit.train.upcycle import upcycle_checkpoint

    check_output(out, force, "dir")
    with console_err.status(f"upcycling {dense}"):
        info = upcycle_checkpoint(dense, out, experts, top_k, granularity=granularity, shared=shared, seed=seed,
                                  router=router, force=force)
    if json_out:
        emit_json(info)
        return
    exact = ("exact for any router" if info["exact_for_any_router"]
             else "exact with --router zero" if info["exact_with_zero_router"] else "not exact at init (k < N)")
    console.print(f"[bold]{info['source']} → {info['target']}[/]: {info['routed_experts']} routed experts of width "
                  f"{info['expert_width']} (top-{info['routed_top_k']})"
                  + (f" + {info['shared']} shared" if info["shared"] else "") + f"; {exact}")
    console.print(f"parameters: dense {info['params_dense']:,} → total {info['params_total']:,}, "
                  f"active {info['params_active']:,}; written to {info['out']}")
