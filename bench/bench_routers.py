"""Router study: six MoELM variants with equal active FFN parameters, trained on the same tokens.

Variants (2 decoder layers, hidden 96, every FFN an MoE; a routed expert is 192 wide, ~2 experts active
per token = 384 active FFN width):

* ``topk``        top-2 of 8 softmax experts, renormalised, Switch balance loss 0.01
* ``top_p``       top-p routing (p = 0.4, "Harder Tasks Need More Experts"); active count is dynamic
* ``null``        AdaMoE: 8 experts + 4 null experts, top-3 over 12 slots (null picks compute nothing)
* ``fine_shared`` DeepSeekMoE: 9 experts split 4× → 36 of width 42, top-8 routed + 1 shared (378 active)
* ``coe``         Chain-of-Experts, C = 2 iterations of top-1 of 8 (2 expert calls per token)
* ``aux_free``    DeepSeek-V3 sigmoid router, top-2 of 8, no aux loss, bias update rate u = 0.01

Each is trained with ``moekit.train.config_train.run_training`` (same seed, same batches, AdamW +
warmup/cosine) and evaluated on the validation split per domain; load CV (std/mean of tokens per expert,
averaged over routers) and mean active experts per token (expert calls per token per MoE layer) are
measured on the validation windows. One JSON line per variant, then a markdown table.

Usage: ``python bench/bench_routers.py [--quick] [--steps N] [--only topk,coe] [--seed S]`` (full: 300 steps of
16 × 128 tokens each; ``--quick``: 60 steps). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch

from moekit.nn.model import MoELM
from moekit.train.config_train import parse_run_config, run_training

BASE: dict[str, Any] = dict(hidden=96, num_layers=2, num_heads=4, inter=192, num_experts=8, top_k=2)

VARIANTS: dict[str, dict[str, Any]] = {
    "topk": dict(router="softmax_then_topk", router_kwargs={"balance_coef": 0.01}),
    "top_p": dict(router="top_p", router_kwargs={"p": 0.4, "balance_coef": 0.01}),
    "null": dict(router="null_experts", top_k=3, router_kwargs={"num_null": 4, "balance_coef": 0.01}),
    "fine_shared": dict(
        router="softmax_then_topk",
        num_experts=9,
        inter=168,
        granularity=4,
        num_shared=1,
        router_kwargs={"balance_coef": 0.01},
    ),
    "coe": dict(router="softmax_then_topk", top_k=1, coe_iterations=2, router_kwargs={"balance_coef": 0.01}),
    "aux_free": dict(router="aux_free", router_kwargs={"bias_update_rate": 0.01}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 steps per variant")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    ap.add_argument("--only", default="", help="comma-separated subset of variants")
    ap.add_argument("--json-out", default=None, help="also write all results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (60 if args.quick else 300)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    results = []
    for name in names:
        spec = {
            "model": {**BASE, **VARIANTS[name]},
            "data": {"seq_len": args.seq_len, "val_windows_per_domain": 16},
            "train": {
                "steps": steps,
                "batch_size": args.batch_size,
                "lr": 3e-3,
                "warmup": max(1, steps // 10),
                "eval_every": steps,
                "save_every": 0,
                "log_every": max(1, steps // 10),
                "seed": args.seed,
            },
        }
        run = parse_run_config(spec)
        cpu0, t0 = os.times(), time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            log = run_training(run, tmp, progress=False)
        ev = log["evals"][-1]
        model = MoELM(run.model)
        _, layer = model.moe_layers()[0]
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.experts.num_experts
        shared = sum(p.numel() for p in layer.shared.parameters()) if layer.shared is not None else 0
        row = {
            "variant": name,
            "seed": args.seed,
            "steps": steps,
            "tokens": log["tokens_seen"],
            "val_loss": ev["val_loss"],
            "val_loss_mean": ev["val_loss_mean"],
            "load_cv": ev["load_cv"],
            "active_experts": ev["active_experts"],
            "active_ffn_params_per_layer": int(per_expert * ev["active_experts"] + shared),
            "total_params": sum(p.numel() for p in model.parameters()),
            "final_train_loss": log["lm_loss"][-1],
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(sum(os.times()[:2]) - sum(cpu0[:2]), 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    doms = list(results[0]["val_loss"]) if results else []
    print()
    print(
        "| variant | "
        + " | ".join(doms)
        + " | mean val | load CV | active experts/token | active FFN params/layer"
        " | total params | train s |"
    )
    print("|" + "---|" * (len(doms) + 7))
    for r in results:
        print(
            f"| {r['variant']} | "
            + " | ".join(f"{r['val_loss'][d]:.3f}" for d in doms)
            + f" | {r['val_loss_mean']:.3f} | {r['load_cv']:.3f} | {r['active_experts']:.2f}"
            f" | {r['active_ffn_params_per_layer']:,} | {r['total_params']:,} | {r['seconds']:.0f} |"
        )
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
