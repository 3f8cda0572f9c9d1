"""The report's HTML: one self-contained page (inline PNG figures and CSS, no scripts, no network
requests) rendered from the statistics of ``moekit.report.stats`` (``render_html``)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.experts import ExpertRef
from moekit.report import figures

# --------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
p{line-height:1.45;margin:6px 0;font-size:14px;max-width:900px}.sub{color:#5b6673;margin:0 0 16px}
figure{margin:10px 0 4px}figure img{max-width:100%;height:auto;display:block}
figcaption{color:#3a4552;font-size:14px;margin-top:4px;max-width:900px}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:8px 12px;margin:10px 0;font-size:14px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:right}th{background:#f0f2f5}
td.l,th.l{text-align:left}.kv td:first-child{text-align:left;color:#5b6673}
nav{font-size:13px;margin:8px 0 0}nav a{margin-right:12px;color:#1f4e96}
footer{color:#8a95a1;font-size:12px;margin-top:32px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return _e(x)


def _fmt_params(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]], left: int = 1, cls: str = "") -> str:
    th = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(head or []))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    thead = f"<thead><tr>{th}</tr></thead>" if head else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _model_section(info: dict[str, Any], s: dict[str, Any]) -> str:
    m = s["model"]
    first = (info.get("layers") or [{}])[0]
    shared = ", ".join(f"{k} ({_fmt_params(v)})" for k, v in (first.get("shared") or {}).items()) or "none"
    kv = [
        ("model", _e(info.get("model"))),
        ("architecture", _e(info.get("architecture")) + (" (generic mapping)" if info.get("generic_mapping") else "")),
        ("decoder layers", _e(info.get("decoder_layers", "–"))),
        ("MoE layers", f"{len(m['layers'])}: {_e(', '.join(map(str, m['layers'])))}"),
        ("routed experts per layer", _e(", ".join(map(str, sorted(set(m["num_experts"])))))),
        ("experts per token (top-k)", _e(", ".join(map(str, sorted(set(m["top_k"])))))),
        ("shared experts", _e(shared) if "shared" in first else "–"),
        ("selection rule", _e(first.get("rule", "–"))),
        ("parameters", f"{_fmt_params(info.get('params_total'))} total, {_fmt_params(info.get('params_active'))} "
                       "active per token" if info.get("params_total") else "–"),
        ("traced tokens", f"{m['tokens']:,} in {m['documents']:,} documents"),
    ]
    rows = s["layers"]
    lt = _table(["layer", "experts", "top-k", "load CV", "max / mean", "load entropy / log E", "dead experts",
                 "router entropy (nats)"],
                [[r["layer"], r["num_experts"], r["top_k"], _num(r["cv"]), _num(r["max_over_mean"]),
                  _num(r["load_entropy_norm"]), r["dead"], _num(r["router_entropy"])] for r in rows])
    return ('<h2 id="model">Model</h2>' + _table(None, kv, left=2, cls="kv")
            + "<h3>Load balance per MoE layer</h3>" + lt
            + "<p>CV is the standard deviation of the per-expert token counts over their mean (0 = perfectly "
              "balanced); max / mean is how overloaded the busiest expert is; dead experts were never selected.</p>")


def _top_experts_table(dom: dict[str, Any], layer: int) -> str:
    lay = next((x for x in dom["layers"] if x["layer"] == layer), dom["layers"][len(dom["layers"]) // 2])
    rows = []
    for t in lay["top_experts"]:
        cells = ", ".join(f"{e} ({_num(lift, 2)}×)" for e, lift in zip(t["experts"], t["lift"], strict=True))
        rows.append([_e(t["domain"]), cells])
    return (f"<h3>Top experts per domain, layer {lay['layer']}</h3>"
            + _table(["domain", "expert (lift = domain frequency / mean over domains)"], rows, left=2))


def _super_section(se: dict[str, Any] | None, trace_only: bool) -> str:
    head = '<h2 id="super">Super experts</h2>'
    if se is None:
        why = ("the report was built from a trace only" if trace_only else "no calibration documents were given")
        return head + _note(f"Super-expert profiling skipped: {why}. It needs the model and text "
                            "(<code>moekit report MODEL --data FILE</code>), because it records the experts' "
                            "output magnitudes, which a routing trace does not hold.")
    parts = [head]
    det = se["detected"]
    if det:
        parts.append(f"<p><b>{len(det)} expert{'s' if len(det) > 1 else ''} flagged as super expert"
                     f"{'s' if len(det) > 1 else ''}</b> by the detector (Su et al. thresholds): "
                     + ", ".join(f"layer {r.layer} expert {r.expert}" for r in map(ExpertRef.parse, det)) + ".</p>")
    else:
        parts.append("<p><b>No super experts detected</b>: no expert's largest output is both above the 99.5th "
                     "percentile of all experts' maxima and above 1/10 of the largest one in the first 75% of "
                     "the layers. A negative result: this model has no outlier experts of that kind.</p>")
    n_cand = se.get("candidates") or 0
    excluded = [li for li in se["layers"] if li not in (se.get("candidate_layers") or se["layers"])]
    if excluded:
        parts.append(f"<p>Layer{'s' if len(excluded) > 1 else ''} {', '.join(map(str, excluded))} (the last "
                     f"quarter) {'are' if len(excluded) > 1 else 'is'} not a candidate: the last "
                     "layers produce large outputs for other reasons (Su et al.).</p>")
    if n_cand and n_cand < 200:
        parts.append(_note(f"Only {n_cand} candidate experts: with fewer than 200 values the 99.5th percentile "
                           "lies just below the largest one, so the threshold reduces to 'above 1/10 of the "
                           "largest' and the top expert is flagged almost by construction. The zeroing check "
                           "below is what tells whether it matters."))
    rows = [[t["layer"], t["expert"], _num(t["max_abs"]), _num(t["over_median"], 1) + "×",
             "yes" if t["super"] else "no"] for t in se["top"]]
    parts.append(_table(["layer", "expert", "max |down_proj output|", "vs median expert", "super expert"], rows,
                        left=0))
    parts.append(_figure(figures.super_expert_map(np.array(se["max_abs"], dtype=float), se["layers"],
                                                  [tuple(x) for x in se["detected_pos"]]),
                         "max expert output per layer and expert",
                         f"The largest absolute output of each routed expert over {se['profile_tokens']:,} "
                         "calibration tokens (grey: no token reached the expert). Look for single bright cells far above the rest of their layer: "
                         "those are super-expert candidates; a smooth picture means no outliers."))
    chk = se.get("check")
    if chk:
        what = ("the flagged experts" if chk["detected"]
                else "the expert with the largest output (not a super expert)")
        rand = ", ".join(_num(v, 2) for v in chk["random"])
        parts.append(f"<h3>Zeroing check ({chk['tokens']:,} tokens)</h3>")
        parts.append(_table(["experts zeroed", "perplexity"], [
            ["none (baseline)", _num(chk["baseline"], 2)],
            [f"{what}: " + ", ".join(chk["experts"]), _num(chk["zeroed"], 2)],
            [f"{len(chk['experts'])} random expert{'s' if len(chk['experts']) > 1 else ''} "
             f"(seeds {', '.join(map(str, chk['seeds']))})", rand],
        ], left=1))
        parts.append(f"<p>Zeroing {what} multiplies perplexity by {_num(chk['zeroed'] / chk['baseline'], 2)}; "
                     f"zeroing as many random experts by {_num(float(np.mean(chk['random'])) / chk['baseline'], 2)} "
                     "on average. Super experts matter when the first number is far above the second.</p>")
    return "".join(parts)


def _cache_table(c90: dict[str, Any] | None) -> str:
    if not c90:
        return ""
    names = {"lru": "LRU", "lfu": "LFU", "static": "static top-C", "belady": "Belady MIN",
             "belady_bypass": "Belady with bypass"}
    scopes = [s for s in ("layer", "global") if s in c90]
    rows = []
    for pol, label in names.items():
        if all(pol not in c90[s] for s in scopes):
            continue
        rows.append([label] + [("not reached" if c90[s].get(pol) is None else f"{c90[s][pol]:.2f} k")
                               for s in scopes])
    head = ["policy"] + [f"{'per-layer' if s == 'layer' else 'global'} cache (target hit rate "
                         f"{c90[s]['target']:.3f})" for s in scopes]
    frac = int(round(100 * c90[scopes[0]]["fraction"]))
    return (f"<h3>Cache size needed to reach {frac}% of Belady's best hit rate</h3>"
            + _table(head, rows)
            + f"<p>The target is {frac}% of Belady MIN's hit rate at the largest tested cache size; sizes are "
              "interpolated between the tested ones and given in multiples of k (per layer; the global cache "
              "has as many slots times the number of layers).</p>")


def render_html(report: dict[str, Any], title: str | None = None) -> str:
    """The report page for ``build_stats``'s dict."""
    s = report["summary"]
    info = report["model"]
    m = s["model"]
    tokens = m["tokens"]
    name = info.get("model") or m.get("id") or "model"
    k = max(m["top_k"])
    sec: list[str] = []
    sec.append(_model_section(info, s))

    sec.append('<h2 id="load">Expert load</h2>')
    sec.append(_figure(figures.load_heatmap(s["load"], m["layers"]), "layer by expert load heatmap",
                       "Each cell is how often an expert was selected in its layer, relative to a perfectly even "
                       "share (white = fair share, red = overloaded, blue = rarely used, black = never). Look for "
                       "dead or hot experts: they waste capacity and make offloading or expert parallelism "
                       "unbalanced."))

    co = s["coactivation"]
    sec.append('<h2 id="coactivation">Co-activation</h2>')
    sec.append(_figure(figures.coactivation_heatmaps(co, s.get("affinity"), tokens),
                       "co-activation heatmap",
                       f"Left: the fraction of tokens that select both experts in layer {co['layer']} (the "
                       "diagonal, an expert with itself, is left grey). Bright cells are pairs that fire together "
                       "and could be merged or placed on one device. Right: for each expert of this layer, where "
                       "its tokens go in the next MoE layer; concentrated rows mean the next layer's experts can "
                       "be predicted and prefetched." if s.get("affinity") else
                       f"The fraction of tokens that select both experts in layer {co['layer']} (the diagonal is "
                       "left grey). Bright cells are pairs that fire together."))

    sec.append('<h2 id="domains">Domain specialisation</h2>')
    dom = s.get("domains")
    if dom is None:
        sec.append(_note("No domain labels in this trace, so the domain figures are left out. Give JSONL files "
                         "with a <code>domain</code> field, or one text file per domain, to see which experts "
                         "each kind of text uses."))
    elif len(dom["names"]) < 2:
        sec.append(_note(f"Only one domain ({_e(dom['names'][0])}) in the data: specialisation needs at least "
                         "two domains to compare, so the domain figures are left out."))
    else:
        sec.append(_figure(figures.domain_heatmap(dom), "domain by expert lift heatmap",
                           "For every layer (blocks) and domain (rows): how much more (orange) or less (purple) "
                           "that domain uses each expert than the domains do on average (black: never). Vertical stripes of one "
                           "colour across a block mean domain-specific experts; a flat picture means the experts "
                           "are not specialised by domain."))
        sec.append(_figure(figures.mi_bars(dom), "mutual information per layer",
                           "Mutual information between the chosen expert and the domain of the token, per layer, "
                           "next to the same quantity after shuffling the routing across tokens (the estimator's "
                           "bias). Only the part above the grey bar is real specialisation."))
        sec.append(_top_experts_table(dom, co["layer"]))

    sec.append('<h2 id="entropy">Router entropy and dynamic k</h2>')
    if not report.get("has_probs"):
        sec.append(_note("The trace has no router probabilities, so per-token router entropy and dynamic k are "
                         "left out (record with <code>moekit trace --probs</code>); the load entropy is shown."))
    sec.append(_figure(figures.entropy_dynamic_k(s["layers"], s.get("dynamic_k")), "router entropy and dynamic k",
                       "Router entropy: how spread out each token's router distribution is (log k = mass spread "
                       "evenly over exactly k experts, log E = no preference at all); the load entropy is the same "
                       "for the layer's total load. Dynamic k: how many experts a token needs to cover p of the "
                       f"router mass; layers far below the top-k line of {k} could run with fewer experts, layers "
                       "above it are undecided."))

    sec.append(_super_section(report.get("super_experts"), trace_only=report.get("trace_only", False)))

    sec.append('<h2 id="locality">Local routing consistency</h2>')
    sec.append(_figure(figures.locality_curves(s["srp"], s.get("sch")), "SRP and SCH curves",
                       "SRP: how well one fixed set of experts per segment of L tokens predicts the experts the "
                       "tokens actually use (best F1; 1 = the same experts throughout the segment). SCH: hit rate of "
                       "a cache of C experts per layer that knows the next L tokens. High values at long segments "
                       "mean the model suits expert offloading and prefetching; curves that drop fast mean routing "
                       "changes token to token."))
    sec.append("<p>Model-level SRP: " + ", ".join(f"L = {sl}: {_num(v)}" for sl, v in
                                                  zip(s["srp"]["seg_lens"], s["srp"]["model"], strict=True))
               + (". A dash means no document is that long." if None in s["srp"]["model"] else ".") + "</p>")

    sec.append('<h2 id="cache">Expert caching</h2>')
    if s.get("cache"):
        sec.append(_figure(figures.cache_curves_figure(s["cache"], len(m["layers"])), "hit rate against cache size",
                           "Hit rate of an expert cache as it grows, for online policies against Belady's optimum "
                           "(which knows the future; with bypass a miss need not be cached). The gap between a "
                           "policy and Belady is what a better eviction policy could win; where the curves are "
                           "already high at C = k, a small cache suffices."))
        sec.append(_cache_table(report.get("cache_90")))
    else:
        sec.append(_note("Cache simulation was not run."))

    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("model", "model"), ("load", "load"), ("coactivation", "co-activation"), ("domains", "domains"),
        ("entropy", "entropy & dynamic k"), ("super", "super experts"), ("locality", "locality"),
        ("cache", "caching")))
    from moekit.version import __version__

    sub = (f"{tokens:,} tokens, {m['documents']:,} documents"
           + (f", domains: {_e(', '.join(dom['names']))}" if dom else ", no domain labels"))
    title = title or f"moekit report: {name}"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><p class=\"sub\">{sub}</p><nav>{nav}</nav>"
            + "".join(sec)
            + f"<footer>Written by moekit {_e(__version__)}. Metric definitions and sources: "
              "docs/analysis.md.</footer></main></body></html>")
