"""Quality of expert pruning, merging and quantization on the bundled models (one JSON line per measurement).

For each model: held-out (test split) perplexity per domain and mean per-token KL(original || compressed)
at 25% and 50% of experts removed, for every pruning criterion (random: 3 seeds) and for M-SMoE merging,
calibrated on a domain-balanced sample of the validation split; EASY-EP (and REAP) calibrated on 16
demonstrations of one domain (train split) vs the generic calibration, in-domain vs off-domain
perplexity; weight-only quantization (int8, int4, mixed) with size on disk.

Usage: ``python bench/bench_compression.py [--models moekit:tiny moekit:tiny-shared] [--out results.jsonl]
[--table table.md] [--quick]``. Test documents are subsampled (``--eval-tokens`` per domain) to keep
the run within minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import moekit
from moekit.compress.criteria import CRITERIA
from moekit.compress.demo import balanced_docs
from moekit.compress.merge import merged_model, plan_groups
from moekit.compress.observer import observe
from moekit.compress.prune import choose
from moekit.compress.quantize import (
    average_bits,
    effective_bits,
    expert_params,
    quantize,
    quantized_copy,
    size_on_disk,
)
from moekit.compress.writer import pruned_model, write_model_dir
from moekit.eval import document_windows

RATIOS = (0.25, 0.5)
SEEDS = (0, 1, 2)


def emit(rows: list, fh, **row) -> None:
    rows.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def eval_batches(lm, docs, seq_len: int, batch_size: int = 8):
    """Batches of (input_ids, attention_mask, domains per row) over the documents' windows."""
    windows = []
    for d in docs:
        ids = lm.tokenizer(d.text, add_special_tokens=False)["input_ids"]
        windows += [(d.domain, w) for w in document_windows(ids, seq_len)]
    out = []
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        width = max(len(w) for _, w in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, w) in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        out.append((ids, mask, [d for d, _ in chunk]))
    return out


@torch.no_grad()
def log_probs(model, batches):
    return [torch.log_softmax(model(input_ids=i, attention_mask=m, use_cache=False).logits[:, :-1].float(), -1)
            for i, m, _ in batches]


@torch.no_grad()
def evaluate(model, batches, ref) -> dict:
    """Perplexity per domain and overall; mean KL(ref || model) per domain and overall."""
    nll, kl, n = {}, {}, {}
    for (ids, mask, doms), lr in zip(batches, ref, strict=True):
        lq = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), -1)
        valid = mask[:, 1:].bool()
        tok_nll = -lq.gather(-1, ids[:, 1:, None]).squeeze(-1)
        tok_kl = (lr.exp() * (lr - lq)).sum(-1).clamp_min(0)
        for r, d in enumerate(doms):
            v = valid[r]
            nll[d] = nll.get(d, 0.0) + float(tok_nll[r][v].sum())
            kl[d] = kl.get(d, 0.0) + float(tok_kl[r][v].sum())
            n[d] = n.get(d, 0) + int(v.sum())
    total = sum(n.values())
    return {"ppl": math.exp(sum(nll.values()) / total), "kl": sum(kl.values()) / total, "tokens": total,
            "ppl_by_domain": {d: math.exp(nll[d] / n[d]) for d in sorted(n)},
            "kl_by_domain": {d: kl[d] / n[d] for d in sorted(n)}}


def off_domain_ppl(res: dict, domain: str, counts: dict) -> float:
    """Token-weighted perplexity over the domains other than ``domain``."""
    others = [d for d in res["ppl_by_domain"] if d != domain]
    tot = sum(counts[d] for d in others)
    return math.exp(sum(math.log(res["ppl_by_domain"][d]) * counts[d] for d in others) / tot)


def run_model(name: str, args, rows: list, fh) -> None:
    t_model = time.perf_counter()
    lm = moekit.load(name)
    test = balanced_docs("test", args.eval_tokens, lm.tokenizer)
    batches = eval_batches(lm, test, args.seq_len)
    ref = log_probs(lm.model, batches)
    base = evaluate(lm.model, batches, ref)
    counts = {}
    for _, mask, doms in batches:
        for r, d in enumerate(doms):
            counts[d] = counts.get(d, 0) + int(mask[r, 1:].sum())
    E = lm.moe.layers[0].num_experts
    common = {"model": name, "experts_per_layer": E, "top_k": lm.moe.layers[0].top_k, "moe_layers": len(lm.moe)}
    emit(rows, fh, **common, kind="baseline", method="none", ratio=0.0, **base)

    t0 = time.perf_counter()
    calib = balanced_docs("validation", args.calib_tokens // 6, lm.tokenizer)
    stats = observe(lm, calib, max_tokens=args.calib_tokens, seq_len=args.seq_len)
    calib_s = time.perf_counter() - t0
    for ratio in RATIOS:
        for method in CRITERIA.names():
            for seed in (SEEDS if method == "random" else (0,)):
                res = choose(lm, stats, method, ratio, seed=seed)
                model, _ = pruned_model(lm, res.kept)
                emit(rows, fh, **common, kind="prune", method=method, seed=seed, ratio=ratio, calibration="generic",
                     calibration_tokens=stats.tokens, experts_kept=res.num_kept, **evaluate(model, batches, ref))
        groups, _ = plan_groups(lm, stats, ratio)
        model, _ = merged_model(lm, groups, {li: st.count for li, st in stats.layers.items()})
        emit(rows, fh, **common, kind="merge", method="m-smoe", seed=0, ratio=ratio, calibration="generic",
             calibration_tokens=stats.tokens, experts_kept=sum(len(g) for g in groups.values()),
             **evaluate(model, batches, ref))
    # protect-super at 50%: does the detector find anything, and does protecting it change REAP?
    res = choose(lm, stats, "reap", 0.5, protect_super=True)
    model, _ = pruned_model(lm, res.kept)
    emit(rows, fh, **common, kind="prune", method="reap+protect-super", seed=0, ratio=0.5, calibration="generic",
         protected=res.protected.to_list(), experts_kept=res.num_kept, **evaluate(model, batches, ref))

    # EASY-EP with 16 in-domain demonstrations vs generic calibration
    for domain in args.domains:
        demos = balanced_docs("train", None, lm.tokenizer, domains=[domain], max_docs_per_domain=16)
        dstats = observe(lm, demos, max_tokens=args.calib_tokens, seq_len=args.seq_len)
        for ratio in RATIOS:
            for method, st, cal in (("easy-ep", dstats, f"16 {domain} demos"), ("easy-ep", stats, "generic"),
                                    ("reap", dstats, f"16 {domain} demos"), ("reap", stats, "generic")):
                res = choose(lm, st, method, ratio)
                model, _ = pruned_model(lm, res.kept)
                r = evaluate(model, batches, ref)
                emit(rows, fh, **common, kind="domain", method=method, ratio=ratio, domain=domain, calibration=cal,
                     calibration_tokens=st.tokens, in_domain_ppl=r["ppl_by_domain"][domain],
                     off_domain_ppl=off_domain_ppl(r, domain, counts),
                     base_in_domain_ppl=base["ppl_by_domain"][domain],
                     base_off_domain_ppl=off_domain_ppl(base, domain, counts), **r)

    # weight-only quantization of the experts
    params = expert_params(lm)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "fp32"
        write_model_dir(lm.model, model_dir, False, {"method": "none"}, lm)
        fp_bytes = size_on_disk(model_dir)
        for bits, gs, avg in ((8, 128, None), (4, 128, None), (4, 64, None), (4, 64, 6.0)):
            q = quantize(lm, bits=bits, group_size=gs, avg_bits=avg, calib=stats if avg else None,
                         out=Path(tmp) / f"q{bits}-{gs}-{avg}")
            model = quantized_copy(lm, q.bits, gs)
            label = f"mixed avg {avg:g}" if avg else f"int{bits}"
            emit(rows, fh, **common, kind="quantize", method=label, group_size=gs, ratio=0.0,
                 average_bits=average_bits(q.bits, params), effective_bits=effective_bits(q.packed),
                 bytes_on_disk=size_on_disk(q.out), fp32_bytes_on_disk=fp_bytes, **evaluate(model, batches, ref))
    emit(rows, fh, model=name, kind="timing", calibration_seconds=calib_s,
         total_seconds=time.perf_counter() - t_model)


def table(rows: list) -> str:
    """Markdown tables (perplexity and KL) from the measurement rows."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == name]
        base = next(r for r in mr if r["kind"] == "baseline")
        doms = list(base["ppl_by_domain"])
        out.append(f"\n### {name} ({base['experts_per_layer']} experts/layer, top-{base['top_k']}, "
                   f"{base['tokens']} test tokens)\n")
        out.append("| method | removed | ppl | KL | " + " | ".join(doms) + " |")
        out.append("|---|---|---|---|" + "---|" * len(doms))
        out.append(f"| original | 0% | {base['ppl']:.2f} | 0 | "
                   + " | ".join(f"{base['ppl_by_domain'][d]:.2f}" for d in doms) + " |")
        for ratio in RATIOS:
            sel = [r for r in mr if r["kind"] in ("prune", "merge") and r["ratio"] == ratio]
            methods = list(dict.fromkeys(r["method"] for r in sel))
            for m in methods:
                rs = [r for r in sel if r["method"] == m]
                if len(rs) > 1:
                    ppl = [r["ppl"] for r in rs]
                    kl = [r["kl"] for r in rs]
                    cell = f"{statistics.mean(ppl):.2f} ± {statistics.stdev(ppl):.2f}"
                    klc = f"{statistics.mean(kl):.3f} ± {statistics.stdev(kl):.3f}"
                    doms_c = " | ".join(f"{statistics.mean(r['ppl_by_domain'][d] for r in rs):.2f}" for d in doms)
                    label = f"{m} (mean ± sd, {len(rs)} seeds)"
                else:
                    r = rs[0]
                    cell, klc = f"{r['ppl']:.2f}", f"{r['kl']:.3f}"
                    doms_c = " | ".join(f"{r['ppl_by_domain'][d]:.2f}" for d in doms)
                    label = m
                out.append(f"| {label} | {int(ratio * 100)}% | {cell} | {klc} | {doms_c} |")
        dr = [r for r in mr if r["kind"] == "domain"]
        if dr:
            out.append("\nDomain calibration (in-domain = the demos' domain; off-domain = the other domains):\n")
            out.append("| method | calibration | removed | in-domain ppl | off-domain ppl | KL |")
            out.append("|---|---|---|---|---|---|")
            for r in dr:
                out.append(f"| {r['method']} | {r['calibration']} | {int(r['ratio'] * 100)}% | "
                           f"{r['in_domain_ppl']:.2f} (orig {r['base_in_domain_ppl']:.2f}) | "
                           f"{r['off_domain_ppl']:.2f} (orig {r['base_off_domain_ppl']:.2f}) | {r['kl']:.3f} |")
        qr = [r for r in mr if r["kind"] == "quantize"]
        if qr:
            out.append("\nWeight-only expert quantization (fp32 checkpoint: "
                       f"{qr[0]['fp32_bytes_on_disk'] / 1e6:.2f} MB):\n")
            out.append("| scheme | group | avg bits | bits incl. scales | MB on disk | ppl | KL |")
            out.append("|---|---|---|---|---|---|---|")
            for r in qr:
                out.append(f"| {r['method']} | {r['group_size']} | {r['average_bits']:.2f} | {r['effective_bits']:.2f} | "
                           f"{r['bytes_on_disk'] / 1e6:.2f} | {r['ppl']:.2f} | {r['kl']:.4f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["moekit:tiny", "moekit:tiny-shared"])
    ap.add_argument("--eval-tokens", type=int, default=1000, help="Test tokens per domain (whole documents).")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--domains", nargs="+", default=["code"], help="Domains for the EASY-EP demo study.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="Also write the JSON lines here.")
    ap.add_argument("--table", type=Path, help="Write the markdown tables here.")
    ap.add_argument("--quick", action="store_true", help="Fewer tokens (a smoke test).")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.calib_tokens = 200, 1024
    torch.set_num_threads(args.threads)
    rows: list = []
    t0 = time.perf_counter()
    fh = args.out.open("w") if args.out else None
    try:
        for name in args.models:
            run_model(name, args, rows, fh)
    finally:
        if fh is not None:
            fh.close()
    summary = {"kind": "summary", "models": args.models, "measurements": len(rows),
               "seconds": time.perf_counter() - t0}
    for name in args.models:
        for ratio in RATIOS:
            sel = {r["method"]: r for r in rows if r["model"] == name and r["kind"] in ("prune", "merge")
                   and r["ratio"] == ratio and r.get("seed", 0) == 0}
            rnd = [r["ppl"] for r in rows if r["model"] == name and r["kind"] == "prune" and r["method"] == "random"
                   and r["ratio"] == ratio]
            summary[f"{name} {int(ratio * 100)}%"] = {
                **{m: round(r["ppl"], 3) for m, r in sel.items() if m != "random"},
                "random_mean": round(statistics.mean(rnd), 3) if rnd else None}
    print(json.dumps(summary), flush=True)
    if args.table:
        args.table.write_text(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
