"""Forward time with routing recording on vs off (issue 2, req. 8). Target: ratio <= 1.10.

Prints one JSON line per measurement and a summary line. Runs are interleaved (off, on, off, on, ...)
so that machine noise hits both sides alike; the ratio is of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import moekit
from moekit.models import from_model
from moekit.testing import random_batch, tiny_model


def medium_model():
    """8 layers, d=512, 32 experts, top-4 (random weights)."""
    return tiny_model("qwen3_moe", vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, moe_intermediate_size=256, num_experts=32,
                      num_experts_per_tok=4, mlp_only_layers=[], max_position_embeddings=1024)


@torch.no_grad()
def measure(lm, batch, repeats: int, fields) -> dict:
    lm.model(**batch)  # warm-up
    off, on = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lm.model(**batch)
        off.append(time.perf_counter() - t0)
        with moekit.record(lm, fields=fields) as rec:
            t0 = time.perf_counter()
            lm.model(**batch)
            _ = rec.trace
            on.append(time.perf_counter() - t0)
    return {"off_s": statistics.median(off), "on_s": statistics.median(on),
            "ratio": statistics.median(on) / statistics.median(off)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small batch, few repeats")
    ap.add_argument("--repeats", type=int, default=5, help="rounds for the medium model (tiny: 10x, it is ~8 ms)")
    ap.add_argument("--model", default=None,
                    help="also a real-size checkpoint (a path or moekit:name), loaded in its dtype, e.g. bench_scale's "
                         "OLMoE-1B-7B: one sequence of --tokens tokens")
    ap.add_argument("--max-memory", default=None, help="with --model: moekit.load's budget (offloaded experts)")
    ap.add_argument("--tokens", type=int, default=256, help="with --model: tokens per forward")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [
        ("tiny", from_model(tiny_model("olmoe")), random_batch(vocab=128, batch=8, seq=64)),
        ("medium", from_model(medium_model()),
         random_batch(vocab=4096, batch=2 if args.quick else 8, seq=128 if args.quick else 512)),
    ]
    if args.model:
        lm = moekit.load(args.model, max_memory=args.max_memory)
        cases.append((args.model, lm, random_batch(vocab=lm.model.config.vocab_size, batch=1, seq=args.tokens)))
    ratios = {}
    for name, lm, batch in cases:
        for fields in (("ids", "weights"), ("ids", "weights", "probs")):
            repeats = args.repeats * (10 if name == "tiny" else 1)  # a millisecond-scale forward is noisier
            repeats = min(repeats, 3) if name == args.model else repeats  # seconds per forward at 7B
            r = measure(lm, batch, 2 if args.quick else repeats, fields)
            key = f"{name}/{'+'.join(fields)}"
            ratios[key] = round(r["ratio"], 3)
            print(json.dumps({"bench": "trace_overhead", "model": name, "fields": list(fields),
                              "tokens": int(batch["attention_mask"].sum()), **{k: round(v, 4) for k, v in r.items()}}),
                  flush=True)
    print(json.dumps({"bench": "trace_overhead", "summary": True, "ratios": ratios, "target": 1.10,
                      "ok": all(v <= 1.10 for k, v in ratios.items() if k.endswith("ids+weights"))}))


if __name__ == "__main__":
    main()
