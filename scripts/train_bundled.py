#!/usr/bin/env python
"""Train the bundled models (moekit:tiny, moekit:tiny-shared) and the dense baseline, and write their cards.

    python scripts/train_bundled.py --preset tiny                 # train one preset (480 steps x 16 x 256)
    python scripts/train_bundled.py --preset tiny --dry-run 20    # measure tokens/s only, save nothing
    python scripts/train_bundled.py --card-only                   # recompute both model cards

The shipped models were made with ``--preset tiny``, ``--preset tiny-shared`` and ``--preset dense``
(defaults: 480 steps, warmup 30, lr 3e-3, seed 0, router aux loss coef 0.05), the three runs side by
side with one thread each, then ``--card-only``. Checkpoints: ``src/moekit/zoo/<preset>/`` for the MoE
presets, ``.work/dense-baseline/`` for the dense baseline (not shipped; its numbers go into the cards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "src" / "moekit" / "zoo"
DENSE_DIR = ROOT / ".work" / "dense-baseline"
CACHE = ROOT / ".work" / "train_tokens.npz"
SEQ_LEN = 256
NOTES = {
    "tiny": "Load-balancing coefficient: a run with the same tokens and `router_aux_loss_coef` 0.01 reached test "
            "perplexity 34.05 but one layer had an expert at 4.23x the mean load, so the shipped model uses 0.05.",
    "tiny-shared": "Load-balancing coefficient 0.05 (the 0.01 runs were more skewed: up to 4.4x mean load and "
                   "5 dead experts in a layer after 0.9M tokens). Dead experts in the routing table are routed experts never "
                   "selected on the test split.",
}


def out_dir(preset: str) -> Path:
    return DENSE_DIR if preset == "dense" else ZOO / preset


def train_tokens(tokenizer) -> list[list[int]]:
    """Token ids of every train document (cached in .work/, keyed by tokenizer size)."""
    from moekit.data import load_corpus

    if CACHE.is_file():
        z = np.load(CACHE)
        return [a.tolist() for a in np.split(z["ids"], z["offsets"][1:-1])]
    docs = load_corpus("train")
    lists = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    offsets = np.cumsum([0] + [len(x) for x in lists])
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, ids=np.concatenate([np.asarray(x, dtype=np.int32) for x in lists]), offsets=offsets)
    return lists


def _as_lm(model, tok, name: str):
    """Wrap a model for moekit.eval; the dense baseline has no MoE map (eval does not need one)."""
    from moekit.models import LoadedModel, from_model

    if getattr(model.config, "num_experts", None):
        return from_model(model, tok, name=name)
    return LoadedModel(model=model.eval(), tokenizer=tok, moe=None, name=name)


def train(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from moekit.data import load_corpus, load_tokenizer
    from moekit.eval import perplexity
    from moekit.train import (
        TrainConfig,
        count_parameters,
        model_config,
        pack_windows,
        plot_loss,
        save_checkpoint,
        train_lm,
    )

    torch.set_num_threads(args.threads)
    tok = load_tokenizer()
    windows = pack_windows(train_tokens(tok), SEQ_LEN, tok.eos_token_id, seed=args.seed)
    overrides = {"router_aux_loss_coef": args.aux_coef} if args.aux_coef is not None and args.preset != "dense" else {}
    config = model_config(args.preset, len(tok), **overrides)
    if args.experts_impl and args.preset != "dense":
        config._experts_implementation = args.experts_impl
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    steps = args.dry_run or args.steps
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, steps // 5 + 1),
                      seed=args.seed, log_every=args.log_every)
    params = count_parameters(model)
    print(f"{args.preset}: {params} params, {len(windows)} windows of {SEQ_LEN} "
          f"({windows.numel() / 1e6:.2f}M tokens/epoch), {steps} steps x {args.batch_size}", flush=True)
    work = ROOT / ".work"
    work.mkdir(exist_ok=True)
    log_path = work / f"train_log_{args.preset}_{steps}.json"
    t0 = time.perf_counter()

    def on_log(step: int, loss: float) -> None:
        if args.no_progress:
            print(f"step {step}/{steps} loss {loss:.3f} {time.perf_counter() - t0:.0f}s", flush=True)

    deadline = None
    if args.stop_at:
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = time.localtime()
        deadline = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hh, mm, 0, 0, 0, -1))
    hist = train_lm(model, windows, cfg, progress=not args.no_progress, log_path=log_path, on_log=on_log,
                    deadline=deadline)
    tps = hist.tokens_seen / hist.seconds
    print(f"{args.preset}: {hist.tokens_seen} tokens in {hist.seconds:.1f}s = {tps:.0f} tokens/s, "
          f"final loss {hist.lm_loss[-1]:.3f}", flush=True)
    if args.dry_run:
        return
    val = perplexity(_as_lm(model, tok, args.preset), load_corpus("validation"), progress=False)
    summary = {"preset": args.preset, "architecture": config.model_type, "parameters": params,
               "tokens_seen": hist.tokens_seen, "train_seconds": round(hist.seconds, 1),
               "tokens_per_second": round(tps), "threads": args.threads, "seq_len": SEQ_LEN,
               "train": hist.config, "final_train_loss": hist.lm_loss[-1],
               "validation": {"nll": val["nll"], "perplexity": val["perplexity"],
                              "by_domain": {d: v["nll"] for d, v in val["by_domain"].items()}}}
    print(json.dumps(summary["validation"], indent=1), flush=True)
    dest = Path(args.out) if args.out else out_dir(args.preset)
    save_checkpoint(model, tok, dest, force=True,
                    extra_files={"train_log.json": json.dumps(hist.to_json()) + "\n",
                                 "train_summary.json": json.dumps(summary, indent=1) + "\n"})
    plot_loss(hist, dest / "loss.png", title=f"moekit:{args.preset} ({config.model_type})")
    print(f"saved {dest}", flush=True)


# ----- model cards ----------------------------------------------------------------------------------
def routing_stats(lm, docs, seq_len: int = SEQ_LEN, batch_size: int = 8) -> dict:
    """Per MoE layer load (max/mean) and MI(expert; domain) vs shuffled routing, on ``docs``."""
    from moekit import record
    from moekit.analysis import domain_mutual_information, load_stats, shuffled_mi
    from moekit.eval import document_windows

    rows, labels = [], []
    for doc in docs:
        for w in document_windows(lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"], seq_len):
            rows.append(w)
            labels.append(doc.domain)
    pad = lm.tokenizer.pad_token_id or 0
    with torch.no_grad(), record(lm, fields=("ids", "weights")) as rec:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        rec.label_documents(labels, first_doc=0)
    trace = rec.trace
    layers = []
    for li, layer in enumerate(trace.layers):
        e = trace.num_experts[li]
        ld = load_stats(trace.ids[li], e)
        mi = domain_mutual_information(trace.ids[li], trace.domain, e)
        sh = shuffled_mi(trace.ids[li], trace.domain, e, seed=0)
        layers.append({"layer": layer, "experts": e, "max_over_mean": ld["max_over_mean"], "dead": ld["dead"],
                       "entropy_norm": ld["entropy_norm"], "mi_bits": mi["mi_bits"], "mi_norm": mi["mi_norm"],
                       "shuffled_mi_bits": sh["mi_bits"]})
    return {"tokens": trace.num_tokens, "windows": len(rows), "layers": layers}


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def render_card(name: str, cfg, summary: dict, ppl: dict, uni: dict, dense: dict | None, dense_summary: dict | None,
                routing: dict) -> str:
    """The markdown model card of one bundled model."""
    shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
    p = summary["parameters"]
    t = summary["train"]
    steps = summary["tokens_seen"] // (t["batch_size"] * summary["seq_len"])
    lines = [
        f"# moekit:{name}",
        "",
        f"A small {cfg.model_type} mixture-of-experts causal LM trained by `scripts/train_bundled.py` on the train "
        "split of the bundled corpus (`moekit:corpus`), for testing and demonstrating moekit offline. "
        "Loads with plain `AutoModelForCausalLM.from_pretrained(path)`; the tokenizer files are in this folder.",
        "",
        "## Config",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | `{cfg.model_type}` |",
        f"| decoder layers (all MoE) | {cfg.num_hidden_layers} |",
        f"| hidden size | {cfg.hidden_size} |",
        f"| attention heads / KV heads | {cfg.num_attention_heads} / {cfg.num_key_value_heads} |",
        f"| routed experts per layer | {cfg.num_experts} |",
        f"| experts per token (top-k) | {cfg.num_experts_per_tok} |",
        f"| routed expert width | {cfg.moe_intermediate_size} |",
        f"| shared expert width | {shared if shared else 'none'} |",
        f"| active FFN width per token | {cfg.num_experts_per_tok * cfg.moe_intermediate_size + shared} |",
        f"| vocabulary (bundled BPE) | {cfg.vocab_size} |",
        f"| tied embeddings | {cfg.tie_word_embeddings} |",
        f"| training sequence length | {summary['seq_len']} |",
        f"| parameters total / active per token | {p['total'] / 1e6:.2f} M / {p['active'] / 1e6:.2f} M |",
        f"| router aux (load-balancing) loss coef | {cfg.router_aux_loss_coef} |",
        "",
        "## Training",
        "",
        f"- tokens seen: {summary['tokens_seen']:,} ({steps} steps x {t['batch_size']} packed windows of "
        f"{summary['seq_len']} tokens, seed {t['seed']})",
        f"- optimiser: AdamW (lr {t['lr']}, betas 0.9/0.95, weight decay {t['weight_decay']}), {t['warmup']} warmup "
        f"steps then cosine decay to {t['min_lr_ratio']} x lr, grad clip {t['grad_clip']}",
        f"- training time: {summary['train_seconds'] / 60:.1f} min on {summary['threads']} CPU thread(s) "
        f"({summary['tokens_per_second']} tokens/s; the machine was shared with other jobs)",
        f"- final train LM loss {summary['final_train_loss']:.3f}; validation perplexity "
        f"{summary['validation']['perplexity']:.2f}",
        "",
        "![loss curve](loss.png)",
        "",
        "## Test-split perplexity (token-weighted, lower is better)",
        "",
    ]
    if dense_summary:
        dp = dense_summary["parameters"]
        lines.append(f"Dense baseline: `{dense_summary['architecture']}` with the same layers, attention and active "
                     f"FFN width ({dp['active'] / 1e6:.2f} M parameters), trained on the same "
                     f"{dense_summary['tokens_seen']:,} tokens with the same schedule (not shipped). "
                     "Unigram: train-split token frequencies, add-one smoothing, same tokenizer and tokens.")
        lines.append("")
    lines += ["| domain | tokens | unigram | dense baseline | this model |", "|---|---:|---:|---:|---:|"]
    for d, v in ppl["by_domain"].items():
        dv = _f(dense["by_domain"][d]["perplexity"]) if dense else "n/a"
        lines.append(f"| {d} | {v['tokens']:,} | {_f(uni['by_domain'][d]['perplexity'])} | {dv} | "
                     f"**{_f(v['perplexity'])}** |")
    dv = _f(dense["perplexity"]) if dense else "n/a"
    lines.append(f"| **all** | {ppl['tokens']:,} | {_f(uni['perplexity'])} | {dv} | **{_f(ppl['perplexity'])}** |")
    if dense:
        diff = ppl["perplexity"] / dense["perplexity"] - 1
        better = "lower" if diff < 0 else "higher"
        lines += ["", f"Overall this model's perplexity is {abs(diff) * 100:.1f}% {better} than the dense baseline's."]
    lines += [
        "",
        f"## Routing on the test split ({routing['tokens']:,} tokens)",
        "",
        "Load: selections of the busiest expert / mean selections per expert (1 = perfectly balanced; "
        "collapse would be > 4). Specialisation: mutual information between expert choice and domain, each "
        "(token, selected slot) one sample, next to the same statistic after permuting the routing across "
        "tokens within the layer (domain labels kept), which is the estimator's floor.",
        "",
        "| layer | max/mean load | dead experts | load entropy / log E | MI(expert; domain) bits | shuffled MI bits "
        "| ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in routing["layers"]:
        ratio = r["mi_bits"] / r["shuffled_mi_bits"] if r["shuffled_mi_bits"] > 0 else float("inf")
        lines.append(f"| {r['layer']} | {_f(r['max_over_mean'])} | {r['dead']} | {_f(r['entropy_norm'], 3)} | "
                     f"{_f(r['mi_bits'], 3)} | {_f(r['shuffled_mi_bits'], 4)} | {ratio:.0f}x |")
    if name in NOTES:
        lines += ["", "Note: " + NOTES[name]]
    lines += ["", "Recompute this card with `python scripts/train_bundled.py --card-only`.", ""]
    return "\n".join(lines)


def write_cards(threads: int = 1, presets: list[str] | None = None) -> None:
    """Evaluate the saved checkpoints on the test split and write ``README.md`` + ``card.json`` per model."""
    from moekit import load
    from moekit.data import load_corpus, load_tokenizer
    from moekit.eval import perplexity, unigram_perplexity
    from moekit.io import atomic_write
    from moekit.train import make_readable

    torch.set_num_threads(threads)
    test, train_docs = load_corpus("test"), load_corpus("train")
    dense = dense_summary = None
    if (DENSE_DIR / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        dlm = _as_lm(AutoModelForCausalLM.from_pretrained(DENSE_DIR, local_files_only=True), load_tokenizer(), "dense")
        dense = perplexity(dlm, test, progress=False)
        dense_summary = json.loads((DENSE_DIR / "train_summary.json").read_text())
        print(f"dense baseline: test perplexity {dense['perplexity']:.2f}", flush=True)
    for name in presets or ["tiny", "tiny-shared"]:
        lm = load(ZOO / name)
        uni = unigram_perplexity(lm.tokenizer, train_docs, test)
        ppl = perplexity(lm, test, progress=False)
        routing = routing_stats(lm, test)
        summary = json.loads((ZOO / name / "train_summary.json").read_text())
        card = render_card(name, lm.config, summary, ppl, uni, dense, dense_summary, routing)
        slim = [{k: v for k, v in r.items() if k != "by_source"} if r else r for r in (ppl, uni, dense)]
        numbers = {"test_perplexity": slim[0], "unigram": slim[1], "dense_baseline": slim[2], "routing": routing,
                   "train": summary}
        with atomic_write(ZOO / name / "README.md", force=True, mode="w", kind="any") as fh:
            fh.write(card)
        with atomic_write(ZOO / name / "card.json", force=True, mode="w", kind="any") as fh:
            fh.write(json.dumps(numbers, indent=1) + "\n")
        make_readable(ZOO / name)
        print(card, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "tiny-shared", "dense"])
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--dry-run", type=int, default=0, help="train this many steps, report tokens/s, save nothing")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experts-impl", default=None, help="transformers experts implementation (eager, grouped_mm, ...)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--aux-coef", type=float, default=None, help="router load-balancing loss coefficient override")
    ap.add_argument("--out", default=None, help="checkpoint directory (default: the zoo, or .work/ for dense)")
    ap.add_argument("--stop-at", default=None, help="HH:MM local time: stop early (and save) once passed")
    ap.add_argument("--zoo", default=None, help="--card-only: folder holding the MoE checkpoints (default: the zoo)")
    ap.add_argument("--dense", default=None, help="--card-only: dense baseline checkpoint (default: .work/dense-baseline)")
    ap.add_argument("--card-only", action="store_true", help="recompute the model cards from saved checkpoints")
    args = ap.parse_args(argv)
    if args.card_only:
        global ZOO, DENSE_DIR
        ZOO = Path(args.zoo) if args.zoo else ZOO
        DENSE_DIR = Path(args.dense) if args.dense else DENSE_DIR
        write_cards(args.threads, presets=[args.preset] if args.preset else ["tiny", "tiny-shared"])
        return 0
    if not args.preset:
        ap.error("--preset is required unless --card-only")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
