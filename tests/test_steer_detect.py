"""Expert detection (risk difference, activation contrast, nPMI) and the experts-file presets (issue 6)."""

import json
import math

import numpy as np
import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.steer.detect import (
    Example,
    SetCounts,
    activation_contrast,
    count_routing,
    find_experts,
    npmi,
    npmi_counts,
    read_examples,
    risk_diff,
    save_experts,
)
from moekit.steer.presets import control_from_spec, load_experts, parse_steer, steering_control
from moekit.testing import save_tiny_checkpoint

POS = ["17 + 25 = 42.", "3 * 4 = 12.", "80 - 8 = 72."]
NEG = ["seventeen plus twenty-five equals forty-two.", "three times four equals twelve."]




@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("m") / "tiny")
    return moekit.load(path)


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("o") / "tiny", seed=5)
    return moekit.load(path)


def counts(tokens, selected, weight=None, marker_tokens=0, marker_selected=None):
    sel = np.array(selected, dtype=np.int64)
    return SetCounts(tokens, sel, np.array(weight if weight is not None else sel, dtype=float), marker_tokens,
                     None if marker_selected is None else np.array(marker_selected, dtype=np.int64))


def test_risk_diff_hand_counts():
    pos = counts(10, [[7, 2, 0]])
    neg = counts(4, [[1, 3, 0]])
    score, c = risk_diff(pos, neg)
    assert score.tolist() == [[7 / 10 - 1 / 4, 2 / 10 - 3 / 4, 0.0]]
    assert c["a_pos"].tolist() == [[7, 2, 0]] and c["d_pos"].tolist() == [[3, 8, 10]]
    assert c["d_neg"].tolist() == [[3, 1, 4]]


def test_activation_contrast_hand_counts():
    pos = counts(4, [[2, 1]], weight=[[1.5, 0.25]])
    neg = counts(2, [[1, 1]], weight=[[0.5, 1.0]])
    score, c = activation_contrast(pos, neg)
    assert score.tolist() == [[1.5 / 4 - 0.5 / 2, 0.25 / 4 - 1.0 / 2]]


def test_npmi_hand_counts():
    # 8 tokens, 2 markers; expert 0 on both markers only, expert 1 on 1 marker + 3 others, expert 2 never with x
    pos = counts(8, [[2, 4, 3]], marker_tokens=2, marker_selected=[[2, 1, 0]])
    score, _ = npmi(pos, None)
    p1 = 1 / 8
    expect1 = math.log(p1 / ((4 / 8) * (2 / 8))) / -math.log(p1)
    assert score[0, 0] == pytest.approx(1.0) and score[0, 1] == pytest.approx(expect1) and score[0, 2] == -1.0
    assert npmi_counts(4, 4, [4], [4]).tolist() == [1.0]  # p(x,E) = 1


def test_detectors_need_their_inputs():
    pos = counts(2, [[1]])
    with pytest.raises(MoekitError, match="--neg"):
        risk_diff(pos, None)
    with pytest.raises(MoekitError, match="--markers"):
        npmi(pos, None)


def test_counts_match_record_and_mask_the_prompt(lm):
    full = count_routing(lm, ["17 + 25 = 42."])
    prompt = count_routing(lm, ["17 + 25 ="])
    masked = count_routing(lm, [Example(" 42.", prompt="17 + 25 =")])
    assert full.tokens == 6 and prompt.tokens == 4 and masked.tokens == 2
    # causal model: the prompt's routing is the same alone and inside prompt+response
    assert np.array_equal(masked.selected, full.selected - prompt.selected)
    assert np.allclose(masked.weight, full.weight - prompt.weight, atol=1e-5)
    ids = lm.tokenizer("17 + 25 = 42.", add_special_tokens=False)["input_ids"]
    with moekit.record(lm) as rec, torch.no_grad():
        lm.model(input_ids=torch.tensor([ids]))
    tr = rec.trace
    for li in range(len(lm.moe)):
        expect = np.array([(tr.ids[li] == e).any(axis=1).sum() for e in range(8)])
        assert full.selected[li].tolist() == expect.tolist()
    assert full.selected.sum() == 6 * 2 * len(lm.moe)  # top-2, every token counted once per expert


def test_find_experts_ranks_and_saves(lm, tmp_path):
    res = find_experts(lm, POS, NEG, top=3)
    entries = res["entries"]
    assert len(entries) == 8 * len(lm.moe)
    scores = [r["score"] for r in entries]
    assert scores == sorted(scores, reverse=True)
    for r in entries[:3]:
        assert r["score"] == pytest.approx(r["a_pos"] / (r["a_pos"] + r["d_pos"]) - r["a_neg"] / (r["a_neg"] + r["d_neg"]))
    assert res["architecture"] == "qwen3_moe" and res["num_experts"] == [8, 8] and res["layers"] == [0, 2]
    path = save_experts(res, tmp_path / "e.json")
    assert load_experts(path, lm)["entries"] == json.loads(json.dumps(entries))


def test_presets_round_trip(lm, tmp_path):
    res = find_experts(lm, POS, NEG, top=5)
    path = save_experts(res, tmp_path / "e.json")
    top = [ExpertRef(r["layer"], r["expert"]) for r in res["entries"] if r["score"] > 0][:5]
    assert ExpertSet.load(path) == ExpertSet(top)  # the file's "experts" key: the top entries with score > 0
    off = control_from_spec(f"{path}:off", lm)
    assert off.disable == frozenset(top) and not off.force
    on = control_from_spec(f"{path}:on", lm)
    per_layer = {}
    for layer, _ in on.force:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    assert max(per_layer.values()) <= 2 and on.force <= frozenset(top)
    neg = [ExpertRef(r["layer"], r["expert"]) for r in reversed(res["entries"]) if r["score"] < 0][:5]
    both = control_from_spec(f"{path}:on+off", lm)
    assert both.force == on.force and both.disable == frozenset(neg)
    boost = control_from_spec(f"{path}:boost=2.5:2", lm)
    assert boost.scale == {top[0]: 2.5, top[1]: 2.5}
    assert parse_steer("a:b.json:off:3") == ("a:b.json", "off", 3)
    with pytest.raises(MoekitError, match="steering mode"):
        steering_control(res, "up", lm)


def test_experts_file_from_another_model_is_refused(lm, other_lm, tmp_path):
    path = save_experts(find_experts(lm, POS, NEG), tmp_path / "e.json")
    with pytest.raises(MoekitError, match="another model"):
        control_from_spec(f"{path}:off", other_lm)
    data = json.loads(path.read_text())
    data["num_experts"] = [16, 16]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(MoekitError, match="another model"):
        load_experts(tmp_path / "bad.json", lm)


def test_read_examples(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"text": "t"}\n')
    assert read_examples(tmp_path / "a.txt") == [Example("one"), Example("two")]
    assert read_examples(tmp_path / "b.jsonl") == [Example("r", "p"), Example("t")]
    from moekit.data import load_corpus

    code = read_examples("moekit:corpus:validation:code")
    assert code == [Example(d.text) for d in load_corpus("validation") if d.domain == "code"]
    with pytest.raises(MoekitError, match="domain"):
        read_examples("moekit:corpus:test:poetry")
    (tmp_path / "c.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(MoekitError, match="c.jsonl:1"):
        read_examples(tmp_path / "c.jsonl")


def test_cli_steer_find(lm, other_lm, tmp_path):
    from moekit.cli import main

    (tmp_path / "pos.txt").write_text("\n".join(POS))
    (tmp_path / "neg.txt").write_text("\n".join(NEG))
    out = tmp_path / "e.json"
    args = ["steer", "find", str(lm.path), "--pos", str(tmp_path / "pos.txt"), "--neg", str(tmp_path / "neg.txt"),
            "--out", str(out), "--top", "4", "--json"]
    assert main(args) == 0
    assert json.loads(out.read_text())["top"] == 4
    assert main(args) == 2  # exists, no --force
    assert main(args[:-1] + ["--method", "nope", "--force"]) == 2
    assert main(args + ["--method", "npmi", "--force"]) == 2  # npmi without markers
    assert main(args + ["--method", "npmi", "--markers", "+,=", "--force"]) == 0
    assert main(args[:6] + ["--out", str(out), "--force"]) == 2  # risk_diff without --neg
    gen = ["generate", str(other_lm.path), "--prompt", "1 + 1 =", "--steer", f"{out}:off", "--max-tokens", "2"]
    assert main(gen) == 2
