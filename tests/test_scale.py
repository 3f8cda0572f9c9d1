"""Real size by default: the checkpoint's dtype kept and recorded, structure from headers (no weight read),
one checkpoint reader (transformers' renames and fusions, one expert at a time), and ``max_memory``
placement giving the in-memory model's traces and logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import moekit
from moekit.cli import main
from moekit.errors import MoekitError
from moekit.formats import Checkpoint, read_header
from moekit.generation import generate
from moekit.models.loading import bank_keys, footprint, load_structure
from moekit.serve.placement import ACTIVATION_SHARE, RESERVE, parse_size, plan_budget
from moekit.testing import random_batch, save_tiny_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROMPT = "The quick brown fox jumps over the lazy dog because"


def _save(arch: str, path, dtype: torch.dtype, **overrides):
    save_tiny_checkpoint(arch, path, **overrides)
    if dtype != torch.float32:  # re-save the same weights in ``dtype``
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(path, dtype=dtype).save_pretrained(path)
    return path


def _config_dtype(path) -> str:
    return json.loads((path / "config.json").read_text())["dtype"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DTYPES)
def test_dtype_round_trips_through_load_and_every_writer(name, tmp_path):
    from moekit.compress.lowmem import prune_lowmem
    from moekit.compress.merge import merge
    from moekit.compress.prune import prune
    from moekit.compress.quantize import quantize
    from moekit.data import Document

    dt = DTYPES[name]
    src = _save("olmoe", tmp_path / "src", dt)
    lm = moekit.load(src)
    assert {p.dtype for p in lm.model.parameters()} == {dt}
    assert moekit.load(src, dtype="float32").model.dtype == torch.float32
    docs = [Document("The cat sat on the mat. " * 20, "prose", "a", "x")]
    prune(lm, "frequency", 0.5, docs, out=tmp_path / "pruned", seq_len=32)
    prune_lowmem(src, "frequency", 0.5, docs, tmp_path / "low", seq_len=32)
    merge(lm, 0.5, docs, out=tmp_path / "merged", seq_len=32)
    quantize(lm, bits=8, group_size=32, out=tmp_path / "quant")
    for out in ("pruned", "low", "merged", "quant"):
        assert _config_dtype(tmp_path / out) == name, out
        back = moekit.load(tmp_path / out)
        assert {p.dtype for p in back.model.parameters() if p.is_floating_point()} == {dt}, out
    header, _ = read_header(tmp_path / "low" / "model.safetensors")
    assert {e["dtype"] for e in header.values()} == {{"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[name]}


def _cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_dtype_and_size_are_one_line_errors(tmp_path, capsys):
    rc, _, err = _cli(capsys, "trace", "moekit:tiny", "--data", "moekit:corpus:validation", "--out",
                      tmp_path / "t.trace", "--dtype", "float8")
    assert rc == 2 and "unknown dtype 'float8'" in err
    rc, _, err = _cli(capsys, "eval", "moekit:tiny", "--max-memory", "lots")
    assert rc == 2 and "bad memory size 'lots'" in err
    for bad in ("-1GB", "nan", "6 parsecs", "0"):
        with pytest.raises(MoekitError):
            parse_size(bad)
    assert parse_size("6GB") == 6_000_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(512) == 512


# the last five need more of transformers' conversions: concatenated, split and chunked attention tensors (bailing
# hybrid, kimi linear, sarvam, lara), and renames that must not fire on a key the model holds as it is (deepseek_v4)
@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "phimoe", "granitemoe", "gpt_oss", "deepseek_v2",
                                  "bailing_hybrid", "kimi_linear", "sarvam_moe", "lara_mini", "deepseek_v4"])
def test_checkpoint_reader_reads_single_experts_exactly(arch, tmp_path):
    """Expert e's slice of every fused bank, read alone from the on-disk (per-expert or fused) tensors,
    equals what transformers' from_pretrained builds."""
    src = save_tiny_checkpoint(arch, tmp_path / "src", with_tokenizer=False)
    full = moekit.load(src, with_tokenizer=False)
    ckpt = Checkpoint(src)
    plan = ckpt.plan(full.model)
    sd = full.model.state_dict()
    assert set(plan) >= {k for k in sd if not k.startswith("lm_head")}
    for d in bank_keys(full.model).values():
        for key in d.values():
            for e in (0, 3):
                out = torch.empty(sd[key].shape[1:], dtype=sd[key].dtype)
                ckpt.read_expert(plan[key], e, out)
                assert torch.equal(out, sd[key][e]), (key, e)
    for key, tgt in plan.items():  # and every tensor whole
        out = torch.empty(tgt.shape, dtype=sd[key].dtype)
        ckpt.read_target(tgt, out)
        assert torch.equal(out, sd[key]), key


def test_conversion_steps_equal_transformers_operations():
    """moekit's conversion steps give what transformers' own operations give (concatenate, chunk, split,
    transpose with and without the shape check, interleave both ways), and a fused expert bank's transpose or
    interleave applied to one expert's slab equals that expert of the converted bank."""
    from transformers.core_model_loading import Chunk, Concatenate, Interleave, Split, Transpose

    from moekit.formats.checkpoint import Piece, Target, _per_expert_recipe, _recipe, _run_recipe

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)

    class Model:  # what Split and a checked Transpose ask transformers' model for: each target's parameter shape
        def __init__(self, shapes: dict) -> None:
            self.shapes = shapes

        def get_parameter(self, name):
            return torch.empty(self.shapes[name], device="meta")

    cases = [  # (operation, sources, target patterns, the model's target shapes)
        (Concatenate(dim=1), [a, b], ["t0"], [(4, 12, 8)]),
        (Chunk(dim=1), [a], ["t0", "t1"], [(4, 3, 8), (4, 3, 8)]),
        (Split(dim=1), [a], ["t0", "t1"], [(4, 2, 8), (4, 4, 8)]),
        (Transpose(1, 2), [a], ["t0"], [(4, 8, 6)]),
        (Transpose(1, 2, check_dims=True), [a], ["t0"], [(4, 6, 8)]),
        (Transpose(1, 2, check_dims=True), [a], ["t0"], [(4, 8, 6)]),
        (Interleave(dim=1), [a], ["t0"], [(4, 6, 8)]),
        (Interleave(dim=1, inverse=True), [a], ["t0"], [(4, 6, 8)]),
    ]
    for op, sources, targets, shapes in cases:
        inputs = {f"s{i}": t for i, t in enumerate(sources)}
        want = op.convert(inputs, list(inputs), targets, model=Model(dict(zip(targets, shapes, strict=True))),
                          full_layer_name="t0", config=None)
        steps = _recipe("key", [op], shapes)
        got = _run_recipe(sources, steps, shapes[0])
        assert len(got) == len(targets), op
        for name, tensor in zip(targets, got, strict=True):
            assert torch.equal(tensor, want[name]), (op, name)
        if len(sources) == 1 and len(targets) == 1 and type(op).__name__ in ("Transpose", "Interleave"):
            info = type("Info", (), {"shape": tuple(a.shape)})()
            slab_steps = _per_expert_recipe(Target("t0", shapes[0], [Piece(info)], steps))
            assert slab_steps is not None
            for e in range(a.shape[0]):
                assert torch.equal(_run_recipe([a[e]], slab_steps, shapes[0][1:])[0], want["t0"][e]), (op, e)
    # a step on the expert axis mixes experts: no per-expert read
    info = type("Info", (), {"shape": tuple(a.shape)})()
    assert _per_expert_recipe(Target("t0", (6, 4, 8), [Piece(info)], _recipe("k", [Transpose(0, 1)], [(6, 4, 8)]))) is None


def _read_bytes() -> int:
    """Bytes this process has read through read/pread system calls so far (/proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_inspect_reads_no_weights(tmp_path, capsys):
    """inspect reads the config and the safetensors headers, not the weights: the process reads far fewer
    bytes than one expert bank holds (of 75 MB of weights), and the numbers equal those of the loaded model."""
    src = _save("olmoe", tmp_path / "src", torch.bfloat16, hidden_size=256, intermediate_size=512, num_experts=16)
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert weights > 35e6
    _cli(capsys, "inspect", "moekit:tiny", "--json")  # warm up: imports read their own files once
    before = _read_bytes()
    rc, out, err = _cli(capsys, "inspect", src, "--json")
    read = _read_bytes() - before
    assert rc == 0, err
    assert read < 2e6, read  # one layer's expert bank alone is 16 * 3 * 256 * 512 * 2 = 12.6 MB
    ref = json.loads(out)
    lm = moekit.load(src)
    assert ref["params_total"] == sum(p.numel() for p in lm.model.parameters())
    sd = lm.model.state_dict()
    persistent = [b for n, b in lm.model.named_buffers() if n in sd]
    assert ref["bytes_total"] == sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *persistent])
    assert ref["dtype"] == "bfloat16" and ref["moe_layers"] == len(lm.moe)
    before = _read_bytes()
    moekit.load(src, max_memory="100GB")  # moekit's own reader, resident: the counter does see its preads
    assert _read_bytes() - before > 0.9 * weights


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2"])
@pytest.mark.parametrize("tied", [True, False])
def test_structure_ties_embeddings_like_the_loaded_model(arch, tied, tmp_path):
    """The weightless structure ties lm_head to the embeddings when the config does, as from_pretrained does:
    its size estimate equals the bytes of the tensors the checkpoint stores (a tied lm_head is stored once)."""
    src = save_tiny_checkpoint(arch, tmp_path / "src", with_tokenizer=False, tie_word_embeddings=tied)
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for f in src.glob("*.safetensors")
                 for e in read_header(f)[0].values())
    meta = load_structure(src)
    assert (meta.model.lm_head.weight is meta.model.model.embed_tokens.weight) is tied
    fp = footprint(meta)
    assert fp["total"] == stored
    assert fp == footprint(moekit.load(src, with_tokenizer=False))
    assert plan_budget(meta, 10**12)["total"] == stored  # the budget plan uses the same estimate


def _budget_for(path, slots: int) -> int:
    """A max_memory that leaves room for ``slots`` experts per layer next to the resident weights."""
    meta = load_structure(path)
    plan = plan_budget(meta, 10**12)
    per_slot = plan["min_cache_bytes"] // max(v.top_k for v in meta.moe)
    return int((RESERVE + plan["resident"] + slots * per_slot + per_slot // 2) / (1 - ACTIVATION_SHARE))


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2", "mixtral", "kimi_linear", "bailing_hybrid"])
def test_max_memory_offloads_with_identical_traces_and_logits(arch, tmp_path):
    src = _save(arch, tmp_path / "src", torch.bfloat16)
    ref = moekit.load(src)
    k = max(v.top_k for v in ref.moe)
    lm = moekit.load(src, max_memory=_budget_for(src, k + 1))
    assert lm.engine is not None and lm.engine.slots == k + 1
    assert all(v.experts.down_proj.is_meta for v in lm.moe)
    batch = random_batch(vocab=ref.config.vocab_size, batch=2, seq=16, seed=1, pad_last=3)
    with torch.no_grad():
        outs = []
        for m in (ref, lm):
            with moekit.record(m, fields=("ids", "weights", "probs")) as rec:
                logits = m.model(**batch).logits
            outs.append((logits, rec.trace))
    (l0, t0), (l1, t1) = outs
    assert torch.equal(l0, l1)
    assert (t0.ids == t1.ids).all() and (t0.weights == t1.weights).all() and (t0.probs == t1.probs).all()
    with moekit.route(ref, disable=[(ref.moe.indices[0], 1)]), moekit.route(lm, disable=[(lm.moe.indices[0], 1)]):
        assert generate(ref, PROMPT, max_new_tokens=10).token_ids == generate(lm, PROMPT, max_new_tokens=10).token_ids
    stats = lm.engine.stats()
    assert stats["misses"] > 0 and stats["hits"] > 0
    # a budget that fits the whole model keeps everything resident (no engine), same logits
    whole = moekit.load(src, max_memory="100GB")
    assert whole.engine is None and not any(p.is_meta for p in whole.model.parameters())
    with torch.no_grad():
        assert torch.equal(whole.model(**batch).logits, l0)


def test_running_engine_computes_with_moekits_dispatch(tmp_path):
    """``engine.set_experts_implementation("moekit")`` on a model offloaded by ``max_memory``: the decode kernel runs
    on the cache's slots and greedy tokens equal the in-memory model on moekit's dispatch (hits and misses alike);
    the model returns to "moekit" when the engine stops; a name that is no experts implementation is refused."""
    from moekit.nn.dispatch import use_moekit_experts

    src = _save("olmoe", tmp_path / "src", torch.bfloat16)
    ref = moekit.load(src)
    assert use_moekit_experts(ref.model)
    k = max(v.top_k for v in ref.moe)
    lm = moekit.load(src, max_memory=_budget_for(src, k + 1))
    with pytest.raises(MoekitError, match="unknown experts implementation"):
        lm.engine.set_experts_implementation("fastest")
    lm.engine.set_experts_implementation("moekit")
    want = generate(ref, PROMPT, max_new_tokens=12).token_ids
    assert generate(lm, PROMPT, max_new_tokens=12).token_ids == want
    stats = lm.engine.stats(belady=False)
    assert stats["decode_misses"] > 0 and stats["decode_hits"] > 0
    lm.engine.stop()
    assert lm.model.config._experts_implementation == "moekit"


def test_max_memory_too_small_says_how_much(tmp_path):
    src = save_tiny_checkpoint("olmoe", tmp_path / "src")
    with pytest.raises(MoekitError, match="too small .* give at least"):
        moekit.load(src, max_memory=RESERVE)


def test_cli_commands_under_max_memory(tmp_path, capsys):
    """trace / eval / generate / steer find / prune with an offloading --max-memory give the in-memory results."""
    src = _save("olmoe", tmp_path / "src", torch.bfloat16)
    budget = str(_budget_for(src, 3))
    data = "moekit:corpus:validation"

    def run(*args):
        rc, out, err = _cli(capsys, *args)
        assert rc == 0, err
        return out

    a = json.loads(run("eval", str(src), "--data", data, "--max-tokens", "256", "--json"))
    b = json.loads(run("eval", str(src), "--data", data, "--max-tokens", "256", "--json", "--max-memory", budget))
    assert a == b
    # generate runs moekit's decode kernels resident and offloaded (on the cache's slots): the same tokens
    g1 = json.loads(run("generate", str(src), "--prompt", PROMPT, "--max-tokens", "8", "--json"))
    g2 = json.loads(run("generate", str(src), "--prompt", PROMPT, "--max-tokens", "8", "--json", "--stats",
                        "--max-memory", budget))
    assert g1["token_ids"] == g2["token_ids"] and g2["offload"]["requests"] > 0 and "offload" not in g1
    run("prune", str(src), "--method", "frequency", "--ratio", "0.5", "--calib", data, "--max-tokens", "256",
        "--out", str(tmp_path / "p1"))
    run("prune", str(src), "--method", "frequency", "--ratio", "0.5", "--calib", data, "--max-tokens", "256",
        "--out", str(tmp_path / "p2"), "--max-memory", budget)
    m1, m2 = (json.loads((tmp_path / p / "moekit_compression.json").read_text()) for p in ("p1", "p2"))
    assert m1["kept_experts"] == m2["kept_experts"] and m2["low_memory"] is True
    assert _config_dtype(tmp_path / "p2") == "bfloat16"
    for cmd, extra in (("merge", ("--ratio", "0.5", "--calib", data, "--max-tokens", "256")),
                       ("quantize", ("--avg-bits", "6", "--group-size", "32", "--calib", data, "--max-tokens", "256"))):
        s1 = json.loads(run(cmd, str(src), *extra, "--out", str(tmp_path / f"{cmd}1"), "--json"))
        s2 = json.loads(run(cmd, str(src), *extra, "--out", str(tmp_path / f"{cmd}2"), "--json", "--max-memory", budget))
        assert {k: v for k, v in s1.items() if k != "out"} == {k: v for k, v in s2.items() if k != "out"}, cmd
        assert _tensors(tmp_path / f"{cmd}1") == _tensors(tmp_path / f"{cmd}2"), cmd


def _tensors(path) -> dict[str, bytes]:
    """Every tensor of a checkpoint directory's safetensors files, as (dtype, shape, bytes) by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({k: (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
                    for k, t in load_file(f).items()})
    return out


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "gpt_oss", "deepseek_v2"])
def test_streamed_merge_and_quantize_equal_in_memory(arch, tmp_path):
    """merge and quantize one decoder layer at a time from the files write exactly what the in-memory
    path writes: same tensors (names, dtypes, bytes), same config, same records (but ``low_memory``)."""
    from moekit.compress.lowmem import merge_lowmem, quantize_lowmem
    from moekit.compress.merge import merge
    from moekit.compress.quantize import quantize
    from moekit.data import Document

    src = _save(arch, tmp_path / "src", torch.bfloat16, **({"tie_word_embeddings": True} if arch == "olmoe" else {}))
    docs = [Document("The cat sat on the mat. The dog ran off to the river. " * 30, "prose", "a", "x")]
    lm = moekit.load(src)
    r1, _ = merge(lm, 0.5, docs, out=tmp_path / "m1", seq_len=32)
    r2 = merge_lowmem(src, 0.5, docs, tmp_path / "m2", seq_len=32)
    assert r1.groups == r2.groups and any(len(g) > 1 for gs in r1.groups.values() for g in gs)
    q1 = quantize(lm, avg_bits=6, group_size=32, calib=docs, out=tmp_path / "q1", seq_len=32)
    q2 = quantize_lowmem(src, avg_bits=6, group_size=32, docs=docs, out=tmp_path / "q2", seq_len=32)
    assert q1.bits == q2.bits and {4, 8} == set(q1.bits.values())
    for a, b, record in (("m1", "m2", "moekit_compression.json"), ("q1", "q2", "moekit_quantization.json")):
        assert _tensors(tmp_path / a) == _tensors(tmp_path / b), a
        ra, rb = (json.loads((tmp_path / d / record).read_text()) for d in (a, b))
        rb.pop("low_memory", None)
        assert ra == rb
        ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in (a, b))
        assert ca == cb and ca["dtype"] == "bfloat16"


def test_streamed_calibration_batches_follow_the_budget_not_the_machine(tmp_path):
    """The layer-by-layer calibration takes as many windows per forward as the budget's activation share holds
    (``windows_per_forward`` on the weightless structure): the batches, and so the statistics bit for bit, are
    those of the in-memory calibration with that batch size; without a budget, the default 8."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from moekit.compress.lowmem import observe_lowmem
    from moekit.compress.observer import STAT_FIELDS, observe
    from moekit.data import Document
    from moekit.models.loading import activation_bytes_per_token, windows_per_forward

    src = _save("olmoe", tmp_path / "src", torch.bfloat16)
    docs = [Document("The cat sat on the mat. The dog ran off to the river. " * 30, "prose", "a", "x")]
    meta = load_structure(src)
    meta.activation_bytes = 3 * 32 * activation_bytes_per_token(meta, 32)  # three windows of 32 tokens
    assert windows_per_forward(meta, 32, 8) == 3
    layer_cls = type(meta.model.model.layers[0])
    sizes: list[int] = []
    hook = register_module_forward_pre_hook(
        lambda m, args: sizes.append(args[0].shape[0]) if type(m) is layer_cls and args else None)
    try:
        low, _ = observe_lowmem(src, docs, seq_len=32, activation_bytes=meta.activation_bytes)
        low_sizes, sizes[:] = list(sizes), []
        default, _ = observe_lowmem(src, docs, seq_len=32)
        default_sizes = list(sizes)
    finally:
        hook.remove()
    assert max(low_sizes) == 3 and max(default_sizes) == 8 and sum(default_sizes) == sum(low_sizes)
    lm = moekit.load(src)
    for got, batch in ((low, 3), (default, 8)):
        ref = observe(lm, docs, seq_len=32, batch_size=batch)
        assert got.tokens == ref.tokens and got.data_hash == ref.data_hash
        for i, st in ref.layers.items():
            for name in (*STAT_FIELDS, "gram"):
                assert np.array_equal(getattr(got.layers[i], name), getattr(st, name), equal_nan=True), (batch, i, name)


_CHILD = r"""
import json, sys
import torch
import moekit
from moekit.generation import generate
src, budget, out = sys.argv[1], sys.argv[2], sys.argv[3]
lm = moekit.load(src, max_memory=budget)
if sys.argv[4:] == ["moekit"]:  # what generate/serve run: moekit's decode kernel on the slots, zero-copy misses
    lm.engine.set_experts_implementation("moekit")
batch = {"input_ids": torch.arange(64).reshape(2, 32) * 7 % 6000, "attention_mask": torch.ones(2, 32, dtype=torch.long)}
with torch.no_grad(), moekit.record(lm, fields=("ids", "weights")) as rec:
    logits = lm.model(**batch).logits
tokens = generate(lm, "The quick brown fox jumps over the lazy dog because", max_new_tokens=12).token_ids
torch.save({"logits": logits, "ids": torch.as_tensor(rec.trace.ids[:]), "weights": torch.as_tensor(rec.trace.weights[:]),
            "tokens": tokens, "slots": lm.engine.slots if lm.engine else None,
            "zero_copy": lm.engine.stats(belady=False)["zero_copy_misses"] if lm.engine else None}, out)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"vm_hwm_kb": hwm}))  # this process's peak RSS (ru_maxrss would include the parent's at fork)
"""


@pytest.mark.slow
def test_few_hundred_mb_model_under_a_smaller_budget(tmp_path):
    """A 640 MB bf16 checkpoint under max_memory=1GB (the model would not fit next to the interpreter):
    peak RSS of the process (sampled with psutil, and the kernel's high-water mark) stays under the budget
    + 10%, and the traces, logits and greedy tokens equal the in-memory model's."""
    src = save_tiny_checkpoint("olmoe", tmp_path / "src", dtype=torch.bfloat16, hidden_size=512,
                               intermediate_size=512, num_hidden_layers=12, num_experts=32, num_experts_per_tok=4,
                               num_attention_heads=8, num_key_value_heads=8)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    budget = 1_000_000_000
    assert size > 600e6 and size + 390e6 > budget  # whole, it cannot fit next to the interpreter
    ref = moekit.load(src)
    batch = {"input_ids": torch.arange(64).reshape(2, 32) * 7 % 6000, "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    with torch.no_grad(), moekit.record(ref, fields=("ids", "weights")) as rec:
        logits = ref.model(**batch).logits
    tokens = generate(ref, PROMPT, max_new_tokens=12).token_ids
    del ref
    out = tmp_path / "child.pt"
    stdout, _, hw = _run_sampled([_CHILD, str(src), str(budget), str(out)], hwm_on="stdout")
    assert hw <= budget * 1.10, (hw / 1e6, budget / 1e6)
    got = torch.load(out, weights_only=True)
    assert got["slots"] is not None and got["slots"] < 32  # really offloaded
    assert torch.equal(got["logits"], logits)
    assert torch.equal(got["ids"], torch.as_tensor(rec.trace.ids[:]))
    assert torch.equal(got["weights"], torch.as_tensor(rec.trace.weights[:]))
    assert got["tokens"] == tokens


@pytest.mark.slow
def test_few_hundred_mb_model_zero_copy_decode_under_a_smaller_budget(tmp_path):
    """The same 640 MB model under max_memory=1GB on moekit's decode kernel (what generate and serve run): decode
    misses in the page cache are computed from a mapping of the checkpoint, whose pages count in RSS while mapped;
    peak RSS still stays under the budget + 10% and the greedy tokens equal the in-memory model's."""
    from moekit.formats.mapped import available
    from moekit.nn.dispatch import use_moekit_experts

    if not available():
        pytest.skip("zero-copy views need Linux mincore/madvise")
    src = save_tiny_checkpoint("olmoe", tmp_path / "src", dtype=torch.bfloat16, hidden_size=512,
                               intermediate_size=512, num_hidden_layers=12, num_experts=32, num_experts_per_tok=4,
                               num_attention_heads=8, num_key_value_heads=8)
    budget = 1_000_000_000
    ref = moekit.load(src)
    use_moekit_experts(ref.model)
    tokens = generate(ref, PROMPT, max_new_tokens=12).token_ids
    del ref
    out = tmp_path / "child.pt"
    _, _, hw = _run_sampled([_CHILD, str(src), str(budget), str(out), "moekit"], hwm_on="stdout")
    assert hw <= budget * 1.10, (hw / 1e6, budget / 1e6)
    got = torch.load(out, weights_only=True)
    assert got["slots"] is not None and got["slots"] < 32
    assert got["zero_copy"] > 0
    assert got["tokens"] == tokens


_CLI_CHILD = r"""
import json, sys
from moekit.cli import main
rc = main(sys.argv[1:])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"vm_hwm_kb": hwm}), file=sys.stderr)
sys.exit(rc)
"""


def _sampled(argv: list[str]) -> tuple[str, int]:
    """Run ``moekit argv`` in a fresh process: (stdout, peak RSS in bytes: the kernel's high-water mark, checked
    against psutil sampling every 10 ms)."""
    stdout, _, hw = _run_sampled([_CLI_CHILD, *map(str, argv)], hwm_on="stderr")
    return stdout, hw


def _run_sampled(child: list[str], hwm_on: str) -> tuple[str, str, int]:
    """Run ``python -c child...``, sampling its RSS every 10 ms; returns (stdout, stderr, peak RSS in bytes): the
    kernel's high-water mark the child prints last (as ``{"vm_hwm_kb": ...}`` on ``hwm_on``), which must not be
    below what sampling saw."""
    import subprocess
    import sys
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", *child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-2000:]
    hw = json.loads((stdout if hwm_on == "stdout" else stderr).strip().splitlines()[-1])["vm_hwm_kb"] * 1024
    assert peak <= hw + (8 << 20)
    return stdout, stderr, hw


BUDGET = 1_000_000_000


@pytest.fixture(scope="module")
def model_over_budget(tmp_path_factory):
    """A 1.2 GB bf16 checkpoint: larger than ``BUDGET`` (built once for the slow budget tests)."""
    src = save_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("over") / "src", dtype=torch.bfloat16, hidden_size=512,
                               intermediate_size=512, num_hidden_layers=24, num_experts=32, num_experts_per_tok=4,
                               num_attention_heads=8, num_key_value_heads=8)
    assert sum(f.stat().st_size for f in src.glob("*.safetensors")) > 1.2 * BUDGET
    return src


_MERGE_REF = r"""
import json, sys
import moekit
from moekit.compress.merge import merge
from moekit.data import read_documents
from moekit.models.loading import windows_per_forward
src, data, share, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lm = moekit.load(src)
lm.activation_bytes = share  # the in-memory merge calibrated with the batches of this activation share
assert windows_per_forward(lm, 256, 8) == 4
res, _ = merge(lm, 0.5, read_documents([data]), out=out, max_tokens=512)
print(json.dumps(res.summary()))
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"vm_hwm_kb": hwm}), file=sys.stderr)
"""


@pytest.mark.slow
def test_streamed_merge_and_quantize_stay_under_a_budget_smaller_than_the_model(model_over_budget, tmp_path):
    """merge and quantize of a 1.2 GB checkpoint under --max-memory 1GB (less than the model itself) stay
    under the budget + 10% and write the same checkpoint as in memory: quantize as the in-memory command; merge as
    the in-memory merge calibrated with the budget's batches (its activation share holds 4 windows of 256 tokens
    per forward, not the default 8, and bf16 statistics of other batches can flip near-tied groups)."""
    src, budget = model_over_budget, BUDGET
    data = "moekit:corpus:validation"
    for cmd, extra in (("merge", ("--ratio", "0.5", "--calib", data, "--max-tokens", "512")),
                       ("quantize", ("--bits", "4", "--group-size", "64"))):
        out, peak = _sampled([cmd, src, *extra, "--out", tmp_path / f"{cmd}-low", "--json", "--max-memory", budget])
        assert peak <= budget * 1.10, (cmd, peak / 1e6)
        if cmd == "merge":  # in a child like the command's, with torch's default threads (these tests run one)
            ref = json.loads(_run_sampled([_MERGE_REF, str(src), data, str(int(ACTIVATION_SHARE * budget)),
                                           str(tmp_path / "merge-mem")], hwm_on="stderr")[0])
        else:
            ref = json.loads(_sampled([cmd, src, *extra, "--out", tmp_path / f"{cmd}-mem", "--json"])[0])
        same = {k: v for k, v in json.loads(out).items() if k not in ("out", "bytes_on_disk")}  # headers differ in layout
        assert same == {k: v for k, v in ref.items() if k not in ("out", "bytes_on_disk")}
        assert _tensors(tmp_path / f"{cmd}-low") == _tensors(tmp_path / f"{cmd}-mem"), cmd
        shutil.rmtree(tmp_path / f"{cmd}-mem")
        shutil.rmtree(tmp_path / f"{cmd}-low")


@pytest.mark.slow
def test_report_stays_under_a_budget_smaller_than_the_model(model_over_budget, tmp_path):
    """report (trace, statistics, super-expert profiling and zeroing check, HTML) of the 1.2 GB checkpoint under
    --max-memory 1GB stays under the budget + 10%, with the experts really offloaded; its routing statistics
    equal the in-memory report's (the offloaded model routes every token the same)."""
    src = model_over_budget
    args = ["report", src, "--data", "moekit:corpus:validation", "--max-tokens", "256", "--seq-len", "128",
            "--profile-tokens", "256", "--print-json"]
    out, peak = _sampled([*args, "--out", tmp_path / "low.html", "--json", tmp_path / "low.json",
                          "--max-memory", BUDGET])
    assert peak <= BUDGET * 1.10, peak / 1e6
    assert peak < sum(f.stat().st_size for f in src.glob("*.safetensors"))  # the model itself was never resident
    low = json.loads((tmp_path / "low.json").read_text())
    assert json.loads(out)["tokens"] == low["summary"]["model"]["tokens"] == 256
    assert low["super_experts"] is not None and (tmp_path / "low.html").stat().st_size > 0
    _sampled([*args, "--out", tmp_path / "mem.html", "--json", tmp_path / "mem.json", "--no-super-experts"])
    mem = json.loads((tmp_path / "mem.json").read_text())
    assert low["summary"] == mem["summary"] and low["cache_90"] == mem["cache_90"]


def test_budget_sizes_profiling_and_perplexity_batches(tmp_path):
    """Under max_memory, report's profiling and perplexity run as many windows per forward as the activation
    share holds by the per-token estimate (fewer than the default 8), with the same results."""
    from moekit.data import Document
    from moekit.eval import perplexity
    from moekit.models.loading import activation_bytes_per_token, windows_per_forward
    from moekit.report.profiling import profile_expert_max

    src = _save("olmoe", tmp_path / "src", torch.bfloat16)
    lm = moekit.load(src, max_memory="100GB")
    assert lm.engine is None and lm.activation_bytes == int(ACTIVATION_SHARE * 100e9)
    assert windows_per_forward(lm, 64, 8) == 8 and moekit.load(src).activation_bytes is None
    docs = [Document("The cat sat on the mat and the dog ran to the river bank. " * 40, "prose", "a", "x")]
    forwards: list[int] = []
    lm.model.register_forward_pre_hook(lambda m, a, k: forwards.append(k["input_ids"].shape[0]), with_kwargs=True)
    ref_max = profile_expert_max(lm, docs, max_tokens=64 * 5, seq_len=64)
    ref_ppl = perplexity(lm, docs, max_tokens=64 * 5, seq_len=64, progress=False)
    (n_prof, n_ppl) = forwards  # one forward each: every window fits the default batch of 8
    assert n_prof == 5 and 5 <= n_ppl <= 8
    per = activation_bytes_per_token(lm, 64)
    vocab = lm.config.vocab_size * 2
    lm.activation_bytes = 2 * 64 * (per + vocab)  # two windows with logits, more without
    assert windows_per_forward(lm, 64, 8, with_logits=True) == 2 and windows_per_forward(lm, 64, 8) > 2
    forwards.clear()
    got_max = profile_expert_max(lm, docs, max_tokens=64 * 5, seq_len=64)
    got_ppl = perplexity(lm, docs, max_tokens=64 * 5, seq_len=64, progress=False)
    n = windows_per_forward(lm, 64, 8)

    def chunks(total: int, size: int) -> list[int]:
        return [min(size, total - i) for i in range(0, total, size)]

    assert forwards == chunks(n_prof, n) + chunks(n_ppl, 2)
    assert np.array_equal(np.isnan(got_max), np.isnan(ref_max))
    np.testing.assert_allclose(got_max, ref_max, rtol=2e-2, equal_nan=True)  # bf16 rows in other batches
    assert got_ppl["tokens"] == ref_ppl["tokens"] and got_ppl["perplexity"] == pytest.approx(ref_ppl["perplexity"], rel=1e-2)
