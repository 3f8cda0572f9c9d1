"""``steer.demo_step``: one steering example with its measured effect and its random control."""

import numpy as np
import pytest

import moekit
from moekit.experts import ExpertRef
from moekit.routing import RoutingControl
from moekit.steer import demo_step
from moekit.steer.effects import classify_style, matched_random, number_token_classes, style_margin
from moekit.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return moekit.load(save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("d") / "tiny"))


def test_demo_step_reports_effect_against_random(lm):
    out = demo_step(lm, n_examples=8, n_test=6, n_experts=2)
    d, w = out["ppl_digits"], out["ppl_words"]
    assert out["effect_digits"] == pytest.approx(d["found_off"] / d["base"] - 1)
    assert out["random_effect_words"] == pytest.approx(np.mean([x / w["base"] - 1 for x in w["random_off"]]))
    experts = [ExpertRef.parse(e) for e in out["experts"]]
    assert len(experts) == 2
    for draw in out["random_controls"]:
        draw = [ExpertRef.parse(e) for e in draw["experts"]]
        assert not set(draw) & set(experts) and sorted(li for li, _ in draw) == sorted(li for li, _ in experts)


def test_style_helpers(lm):
    assert classify_style(" forty-two.") == "words" and classify_style(" 42.") == "digits"
    assert classify_style("x = y") == "none"
    digits, words = number_token_classes(lm.tokenizer)
    assert lm.tokenizer.decode([int(digits[0])]).strip().isdigit()
    assert {lm.tokenizer.decode([int(w)]).strip() for w in words} >= {"seven", "twenty"}
    prompts = ["seven plus two equals"]
    m0 = style_margin(lm, prompts)
    ctrl = RoutingControl.make(disable=matched_random(lm, [(0, 1)], seed=0))
    assert style_margin(lm, prompts, ctrl).shape == m0.shape == (1,)


def test_greedy_batch_matches_generate(lm):
    from moekit.generation import generate
    from moekit.steer.effects import greedy_batch

    prompts = ["seven plus two equals", "3 + 4 =", "nine times one equals", "80 - 8 ="]
    ctrl = RoutingControl.make(disable=[(0, 1)])
    texts, margins = greedy_batch(lm, prompts, 3, ctrl, number_token_classes(lm.tokenizer))
    assert texts == [generate(lm, p, max_new_tokens=3, control=ctrl).text for p in prompts]
    assert margins == pytest.approx(style_margin(lm, prompts, ctrl), abs=1e-4)
