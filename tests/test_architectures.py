"""Every MoE language model of the installed transformers, found by enumeration (issue 15).

Each architecture is built as a tiny random model (``moekit.testing.tiny_model``) and checked against the
support table (``moekit.models.support``): the map, exact routing control, recording (also during
``generate`` through the model's own cache), the pruned-checkpoint writer and offloaded generation. A new
MoE architecture in a future transformers fails ``test_support_entry`` with its name.

The writer, offload and generate sweeps over all architectures are ``slow``; one representative per
selection rule runs by default (``REPRESENTATIVES``).
"""

from __future__ import annotations

import contextlib
import functools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.errors import UnsupportedArchitecture
from moekit.models import build_moe_map, from_model
from moekit.models.support import FEATURES, SUPPORT
from moekit.testing import has_causal_lm, moe_architectures, random_batch, tiny_config, tiny_model

ARCHS = moe_architectures()
NEG = float("-inf")

# tiny model map: (MoE decoder layers, experts per layer, top-k, shared modules). E is 8 by construction
# (LongCat-Flash and inkling add 2 zero-computation experts); dense layers follow each config's pattern.
EXPECTED = {
    "afmoe": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "aria_text": ([0, 1, 2, 3], 8, 2, ["shared_experts"]),
    "axk1": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "axk2": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "bailing_hybrid": ([2, 3], 8, 2, ["shared_experts"]),
    "beam": ([3], 8, 2, []),
    "cohere2_moe": ([0, 1, 2, 3], 8, 2, []),
    "dbrx": ([0, 1, 2], 8, 2, []),
    "deepseek_ocr2_text": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "deepseek_v2": ([1, 2], 8, 3, ["shared_experts"]),
    "deepseek_v3": ([1, 2], 8, 3, ["shared_experts"]),
    "deepseek_v32": ([3], 8, 2, ["shared_experts"]),
    "deepseek_v4": ([0, 1, 2, 3], 8, 2, ["shared_experts"]),
    "diffusion_gemma_text": ([0, 1, 2, 3], 8, 2, ["mlp"]),
    "dots1": ([1, 2], 8, 3, ["shared_experts"]),
    "dots3_note_text": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "ernie4_5_moe": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "ernie4_5_vl_moe_text": ([1, 2, 3], 8, 2, ["mlp.shared_experts"]),
    "exaone_moe": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "flex_olmo": ([0, 1, 2, 3], 8, 2, []),
    "flint": ([2, 3], 8, 2, ["shared_expert"]),
    "gemma4_text": ([0, 1, 2, 3], 8, 2, ["mlp"]),
    "glm4_moe": ([1, 2], 8, 3, ["shared_experts"]),
    "glm4_moe_lite": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "glm4v_moe_text": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "glm5_next_text": ([3], 8, 2, ["shared_experts"]),
    "glm_moe_dsa": ([3], 8, 2, ["shared_experts"]),
    "gpt_oss": ([0, 1, 2], 8, 2, []),
    "granitemoe": ([0, 1, 2], 8, 2, []),
    "granitemoe_swa": ([0, 1, 2, 3], 8, 2, []),
    "granitemoehybrid": ([0, 1, 2, 3], 8, 2, []),
    "granitemoeshared": ([0, 1, 2, 3], 8, 2, []),
    "hunyuan_v1_moe": ([0, 1, 2, 3], 8, 2, ["shared_mlp"]),
    "hy_v3": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "hy_v4": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "hy_v4_vl_text": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "inkling2_loop_text": ([0, 1, 2, 3], 8, 2, []),
    "inkling2_text": ([0, 1, 2, 3], 8, 2, []),
    "inkling_text": ([0, 1, 2, 3], 10, 2, ["shared_experts"]),
    "jamba": ([1, 3], 8, 2, []),
    "jetmoe": ([0, 1, 2, 3], 8, 2, []),
    "kimi_linear": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "kolibri1": ([0, 1, 2, 3], 8, 2, ["shared_experts"]),
    "laguna": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "lara_mini": ([0, 1, 2, 3], 8, 2, ["shared_expert"]),
    "lfm2_moe": ([1, 2, 3], 8, 2, []),
    "llama4_text": ([0, 1, 2, 3], 8, 1, ["shared_expert"]),
    "longcat_flash": ([0, 1, 2, 3], 10, 2, []),
    "mellum": ([0, 1, 2, 3], 8, 2, []),
    "mimo_v2_flash": ([1, 2, 3], 8, 2, []),
    "minimax": ([0, 1, 2, 3], 8, 2, []),
    "minimax_m2": ([0, 1, 2, 3], 8, 2, []),
    "minimax_m3_vl_text": ([0, 1, 2, 3], 8, 2, ["shared_experts"]),
    "mistral_large4_text": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "mixtral": ([0, 1, 2], 8, 2, []),
    "muse_spark_text": ([0, 1, 2, 3], 8, 2, []),
    "nemotron_h": ([1, 3], 8, 2, ["shared_experts"]),
    "olmoe": ([0, 1, 2], 8, 2, []),
    "phimoe": ([0, 1, 2], 8, 2, []),
    "qwen2_moe": ([0, 1, 2], 8, 2, ["shared_expert", "shared_expert_gate"]),
    "qwen3_5_moe_text": ([0, 1, 2, 3], 8, 2, ["shared_expert", "shared_expert_gate"]),
    "qwen3_moe": ([0, 2], 8, 2, []),
    "qwen3_next": ([0, 1, 2, 3], 8, 2, ["shared_expert", "shared_expert_gate"]),
    "qwen3_omni_moe_text": ([0, 1, 2, 3], 8, 2, []),
    "qwen3_vl_moe_text": ([0, 1, 2, 3], 8, 2, []),
    "qwen4_exp_text": ([0, 1, 2, 3], 8, 2, ["shared_expert", "shared_expert_gate"]),
    "sarvam_mla": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "sarvam_moe": ([1, 2, 3], 8, 2, ["shared_experts"]),
    "solar_open": ([0, 1, 2, 3], 8, 2, ["shared_experts"]),
    "step3p5": ([3], 8, 2, ["shared_experts"]),
    "unlimited_ocr_text": ([1, 2, 3], 8, 2, ["shared_experts"]),
}

# one architecture per selection rule and per special form (hybrid caches, dense scores, zero experts, ...)
REPRESENTATIVES = {"qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe", "minimax_m2",
                   "llama4_text", "gemma4_text", "qwen3_next", "jamba", "nemotron_h", "granitemoehybrid",
                   "lfm2_moe", "dbrx", "longcat_flash", "hunyuan_v1_moe", "deepseek_v32", "beam", "jetmoe",
                   "kolibri1"}


def _heavy(archs):
    """Representatives run by default; the full sweep is ``slow``."""
    return [a if a in REPRESENTATIVES else pytest.param(a, marks=pytest.mark.slow) for a in archs]


def supported(feature: str | None = None) -> list[str]:
    out = []
    for a in ARCHS:
        s = SUPPORT.get(a)
        if s is not None and not s.unsupported and (feature is None or feature in s.works()):
            out.append(a)
    return out


def skip_unless(arch: str, feature: str) -> None:
    """Skip with the support table's written reason when ``feature`` does not work for ``arch``."""
    s = SUPPORT[arch]
    if feature in s.limits:
        pytest.skip(f"{arch}: {s.limits[feature]}")
    if feature not in s.works():
        pytest.skip(f"{arch}: record-only ({s.note})")


@functools.cache
def lm_of(arch: str):
    return from_model(tiny_model(arch), name=f"tiny-{arch}")


def output_of(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def batch_for(lm, seed: int, **kw) -> dict:
    return random_batch(vocab=lm.config.vocab_size, seed=seed, **kw)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_support_entry(arch):
    """Every MoE architecture of the installed transformers is in the support table and the tiny map."""
    assert arch in SUPPORT, f"{arch}: a new MoE architecture in transformers; add it to models/support.py"
    s = SUPPORT[arch]
    assert s.unsupported or arch in EXPECTED, f"{arch}: no expected map"
    text_tower = not has_causal_lm(arch)
    for f in ("generate", "prune", "offload"):
        if text_tower:
            assert f in s.limits, f"{arch} is a text tower; {f} cannot work"


def test_support_table_lists_only_installed_architectures():
    """No stale rows: an entry is either an MoE architecture of this transformers or unknown to it (it
    arrived in a newer release than the one installed, e.g. under `make test-lowest`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert set(ARCHS) <= set(SUPPORT)
    stale = sorted(a for a in set(SUPPORT) - set(ARCHS) if a in CONFIG_MAPPING_NAMES)
    assert not stale, f"in models/support.py but not an MoE language model of this transformers: {stale}"


@pytest.mark.parametrize("arch", ARCHS)
def test_map(arch):
    s = SUPPORT[arch]
    if s.unsupported:
        with pytest.raises(UnsupportedArchitecture):
            build_moe_map(tiny_model(arch))
        return
    moe = lm_of(arch).moe
    layers, E, k, shared = EXPECTED[arch]
    assert moe.indices == layers
    for v in moe:
        assert (v.num_experts, v.top_k, sorted(v.shared)) == (E, k, sorted(shared))
        assert v.router_io in ("triple", "dense_scores", "logits", "probs", "jetmoe")
    if s.rule is None:
        assert all(v.rule is None for v in moe)
    else:
        rule_text = re.sub(r" \(\d+/\d+ groups(, max)?\)| \(sequential top-k, jitter [\d.]+\)", "",
                           moe.layers[0].rule_name)
        rule_text = re.sub(r" × [\d.]+$", " × scale", rule_text)
        rule_text = rule_text.replace("group-limited top-k × scale", "group-limited top-k (group max) × scale")
        assert (moe.layers[0].rule.name, rule_text) == (s.rule, s.rule_text)


@pytest.mark.parametrize("arch", supported())
def test_noop_is_bit_identical(arch):
    lm = lm_of(arch)
    batch = batch_for(lm, 1)
    ref = output_of(lm, batch)
    with moekit.record(lm):
        assert torch.equal(output_of(lm, batch), ref)
    if SUPPORT[arch].rule is None:  # record-only: routing control is refused with the clean error
        with pytest.raises(UnsupportedArchitecture), moekit.route(lm, disable={(lm.moe.indices[0], 0)}):
            pass
        return
    with moekit.route(lm):
        assert torch.equal(output_of(lm, batch), ref)
    with moekit.route(lm, top_k=lm.moe.layers[0].top_k):  # the rule re-derives the model's own selection
        torch.testing.assert_close(output_of(lm, batch), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(output_of(lm, batch), ref)  # nothing left behind


@contextlib.contextmanager
def reference_disable(lm, disabled: list[int]):
    """The model's own router code with the disabled experts' logits at −inf (and their selection bias at
    −inf), computed by intercepting the router's linear layer: an independent reference for ``disable``."""
    weights = {id(v.logit_weight): v for v in lm.moe}
    saved = []
    for v in lm.moe:
        for name, t in list(v.block.named_parameters()) + list(v.block.named_buffers()):
            if "bias" in name and t.numel() == v.num_experts and not name.startswith(("experts", "shared")) \
                    and t is not getattr(v.router, "bias", None):
                saved.append((t, t.detach().clone()))
                with torch.no_grad():
                    t.view(-1)[disabled] = NEG
    original = F.linear

    def linear(x, w, b=None):
        out = original(x, w, b)
        if id(w) in weights:
            out = out.clone()
            out[..., disabled] = NEG
        return out

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original
        with torch.no_grad():
            for t, old in saved:
                t.copy_(old)


@pytest.mark.parametrize("arch", supported())
def test_disable_equals_reference(arch):
    skip_unless(arch, "route")
    lm = lm_of(arch)
    batch = batch_for(lm, 2)
    disabled = [1, 4]
    with moekit.route(lm, disable={(v.index, e) for v in lm.moe for e in disabled}), moekit.record(lm) as rec:
        got = output_of(lm, batch)
    assert not np.isin(rec.trace.ids, disabled).any()
    with reference_disable(lm, disabled):
        want = output_of(lm, batch)
    assert not torch.equal(got, output_of(lm, batch))  # disabling changed the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", supported())
def test_force_top_k_all_and_top_p(arch):
    skip_unless(arch, "route")
    lm = lm_of(arch)
    batch = batch_for(lm, 4)
    forced = {(v.index, v.num_experts - 1) for v in lm.moe}
    with moekit.route(lm, force=forced), moekit.record(lm) as rec:
        output_of(lm, batch)
    for li, v in enumerate(lm.moe):
        assert (rec.trace.ids[li] == v.num_experts - 1).any(axis=1).all()
    E = lm.moe.layers[0].num_experts
    with moekit.route(lm, top_k=E), moekit.record(lm) as rec:
        assert torch.isfinite(output_of(lm, batch)).all()
    for li in range(rec.trace.num_layers):
        assert (np.sort(rec.trace.ids[li], axis=1) == np.arange(E)).all()
    with moekit.route(lm, top_p=0.5), moekit.record(lm, fields=("ids", "probs")) as rec:
        output_of(lm, batch)
    t = rec.trace
    for li in range(t.num_layers):
        probs = np.sort(t.probs[li].astype(np.float64), axis=1)[:, ::-1]
        want = ((np.cumsum(probs, axis=1) - probs) <= 0.5).sum(axis=1)
        got = (t.ids[li] >= 0).sum(axis=1)
        assert (got == want).mean() > 0.95  # fp16 probabilities may flip exact ties


@pytest.mark.parametrize("arch", _heavy(supported()))
def test_record_during_generate(arch):
    """Decode steps through the model's own cache (hybrid caches included) are recorded in order, and the
    prompt's routing equals a plain forward's."""
    skip_unless(arch, "generate")
    lm = lm_of(arch)
    batch = batch_for(lm, 8, batch=2, seq=6)
    with moekit.record(lm) as rec, torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    t = rec.trace
    assert t.num_tokens == 2 * (6 + 2)
    assert t.doc.tolist() == [0] * 8 + [1] * 8 and t.pos.tolist() == list(range(8)) * 2
    assert t.token_ids[:8].tolist() == out[0, :8].tolist()
    with moekit.record(lm) as plain, torch.no_grad():
        lm.model(**batch)
    prompt = np.concatenate([np.arange(6), 8 + np.arange(6)])
    assert np.array_equal(plain.trace.ids, t.ids[:, prompt])


@pytest.mark.parametrize("arch", _heavy(supported()))
def test_pruned_checkpoint(arch, tmp_path):
    """The pruned checkpoint computes what route(disable) computes on the full model, and loads in plain
    transformers. Group limits are switched off (n_group=1) so that any expert can be dropped exactly."""
    skip_unless(arch, "prune")
    from transformers import AutoModelForCausalLM

    from moekit.compress.writer import pruned_experts, write_pruned

    d = tiny_config(arch).to_dict()
    no_groups = {k: 1 for k in ("n_group", "num_expert_group", "topk_group") if k in d}
    lm = from_model(tiny_model(arch, **no_groups))
    kept = {v.index: [e for e in range(v.num_experts) if e not in (0, 3)] for v in lm.moe}
    out = write_pruned(lm, kept, tmp_path / "pruned")
    batch = batch_for(lm, 5)
    with moekit.route(lm, disable=pruned_experts(lm, kept)):
        want = output_of(lm, batch)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = plain(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert build_moe_map(plain).layers[0].num_experts == lm.moe.layers[0].num_experts - 2


@pytest.mark.parametrize("arch", _heavy(supported()))
def test_offloaded_greedy_equals_in_memory(arch):
    skip_unless(arch, "offload")
    from moekit.serve import TensorStore, offload

    lm = from_model(tiny_model(arch))
    batch = batch_for(lm, 9, batch=1, seq=6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = lm.model.generate(**batch, **kw)
        with offload(lm, policy="lru", slots=max(v.top_k for v in lm.moe), store=TensorStore.from_model(lm)) as eng:
            got = lm.model.generate(**batch, **kw)
            stats = eng.stats()
    assert torch.equal(got, ref)
    assert stats["requests"] > 0


def test_every_feature_is_known():
    for s in SUPPORT.values():
        assert set(s.limits) <= set(FEATURES), s.model_type


@pytest.mark.parametrize("arch", sorted(a for a, s in SUPPORT.items() if {"prune", "offload"} & set(s.limits)
                                        and a in ARCHS and has_causal_lm(a) and not s.unsupported))
def test_writer_and_offload_refuse_cleanly(arch, tmp_path):
    """Where the writer or the offload engine cannot work, they say so with UnsupportedArchitecture."""
    from moekit.compress.writer import write_pruned
    from moekit.serve import offload

    lm = lm_of(arch)
    s = SUPPORT[arch]
    if "prune" in s.limits:
        with pytest.raises(UnsupportedArchitecture, match="not supported for this architecture yet"):
            write_pruned(lm, {v.index: list(range(v.num_experts - 1)) for v in lm.moe}, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    if "offload" in s.limits:
        with pytest.raises(UnsupportedArchitecture, match="not supported for this architecture yet"), \
                offload(lm, policy="lru", slots=2):
            pass


def test_committed_doc_matches_the_generator():
    from pathlib import Path

    import transformers

    from moekit.models.support import support_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
    text = doc.read_text()
    if f"transformers {transformers.__version__} " not in text:
        pytest.skip(f"docs/architectures.md describes another transformers than the installed "
                    f"{transformers.__version__} (regenerate it when the lock moves)")
    assert text == support_markdown(), "run scripts/gen_architectures_doc.py"


def test_cli_list_architectures_json_is_the_table(capsys):
    import json

    from moekit.cli import main
    from moekit.models.support import support_rows

    assert main(["inspect", "--list-architectures", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == json.loads(json.dumps(support_rows()))
    assert {r["architecture"] for r in rows} == set(ARCHS)
    assert main(["inspect", "--list-architectures"]) == 0
    text = capsys.readouterr().out
    assert "mixtral" in text and "minimax_m2" in text


def test_jetmoe_attention_experts_are_mapped():
    """JetMoE's mixture-of-attention experts are in the map beside the MLP experts, with their own router,
    and the expert views are the slices of its parallel-experts weights."""
    lm = lm_of("jetmoe")
    att = lm.moe.attention_experts
    assert [v.index for v in att] == [0, 1, 2, 3]
    for v in att:
        assert (v.num_experts, v.top_k, v.rule.name) == (8, 2, "topk_then_softmax")
        assert v.block is lm.model.model.layers[v.index].self_attention.experts
    mlp = lm.moe.layers[0]
    w = mlp.expert_weights(5)
    assert torch.equal(torch.cat([w["gate"], w["up"]]), mlp.block.input_linear.weight[5])
    assert torch.equal(w["down"], mlp.block.output_linear.weight[5])
