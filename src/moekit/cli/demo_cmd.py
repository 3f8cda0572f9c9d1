"""``moekit demo``: the whole tool on the bundled default model, offline, in a few minutes."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from moekit.cli.common import app, check_output, console, positive_int


def _step(title: str):
    console.rule(f"[bold]{title}")
    return time.perf_counter()


@app.command("demo")
def demo_command(
    model: str = typer.Option("moekit:tiny", "--model", help="Bundled model (or any model with a tokenizer)."),
    out: Path = typer.Option(None, "--out", help="Output folder (default: ./moekit-demo-<time>)."),
    max_tokens: int = typer.Option(None, "--max-tokens", callback=positive_int, help="Trace at most this many tokens (default: the whole test split)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Inspect, trace, analyse, evaluate, report, compress, steer and serve the bundled model.

    Example:\n
      moekit demo --out demo-out
    """
    import moekit
    from moekit.analysis.summary import summarize
    from moekit.data import load_corpus
    from moekit.data.corpus import interleave_domains
    from moekit.eval import perplexity
    from moekit.io import atomic_output_dir
    from moekit.models.summary import describe
    from moekit.report import write_report
    from moekit.routing.tracing import trace_documents

    out = out or Path(f"moekit-demo-{datetime.now():%Y%m%d-%H%M%S}")
    check_output(out, force, "dir")
    started = time.perf_counter()
    summary: dict = {}
    with atomic_output_dir(out, force=force) as tmp:
        t = _step("1. inspect")
        lm = moekit.load(model)
        info = describe(lm)
        (tmp / "inspect.json").write_text(json.dumps(info, indent=2))
        console.print(f"{info['model']}: {info['architecture']}, {info['moe_layers']} MoE layers × "
                      f"{info['layers'][0]['num_experts']} experts, top-{info['layers'][0]['top_k']}, "
                      f"{info['params_total'] / 1e6:.2f}M parameters ({info['params_active'] / 1e6:.2f}M active)")
        summary["inspect"] = {"seconds": round(time.perf_counter() - t, 1)}

        t = _step("2. trace the bundled test split")
        docs = interleave_domains(load_corpus("test"))  # a token cap then samples every domain
        trace = trace_documents(lm, docs, max_tokens=max_tokens, seq_len=256, fields=("ids", "weights", "probs"))
        trace.save(tmp / "test.trace")
        console.print(f"{trace.num_tokens} tokens from {len(set(trace.doc.tolist()))} documents in "
                      f"{len(trace.domains)} domains → test.trace")
        summary["trace"] = {"tokens": trace.num_tokens, "seconds": round(time.perf_counter() - t, 1)}

        t = _step("3. routing statistics")
        stats = summarize(trace, cache=True)
        (tmp / "stats.json").write_text(json.dumps(stats))
        table = Table("layer", "load CV", "max/mean load", "dead experts", "MI(expert; domain) bits",
                      "shuffled MI bits")
        dom_layers = (stats.get("domains") or {}).get("layers") or [{}] * len(stats["layers"])
        for row, dom in zip(stats["layers"], dom_layers, strict=True):
            table.add_row(str(row["layer"]), _f(row["cv"]), _f(row["max_over_mean"]), str(row["dead"]),
                          _f((dom.get("mi") or {}).get("mi_bits")), _f((dom.get("shuffled_mi") or {}).get("mi_bits")))
        console.print(table)
        summary["stats"] = {"seconds": round(time.perf_counter() - t, 1)}

        t = _step("4. perplexity per domain (test split)")
        ppl = perplexity(lm, docs, max_tokens=max_tokens)
        (tmp / "perplexity.json").write_text(json.dumps(ppl, indent=2))
        table = Table("domain", "tokens", "perplexity")
        for name, row in ppl["by_domain"].items():
            table.add_row(name, str(row["tokens"]), f"{row['perplexity']:.2f}")
        table.add_row("[bold]all", str(ppl["tokens"]), f"[bold]{ppl['perplexity']:.2f}")
        console.print(table)
        summary["perplexity"] = {"all": ppl["perplexity"], "seconds": round(time.perf_counter() - t, 1)}

        t = _step("5. HTML report")
        write_report(lm, trace, tmp / "report.html", docs=docs, stats=stats, model_info=info,
                     profile_tokens=min(8192, (max_tokens or 8192 * 4) // 4),
                     check_tokens=min(4096, (max_tokens or 4096 * 8) // 8))
        console.print(f"report: [bold]{(out / 'report.html').resolve()}[/]")
        summary["report"] = {"path": str(out / "report.html"), "seconds": round(time.perf_counter() - t, 1)}

        t = _step("6. compress: REAP pruning of 25% of the experts")
        from moekit.compress.demo import demo_step as compress_step

        comp = compress_step(lm, ratio=0.25, method="reap")
        (tmp / "compression.json").write_text(json.dumps(comp, indent=2))
        console.print(f"experts {comp['experts_before']} → {comp['experts_after']}, parameters "
                      f"{comp['params_before'] / 1e6:.2f}M → {comp['params_after'] / 1e6:.2f}M; held-out perplexity "
                      f"{comp['perplexity_before']:.2f} → {comp['perplexity_after']:.2f}")
        summary["compression"] = {k: comp[k] for k in ("perplexity_before", "perplexity_after", "experts_after")}

        t = _step("7. steer: switch off the experts tied to digit arithmetic")
        from moekit.steer.demo import demo_step as steer_step

        steer = steer_step(lm)
        (tmp / "steering.json").write_text(json.dumps(steer, indent=2))
        console.print(f"experts {steer['experts']} off: digit-arithmetic perplexity "
                      f"{steer['ppl_digits']['base']:.2f} → {steer['ppl_digits']['found_off']:.2f} "
                      f"({steer['effect_digits']:+.0%}; random experts off: {steer['random_effect_digits']:+.0%}); "
                      f"the same facts in number words {steer['effect_words']:+.0%} "
                      f"(random: {steer['random_effect_words']:+.0%})")
        ex = steer["example"]
        console.print(f"{ex['prompt']!r} → plain {ex['plain']!r}, experts off {ex['experts_off']!r}")
        summary["steering"] = {k: steer[k] for k in ("experts", "effect_digits", "random_effect_digits")}

        t = _step("8. serve: offloaded generation with an expert cache (LRU + cross-layer prefetch)")
        from moekit.serve.demo import demo_step as serve_step

        served = serve_step(lm)
        (tmp / "offload.json").write_text(json.dumps(served, indent=2, default=str))
        console.print(f"{served['prompt']!r} → {served['text']!r}")
        console.print(f"{served['slots_per_layer']} of {lm.moe.layers[0].num_experts} experts per layer resident: "
                      f"hit rate {served['hit_rate']:.2f}, {served['misses']} misses"
                      + (f", {served['miss_ratio_to_belady']:.2f}× Belady's misses"
                         if served.get("miss_ratio_to_belady") is not None else "")
                      + f"; tokens identical to the fully loaded model: {served['exact']}")
        summary["offload"] = {k: served[k] for k in ("hit_rate", "misses", "exact")}

        summary["total_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    console.rule()
    console.print(f"demo finished in {summary['total_seconds']:.0f} s; everything is in [bold]{out.resolve()}[/]")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"

