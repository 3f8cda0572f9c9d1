"""``moekit steer find``: rank the experts whose routing separates two example sets (or marks tokens)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from moekit.cli.choices import choice_callback, choice_help
from moekit.cli.common import (
    DTYPE_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    app,
    check_output,
    console,
    emit_json,
    load_model,
    positive_int,
)
from moekit.data.corpus import CORPUS_SPEC_HELP
from moekit.steer.detect import DETECTORS, INPUT_OPTIONS

steer_app = typer.Typer(help="Find the experts tied to a behaviour (then steer with `moekit generate --steer`).",
                        no_args_is_help=True)
app.add_typer(steer_app, name="steer")


@steer_app.command("find")
def find_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    pos: str = typer.Option(..., "--pos", help="Examples of the behaviour: text (one example per line), JSONL "
                            "with 'response' (+ optional 'prompt', not counted) or 'text', or "
                            f"{CORPUS_SPEC_HELP}."),
    neg: str = typer.Option(None, "--neg", help="Contrasting examples, same formats (optional for npmi)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output experts file (JSON)."),
    method: str = typer.Option("risk_diff", "--method", callback=choice_callback(DETECTORS),
                               help=choice_help(DETECTORS, "Detection method", INPUT_OPTIONS)),
    markers: str = typer.Option(None, "--markers", help="Comma-separated marker strings for npmi, e.g. 'Alternatively,Wait'."),
    top: int = typer.Option(10, "--top", callback=positive_int, help="How many experts the steering presets use by default."),
    max_len: int = typer.Option(256, "--max-len", callback=positive_int, help="Tokens per example (longer ones are cut)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print the top entries as JSON."),
) -> None:
    """Rank (layer, expert) by how strongly routing differs between --pos and --neg.

    Examples:\n
      moekit steer find moekit:tiny --pos digits.txt --neg words.txt --out digits.json\n
      moekit steer find moekit:tiny --pos moekit:corpus:validation:code --neg moekit:corpus:validation:prose --out code.json\n
      moekit steer find moekit:tiny --pos qa.jsonl --neg qa_bad.jsonl --method contrast --out e.json --top 4\n
      moekit steer find moekit:tiny --pos traces.txt --method npmi --markers "equals,plus" --out m.json
    """
    from moekit.steer.detect import check_inputs, find_experts, read_examples, save_experts

    mk = [m for m in (markers or "").split(",") if m.strip()]
    check_inputs(method, neg is not None, bool(mk))
    check_output(out, force, "json")
    pos_ex = read_examples(pos)
    neg_ex = read_examples(neg) if neg is not None else None
    lm = load_model(model, dtype, max_memory)
    result = find_experts(lm, pos_ex, neg_ex, method=method, markers=mk or None, top=top, max_len=max_len)
    save_experts(result, out, force=force)
    head = result["entries"][:top]
    if json_out:
        emit_json({"out": str(out), "method": method, "sets": result["sets"], "experts": result["experts"],
                   "top": head})
        return
    sets = result["sets"]
    console.print(f"wrote {out}: {method} over {sets['pos']['tokens']} target tokens"
                  + (f" vs {sets['neg']['tokens']}" if "neg" in sets else ""))
    extra = [k for k in head[0] if k not in ("layer", "expert", "score", "rank")] if head else []
    table = Table("rank", "layer", "expert", "score", *extra)
    for r in head:
        table.add_row(str(r["rank"]), str(r["layer"]), str(r["expert"]), f"{r['score']:+.4f}",
                      *[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in extra])
    console.print(table)
    console.print(f"expert set (the top {top} with a positive score): {','.join(result['experts']) or 'none'}; "
                  f"use it as --disable/--force {out} or prune --protect {out}")
