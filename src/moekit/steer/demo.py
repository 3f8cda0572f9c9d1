"""One steering example with its measured effect, for ``moekit demo`` (a few seconds on moekit:tiny)."""

from __future__ import annotations

import random
import time

import numpy as np

from moekit.data.synthetic import format_fact, random_fact
from moekit.generation import generate
from moekit.models.loading import LoadedModel
from moekit.routing import RoutingControl, route
from moekit.steer.detect import find_experts
from moekit.steer.effects import matched_random
from moekit.steer.presets import selected_experts


def _ppl(lm: LoadedModel, lines: list[str], control: RoutingControl | None) -> float:
    from moekit.eval import perplexity

    text = ["\n".join(lines)]
    if control is None:
        return float(perplexity(lm, text, progress=False)["perplexity"])
    with route(lm, control=control):
        return float(perplexity(lm, text, progress=False)["perplexity"])


def demo_step(lm: LoadedModel, n_examples: int = 48, n_test: int = 40, n_experts: int = 2, seed: int = 0) -> dict:
    """Find the experts that separate digit arithmetic from the *same facts* in number words (risk
    difference, SteerMoE), switch the top ``n_experts`` off, and measure the perplexity change on held-out
    digit lines (target) and number-word lines (other) — against switching off the same number of random
    experts in the same layers (3 draws). Returns a JSON-able dict.
    """
    t0 = time.time()
    rng = random.Random(seed)
    facts = [random_fact(rng) for _ in range(n_examples)]
    found = find_experts(lm, [format_fact(f, "digits") for f in facts], [format_fact(f, "words") for f in facts],
                         method="risk_diff", top=n_experts)
    experts = selected_experts(found, n_experts)
    test_rng = random.Random(seed + 1000)
    held = [random_fact(test_rng) for _ in range(n_test)]
    digits, words = [format_fact(f, "digits") for f in held], [format_fact(f, "words") for f in held]
    base = (_ppl(lm, digits, None), _ppl(lm, words, None))
    off = RoutingControl.make(disable=experts)
    found_ppl = (_ppl(lm, digits, off), _ppl(lm, words, off))
    randoms = []
    for s in range(3):
        draw = matched_random(lm, experts, s)
        ctrl = RoutingControl.make(disable=draw)
        randoms.append({"experts": [str(e) for e in draw], "ppl_digits": _ppl(lm, digits, ctrl),
                        "ppl_words": _ppl(lm, words, ctrl)})
    rel = lambda new, old: new / old - 1  # noqa: E731
    prompt = "17 + 25 ="
    return {
        "what": f"switch off the {n_experts} experts found for digit arithmetic (vs the same facts in number "
                "words) and compare with switching off random experts in the same layers",
        "experts": [str(e) for e in experts],
        "scores": [round(r["score"], 4) for r in found["entries"][:n_experts]],
        "held_out_lines": n_test,
        "ppl_digits": {"base": base[0], "found_off": found_ppl[0], "random_off": [r["ppl_digits"] for r in randoms]},
        "ppl_words": {"base": base[1], "found_off": found_ppl[1], "random_off": [r["ppl_words"] for r in randoms]},
        "effect_digits": rel(found_ppl[0], base[0]),
        "effect_words": rel(found_ppl[1], base[1]),
        "random_effect_digits": float(np.mean([rel(r["ppl_digits"], base[0]) for r in randoms])),
        "random_effect_words": float(np.mean([rel(r["ppl_words"], base[1]) for r in randoms])),
        "random_controls": randoms,
        "example": {"prompt": prompt, "plain": generate(lm, prompt, max_new_tokens=8).text,
                    "experts_off": generate(lm, prompt, max_new_tokens=8, control=off).text},
        "seconds": round(time.time() - t0, 2),
    }
