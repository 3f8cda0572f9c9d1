"""Generation with routing interventions, SCMoE and test-time rerouting (issue 6)."""

import json
import math

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.generation import generate, stream
from moekit.steer.contrast import contrast_logits
from moekit.steer.rewire import RewireDecoder
from moekit.testing import save_tiny_checkpoint, tiny_lm

PROMPT = [5, 17, 42, 9, 77, 3]




@pytest.fixture(scope="module")
def lm():
    return tiny_lm("qwen3_moe")


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    return moekit.load(save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("g") / "tiny"))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_greedy_equals_hf_generate(arch):
    lm = tiny_lm(arch)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                min_new_tokens=12, pad_token_id=0, eos_token_id=None)
    out = generate(lm, PROMPT, max_new_tokens=12)
    assert out.token_ids == ref[0, len(PROMPT):].tolist()
    assert out.finish_reason == "length" and out.prompt_tokens == len(PROMPT)


def test_seeded_sampling_is_reproducible(lm):
    a = generate(lm, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(lm, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    c = generate(lm, PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_strings_and_streaming(text_lm):
    full = generate(text_lm, "17 + 25 =", max_new_tokens=8)
    assert len(full.text) > 2
    stop = full.text[2:4]
    cut = generate(text_lm, "17 + 25 =", max_new_tokens=8, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert "".join(stream(text_lm, "17 + 25 =", max_new_tokens=8)) == full.text
    # a stop string spanning token boundaries never leaks its first characters into the stream
    longer = generate(text_lm, "def f(x):", max_new_tokens=16)
    for i in range(1, len(longer.text) - 3):
        stop = longer.text[i:i + 3]
        streamed = "".join(stream(text_lm, "def f(x):", max_new_tokens=16, stop=[stop]))
        assert streamed == longer.text[: longer.text.index(stop)]


def test_routing_control_changes_generation(lm):
    plain = generate(lm, PROMPT, max_new_tokens=8)
    ctrl = moekit.RoutingControl.make(top_k=1)
    assert generate(lm, PROMPT, max_new_tokens=8, control=ctrl).token_ids != plain.token_ids


def test_contrast_formula_hand_example():
    zs = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    zw = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    z = contrast_logits(zs, zw, beta=1.0, alpha=0.2)  # plausible: p >= 0.1 -> tokens 0, 1, 2
    assert z[3] == float("-inf")
    expect = [2 * math.log(0.5) - math.log(0.7), 2 * math.log(0.3) - math.log(0.1), 2 * math.log(0.15) - math.log(0.1)]
    assert z[:3].tolist() == pytest.approx(expect, abs=1e-6)
    assert int(z.argmax()) == 1  # the contrast prefers the token the weak routing under-rates
    with pytest.raises(MoekitError, match="beta"):
        contrast_logits(zs, zw, beta=-0.1)


def test_contrast_beta_zero_is_greedy(lm):
    plain = generate(lm, PROMPT, max_new_tokens=12)
    scm = generate(lm, PROMPT, max_new_tokens=12, strategy="contrast", strategy_options={"beta": 0.0})
    assert scm.token_ids == plain.token_ids and scm.stats["changed"] == 0
    strong = generate(lm, PROMPT, max_new_tokens=12, strategy="contrast", strategy_options={"beta": 2.0})
    assert strong.stats["steps"] == 12
    with pytest.raises(MoekitError, match="beta"):
        generate(lm, PROMPT, strategy="contrast", strategy_options={"beta": -1.0})


LAZY_DECODER = """
import json, sys
from moekit.generation import DECODERS, generate
from moekit.testing import tiny_lm
before = sorted(m for m in sys.modules if m.startswith("moekit.steer"))
help_text = DECODERS.help("contrast")  # listed with its help, still not imported
lm = tiny_lm("qwen3_moe")
still = sorted(m for m in sys.modules if m.startswith("moekit.steer"))
r = generate(lm, PROMPT, max_new_tokens=8, strategy="contrast", strategy_options={"beta": 2.0})
print(json.dumps({"before": before + still, "help": help_text, "ids": r.token_ids, "changed": r.stats["changed"],
                  "loaded": "moekit.steer.contrast" in sys.modules}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (~30 s on a busy 2-core machine)
def test_steer_decoders_resolve_lazily_from_the_registry(lm):
    """generation.py never imports moekit.steer: the "contrast" entry imports its module on first use."""
    import subprocess
    import sys

    code = LAZY_DECODER.replace("PROMPT", repr(PROMPT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["before"] == [] and got["loaded"] is True
    assert got["help"].startswith("Self-contrast decoding (SCMoE)")
    here = generate(lm, PROMPT, max_new_tokens=8, strategy="contrast", strategy_options={"beta": 2.0})
    assert got["ids"] == here.token_ids and got["changed"] == here.stats["changed"]


def test_unknown_decoder_lists_the_registry():
    from moekit.generation import DECODERS

    with pytest.raises(MoekitError, match=r"^unknown decoding strategy 'nope'; choose one of: plain, contrast, rewire$"):
        DECODERS.get("nope")


def test_rewire_keeps_weights_and_changes_routing(lm):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    dec = RewireDecoder(lm, steps=5, lr=0.5, every=0)
    ids = torch.tensor(list(range(1, 40)))
    dec.prefill(ids)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lm.model.parameters())
    losses = dec.stats["history"][0]["losses"]
    assert losses[-1] < losses[0]
    x = ids.view(1, -1)
    with moekit.record(lm) as r0, torch.no_grad():
        lm.model(input_ids=x)
    with moekit.route(lm, control=dec.bias.control()), moekit.record(lm) as r1, torch.no_grad():
        lm.model(input_ids=x)
    assert (r0.trace.ids != r1.trace.ids).any()


def test_rewire_generation_updates_every_n(lm):
    out = generate(lm, PROMPT, max_new_tokens=9, strategy="rewire",
                   strategy_options={"every": 4, "steps": 2, "layers": [2]})
    assert out.stats["updates"] == 3 and out.stats["layers"] == [2]  # prefill, after 4 and after 8 tokens
    with pytest.raises(MoekitError, match="not an MoE layer"):
        generate(lm, PROMPT, strategy="rewire", strategy_options={"layers": [1]})


def test_cli_generate(text_lm, capsys):
    from moekit.cli import main

    base = ["generate", str(text_lm.path), "--prompt", "17 + 25 =", "--max-tokens", "4"]
    assert main(base + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == generate(text_lm, "17 + 25 =", max_new_tokens=4).token_ids
    assert main(base) == 0
    assert capsys.readouterr().out == res["text"] + "\n"
    assert main(base + ["--disable", "0:1,2:3", "--boost", "0:2=2", "--bias", "2:4=1.5", "--top-p", "0.5"]) == 0
    assert main(base + ["--contrast", "0.5"]) == 0
    assert main(base + ["--rewire", "--rewire-steps", "1"]) == 0
    for bad in (["--disable", "0:99"], ["--disable", "7:0"], ["--force", "0:1,0:2,0:3"], ["--contrast", "-1"],
                ["--boost", "0:1"], ["--top-k", "1", "--top-p", "0.5"], ["--steer", "missing.json:off"],
                ["--contrast", "0.5", "--rewire"], ["--rewire", "--rewire-layers", "1"]):
        assert main(base + bad) == 2, bad
        assert capsys.readouterr().err.count("\n") == 1


def _steps(lm, prompt: list[int], tokens: list[int], reserve: int | None = None):
    """The plain decoder's logits after the prompt and after each of ``tokens``, and its cache's length at each."""
    from moekit.generation import Decoder

    dec = Decoder(lm)
    dec.reserve = reserve
    logits, lengths = [dec.prefill(torch.tensor(prompt))], []
    for t in tokens:
        logits.append(dec.step(t))
        lengths.append(dec.cache.layers[0].max_cache_len if dec._static else None)
    return dec, torch.stack(logits), lengths


@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "mixtral", "qwen2_moe"])
def test_fast_decode_keeps_a_static_cache_that_grows(arch, monkeypatch) -> None:
    """With moekit's whole-layer decode step on (``use_fast_decode``) the plain decoder keeps a static KV cache, written
    in place by the native step, twice the prompt (at least STATIC_CHUNK more) and doubling when full: with
    STATIC_CHUNK = 4 a 6-token prompt gives 12, then 24, then 48 positions over 30 steps. Its logits equal those of a
    dynamic cache through the same native layers (fp32, 1e-5) at every step, every step ran the whole-layer call, and
    ``reserve`` caps the length (6 + 9 = 15)."""
    from moekit import generation
    from moekit.cli.common import use_fast_decode
    from moekit.nn import fused_decode

    if not fused_decode.enabled():
        pytest.skip("no C++ compiler: no whole-layer step")
    monkeypatch.setattr(generation, "STATIC_CHUNK", 4)
    lm = tiny_lm(arch)
    use_fast_decode(lm)
    tokens = torch.randint(3, 100, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    fused_decode.calls.clear()
    dec, static, lengths = _steps(lm, PROMPT, tokens)
    assert dec._static and type(dec.cache).__name__ == "StaticCache"
    assert lengths == [12] * 6 + [24] * 12 + [48] * 12  # full at 12 and 24 positions: grown by the next step
    moe_layers = sum(type(getattr(layer.mlp, "gate", None)).__name__ in fused_decode.ROUTER_CLASSES
                     for layer in lm.model.model.layers)  # (Qwen3-MoE's dense layers take the per-module ops)
    assert moe_layers > 0 and fused_decode.calls["layer"] == 30 * moe_layers
    monkeypatch.setattr(generation, "static_cache", lambda model, length: None)
    dec, dynamic, _ = _steps(lm, PROMPT, tokens)
    assert not dec._static and type(dec.cache).__name__ == "DynamicCache"
    torch.testing.assert_close(static, dynamic, rtol=0, atol=1e-5)
    monkeypatch.undo()
    assert _steps(lm, PROMPT, tokens[:9], reserve=9)[2] == [15] * 9
    monkeypatch.setattr(generation, "STATIC_CHUNK", 4)
    dec = generation.Decoder(lm)
    dec.prefill(torch.tensor(PROMPT))
    first = dec.cache
    for t in tokens[:7]:  # the 7th step finds 12 of 12 positions filled
        dec.step(t)
    assert dec.cache is not first and all(layer.keys is None for layer in first.layers)  # freed as copied


def test_static_cache_only_where_it_pays() -> None:
    """A dynamic cache without the whole-layer step (the model's own forwards: SDPA over a static cache's whole length
    would cost more) and for a sliding-window model (its layers cannot grow by copying); greedy text identical."""
    from moekit.cli.common import use_fast_decode
    from moekit.generation import static_cache
    from moekit.nn import fused_decode

    plain = tiny_lm("qwen3_moe")
    assert not fused_decode.runs_whole_layers(plain.model) and static_cache(plain.model, 16) is None
    if not fused_decode.enabled():
        pytest.skip("no C++ compiler: no whole-layer step")
    sliding = tiny_lm("mixtral", sliding_window=4)
    use_fast_decode(sliding)
    assert fused_decode.runs_whole_layers(sliding.model)  # refused for its sliding layers, not for the step
    assert static_cache(sliding.model, 16) is None
    fast = tiny_lm("qwen3_moe")
    use_fast_decode(fast)
    cache = static_cache(fast.model, 16)
    assert cache is not None and all(layer.max_cache_len == 16 for layer in cache.layers)
    assert generate(fast, PROMPT, max_new_tokens=40).token_ids == generate(plain, PROMPT, max_new_tokens=40).token_ids
