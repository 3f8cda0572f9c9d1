"""Sparse upcycling vs. dense continued training on the bundled corpus (one JSON line per measurement).

1. Train a small dense qwen3 model (``moekit.train`` preset ``dense``, shrunk by the flags) from scratch
   for ``--pre-steps`` steps on the train split.
2. Exactness at init: max |Δlogit| between the dense model and (a) its copy-upcycled MoE (``--experts``,
   ``--top-k``, random router std 0.02), (b) a fine-grained split (``--experts`` × 4 slices, every expert
   active, zero router) on validation windows.
3. Continue training (a) the dense model, (b) the upcycled MoE and (c) a control with the same active
   FFN width as (b) but no sparsity (2 experts top-2: the dense FFN twice, all active) for ``--steps``
   steps each, same data order, same optimiser settings (AdamW, warmup + cosine, transformers' router
   aux loss for the MoEs), and report validation loss per domain before and after.

Usage: ``python bench/bench_upcycle.py [--quick]`` (defaults: hidden 96, 3 layers, FFN 256, 400 + 200 steps of
8 x 128 tokens, one torch thread). Wall ``seconds`` and process ``cpu_seconds`` are
recorded (the machine may be shared); the last line is a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch

from moekit.data import load_corpus, load_tokenizer
from moekit.eval import perplexity
from moekit.models.loading import LoadedModel
from moekit.train import TrainConfig, count_parameters, model_config, pack_windows, train_lm
from moekit.train.upcycle import upcycle


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def val_subset(tokenizer, tokens_per_domain: int) -> list:
    """Validation documents, the first ones of each domain up to ``tokens_per_domain`` tokens."""
    used: dict[str, int] = defaultdict(int)
    out = []
    for doc in load_corpus("validation"):
        if used[doc.domain] >= tokens_per_domain:
            continue
        used[doc.domain] += len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        out.append(doc)
    return out


def evaluate(model, tokenizer, docs, name: str, seq_len: int) -> dict:
    """Validation NLL (nats/token) overall and per domain."""
    lm = LoadedModel(model=model.eval(), tokenizer=tokenizer, moe=None, name=name)
    r = perplexity(lm, docs, seq_len=seq_len, batch_size=16, progress=False)
    return {"all": round(r["nll"], 4), **{d: round(v["nll"], 4) for d, v in r["by_domain"].items()}}


@torch.no_grad()
def max_logit_diff(a, b, windows: torch.Tensor) -> float:
    return float((a(windows).logits - b(windows).logits).abs().max())


@torch.no_grad()
def max_logit(a, windows: torch.Tensor) -> float:
    return float(a(windows).logits.abs().max())


def timed_train(model, windows, cfg: TrainConfig) -> tuple[dict, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    hist = train_lm(model, windows, cfg, progress=False)
    return hist.to_json(), time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pre-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pre-lr", type=float, default=3e-3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--variants", default="dense,upcycled,control",
                    help="continuations to run: dense, upcycled (N x top-k), control (2 experts top-2: the dense FFN "
                         "twice, all active = a dense model as wide as the upcycled one's active FFN, same init)")
    ap.add_argument("--seed", type=int, default=0, help="router seed; the continuation data order uses seed + 1")
    ap.add_argument("--val-tokens", type=int, default=3000, help="validation tokens per domain")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded machine)")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.pre_steps, args.steps, args.val_tokens = 10, 5, 300
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer()
    t0 = time.perf_counter()
    train_ids = [tok(d.text, add_special_tokens=False)["input_ids"] for d in load_corpus("train")]
    windows = pack_windows(train_ids, args.seq_len, tok.eos_token_id, seed=0)
    val_docs = val_subset(tok, args.val_tokens)
    emit({"stage": "data", "train_windows": len(windows), "seq_len": args.seq_len, "val_docs": len(val_docs),
          "seconds": round(time.perf_counter() - t0, 2)})

    hd = args.hidden // 4
    cfg = model_config("dense", len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers, head_dim=hd,
                       intermediate_size=args.ffn, max_position_embeddings=max(512, args.seq_len))
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg)
    pre = TrainConfig(steps=args.pre_steps, batch_size=args.batch, lr=args.pre_lr, warmup=min(30, args.pre_steps // 5),
                      seed=0, log_every=max(1, args.pre_steps // 10))
    hist, wall, cpu = timed_train(dense, windows, pre)
    emit({"stage": "pretrain_dense", "steps": args.pre_steps, "params": count_parameters(dense),
          "final_train_loss": round(hist["lm_loss"][-1], 4), "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)})
    before = evaluate(dense, tok, val_docs, "dense", args.seq_len)
    emit({"stage": "val_before", "model": "dense", "nll": before})

    probe = windows[-8:]
    moe = upcycle(dense, args.experts, args.top_k, seed=args.seed)
    fine = upcycle(dense, args.experts, args.experts, granularity=4, router="zero")
    exact = {"copy": max_logit_diff(moe, dense, probe), "fine_grained_all_active": max_logit_diff(fine, dense, probe),
             "logit_scale": max_logit(dense, probe)}
    moe_before = evaluate(moe, tok, val_docs, "upcycled", args.seq_len)
    emit({"stage": "exactness_at_init", "experts": args.experts, "top_k": args.top_k,
          "max_abs_dlogit_copy": exact["copy"], "max_abs_dlogit_fine_m4_all_active_zero_router":
          exact["fine_grained_all_active"], "max_abs_logit": round(exact["logit_scale"], 3),
          "val_nll_dense": before["all"], "val_nll_upcycled": moe_before["all"], "params_moe": count_parameters(moe)})
    del fine

    cont = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=min(10, args.steps // 5),
                       seed=args.seed + 1, log_every=max(1, args.steps // 10))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    models = {"dense": dense, "upcycled": moe}  # the MoEs are built (copied) before dense trains in place
    if "control" in variants:
        models["control"] = upcycle(dense, 2, 2, seed=args.seed)
    results = {}
    for name in variants:
        model = models[name]
        hist, wall, cpu = timed_train(model, windows, cont)
        after = evaluate(model, tok, val_docs, name, args.seq_len)
        results[name] = after
        emit({"stage": "continue", "model": name, "steps": args.steps, "tokens": hist["tokens_seen"],
              "final_train_loss": round(hist["lm_loss"][-1], 4), "seconds": round(wall, 1),
              "cpu_seconds": round(cpu, 1), "nll_after": after})

    names = {"dense": f"dense +{args.steps}", "upcycled": f"upcycled {args.experts}x top-{args.top_k} +{args.steps}",
             "control": f"2x top-2 (dense-width control) +{args.steps}"}
    print("\n| domain | before (all) | " + " | ".join(names[v] for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for d in before:
        print(f"| {d} | {before[d]:.4f} | " + " | ".join(f"{results[v][d]:.4f}" for v in variants) + " |")
    emit({"summary": True, "config": vars(args), "exactness": exact, "val_nll_before": before,
          "val_nll_after": results, "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
