"""``moekit report``: one self-contained HTML page about a model's experts and routing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from moekit.cli.common import (
    DTYPE_OPTION,
    MAX_MEMORY_OPTION,
    MODEL_HELP,
    app,
    check_output,
    console,
    emit_json,
    load_model,
    non_negative_int,
    positive_int,
)
from moekit.data.corpus import CORPUS_SPEC_HELP


@app.command("report")
def report_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    dtype: str = DTYPE_OPTION,
    max_memory: str = MAX_MEMORY_OPTION,
    data: list[str] = typer.Option(None, "--data", "-d", help="Text files (one document each), JSONL with "
                                   f"'text' and optional 'domain', or {CORPUS_SPEC_HELP}."),
    trace_path: Path = typer.Option(None, "--trace", help="Use a recorded trace (.trace) instead of tracing "
                                    "--data; it must come from MODEL."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HTML file."),
    json_path: Path = typer.Option(None, "--json", help="Also write all statistics to this JSON file."),
    super_path: Path = typer.Option(None, "--super-experts", help="Also write the detected super experts as an "
                                    "expert-set JSON file (input of generate --disable, prune --protect)."),
    layer: int = typer.Option(None, "--layer", callback=non_negative_int, help="Decoder layer for the co-activation heatmap and the "
                              "top-experts table (default: the middle MoE layer)."),
    max_tokens: int = typer.Option(40_000, "--max-tokens", callback=positive_int, help="Tokens of --data to trace (documents are "
                                   "taken round-robin over domains, so a cap samples every domain)."),
    seq_len: int = typer.Option(512, "--seq-len", callback=positive_int, help="Documents are cut into windows of this many tokens."),
    profile_tokens: int = typer.Option(8192, "--profile-tokens", callback=positive_int, help="Tokens for the super-expert profiling "
                                       "pass and for each perplexity of the zeroing check (half as many)."),
    no_super: bool = typer.Option(False, "--no-super-experts", help="Skip the super-expert profiling and check."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    json_out: bool = typer.Option(False, "--print-json", help="Print a JSON summary of what was written."),
) -> None:
    """Write an HTML report: load, co-activation, domains, entropy, super experts, locality, caching.

    Examples:\n
      moekit report moekit:tiny --data moekit:corpus:test --out report.html\n
      moekit report ./ckpt --data notes.jsonl --out notes.html --json notes-stats.json --layer 3\n
      moekit report moekit:tiny --trace test.trace --out report.html\n
      moekit report moekit:tiny --data moekit:corpus:test --out r.html --super-experts super.json
    """
    from moekit.errors import MoekitError
    from moekit.report import write_report

    if trace_path is None and not data:
        raise MoekitError("give --data FILE (text to trace) or --trace FILE (a recorded trace)")
    check_output(out, force, "html")
    if json_path is not None:
        check_output(json_path, force, "json")
    if super_path is not None:
        if no_super or not data:
            raise MoekitError("--super-experts needs the super-expert profiling: give --data, not --no-super-experts")
        check_output(super_path, force, "json")
    docs = None
    if data:
        from moekit.data import read_documents

        docs = read_documents(data)
    if trace_path is not None:
        from moekit.trace import RoutingTrace

        trace = RoutingTrace.load(trace_path)
    lm = load_model(model, dtype, max_memory)
    if trace_path is None:
        from moekit.data.corpus import interleave_domains
        from moekit.routing.tracing import trace_documents

        trace = trace_documents(lm, interleave_domains(docs), max_tokens=max_tokens, seq_len=seq_len,
                                fields=("ids", "weights", "probs"))
    with console.status("analysing and writing the report") if not json_out else contextlib.nullcontext():
        rep = write_report(lm, trace, out, docs=None if no_super else docs, layer=layer, json_path=json_path,
                           force=force, profile_tokens=profile_tokens, check_tokens=max(profile_tokens // 2, 64))
    se = rep.get("super_experts")
    if super_path is not None:
        from moekit.experts import ExpertSet

        ExpertSet(se["detected"]).save(super_path, force=force, model=lm.name, source="moekit report")
    summary = {"out": str(out), "json": str(json_path) if json_path else None, "tokens": trace.num_tokens,
               "bytes": out.stat().st_size, "super_experts": None if se is None else se["detected"],
               "super_experts_file": str(super_path) if super_path else None,
               "timings": rep["timings"]}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out} ({summary['bytes'] / 1e3:.0f} kB, {trace.num_tokens} tokens)"
                      + (f" and {json_path}" if json_path else ""))

