"""Offloaded generation: exact greedy tokens for every policy, the byte budget, LRU order, statistics."""

from __future__ import annotations

import gc

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.generation import generate
from moekit.models.loading import bundled_names
from moekit.serve import POLICIES, TensorStore, load_offloaded, offload
from moekit.testing import save_tiny_checkpoint, tiny_lm

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3")
PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moekit-cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {a: save_tiny_checkpoint(a, root / a) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_greedy_every_policy(arch, checkpoints):
    path = checkpoints[arch]
    ref = generate(moekit.load(path), PROMPT, max_new_tokens=16)
    lm = load_offloaded(path)
    # the expert banks never occupy memory: they are meta tensors, read from the store on demand
    assert all(v.experts.down_proj.is_meta for v in lm.moe)
    k = max(v.top_k for v in lm.moe)
    for policy in POLICIES.names():
        for slots in (k, 2 * k):
            with offload(lm, policy=policy, slots=slots) as engine:
                out = generate(lm, PROMPT, max_new_tokens=16)
                stats = engine.stats()
            assert out.token_ids == ref.token_ids, (arch, policy, slots)
            assert stats["hits"] + stats["misses"] == stats["requests"] > 0
            assert stats["decode_hits"] + stats["decode_misses"] == stats["decode_requests"] > 0
            assert stats["decode_tokens"] == len(out.token_ids) - 1
            if policy == "none":
                assert stats["hits"] == 0
    # after the block the model is back on its own implementation (and cannot run: no experts)
    assert lm.model.config._experts_implementation != "moekit_offload"


def test_exact_with_sampling_and_routing_control(checkpoints):
    path = checkpoints["qwen3_moe"]
    full = moekit.load(path)
    ctrl = moekit.RoutingControl.make(disable=[(0, 1)], scale={(2, 3): 2.0})
    ref = generate(full, PROMPT, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, control=ctrl)
    lm = load_offloaded(path)
    with offload(lm, policy="lru+prefetch", slots=2):
        out = generate(lm, PROMPT, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, control=ctrl)
    assert out.token_ids == ref.token_ids


def test_in_memory_store_and_fully_loaded_model():
    lm = tiny_lm("olmoe")
    ref = generate(lm, [5, 6, 7, 8], max_new_tokens=12)
    with offload(lm, policy="lfu", slots=3, store=TensorStore.from_model(lm)) as engine:
        out = generate(lm, [5, 6, 7, 8], max_new_tokens=12)
    assert out.token_ids == ref.token_ids
    assert engine.stats()["misses"] > 0
    assert generate(lm, [5, 6, 7, 8], max_new_tokens=12).token_ids == ref.token_ids  # restored


@pytest.mark.skipif(not bundled_names(), reason="bundled models not built yet")
@pytest.mark.parametrize("name", bundled_names())
def test_exact_on_bundled_models(name):
    ref = generate(moekit.load(name), PROMPT, max_new_tokens=24)
    lm = load_offloaded(name)
    for policy in POLICIES.names():
        with offload(lm, policy=policy) as engine:
            out = generate(lm, PROMPT, max_new_tokens=24)
        assert out.token_ids == ref.token_ids, policy
        s = engine.stats()
        assert s["requests"] > 0
        if policy != "none":  # Belady's MIN on the recorded decode requests bounds every policy's reads
            b = s["belady"]   # (demand misses; with prefetch, misses + prefetch reads: demand paging is optimal)
            assert b["decode_misses"] == s["decode_misses"], policy
            assert 0 < b["belady_misses_warm"] <= (b["decode_fetches"] if "prefetch" in s else b["decode_misses"])
            assert b["belady_misses_cold"] <= b["simulated_lru_misses_cold"], policy


def test_cache_respects_byte_budget(checkpoints):
    lm = load_offloaded(checkpoints["mixtral"])
    per_layer = max(lm._moekit_expert_store.expert_bytes.values())
    one_slot_mb = per_layer * len(lm.moe) / 2**20
    budget = 3.5 * one_slot_mb
    with offload(lm, cache_mb=budget, policy="lru") as engine:
        generate(lm, PROMPT, max_new_tokens=8)
        stats = engine.stats()
        assert all(len(engine.resident(v.index)) <= 3 for v in lm.moe)
    assert stats["slots_per_layer"] == 3
    assert stats["cache_bytes"] <= stats["budget_bytes"] == int(budget * 2**20)
    with pytest.raises(MoekitError, match="holds no expert"), offload(lm, cache_mb=one_slot_mb / 2):
        pass


def _engine_on(lm, policy, slots):
    return offload(lm, policy=policy, slots=slots, store=TensorStore.from_model(lm))


def test_lru_eviction_order_on_hand_made_sequence():
    lm = tiny_lm("qwen3_moe")
    layer = lm.moe.layers[0].index
    with _engine_on(lm, "lru", 3) as engine:
        assert engine.access(layer, [0, 1]) == ["miss", "miss"]
        assert engine.access(layer, [2]) == ["miss"]
        assert engine.access(layer, [0]) == ["hit"]       # recency: 1, 2, 0
        assert engine.access(layer, [3]) == ["miss"]      # evicts 1
        assert engine.resident(layer) == {0, 2, 3}
        assert engine.access(layer, [2, 4]) == ["hit", "miss"]  # evicts 0 (2 is requested: kept)
        assert engine.resident(layer) == {2, 3, 4}
        assert engine.access(layer, [1]) == ["miss"]      # evicts 3
        assert engine.resident(layer) == {1, 2, 4}
        s = engine.stats(belady=False)
    assert (s["requests"], s["hits"], s["misses"]) == (8, 2, 6)


def test_lfu_and_static_eviction():
    lm = tiny_lm("qwen3_moe")
    layer = lm.moe.layers[0].index
    with _engine_on(lm, "lfu", 2) as engine:
        for seq in ([0], [0], [1], [2]):  # 1 has fewer requests than 0: evicted
            engine.access(layer, seq)
        assert engine.resident(layer) == {0, 2}
    with offload(lm, policy="static", slots=2, profile={layer: [0, 5, 0, 9, 0, 0, 0, 0]},
                 store=TensorStore.from_model(lm)) as engine:
        assert engine.access(layer, [1, 3]) == ["miss", "miss"]
        assert engine.access(layer, [0, 2]) == ["miss", "miss"]
        assert engine.resident(layer) == {1, 3}           # only the profile's top-2 are ever cached
        assert engine.access(layer, [1, 3]) == ["hit", "hit"]


def test_belady_replay_is_a_lower_bound():
    """The engine records its decode requests (slot order) and replays them in moekit.analysis.cache. By hand, with
    3 slots: LRU misses 2+2+1+2+2+2+2 = 13 (t1 evicts 0; t2 evicts 1; t3 evicts 3, 0; t4 evicts 2, 1; t5 evicts
    4, 0; t6 evicts 3, 2); Belady 2+2+0+2+1+1+1 = 9 (t1 evicts 1, next used at t3; t3 evicts 2 and 3; t4 evicts 4;
    t5 evicts 3, never used again; t6 evicts 2)."""
    reqs = [[0, 1], [2, 3], [0, 2], [1, 4], [0, 3], [2, 1], [4, 0]]
    lm = tiny_lm("qwen3_moe")
    layer = lm.moe.layers[0].index
    with _engine_on(lm, "lru", 3) as engine:
        for r in reqs:
            engine.access(layer, r)
        s = engine.stats()
        assert engine.logs[layer].array().tolist() == reqs
    assert s["misses"] == s["decode_misses"] == 13
    assert s["belady"]["belady_misses_warm"] == s["belady"]["belady_misses_cold"] == 9
    assert s["belady"]["simulated_lru_misses_cold"] == 13 and s["belady"]["miss_ratio_to_belady"] == 13 / 9


def test_prefetch_statistics_are_consistent(checkpoints):
    lm = load_offloaded(checkpoints["qwen2_moe"])
    with offload(lm, policy="lru+prefetch", slots=4) as engine:
        generate(lm, PROMPT, max_new_tokens=16)
        s = engine.stats()
    pf = s["prefetch"]
    assert pf["used"] + pf["wasted"] <= pf["issued"]
    assert 0 <= pf["predictor_recall"] <= 1 and 0 <= pf["precision"] <= 1
    assert s["belady"]["belady_misses_warm"] <= s["belady"]["decode_fetches"]
    # every miss and prefetch is read once, except the misses computed in place from the page cache
    assert s["bytes_read"] == (s["misses"] - s["zero_copy_misses"] + pf["issued"]) * s["expert_bytes"]
    assert s["tokens_per_s"] > 0 and s["stall_s"] >= 0


def test_unknown_policy_is_a_clear_error():
    lm = tiny_lm("qwen3_moe")
    with pytest.raises(MoekitError, match="unknown offload policy"), _engine_on(lm, "fifo", 2):
        pass


def test_torch_default_dtype_untouched():
    assert torch.get_default_dtype() == torch.float32


def test_demo_step():
    from moekit.serve import demo_step

    out = demo_step(tiny_lm("mixtral"), max_new_tokens=8)
    assert out["exact"] and out["tokens"] > 0 and 0 <= out["hit_rate"] <= 1
    assert out["stats"]["hits"] + out["stats"]["misses"] == out["stats"]["requests"]


# Bitwise on these; on GPT-OSS (transposed banks), with moekit.nn's dispatch on DeepSeek-V3, and with moekit's
# auto path (one padded bmm for CPU inference) a prefill may differ in the last bit: the CPU matmul kernel is
# chosen per call and per shape, and row blocks start elsewhere. "moekit-loop" forces per-expert matmuls.
BITWISE = {("qwen3_moe", "grouped_mm"), ("qwen3_moe", "moekit-loop"), ("deepseek_v3", "grouped_mm")}


@pytest.mark.parametrize("impl", ["grouped_mm", "moekit", "moekit-loop"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_logits_equal_to_the_models_own_implementation(arch, impl):
    """The offloaded forward computes what the model's own experts implementation computes."""
    import moekit.nn  # (registers the "moekit" implementation)

    lm = tiny_lm(arch)
    lm.model.set_experts_implementation(impl.removesuffix("-loop"))
    ids = torch.tensor([[3, 9, 27, 81, 17, 51, 25, 75, 99, 41]])
    moekit.nn.set_backend("loop" if impl.endswith("-loop") else "auto")
    try:
        with torch.no_grad():
            ref = lm.model(input_ids=ids).logits
            for slots in (1, 3):  # 1: most experts of the prefill bypass the cache
                with offload(lm, policy="lru", slots=slots, store=TensorStore.from_model(lm)):
                    out = lm.model(input_ids=ids).logits
                if (arch, impl) in BITWISE:
                    assert torch.equal(out, ref), (arch, impl, slots)
                else:
                    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), (arch, impl, slots)
    finally:
        moekit.nn.set_backend("auto")
    assert lm.model.config._experts_implementation == impl.removesuffix("-loop")


@pytest.mark.parametrize("arch,bits", [("qwen3_moe", 4), ("gpt_oss", 8), ("deepseek_v3", 4)])
def test_quantized_checkpoint_offloads_exactly(arch, bits, checkpoints, tmp_path):
    """A moekit quantized checkpoint offloads: packed codes are read per expert and dequantized into the cache,
    giving the same tokens as the checkpoint loaded whole (its experts dequantized up front)."""
    from moekit.compress.quantize import QUANT_WEIGHTS, quantize
    from moekit.formats import read_header as read_safetensors_header
    from moekit.serve.store import QuantizedFileStore

    out = tmp_path / "q"
    quantize(moekit.load(checkpoints[arch]), bits=bits, group_size=32, out=out)
    whole = moekit.load(out)
    ref = generate(whole, PROMPT, max_new_tokens=12)
    lm = load_offloaded(out)
    store = lm._moekit_expert_store
    assert isinstance(store, QuantizedFileStore)
    assert all(v.experts.down_proj.is_meta for v in lm.moe)
    # one expert read = its packed codes, scales and zeros (+ unquantized biases), dequantized bit for bit
    header, _ = read_safetensors_header(out / QUANT_WEIGHTS)
    view = next(iter(whole.moe))
    bank = {n: getattr(view.experts, n) for n in store.shapes(view.index)}
    slot = {n: torch.empty(s, dtype=d) for n, (s, d) in store.shapes(view.index).items()}
    nbytes = store.read(view.index, 1, slot)
    for name, tensor in slot.items():
        assert torch.equal(tensor, bank[name][1]), name
    def size(key: str) -> int:
        start, end = header[key]["data_offsets"]
        return end - start

    prefix = f"layers.{view.index}.mlp.experts."
    packed = sum(size(k) for k in header if prefix in k and k.endswith((".1.qweight", ".1.scales", ".1.zeros")))
    biases = sum(size(k) // header[k]["shape"][0] for k in header if prefix in k and k.endswith("_bias"))
    assert packed > 0 and nbytes == packed + biases
    assert nbytes < store.expert_bytes[view.index]  # what the cache holds: the dequantized expert
    for policy in ("lru", "lru+prefetch", "none"):
        with offload(lm, policy=policy, slots=2) as engine:
            got = generate(lm, PROMPT, max_new_tokens=12)
        assert got.token_ids == ref.token_ids, (arch, policy)
        assert engine.stats()["misses"] > 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_decode_on_the_slot_bank_equals_the_models_own_dispatch(arch):
    """With moekit.nn's dispatch as the model's implementation, a decode step whose experts are all resident runs
    that dispatch on the cache's slot bank (slots as expert ids): the experts' output equals the dispatch's on the
    model's own bank, bit for bit; with one expert missing, the hits and then the miss, read into its slot, run the
    same kernel: bit for bit again."""
    from moekit.nn.dispatch import moekit_experts_forward

    lm = tiny_lm(arch)
    lm.model.set_experts_implementation("moekit")
    view = lm.moe.layers[0]
    mod, num_experts, k = view.experts, view.num_experts, view.top_k
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, lm.model.config.hidden_size, generator=g)
    ids = torch.randperm(num_experts, generator=g)[:k].view(1, k)
    weights = torch.rand(1, k, generator=g)
    with torch.no_grad():
        ref = moekit_experts_forward(mod, hidden, ids, weights)
        with offload(lm, policy="lru", slots=num_experts - 1, store=TensorStore.from_model(lm)) as engine:
            engine.access(view.index, ids[0].tolist(), decode=False)     # all k resident
            fast = mod(hidden, ids, weights)
            assert engine.stats(belady=False)["decode_hits"] == k                 # the slot-bank path
            engine.access(view.index, [e for e in range(num_experts) if e not in ids[0].tolist()], decode=False)
            assert engine.resident(view.index) != set(range(num_experts))
            slow = mod(hidden, ids, weights)                               # now one of them was evicted
            s = engine.stats(belady=False)
    assert torch.equal(fast, ref), arch
    assert torch.equal(slow, ref), arch
    assert s["decode_requests"] == 2 * k and s["decode_misses"] >= 1


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_decode_with_misses_runs_the_kernel_on_the_slots(arch):
    """A decode step with hits and misses under moekit's dispatch: the misses are read once each, straight into
    their slots (bytes read = their size), no expert-sized buffer is allocated, and the only expert matmuls are
    moekit's decode kernels (the up projections per part: the hits on the slot bank, then the misses; the down
    projections and the weighted sum in one fused pass over both banks, or per part where the experts have a down
    bias), no per-expert torch matmul; the output equals moekit's dispatch on the whole bank bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    from moekit.nn.dispatch import moekit_experts_forward

    lm = tiny_lm(arch)
    lm.model.set_experts_implementation("moekit")
    view = lm.moe.layers[0]
    mod, num_experts, k = view.experts, view.num_experts, view.top_k
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, lm.model.config.hidden_size, generator=g)
    ids = torch.randperm(num_experts, generator=g)[:k].view(1, k)
    weights = torch.rand(1, k, generator=g)
    store = TensorStore.from_model(lm)
    per_expert = store.expert_bytes[view.index]
    with torch.no_grad():
        ref = moekit_experts_forward(mod, hidden, ids, weights)
        with offload(lm, policy="lru", slots=num_experts, store=store) as engine:
            resident = ids[0, : k - 1].tolist()                        # k - 1 hits, 1 miss
            engine.access(view.index, resident, decode=False)
            before = engine.stats(belady=False)["bytes_read"]
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = mod(hidden, ids, weights)
            s = engine.stats(belady=False)
    assert torch.equal(out, ref), arch
    assert s["decode_hits"] == k - 1 and s["decode_misses"] == 1
    assert s["bytes_read"] - before == per_expert                      # one read of the miss, into its slot
    events = prof.events()
    names = [e.name for e in events]
    fused = not mod.is_transposed and not getattr(mod, "has_bias", False)  # down + sum: one kernel pass over both
    assert names.count("moekit::expert_gemv") == (2 if fused else 4), names  # hits' gate_up, misses' (and downs)
    if not mod.is_transposed:  # (GPT-OSS's [E, in, out] banks: the op runs torch.mv per slot, as in memory)
        assert not {"aten::mv", "aten::mm", "aten::matmul", "aten::linear"} & set(names), arch  # (bmm: sum over k)
    biggest = max((e.cpu_memory_usage for e in events), default=0)
    assert biggest < per_expert // 2, (biggest, per_expert)            # activations only, never a weight copy


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_exact_greedy_under_moekit_dispatch_every_policy(arch, checkpoints):
    """With moekit's dispatch as the model's implementation (what generate/serve use), offloaded greedy tokens equal
    the in-memory model's for every policy, with a cache smaller than a token's experts (misses the cache cannot
    take are computed from scratch buffers) and with one as large as all experts."""
    path = checkpoints[arch]
    whole = moekit.load(path)
    whole.model.set_experts_implementation("moekit")
    ref = generate(whole, PROMPT, max_new_tokens=16)
    lm = load_offloaded(path)
    lm.model.set_experts_implementation("moekit")
    num_experts = max(v.num_experts for v in lm.moe)
    for policy in POLICIES.names():
        for slots in (1, num_experts):
            with offload(lm, policy=policy, slots=slots) as engine:
                out = generate(lm, PROMPT, max_new_tokens=16)
                stats = engine.stats(belady=False)
            assert out.token_ids == ref.token_ids, (arch, policy, slots)
            assert stats["decode_hits"] + stats["decode_misses"] == stats["decode_requests"] > 0
    assert lm.model.config._experts_implementation == "moekit"


def _drop_page_cache(path) -> None:
    """Evict a checkpoint's files from the OS page cache (written back first, so that the kernel can drop them)."""
    from moekit.formats import drop_file_cache

    for f in sorted(path.glob("*.safetensors")):
        drop_file_cache(f)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"])
def test_zero_copy_misses_from_the_page_cache_are_exact(arch, checkpoints):
    """Under moekit's dispatch with a cache of k slots, the decode misses whose bytes are in the page cache are
    computed straight from a mapping of the checkpoint (counted as decode_zero_copy_misses) and greedy tokens equal
    the in-memory model's and the copying engine's, whichever of them are also copied into the cache (``never``:
    none, ``always``: all, ``repeat``: those missed again soon). Mixtral stores w1 (gate), w2 (down), w3 (up) in
    that order: gate and up are not one range, so its misses are copied as before."""
    from moekit.formats.mapped import available

    if not available():
        pytest.skip("zero-copy views need Linux mincore/madvise")
    path = checkpoints[arch]
    whole = moekit.load(path)
    whole.model.set_experts_implementation("moekit")
    ref = generate(whole, PROMPT, max_new_tokens=16).token_ids
    lm = load_offloaded(path)
    lm.model.set_experts_implementation("moekit")
    k = max(v.top_k for v in lm.moe)
    runs = {}
    for zero_copy, admit in ((False, "repeat"), (True, "repeat"), (True, "never"), (True, "always")):
        with offload(lm, policy="lru", slots=k, zero_copy=zero_copy, admit_mapped=admit) as engine:
            runs[zero_copy, admit] = generate(lm, PROMPT, max_new_tokens=16).token_ids, engine.stats(belady=False)
    assert all(tokens == ref for tokens, _ in runs.values()), arch
    s0 = runs[False, "repeat"][1]
    assert s0["zero_copy_misses"] == 0 and s0["decode_misses"] > 0
    if arch == "mixtral":
        assert all(s["zero_copy_misses"] == 0 for _, s in runs.values())
        return
    size = s0["expert_bytes"]
    for admit in ("repeat", "never", "always"):
        s = runs[True, admit][1]
        # every decode miss was in the page cache (the model was just read): all computed in place; a prefill's
        # misses are read as before (zero-copy is for decode)
        assert s["decode_zero_copy_misses"] == s["decode_misses"] > 0, (admit, s)
        assert s["zero_copy_misses"] == s["decode_zero_copy_misses"]
        assert s["zero_copy_bytes"] == s["zero_copy_misses"] * size
    decode_read = {a: round(runs[True, a][1]["bytes_read_per_token"] * runs[True, a][1]["decode_tokens"])
                   for a in ("repeat", "never", "always")}
    assert decode_read["never"] == 0  # nothing copied: no slot filled during decode
    # every miss the cache takes (a free or evictable slot) copied as well; only those that repeat soon
    assert 0.8 * runs[True, "always"][1]["decode_misses"] * size <= decode_read["always"]
    assert decode_read["always"] <= runs[True, "always"][1]["decode_misses"] * size
    assert 0 <= decode_read["repeat"] < decode_read["always"]
    with pytest.raises(MoekitError, match="admit_mapped must be one of"), offload(lm, admit_mapped="sometimes"):
        pass


def test_cold_misses_are_read_and_cached_then_mapped(tmp_path):
    """An expert whose bytes are not in the page cache (a checkpoint bigger than RAM, never read) is not mapped: the
    miss is read with pread as before; once read, the page cache holds it and ``mapped`` gives views equal to what
    was read. A decode step after the page cache was dropped reads its cold misses (not mapped); every step's
    logits equal the copying engine's bit for bit, and the greedy tokens the in-memory model's."""
    from moekit.formats.mapped import available
    from moekit.generation import Decoder, encode_prompt

    if not available():
        pytest.skip("zero-copy views need Linux mincore/madvise")
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "m")
    whole = moekit.load(path)
    whole.model.set_experts_implementation("moekit")
    want = generate(whole, PROMPT, max_new_tokens=5).token_ids
    ids = encode_prompt(whole, PROMPT)
    del whole  # (its weights may be mapped from the file: mapped pages stay in the page cache)
    gc.collect()
    lm = load_offloaded(path)
    lm.model.set_experts_implementation("moekit")
    store = lm._moekit_expert_store
    layer = lm.moe.layers[0].index
    _drop_page_cache(path)
    assert store.mapped(layer, 3) is None  # cold: not in the page cache
    buf = {n: torch.empty(s, dtype=d) for n, (s, d) in store.shapes(layer).items()}
    store.read(layer, 3, buf)
    me = store.mapped(layer, 3)  # the read brought it into the page cache
    assert me is not None and set(me.weights) == set(buf)
    assert all(torch.equal(me.weights[n], buf[n]) for n in buf)
    k = max(v.top_k for v in lm.moe)
    runs = {}
    for zero_copy in (False, True):
        with offload(lm, policy="lru", slots=k, zero_copy=zero_copy) as engine:
            dec = Decoder(lm)
            logits = [dec.prefill(ids)]
            stats = []
            for i in range(4):
                if zero_copy and i == 2:
                    _drop_page_cache(path)  # this step's first misses are cold (their reads bring the rest in)
                stats.append(engine.stats(belady=False))
                logits.append(dec.step(int(torch.argmax(logits[-1]))))
            stats.append(engine.stats(belady=False))
        runs[zero_copy] = logits, stats
    (ref, _), (got, st) = runs[False], runs[True]
    assert [int(torch.argmax(x)) for x in got] == want
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    warm, cold = st[2], st[3]  # before and after the cold step
    assert warm["decode_zero_copy_misses"] > 0
    misses = cold["decode_misses"] - warm["decode_misses"]
    assert misses > 0 and cold["decode_zero_copy_misses"] - warm["decode_zero_copy_misses"] < misses
    assert cold["bytes_read"] > warm["bytes_read"]


def test_mapped_pages_leave_the_process_after_each_step(tmp_path):
    """Mapped expert bytes count in RSS only while a step computes on them: after decoding with zero-copy misses the
    process's file-backed RSS has not grown by the bytes those misses covered (they were unmapped)."""
    from moekit.formats.mapped import available

    if not available():
        pytest.skip("zero-copy views need Linux mincore/madvise")

    def rss_file() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))

    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "m", hidden_size=512, intermediate_size=512,
                                moe_intermediate_size=512, num_experts=32)
    lm = load_offloaded(path)
    lm.model.set_experts_implementation("moekit")
    with offload(lm, policy="lru", slots=max(v.top_k for v in lm.moe)) as engine:
        generate(lm, PROMPT, max_new_tokens=2)  # warm up: imports, kernel build
        before = rss_file()
        generate(lm, PROMPT, max_new_tokens=12)
        after = rss_file()
        s = engine.stats(belady=False)
    assert s["zero_copy_bytes"] > 8 * s["expert_bytes"] > 8 << 20, s
    assert after - before < s["expert_bytes"], (after - before, s["expert_bytes"])
