"""``moekit eval``: token-weighted perplexity per file and per domain."""

from __future__ import annotations

import typer
from rich.table import Table

from moekit.cli.common import (
    DTYPE_OPTION,
    EP_HELP,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    app,
    console,
    emit_json,
    join_ranks,
    load_model,
    positive_int,
)
from moekit.data.corpus import CORPUS_SPEC_HELP


@app.command("eval")
def eval_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    data: list[str] = typer.Option(["moekit:corpus:test"], "--data", "-d",
                                   help=f"Text/JSONL files or {CORPUS_SPEC_HELP} (default: the bundled test split)."),
    max_tokens: int = typer.Option(None, "--max-tokens", callback=positive_int, help="Evaluate at most this many tokens."),
    seq_len: int = typer.Option(256, "--seq-len", callback=positive_int, help="Window length in tokens."),
    batch_size: int = typer.Option(8, "--batch-size", callback=positive_int),
    adapter: str = typer.Option(None, "--adapter",
                                help="Evaluate with this PEFT adapter directory (moekit adapt train/compose)."),
    expert_parallel: bool = typer.Option(False, "--expert-parallel", help=EP_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Perplexity of a model per file and per domain.

    Examples:\n
      moekit eval moekit:tiny\n
      moekit eval ./pruned --data notes.txt --data code.jsonl --json\n
      moekit eval moekit:tiny --adapter ad/code --data moekit:corpus:test\n
      torchrun --nproc-per-node 2 -m moekit eval moekit:tiny --json
    """
    from moekit.data import read_documents
    from moekit.eval import perplexity

    world = join_ranks()
    docs = read_documents(data)
    lm = load_model(model, dtype, max_memory, world, expert_parallel)
    if adapter is not None:
        import dataclasses

        from moekit.adapters import load_adapter

        lm = dataclasses.replace(lm, model=load_adapter(lm.model, adapter), name=f"{lm.name}+{adapter}")
    if world is None:
        result = perplexity(lm, docs, max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len,
                            progress=not json_out)
    else:
        from moekit.distributed.data_parallel import perplexity_dp

        result = perplexity_dp(lm, docs, world, max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len,
                               progress=not json_out)
        if not world.is_main:
            return
    if json_out:
        emit_json(result)
        return
    for key, title in (("by_domain", "domain"), ("by_source", "file")):
        rows = result.get(key) or {}
        if len(rows) <= 1 and key == "by_source":
            continue
        table = Table(title, "tokens", "NLL", "perplexity")
        for name, row in rows.items():
            table.add_row(name, str(row["tokens"]), f"{row['nll']:.4f}", f"{row['perplexity']:.2f}")
        console.print(table)
    console.print(f"[bold]all:[/] {result['tokens']} tokens, perplexity {result['perplexity']:.3f}")
