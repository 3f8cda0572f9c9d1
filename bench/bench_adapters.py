"""Adapter experts on the bundled corpus and moekit:tiny, against controls (issue 17, requirement 3).

A. Each method trained on one domain (code) with about equal trainable parameters: perplexity on that
   domain and on the others (forgetting = ratio to the base model), training tokens/s relative to LoRA.
B. Merging two independently trained domain adapters (code + json, both active = sum of updates):
   FlyLoRA vs LoRA, perplexity on each domain relative to that domain's own adapter.
C. ROCKET on an arithmetic task (K prompt/answer shots, held-out facts) from a pool of per-domain LoRAs:
   vs the best single adapter, a uniform merge of the selected ones, a random selection of the same size,
   a LoRA trained on the K shots alone; perplexity and exact match on held-out facts.

Every line is one JSON measurement; the last line is the summary. Usage (under the bench lock):
``flock /tmp/moekit-bench.lock python bench/bench_adapters.py [--steps 30] [--seeds 2]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import moekit
import moekit.adapters as ad
from moekit.adapters.rocket import Shot, compose, retrieve, select, shot_scores
from moekit.adapters.train import train_adapter
from moekit.data import load_corpus
from moekit.data.corpus import Document
from moekit.data.synthetic import fact_prompt, random_fact
from moekit.eval import perplexity

# about equal trainable parameters on moekit:tiny's attention (LoRA r=8: 28,672)
METHODS = {
    "lora": dict(method="lora", rank=8),
    "lora-experts": dict(method="lora", rank=1, target="experts"),  # r=1 per expert is the minimum
    "flylora": dict(method="flylora", rank=18, active=4),
    "flylora-outside": dict(method="flylora", rank=18, active=4, route_bias="outside"),
    "smora": dict(method="smora", rank=5, active=2),
    "mora": dict(method="mora", rank=8, active=4),
    "mixlora": dict(method="mixlora", rank=2, experts=3, top_k=2),
    "loramoe": dict(method="loramoe", rank=2, experts=3),
    "hydralora": dict(method="hydralora", rank=3, experts=3),
}


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def domain_docs(split: str, chars: int) -> dict[str, list[Document]]:
    """Per domain, documents of the split cut so that each domain has about ``chars`` characters."""
    out: dict[str, list[Document]] = {}
    for d in load_corpus(split):
        have = sum(len(x.text) for x in out.get(d.domain, []))
        if have < chars:
            out.setdefault(d.domain, []).append(dataclasses.replace(d, text=d.text[: chars - have]))
    return out


def ppl_by_domain(lm, model, docs: dict[str, list[Document]]) -> dict[str, float]:
    flat = [d for ds in docs.values() for d in ds]
    res = perplexity(dataclasses.replace(lm, model=model), flat, seq_len=64, batch_size=8, progress=False)
    return {k: v["perplexity"] for k, v in res["by_domain"].items()}


def train(lm, spec: dict, docs, steps: int, seed: int, lr: float = 3e-3):
    kw = dict(spec)
    method = kw.pop("method")
    model = copy.deepcopy(lm.model)
    torch.manual_seed(seed)
    pm = ad.attach(model, ad.make_config(model, method, seed=seed, **kw))
    log = train_adapter(pm, lm.tokenizer, docs, steps=steps, lr=lr, batch_size=8, seq_len=64, seed=seed,
                        progress=False)
    return pm, log


def facts(n: int, seed: int) -> list[Shot]:
    rng = random.Random(seed)
    return [Shot(*fact_prompt(random_fact(rng), "digits")) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--model", default="moekit:tiny")
    ap.add_argument("--shots", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    lm = moekit.load(args.model)
    train_docs = domain_docs("train", 60_000)
    test_docs = domain_docs("test", 1_500)
    base_ppl = ppl_by_domain(lm, lm.model, test_docs)
    emit({"part": "base", "ppl": base_ppl})
    seeds = list(range(args.seeds))
    work = Path(tempfile.mkdtemp(prefix="bench_adapters."))

    # A. one domain, every method
    a_rows: dict[str, list[dict]] = {}
    saved: dict[tuple[str, str, int], Path] = {}
    for name, spec in METHODS.items():
        for seed in seeds:
            pm, log = train(lm, spec, train_docs["code"], args.steps, seed)
            ppl = ppl_by_domain(lm, pm, test_docs)
            others = [ppl[d] / base_ppl[d] for d in ppl if d != "code"]
            row = {"part": "A", "method": name, "seed": seed, "trainable_params": log["trainable_params"],
                   "ppl_code": ppl["code"], "ppl_code_vs_base": ppl["code"] / base_ppl["code"],
                   "forgetting_other_domains": statistics.mean(others), "tokens_per_s": log["tokens_per_s"],
                   "load_cv": log["load_cv"], "final_loss": log["final_loss"]}
            emit(row)
            a_rows.setdefault(name, []).append(row)
            if name in ("lora", "flylora"):
                saved[(name, "code", seed)] = ad.save_adapter(pm, work / f"{name}-code-{seed}")

    # B. merging two domain adapters
    b_rows: dict[str, list[dict]] = {}
    for name in ("lora", "flylora"):
        for seed in seeds:
            pm, _ = train(lm, METHODS[name], train_docs["json"], args.steps, seed + 100)
            saved[(name, "json", seed)] = ad.save_adapter(pm, work / f"{name}-json-{seed}")
            model = ad.load_adapter(copy.deepcopy(lm.model), saved[(name, "code", seed)], adapter_name="code")
            model.load_adapter(str(saved[(name, "json", seed)]), adapter_name="json")
            own = {}
            for dom in ("code", "json"):
                model.base_model.set_adapter(dom)
                own[dom] = ppl_by_domain(lm, model, {dom: test_docs[dom]})[dom]
            model.base_model.set_adapter(["code", "json"])
            merged = ppl_by_domain(lm, model, {d: test_docs[d] for d in ("code", "json")})
            row = {"part": "B", "method": name, "seed": seed, "own_ppl": own, "merged_ppl": merged,
                   "interference": statistics.mean(merged[d] / own[d] for d in own)}
            emit(row)
            b_rows.setdefault(name, []).append(row)

    # C. ROCKET
    pool = work / "pool"
    pool.mkdir()
    for dom in sorted(train_docs):
        if dom in ("code", "json"):
            os.symlink(saved[("lora", dom, 0)], pool / dom)
            continue
        pm, _ = train(lm, METHODS["lora"], train_docs[dom], args.steps, 0)
        ad.save_adapter(pm, pool / dom)
    shots, held = facts(args.shots, 1), facts(48, 2)

    def score(model) -> dict:
        return shot_scores(model, lm.tokenizer, held)

    sel = select(lm, pool, shots, keep=2, candidates=4, progress=False)
    emit({"part": "C", "selection": [Path(e).name for e in sel["experts"]], "diversity": sel["diversity"],
          "ranking": [(Path(r["adapter"]).name, r["perplexity"], r["exact_match"]) for r in sel["ranking"]]})
    c_rows: dict[str, list[dict]] = {}

    def record(name: str, model, seed: int | None) -> None:
        row = {"part": "C", "variant": name, "seed": seed, **score(model)}
        emit(row)
        c_rows.setdefault(name, []).append(row)

    best = ad.load_adapter(copy.deepcopy(lm.model), sel["ranking"][0]["adapter"])
    record("best single adapter", best, None)
    record("base model", lm.model, None)
    uniform = compose(dataclasses.replace(lm, model=copy.deepcopy(lm.model)), sel["experts"], top_k=2)
    for m in ad.moe_layers(uniform):
        torch.nn.init.zeros_(m.lora_router["default"].weight)  # softmax of zeros: the uniform average
    record("uniform merge of selected", uniform, None)
    shot_docs = [Document(s.text, "task", f"shot:{i}", "shots") for i, s in enumerate(shots)]
    retrieval_pool = [d for d in load_corpus("train")[::15]]
    retrieved = retrieve(lm, shots, retrieval_pool, budget=32)
    all_names = [str(p) for p in sorted(pool.iterdir())]
    for seed in seeds:
        rnd = random.Random(seed).sample(all_names, 2)
        variants = {"ROCKET": (sel["experts"], shot_docs), "ROCKET + retrieval": (sel["experts"],
                                                                                  shot_docs + retrieved),
                    "random selection": (rnd, shot_docs)}
        for name, (experts, docs) in variants.items():
            torch.manual_seed(seed)
            moe = compose(dataclasses.replace(lm, model=copy.deepcopy(lm.model)), experts, top_k=2, seed=seed)
            train_adapter(moe, lm.tokenizer, docs, steps=args.steps, lr=3e-3, batch_size=8, seq_len=64, seed=seed,
                          progress=False)
            record(name, moe, seed)
        pm, _ = train(lm, METHODS["lora"], shot_docs, args.steps, seed)
        record("LoRA on the K shots", pm, seed)

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    lora_tps = mean(a_rows["lora"], "tokens_per_s")
    summary = {
        "summary": True, "model": args.model, "steps": args.steps, "seeds": len(seeds), "shots": args.shots,
        "A": {n: {"params": rows[0]["trainable_params"], "ppl_code": mean(rows, "ppl_code"),
                  "ppl_code_vs_base": mean(rows, "ppl_code_vs_base"),
                  "forgetting": mean(rows, "forgetting_other_domains"),
                  "speed_vs_lora": mean(rows, "tokens_per_s") / lora_tps, "load_cv": mean(rows, "load_cv")}
              for n, rows in a_rows.items()},
        "B": {n: {"interference": mean(rows, "interference")} for n, rows in b_rows.items()},
        "C": {n: {"ppl": mean(rows, "perplexity"), "exact_match": mean(rows, "exact_match")}
              for n, rows in c_rows.items()},
        "C_selection": [Path(e).name for e in sel["experts"]],
        "seconds": time.perf_counter() - t_start, "loadavg": os.getloadavg()[0],
    }
    emit(summary)


if __name__ == "__main__":
    main()
