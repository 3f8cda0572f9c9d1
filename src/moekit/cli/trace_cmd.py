"""``moekit trace``: record routing over text files into a RoutingTrace file."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli.common import (
    DTYPE_OPTION,
    EP_HELP,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    app,
    check_output,
    console,
    emit_json,
    join_ranks,
    load_model,
    positive_int,
)
from moekit.data.corpus import CORPUS_SPEC_HELP


@app.command("trace")
def trace_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    data: list[str] = typer.Option(..., "--data", "-d", help="Text files (one document each), JSONL with "
                                   f"'text' and optional 'domain', or {CORPUS_SPEC_HELP}."),
    out: Path = typer.Option(..., "--out", "-o", help="Output trace file (.trace)."),
    max_tokens: int = typer.Option(None, "--max-tokens", callback=positive_int, help="Stop after this many tokens."),
    seq_len: int = typer.Option(512, "--seq-len", callback=positive_int, help="Documents are cut into windows of this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", callback=positive_int),
    probs: bool = typer.Option(False, "--probs", help="Also store full router probabilities."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    expert_parallel: bool = typer.Option(False, "--expert-parallel", help=EP_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Record which experts every token uses.

    Examples:\n
      moekit trace moekit:tiny --data moekit:corpus:test --out test.trace\n
      moekit trace ./ckpt --data notes.txt --data more.jsonl --out notes.trace --max-tokens 20000\n
      torchrun --nproc-per-node 2 -m moekit trace moekit:tiny --data moekit:corpus:test --out test.trace
    """
    from moekit.data import read_documents
    from moekit.routing.tracing import trace_documents

    check_output(out, force, "trace")
    world = join_ranks()
    docs = read_documents(data)
    lm = load_model(model, dtype, max_memory, world, expert_parallel)
    fields = ("ids", "weights", "probs") if probs else ("ids", "weights")
    if world is None:
        trace = trace_documents(lm, docs, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, fields=fields)
    else:
        from moekit.distributed.data_parallel import trace_documents_dp

        trace = trace_documents_dp(lm, docs, world, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                                   fields=fields)
        if not world.is_main:
            return
    trace.save(out, force=force)
    summary = {"out": str(out), "tokens": trace.num_tokens, "documents": int(trace.doc.max()) + 1,
               "moe_layers": trace.num_layers, "domains": trace.domains, "bytes": out.stat().st_size}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: {summary['tokens']} tokens, {summary['documents']} documents, "
                      f"{summary['moe_layers']} MoE layers" + (f", domains {summary['domains']}" if trace.domains else ""))
