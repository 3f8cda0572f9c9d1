"""Exactness of moekit.route and moekit.record on every supported architecture (issue 2, req. 4-5)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.models.rules import top_p_counts
from moekit.testing import TINY_ARCHS, random_batch, tiny_lm

NEG = float("-inf")


@pytest.fixture(scope="module", params=TINY_ARCHS)
def lm(request):
    return tiny_lm(request.param)


def logits_of(lm, batch):
    with torch.no_grad():
        return lm.model(**batch).logits


def reference_router(arch: str, router, disabled: list[int]):
    """A hand-written router for ``arch`` with the disabled experts' logits at -inf before selection."""

    def fwd(hidden_states):
        h = hidden_states.reshape(-1, router.weight.shape[1])
        logits = F.linear(h.float(), router.weight.float(), getattr(router, "bias", None))
        masked = logits.clone()
        masked[:, disabled] = NEG
        k = router.top_k
        if arch == "phimoe":  # transformers' own sparsemixer on the masked logits
            from transformers.models.phimoe.modeling_phimoe import sparsemixer

            w, idx = sparsemixer(masked, jitter_eps=router.router_jitter_noise, training=False, top_k=k)
            return logits, w, idx
        if arch in ("gpt_oss", "granitemoe"):
            top, idx = masked.topk(k, dim=-1)
            return logits, torch.softmax(top, dim=-1), idx
        if arch in ("deepseek_v3", "glm4_moe", "dots1"):  # the same sigmoid, selection-bias, group-limited rule
            s = masked.sigmoid()
            choice = s + router.e_score_correction_bias
            choice[:, disabled] = NEG
            T, E = choice.shape
            g = choice.view(T, router.num_group, -1).topk(2, dim=-1)[0].sum(-1)
            keep = torch.zeros_like(g).scatter_(1, g.topk(router.topk_group, dim=-1)[1], 1).bool()
            choice = choice.masked_fill(~keep.repeat_interleave(E // router.num_group, 1), NEG)
            idx = choice.topk(k, dim=-1)[1]
            w = s.gather(1, idx)
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return logits, w * router.routed_scaling_factor, idx
        p = torch.softmax(masked, dim=-1)
        if arch == "deepseek_v2":
            T, E = p.shape
            g = p.view(T, router.num_group, -1).max(-1).values
            keep = torch.zeros_like(g).scatter_(1, g.topk(router.topk_group, dim=-1)[1], 1).bool()
            p = p.masked_fill(~keep.repeat_interleave(E // router.num_group, 1), 0.0)
            w, idx = p.topk(k, dim=-1)
            return logits, w * router.routed_scaling_factor, idx
        w, idx = p.topk(k, dim=-1)
        if arch == "mixtral" or getattr(router, "norm_topk_prob", False):
            w = w / w.sum(-1, keepdim=True)
        return logits, w, idx

    return fwd


def test_no_options_is_identical_and_leaves_no_trace(lm):
    batch = random_batch(seed=1)
    ref = logits_of(lm, batch)
    with moekit.route(lm):
        same = logits_of(lm, batch)
    with moekit.record(lm):
        rec_same = logits_of(lm, batch)
    assert torch.equal(ref, same) and torch.equal(ref, rec_same)
    assert all("forward" not in vars(v.router) for v in lm.moe)
    with moekit.route(lm, disable={(lm.moe.indices[0], 0)}):
        changed = logits_of(lm, batch)
    assert not torch.equal(ref, changed)
    assert torch.equal(ref, logits_of(lm, batch))  # nothing left behind after exit


def test_disable_matches_hand_written_reference(lm):
    arch = lm.moe.model_type
    batch = random_batch(seed=2)
    disabled = {(v.index, e) for v in lm.moe for e in (1, 4)}
    with moekit.route(lm, disable=disabled):
        got = logits_of(lm, batch)
    for v in lm.moe:
        v.router.forward = reference_router(arch, v.router, [1, 4])
    try:
        want = logits_of(lm, batch)
    finally:
        for v in lm.moe:
            del v.router.forward
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with moekit.route(lm, disable=disabled), moekit.record(lm) as rec:
        logits_of(lm, batch)
    assert not np.isin(rec.trace.ids, [1, 4]).any()


def test_sparsemixer_matches_hf():
    lm = tiny_lm("phimoe")
    batch = random_batch(seed=3)
    with moekit.record(lm) as plain:
        logits_of(lm, batch)
    for v in lm.moe:  # the rule re-derived with no control must equal HF's own router exactly
        h = torch.randn(40, v.hidden_size)
        logits, w, ids = v.router(h)
        sel = v.rule.select(logits)
        assert torch.equal(sel.ids, ids) and torch.allclose(sel.weights, w.float())
    assert plain.trace.ids.shape[2] == 2


def test_forced_expert_in_every_selection(lm):
    batch = random_batch(seed=4, pad_last=2)
    forced = {(v.index, v.num_experts - 1) for v in lm.moe}
    with moekit.route(lm, force=forced), moekit.record(lm) as rec:
        logits_of(lm, batch)
    t = rec.trace
    assert t.num_tokens == batch["attention_mask"].sum()
    for li, v in enumerate(lm.moe):
        assert (t.ids[li] == v.num_experts - 1).any(axis=1).all()


def test_top_k_all_runs_every_expert(lm):
    batch = random_batch(seed=5)
    E = lm.moe.layers[0].num_experts
    with moekit.route(lm, top_k=E), moekit.record(lm) as rec:
        out = logits_of(lm, batch)
    assert torch.isfinite(out).all()
    for li in range(rec.trace.num_layers):
        assert (np.sort(rec.trace.ids[li], axis=1) == np.arange(E)).all()


def test_top_p_counts_match_reference(lm):
    batch = random_batch(seed=6)
    with moekit.route(lm, top_p=0.6), moekit.record(lm, fields=("ids", "probs")) as rec:
        logits_of(lm, batch)
    t = rec.trace
    for li in range(t.num_layers):
        probs = t.probs[li].astype(np.float64)
        want = []
        for row in probs:  # keep experts up to and including the first whose cumulative mass exceeds p
            total, n = 0.0, 0
            for q in sorted(row, reverse=True):
                n += 1
                total += q
                if total > 0.6:
                    break
            want.append(n)
        got = (t.ids[li] >= 0).sum(axis=1)
        assert (got == np.array(want)).mean() > 0.97  # fp16 probabilities may flip exact ties
        assert got.max() > 1


def test_top_p_counts_function():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.06, 0.04], [0.4, 0.4, 0.2]])
    assert top_p_counts(probs, 0.6).tolist() == [2, 1, 2]
    assert top_p_counts(probs, 0.95).tolist() == [3, 2, 3]


def test_scale_bias_and_composition():
    lm = tiny_lm("qwen3_moe")
    batch = random_batch(seed=7)
    l0 = lm.moe.indices[0]
    with moekit.record(lm) as base:
        logits_of(lm, batch)
    with moekit.route(lm, scale={(l0, 3): 2.0}), moekit.record(lm) as scaled:
        logits_of(lm, batch)
    b, s = base.trace, scaled.trace
    assert np.array_equal(b.ids[0], s.ids[0])  # later layers see a changed hidden state
    m = b.ids[0] == 3
    np.testing.assert_allclose(s.weights[0][m], 2 * b.weights[0][m], rtol=1e-6)
    np.testing.assert_allclose(s.weights[0][~m], b.weights[0][~m], rtol=1e-6)
    with moekit.route(lm, bias={(l0, 5): 100.0}), moekit.record(lm) as biased:
        logits_of(lm, batch)
    assert (biased.trace.ids[0] == 5).any(axis=1).all()
    with moekit.route(lm, disable={(l0, 5)}), moekit.route(lm, force={(l0, 6)}), moekit.record(lm) as both:
        logits_of(lm, batch)
    assert not (both.trace.ids[0] == 5).any() and (both.trace.ids[0] == 6).any(axis=1).all()


def test_bad_controls_raise_one_line_errors():
    lm = tiny_lm("olmoe")
    for kwargs in ({"disable": {(0, 99)}}, {"disable": {(9, 0)}}, {"top_p": 1.5}, {"top_k": 0}, {"top_k": 99},
                   {"force": {(0, 1), (0, 2), (0, 3)}}):
        with pytest.raises(moekit.MoekitError) as exc, moekit.route(lm, **kwargs):
            pass
        assert "\n" not in str(exc.value)


def test_record_skips_padding_and_follows_generate():
    lm = tiny_lm("qwen2_moe")
    batch = random_batch(batch=2, seq=8, seed=8, pad_last=3)
    with moekit.record(lm) as rec, torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    t = rec.trace
    assert t.num_tokens == 8 + 5 + 2 * (4 - 1)  # unpadded prompts + fed-back tokens (the last is never fed)
    assert t.doc.tolist() == [0] * 11 + [1] * 8
    assert t.pos.tolist() == list(range(11)) + list(range(8))
    assert t.token_ids[:8].tolist() == batch["input_ids"][0].tolist()
    assert t.token_ids[8:11].tolist() == out[0, 8:11].tolist()
    # the recorded routing of the generated tokens equals a fresh teacher-forced pass over the output
    with moekit.record(lm) as again, torch.no_grad():
        lm.model(input_ids=out[:1, :11])
    assert np.array_equal(again.trace.ids, t.select_docs([0]).ids)
