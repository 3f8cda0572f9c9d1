"""Measured steering effects on a bundled model, each against a control (one JSON line per measurement,
then a summary). Usage: ``python bench/bench_steering.py [--model moekit:tiny] [--quick]``.

1. detection: experts separating digit vs number-word arithmetic (synthetic twins: the same facts in both
   styles) and code vs prose (validation documents), by risk difference; overlap with activation contrast.
2. disable the top-N found experts: perplexity of the target and the other domain (test split), against
   disabling N random experts in the same layers (3 seeds).
3. force / boost the found digit experts on number-word prompts (and the word experts on digit
   prompts): style of greedy continuations (regex) and the next-token log P(digits) − log P(words),
   against the same intervention on random experts (3 seeds).
4. top-p routing: mean activated experts per token and perplexity, against fixed top-k.
5. SCMoE vs greedy: exact-match accuracy on synthetic digit arithmetic.
6. test-time rerouting: perplexity of a continuation after adapting router biases on its prefix, against
   no adaptation and adaptation on an unrelated-domain prefix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import numpy as np
import torch

import moekit
from moekit.data import load_corpus
from moekit.data.synthetic import fact_prompt, format_fact, random_fact
from moekit.eval import perplexity
from moekit.generation import generate
from moekit.routing import RoutingControl, route
from moekit.steer import steering_control
from moekit.steer.detect import count_routing, rank_experts
from moekit.steer.effects import (
    classify_style,
    continuation_nll,
    greedy_batch,
    matched_random,
    number_token_classes,
)
from moekit.steer.presets import selected_experts
from moekit.steer.rewire import RouterBias

OUT: list[dict] = []


def emit(kind: str, **rec) -> dict:
    rec = {"bench": "steering", "measure": kind, **rec}
    OUT.append(rec)
    print(json.dumps(rec, default=float), flush=True)
    return rec


def docs_of(split: str, domain: str, n: int) -> list:
    return [d for d in load_corpus(split) if d.domain == domain][:n]


def ppl(lm, docs, max_tokens: int, control: RoutingControl | None = None) -> float:
    if control is None:
        return perplexity(lm, docs, max_tokens=max_tokens, progress=False)["perplexity"]
    with route(lm, control=control):
        return perplexity(lm, docs, max_tokens=max_tokens, progress=False)["perplexity"]


def twins(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    facts = [random_fact(rng) for _ in range(n)]
    return [format_fact(f, "digits") for f in facts], [format_fact(f, "words") for f in facts]


def chunks(docs, lm, n_tokens: int) -> list[str]:
    """Each document's first ``n_tokens`` tokens as text (detection examples)."""
    out = []
    for d in docs:
        ids = lm.tokenizer(d.text, add_special_tokens=False)["input_ids"][:n_tokens]
        out.append(lm.tokenizer.decode(ids))
    return out


# ----- 1 + 2: detection, then disabling found vs random experts ---------------------------------------
def detect_and_disable(lm, args) -> dict:
    digits, words = twins(args.detect_examples, seed=11)
    n_doc = max(8, args.detect_examples // 4)
    code = chunks(docs_of("validation", "code", n_doc), lm, 128)
    prose = chunks(docs_of("validation", "prose", n_doc), lm, 128)
    pairs = {("arith_digits", "arith_words"): (digits, words), ("code", "prose"): (code, prose)}
    found_all = {}
    for (target, other), (pos, neg) in pairs.items():
        t0 = time.time()
        pc, nc = count_routing(lm, pos), count_routing(lm, neg)
        rd = rank_experts(lm, pc, nc, "risk_diff", top=max(args.n_experts))
        ac = rank_experts(lm, pc, nc, "contrast", top=max(args.n_experts))
        found_all[target] = rd
        n = min(args.n_experts)
        a = set(selected_experts(rd, n))
        b = set(selected_experts(ac, n))
        emit("detect", target=target, other=other, pos_tokens=rd["sets"]["pos"]["tokens"],
             neg_tokens=rd["sets"]["neg"]["tokens"],
             top=[{k: r[k] for k in ("layer", "expert", "score", "a_pos", "a_neg")} for r in rd["entries"][:6]],
             max_abs_risk_diff=max(abs(r["score"]) for r in rd["entries"]),
             overlap_with_contrast=f"{len(a & b)}/{n}", seconds=round(time.time() - t0, 2))
        t_docs = docs_of("test", target, 200)
        o_docs = docs_of("test", other, 200)
        base_t, base_o = ppl(lm, t_docs, args.ppl_tokens), ppl(lm, o_docs, args.ppl_tokens)
        for n in args.n_experts:
            experts = selected_experts(rd, n)
            ft = ppl(lm, t_docs, args.ppl_tokens, RoutingControl.make(disable=experts))
            fo = ppl(lm, o_docs, args.ppl_tokens, RoutingControl.make(disable=experts))
            rt, ro = [], []
            for s in range(args.seeds):
                rnd = RoutingControl.make(disable=matched_random(lm, experts, s))
                rt.append(ppl(lm, t_docs, args.ppl_tokens, rnd))
                ro.append(ppl(lm, o_docs, args.ppl_tokens, rnd))
            d_ft, d_fo = ft / base_t - 1, fo / base_o - 1
            d_rt = [x / base_t - 1 for x in rt]
            d_ro = [x / base_o - 1 for x in ro]
            emit("disable", target=target, other=other, n=n, experts=[str(e) for e in experts], ppl_target_base=base_t,
                 ppl_other_base=base_o, ppl_target_found=ft, ppl_other_found=fo, ppl_target_random=rt,
                 ppl_other_random=ro, rel_target_found=d_ft, rel_other_found=d_fo,
                 rel_target_random_mean=float(np.mean(d_rt)), rel_target_random_max=float(np.max(d_rt)),
                 rel_other_random_mean=float(np.mean(d_ro)),
                 found_beats_every_random=bool(d_ft > max(d_rt)), other_moves_less=bool(d_fo < d_ft))
    return found_all


# ----- 3: forcing / boosting shifts the style ---------------------------------------------------------------
def style_shift(lm, found_all: dict, args) -> None:
    classes = number_token_classes(lm.tokenizer)
    rng = random.Random(12345)
    facts = [random_fact(rng) for _ in range(args.style_prompts)]
    digits_rd = found_all["arith_digits"]
    # the word experts are the other end of the same ranking: rank by -score
    words_rd = dict(digits_rd, entries=[dict(r, score=-r["score"]) for r in reversed(digits_rd["entries"])])
    sides = (("digits", "words", digits_rd), ("words", "digits", words_rd))
    for target, source_style, data in sides:
        prompts = [fact_prompt(f, source_style)[0] for f in facts]
        n = args.style_experts
        on = steering_control(data, "on", lm, n)
        off_other = selected_experts(data, n, side="neg")
        conds = {"base": None, "on": on,
                 f"boost={args.boost:g}": steering_control(data, f"boost={args.boost}", lm, n),
                 "on+off_other": steering_control(data, "on+off", lm, n)}
        for s in range(args.seeds):
            forced = sorted(on.force)
            r_on = matched_random(lm, forced, s)
            conds[f"random_on_s{s}"] = RoutingControl.make(force=r_on)
            bst = selected_experts(data, n)
            conds[f"random_boost_s{s}"] = RoutingControl.make(
                scale={e: args.boost for e in matched_random(lm, bst, s)})
            r_off = matched_random(lm, sorted(set(off_other) | set(r_on)), s + 100)
            per_layer = {li: sum(1 for x, _ in off_other if x == li) for li, _ in off_other}
            r_off = [e for li, k in per_layer.items() for e in [x for x in r_off if x.layer == li][:k]]
            conds[f"random_on+off_s{s}"] = RoutingControl.make(force=r_on, disable=r_off)
        base_margin = None
        for name, ctrl in conds.items():
            t0 = time.time()
            gens, margin = greedy_batch(lm, prompts, args.style_tokens, ctrl, classes)
            if base_margin is None:
                base_margin = margin
            styles = [classify_style(g) for g in gens]
            emit("style", target=target, prompts_style=source_style, condition=name,
                 experts=sorted(ctrl.experts()) if ctrl is not None else [], n_prompts=len(prompts),
                 frac_target=styles.count(target) / len(styles), frac_digits=styles.count("digits") / len(styles),
                 frac_words=styles.count("words") / len(styles), frac_none=styles.count("none") / len(styles),
                 margin_digits_minus_words=float(margin.mean()),
                 margin_shift=float((margin - base_margin).mean()),
                 example=gens[0], seconds=round(time.time() - t0, 2))


# ----- 4: top-p vs top-k routing -----------------------------------------------------------------------------
def routing_budget(lm, args) -> None:
    test = load_corpus("test")
    by = {}
    for d in test:
        by.setdefault(d.domain, []).append(d)
    mixed = [d for group in zip(*[v[:20] for v in by.values()], strict=False) for d in group]
    conds = [("top_k", k) for k in args.top_k] + [("top_p", p) for p in args.top_p]
    for kind, v in conds:
        ctrl = RoutingControl.make(**{kind: v})
        with route(lm, control=ctrl), moekit.record(lm) as rec:
            res = perplexity(lm, mixed, max_tokens=args.ppl_tokens, progress=False)
        ids = rec.trace.ids
        active = float((ids >= 0).sum(-1).mean())
        per_layer = [float(x) for x in (ids >= 0).sum(-1).mean(-1)]
        emit("routing_budget", rule=kind, value=v, mean_active_experts=active, active_per_layer=per_layer,
             perplexity=res["perplexity"], tokens=res["tokens"])


# ----- 5: SCMoE vs greedy -----------------------------------------------------------------------------------
def answer_of(text: str) -> str:
    return text.strip().split("\n")[0].split(".")[0].strip()


def scmoe(lm, args) -> None:
    rng = random.Random(777)
    facts = [random_fact(rng) for _ in range(args.arith_prompts)]
    results = {}
    for name, strategy, opts in [("greedy", "plain", {})] + [
            (f"scmoe_b{b:g}", "contrast", {"beta": b, "alpha": 0.1, "weak_top_k": 1}) for b in args.betas]:
        t0 = time.time()
        ok = []
        for f in facts:
            prompt, answer = fact_prompt(f, "digits")
            out = generate(lm, prompt, max_new_tokens=6, stop=["\n"], strategy=strategy, strategy_options=opts)
            ok.append(answer_of(out.text) == answer_of(answer))
        results[name] = np.array(ok)
        acc = float(np.mean(ok))
        se = math.sqrt(acc * (1 - acc) / len(ok))
        rec = {"accuracy": acc, "stderr": se, "n": len(ok), "seconds": round(time.time() - t0, 2)}
        if name != "greedy":
            g = results["greedy"]
            rec.update(wins=int((results[name] & ~g).sum()), losses=int((~results[name] & g).sum()))
        emit("scmoe", condition=name, **rec)


# ----- 6: test-time rerouting -----------------------------------------------------------------------------------
def rerouting(lm, args) -> None:
    for lr in args.rewire_lr:
        rerouting_at(lm, args, lr)


def rerouting_at(lm, args, lr: float) -> None:
    tok = lm.tokenizer
    unrelated = tok(docs_of("test", "arith_words", 1)[0].text, add_special_tokens=False)["input_ids"][: args.prefix]
    for domain in args.rewire_domains:
        tot = {"none": 0.0, "adapted": 0.0, "unrelated": 0.0}
        n_tok = 0
        per_doc = []
        t0 = time.time()
        for d in docs_of("test", domain, 100):
            ids = tok(d.text, add_special_tokens=False)["input_ids"]
            if len(ids) < args.prefix + args.cont:
                continue
            prefix, cont = ids[: args.prefix], ids[args.prefix: args.prefix + args.cont]
            none, n = continuation_nll(lm, prefix, cont)
            own = RouterBias(lm, steps=args.rewire_steps, lr=lr)
            own.fit(torch.tensor(prefix))
            adapted, _ = continuation_nll(lm, prefix, cont, own.control())
            other = RouterBias(lm, steps=args.rewire_steps, lr=lr)
            other.fit(torch.tensor(unrelated))
            unrel, _ = continuation_nll(lm, prefix, cont, other.control())
            tot["none"] += none
            tot["adapted"] += adapted
            tot["unrelated"] += unrel
            n_tok += n
            per_doc.append((adapted - none) / n)
            if len(per_doc) >= args.rewire_docs:
                break
        if not per_doc:
            continue
        emit("rewire", domain=domain, docs=len(per_doc), tokens=n_tok, prefix=args.prefix, cont=args.cont,
             steps=args.rewire_steps, lr=lr,
             ppl_none=math.exp(tot["none"] / n_tok), ppl_adapted=math.exp(tot["adapted"] / n_tok),
             ppl_unrelated_prefix=math.exp(tot["unrelated"] / n_tok),
             docs_improved=int(sum(x < 0 for x in per_doc)), seconds=round(time.time() - t0, 2))


# ----- summary ---------------------------------------------------------------------------------------------------
def summary() -> list[str]:
    lines = []
    for r in OUT:
        m = r["measure"]
        if m == "detect":
            lines.append(f"detect {r['target']} vs {r['other']}: max |risk diff| {r['max_abs_risk_diff']:.3f}, "
                         f"top {[(e['layer'], e['expert'], round(e['score'], 3)) for e in r['top'][:3]]}, "
                         f"overlap with activation contrast {r['overlap_with_contrast']}")
        elif m == "disable":
            lines.append(
                f"disable top-{r['n']} {r['target']} experts: {r['target']} ppl {r['ppl_target_base']:.3f} -> "
                f"{r['ppl_target_found']:.3f} ({r['rel_target_found']:+.1%}) vs random {r['rel_target_random_mean']:+.1%} "
                f"(max {r['rel_target_random_max']:+.1%}); {r['other']} {r['rel_other_found']:+.1%} vs random "
                f"{r['rel_other_random_mean']:+.1%}  [found>every random: {r['found_beats_every_random']}, "
                f"other moves less: {r['other_moves_less']}]")
        elif m == "style":
            lines.append(f"style -> {r['target']} on {r['prompts_style']} prompts, {r['condition']:>16}: "
                         f"{r['frac_target']:.0%} of {r['n_prompts']} greedy answers in {r['target']}, "
                         f"margin log P(digits)-log P(words) {r['margin_digits_minus_words']:+.2f} "
                         f"(shift {r['margin_shift']:+.2f})")
        elif m == "routing_budget":
            lines.append(f"routing {r['rule']}={r['value']}: {r['mean_active_experts']:.2f} experts/token, "
                         f"ppl {r['perplexity']:.3f}")
        elif m == "scmoe":
            extra = f", wins {r['wins']} / losses {r['losses']} vs greedy" if "wins" in r else ""
            lines.append(f"arith exact match {r['condition']}: {r['accuracy']:.1%} ± {r['stderr']:.1%} "
                         f"(n={r['n']}){extra}")
        elif m == "rewire":
            lines.append(f"rewire {r['domain']} (lr {r['lr']:g}): continuation ppl none {r['ppl_none']:.3f}, adapted on prefix "
                         f"{r['ppl_adapted']:.3f}, adapted on unrelated prefix {r['ppl_unrelated_prefix']:.3f} "
                         f"({r['docs_improved']}/{r['docs']} docs improved)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="moekit:tiny")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machines)")
    p.add_argument("--parts", default="detect,style,budget,scmoe,rewire")
    p.add_argument("--rewire-lr", type=float, nargs="+", default=[0.03, 0.1],
                   help="Adam learning rates of the rerouting biases (one measurement each)")
    p.add_argument("--rewire-steps", type=int, default=5, help="Adam steps of the rerouting biases")
    args = p.parse_args(argv)
    q = args.quick
    args.seeds = 3
    args.detect_examples = 48 if q else 200
    args.n_experts = [2, 4] if q else [2, 4, 8]
    args.ppl_tokens = 600 if q else 1500
    args.style_prompts = 12 if q else 60
    args.style_experts = 4
    args.style_tokens = 4
    args.boost = 3.0
    args.top_k = [1, 2] if q else [1, 2, 3, 4]
    args.top_p = [0.5, 0.9] if q else [0.3, 0.5, 0.7, 0.8, 0.9]
    args.arith_prompts = 16 if q else 100
    args.betas = [0.5] if q else [0.5, 1.0]
    args.rewire_domains = ["code"] if q else ["code", "json", "literature"]
    args.rewire_docs = 2 if q else 5
    args.prefix, args.cont = (48, 48) if q else (96, 96)
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    lm = moekit.load(args.model)
    parts = set(args.parts.split(","))
    emit("setup", model=lm.name, architecture=lm.moe.model_type, layers=lm.moe.indices,
         num_experts=[v.num_experts for v in lm.moe], top_k=[v.top_k for v in lm.moe], quick=q)
    found = detect_and_disable(lm, args) if parts & {"detect", "style"} else {}
    if "style" in parts:
        style_shift(lm, found, args)
    if "budget" in parts:
        routing_budget(lm, args)
    if "scmoe" in parts:
        scmoe(lm, args)
    if "rewire" in parts:
        rerouting(lm, args)
    lines = summary()
    emit("summary", seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1), lines=lines)
    head = f"== steering effects on {lm.name} ({time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU) =="
    print("\n".join(["", head] + lines), file=sys.stderr)


if __name__ == "__main__":
    main()
