"""Time every analysis metric on a synthetic routing trace (one JSON line per metric + a summary).

Default: 16 MoE layers x 65,536 tokens (1M token x layer records), E = 64, k = 8, documents of 512
tokens, 5 domains, router probabilities included.  The routing has locality (a per-document,
slowly drifting set of hot experts plus a per-domain preference) so caches matter.
``--quick`` runs a small trace.  Usage: ``python bench/bench_analysis.py [--quick]``.
Each line has wall ``seconds`` and ``cpu_seconds`` (process CPU time: the fairer number on a machine
shared with other jobs); the summary line records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from moekit.analysis import (
    cache_curves,
    coactivation,
    detect_super_experts,
    domain_frequency,
    domain_mutual_information,
    dynamic_k_profile,
    expert_token_npmi,
    layer_affinity,
    layer_summary,
    sch_layers,
    shuffled_mi,
    srp_layers,
    token_class_mask,
)
from moekit.trace import RoutingTrace


def synthetic_trace(n_layers: int, n_tokens: int, e: int, k: int, doc_len: int, n_domains: int,
                    seed: int = 0, probs: bool = True) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    n_docs = n_tokens // doc_len
    n_tokens = n_docs * doc_len
    doc = np.repeat(np.arange(n_docs), doc_len).astype(np.int32)
    pos = np.tile(np.arange(doc_len), n_docs).astype(np.int32)
    domain = rng.integers(0, n_domains, n_docs)[doc].astype(np.int16)
    dom_bias = rng.normal(0, 1.0, (n_domains, e)).astype(np.float32)
    ids = np.empty((n_layers, n_tokens, k), dtype=np.int16)
    weights = np.empty((n_layers, n_tokens, k), dtype=np.float32)
    pr = np.empty((n_layers, n_tokens, e), dtype=np.float16) if probs else None
    seg = 32  # the hot set drifts every 32 tokens
    n_seg = n_tokens // seg
    rows = np.arange(n_tokens)[:, None]
    for li in range(n_layers):
        hot = np.zeros((n_seg, e), dtype=np.float32)
        cur = rng.choice(e, 12, replace=False)
        for s in range(n_seg):
            if s * seg % doc_len == 0:
                cur = rng.choice(e, 12, replace=False)
            elif rng.random() < 0.5:
                cur[rng.integers(12)] = rng.integers(e)
            hot[s, cur] = 2.5
        logits = (rng.gumbel(size=(n_tokens, e)).astype(np.float32) + np.repeat(hot, seg, axis=0)
                  + dom_bias[domain])
        top = np.argpartition(-logits, k, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-logits[rows, top], axis=1), axis=1)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        ids[li] = top
        weights[li] = p[rows, top]
        if probs:
            pr[li] = p
    return RoutingTrace(ids=ids, weights=weights, probs=pr, token_ids=rng.integers(0, 50_000, n_tokens).astype(np.int32),
                        doc=doc, pos=pos, domain=domain,
                        meta={"model": "synthetic", "num_experts": e, "top_k": k,
                              "domains": [f"d{i}" for i in range(n_domains)]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small trace (4 layers x 4096 tokens)")
    ap.add_argument("--skip", default="", help="comma-separated metric names to skip")
    ap.add_argument("--only", default="", help="comma-separated metric names to run (default: all)")
    args = ap.parse_args()
    if args.quick:
        shape = dict(n_layers=4, n_tokens=4096, e=64, k=8, doc_len=512, n_domains=5)
    else:
        shape = dict(n_layers=16, n_tokens=65536, e=64, k=8, doc_len=512, n_domains=5)
    t0 = time.perf_counter()
    tr = synthetic_trace(**shape)
    gen = time.perf_counter() - t0
    ids, doc, dom = tr.ids, tr.doc, tr.domain
    e, k, n_l = shape["e"], shape["k"], shape["n_layers"]
    skip = set(filter(None, args.skip.split(",")))
    mask = token_class_mask(tr.token_ids, class_ids=range(0, 50_000, 7))
    rng = np.random.default_rng(1)
    act = rng.lognormal(0, 0.5, (n_l, e))
    act[1, 5] = 500.0
    metrics = {
        "layer_summary": lambda: layer_summary(tr),
        "coactivation_all_layers": lambda: [coactivation(ids[i], e) for i in range(n_l)],
        "layer_affinity_all_pairs": lambda: [layer_affinity(ids[i], ids[i + 1], e, e) for i in range(n_l - 1)],
        "domain_frequency_all_layers": lambda: [domain_frequency(ids[i], dom, e, 5) for i in range(n_l)],
        "domain_mi_all_layers": lambda: [domain_mutual_information(ids[i], dom, e) for i in range(n_l)],
        "shuffled_mi_all_layers": lambda: [shuffled_mi(ids[i], dom, e, seed=0) for i in range(n_l)],
        "npmi_all_layers": lambda: [expert_token_npmi(ids[i], mask, e) for i in range(n_l)],
        "dynamic_k_profile": lambda: dynamic_k_profile(tr.probs, dom, n_domains=5),
        "super_experts": lambda: detect_super_experts(act),
        "srp_all_layers_4_seglens": lambda: srp_layers(ids, doc, e),
        "sch_all_layers_seglen_4": lambda: sch_layers(ids, doc, e, k, seg_lens=(4,)),
        "sch_all_layers_seglen_16": lambda: sch_layers(ids, doc, e, k, seg_lens=(16,)),
        "sch_all_layers_seglen_64": lambda: sch_layers(ids, doc, e, k, seg_lens=(64,)),
        "sch_all_layers_seglen_256": lambda: sch_layers(ids, doc, e, k, seg_lens=(256,)),
    }
    for pol in ("lru", "lfu", "static", "belady", "belady_bypass"):
        for scope in ("layer", "global"):
            metrics[f"cache_{scope}_{pol}_5_sizes"] = (
                lambda pol=pol, scope=scope: cache_curves(tr, policies=(pol,), scopes=(scope,), with_belady=False))
    metrics["cache_curves_layer_all_policies"] = lambda: cache_curves(tr, scopes=("layer",))
    metrics["cache_curves_global_all_policies"] = lambda: cache_curves(tr, scopes=("global",))
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    results = {}
    for name, fn in metrics.items():
        if name in skip or (args.only and name not in args.only.split(",")):
            continue
        t, c = time.perf_counter(), time.process_time()
        results[name] = fn()
        times[name] = time.perf_counter() - t
        cpu[name] = time.process_time() - c
        print(json.dumps({"metric": name, "seconds": round(times[name], 3), "cpu_seconds": round(cpu[name], 3),
                          "records": n_l * tr.num_tokens}), flush=True)
    extra = {}
    for scope in ("layer", "global"):
        if f"cache_curves_{scope}_all_policies" in results:
            c = results[f"cache_curves_{scope}_all_policies"][scope]
            extra[f"{scope}_hit_rate_at_2k"] = {p: round(c[p]["hit_rate"][2], 4)
                                                for p in ("lru", "lfu", "static", "belady", "belady_bypass")}
    if "srp_all_layers_4_seglens" in results:
        extra["srp_model"] = [round(x, 4) for x in results["srp_all_layers_4_seglens"]["model"]]
    print(json.dumps({"summary": True, "shape": shape, "generate_seconds": round(gen, 3),
                      "total_seconds": round(sum(times.values()), 3),
                      "max_seconds": round(max(times.values()), 3) if times else 0.0,
                      "total_cpu_seconds": round(sum(cpu.values()), 3),
                      "over_10s": [m for m, s in times.items() if s > 10],
                      "over_10s_cpu": [m for m, s in cpu.items() if s > 10],
                      "load_average": list(os.getloadavg()), "cpus": os.cpu_count(), **extra}), flush=True)


if __name__ == "__main__":
    main()
