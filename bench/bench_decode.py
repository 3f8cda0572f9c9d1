"""Decode speed of an MoE against the memory bound: moekit (float, int8 and packed int4 experts), transformers eager
and grouped_mm, compiled moekit, optionally llama.cpp, side by side in one run.

The model is a random checkpoint with OLMoE-1B-7B's published config (H=2048, I=1024, 64 experts, top-8, vocab
50304) cut to ``--experts`` experts and ``--layers`` layers, in bf16 (``--arch qwen2_moe``: Qwen1.5-MoE-A2.7B's, H=2048,
60 experts of I=1408, top-4, a shared expert of 5632 behind a sigmoid gate, q/k/v biases, vocab 151936; ``--arch
glm4_moe``: GLM-4.5-Air's, H=4096, 96 heads of 128 (8 key/value heads), q/k/v biases, rotary on half of each head,
128 experts of I=1408, top-8 by DeepSeek-V3's sigmoid router, an ungated shared expert of 1408, the first layer
dense with I=10944, vocab 151552, which ``--vocab`` cuts). Decode of one sequence reads every
non-expert weight (attention, router, norms, lm_head) and the k active experts' weights once per token, so
tokens/s cannot exceed bound = streaming-read bandwidth ÷ bytes of weights read per token. The bandwidth is the
best of torch's streaming reads (``sum``, ``dot``) over a buffer far larger than the caches, measured in the same
run at the same thread count.

Offloaded rows (CPU): the same checkpoint saved to disk and loaded with its experts served by moekit's expert cache
(``moekit.serve``: non-expert weights resident, experts read from the checkpoint into the cache's slots), computed
with moekit's decode kernels (experts on the slots, ``use_for_linears``): ``moekit-offload-warm`` with a cache that
holds every expert, filled before timing (hit rate 1.0: what #14 calls "offloaded with a warm cache"; the bound is
the in-memory one, the bytes read per token being the same) and ``moekit-offload-half`` with half of each layer's
experts (misses read from storage, page cache bypassed: its hit rate is printed). Their decode steps run whole
decoder layers natively with the engine's experts (on the slots in the native call when all are cached);
``moekit-offload-warm-modules`` is the warm row's model with the per-module fused ops instead (the experts module
calling the engine: the path before whole layers took offloaded experts), side by side.

``moekit-linears`` (and the int8, int4, offloaded and huge-pages rows) run what ``moekit generate`` runs: the
experts, the linears and ``moekit.nn.fused_decode`` (a whole decoder layer of a one-token static-cache step in
one native call); ``moekit-linears-unfused`` is the same without ``fused_decode``.

Every implementation generates greedily with a static cache from the same prompt. Decode tokens/s is
new tokens ÷ (time of a generate with ``--new-tokens`` + 1 tokens − time of one with 1 token), the median of
``--rounds`` interleaved rounds (every implementation once per round, so load from other processes hits all
alike). Prefill tokens/s is one forward of ``--prefill`` tokens without a cache.

    python bench/bench_decode.py                        # 16 experts, 4 layers, 1 and 2 threads
    python bench/bench_decode.py --threads 2 --no-compile
    python bench/bench_decode.py --arch qwen2_moe --no-compile --no-int8 --no-int4 --no-offload
    python bench/bench_decode.py --arch glm4_moe --experts 16 --layers 3 --vocab 32768 --no-compile --no-offload
    python bench/bench_decode.py --save-checkpoint .work/olmoe-cut  # then convert it for llama.cpp
    python bench/bench_decode.py --llama-bench ~/llama.cpp/build/bin/llama-bench --gguf .work/olmoe-cut.gguf
    python bench/bench_decode.py --device cuda

One JSON line per measurement, one summary line per thread count, then a final line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# OLMoE-1B-7B-0924's published config.json (the fields that shape the weights and the routing).
OLMOE_1B_7B = dict(
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    vocab_size=50304,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    norm_topk_prob=False,
    tie_word_embeddings=False,
)
# Qwen1.5-MoE-A2.7B's published config.json (the same fields; --arch qwen2_moe): q/k/v biases, 60 experts of 1408
# plus a shared expert of 5632 behind a sigmoid gate (the Qwen2-MoE layer; Qwen2-57B-A14B has the same one, larger)
QWEN15_MOE_A27B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=60,
    num_experts_per_tok=4,
    vocab_size=151936,
    max_position_embeddings=8192,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    norm_topk_prob=False,
    qkv_bias=True,
    tie_word_embeddings=False,
)
# GLM-4.5-Air's published config.json (--arch glm4_moe; transformers' Glm4MoeConfig defaults have its shapes, not its
# head_dim and biases): the GLM4-MoE layer (dots.llm1's and DeepSeek-V3's MoE block), GLM-4.5 (355B) is larger
GLM45_AIR = dict(
    hidden_size=4096,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=46,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    n_routed_experts=128,
    num_experts_per_tok=8,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    partial_rotary_factor=0.5,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    attention_bias=True,
    use_qk_norm=False,
    vocab_size=151552,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
ARCHS = {"olmoe": ("olmoe-1b-7b", OLMOE_1B_7B), "qwen2_moe": ("qwen1.5-moe-a2.7b", QWEN15_MOE_A27B),
         "glm4_moe": ("glm-4.5-air", GLM45_AIR)}
EXPERTS_KEY = {"olmoe": "num_experts", "qwen2_moe": "num_experts", "glm4_moe": "n_routed_experts"}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
IMPLS = ("eager", "grouped_mm", "moekit", "moekit-linears", "moekit-linears-modules", "moekit-linears-unfused",
         "moekit-compiled")
# rows that also run moekit.nn.fused_decode (norms, attention, router and the experts' glue in one call each), as
# moekit generate / serve do; moekit-linears-unfused is moekit-linears without them, side by side, and
# moekit-linears-modules with each module's fused op but no whole-layer step (fused_decode.LAYER_CLASSES' own forwards)
FUSED_IMPLS = ("moekit-linears", "moekit-linears-modules", "moekit-int8", "moekit-int4", "moekit-int4-float-acts")
OFFLOAD_IMPLS = ("moekit-offload-warm", "moekit-offload-half")
INT4_OFFLOAD = "moekit-int4-offload-warm"  # a `moekit quantize --bits 4` checkpoint, its experts packed in the slots
OFFLOAD_MODULES = "moekit-offload-warm-modules"  # the warm row's model without whole-layer steps for its experts
OFFLOADED: dict = {}  # offload row → (LoadedModel, OffloadEngine), built by prepare_offloaded
PROVIDERS: dict = {}  # experts module of the warm row → its engine's provider (fused_decode.EXPERTS_PROVIDER)
HUGE: dict = {}  # "moekit-linears-hugepages" → a copy of the model on huge pages (--huge-pages)
COMPILED: dict = {}  # "moekit-compiled", "moekit-int8-compiled", ... → a copy of the model switched once (so that the
# interleaved rounds' switching of the other rows never invalidates a compiled step's guards)

DEVICE = torch.device("cpu")
CLOCK = "wall"  # --clock


def now() -> float:
    """Seconds on the chosen clock: wall time, or (``--clock cpu``) this process's CPU time ÷ torch's threads.

    On a busy shared machine wall time measures the other processes; CPU time counts only the cycles this process
    ran (stalls on memory included), so CPU time ÷ threads estimates the wall time of a quiet machine. Spinning
    OpenMP threads add CPU time, so at 2 threads it is a conservative (slower) estimate.
    """
    if CLOCK == "cpu":
        return time.process_time() / (torch.get_num_threads() if DEVICE.type == "cpu" else 1)
    return time.perf_counter()


def synchronize() -> None:
    """Wait for queued kernels so that wall time measures the work (a no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def build_model(num_experts: int, num_layers: int, dtype: torch.dtype, seed: int = 0, arch: str = "olmoe",
                vocab: int | None = None):
    """A random OLMoE-1B-7B-shaped (``arch="qwen2_moe"``: Qwen1.5-MoE-A2.7B-shaped, ``"glm4_moe"``: GLM-4.5-Air-shaped)
    causal LM with ``num_experts`` experts and ``num_layers`` layers (and ``vocab`` tokens: None, the published)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cut = {EXPERTS_KEY[arch]: num_experts, "num_hidden_layers": num_layers, **({"vocab_size": vocab} if vocab else {})}
    cfg = AutoConfig.for_model(arch, **{**ARCHS[arch][1], **cut})
    torch.manual_seed(seed)
    with torch.device(DEVICE):  # random weights made where they run (a GPU initialises a 7B model in a second)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # always generate the full count
    model.generation_config.pad_token_id = 0
    return model


def num_experts(cfg) -> int:
    """Routed experts per layer of a config of ``ARCHS``."""
    return getattr(cfg, "num_experts", None) or cfg.n_routed_experts


def save_checkpoint(model, path: str) -> None:
    """Write the random checkpoint with moekit:tiny's BPE tokenizer (its 6144 tokens; convert_hf_to_gguf.py needs a
    tokenizer and pads the vocabulary to the config's 50304 with placeholder tokens)."""
    import shutil

    from moekit.models.loading import zoo_dir

    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_dir() / "tiny" / name, Path(path) / name)


def bytes_read_per_token(model, experts: str = "float", group_size: int = 128) -> int:
    """Weights one decode step reads: everything but the embedding table (one row), k/E of every expert
    (``experts="int8"``: 1 byte per expert weight plus a 2-byte scale per output row; ``"int4"``: half a byte per
    expert weight plus a 2-byte scale and a 1-byte zero point per group of ``group_size``). With quantized experts
    the linears (attention, lm_head) count as int8 too (1 byte per weight + a 2-byte row scale), as moekit-int8 and
    moekit-int4 run them (quantize_linears_int8), like llama.cpp's quantized types."""
    cfg = model.config
    share = cfg.num_experts_per_tok / num_experts(cfg)
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    total = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if "embed_tokens" in name:
            size = p.shape[-1] * p.element_size()
        elif experts != "float" and name in linears:
            size = p.numel() + 2 * p.shape[0]
        elif ".experts." in name:
            if experts == "int8" and p.dim() == 3:  # [E, out, in] (OLMoE's layout): one scale per output row
                size = p.numel() + 2 * p.numel() // p.shape[-1]
            elif experts == "int4" and p.dim() == 3:
                size = p.numel() // 2 + 3 * p.numel() // group_size
            size *= share
        total += size
    return int(total)


def stream_read_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """Best streaming-read rate (GB/s) of torch's reductions over a buffer much larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=DEVICE)
    best = 0.0
    for fn in (lambda: buf.sum(), lambda: torch.dot(buf, buf)):
        fn()
        for _ in range(repeats):
            synchronize()
            t0 = now()
            fn()
            synchronize()
            best = max(best, buf.numel() * 4 / max(now() - t0, 1e-9) / 1e9)
    return best


COMPILE_MODE = "default"  # --compile-mode


def generate_seconds(model, prompt: torch.Tensor, new_tokens: int, compiled: bool) -> float:
    """Wall time of one greedy static-cache generate of ``new_tokens`` tokens."""
    from transformers import CompileConfig

    kwargs: dict = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        max_length=prompt.shape[1] + 64,
    )
    if compiled:
        config = CompileConfig(fullgraph=True, mode=COMPILE_MODE)
        config._compile_all_devices = True  # transformers compiles the decode step on CPU only when asked
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    synchronize()
    t0 = now()
    with torch.no_grad():
        model.generate(prompt, **kwargs)
    synchronize()
    return now() - t0


INT8: dict = {}  # experts module → its int8 buffers (quantize_experts_int8), attached only for "moekit-int8"
INT4: dict = {}  # experts module → its packed int4 buffers (quantize_experts_int4), attached only for "moekit-int4"
INT8_LINEARS: dict = {}  # nn.Linear → its int8 codes and row scales (quantize_linears_int8), for int8 and int4
INT4_FLOAT_ACTS = "moekit-int4-float-acts"  # int4 experts, float activations (MOEKIT_INT4_ACTIVATIONS=float)


def set_impl(model, impl: str) -> bool:
    """Switch the experts implementation (and the int8 / int4 experts on or off); returns whether this run is
    compiled."""
    import moekit.nn
    import moekit.nn.fused_decode
    from moekit.formats.quantized import INT4_BUFFERS
    from moekit.nn.int8_experts import INT8_BUFFERS

    compiled = impl.endswith("-compiled")
    base = impl.removesuffix("-compiled")  # moekit-compiled is moekit-linears compiled; moekit-int8-compiled, ...
    # moekit-int4-float-acts: the int4 experts with float activations (the loops before int8 activations)
    if base == INT4_FLOAT_ACTS:
        os.environ["MOEKIT_INT4_ACTIVATIONS"] = "float"
    else:
        os.environ.pop("MOEKIT_INT4_ACTIVATIONS", None)
    for store, names, own in ((INT8, INT8_BUFFERS, "moekit-int8"), (INT4, INT4_BUFFERS, "moekit-int4")):
        for module, buffers in store.items():
            for name in names:
                if base == own or (own == "moekit-int4" and base == INT4_FLOAT_ACTS):
                    module.register_buffer(name, buffers[name], persistent=False)
                elif hasattr(module, name):
                    delattr(module, name)
    model.set_experts_implementation("moekit" if impl.startswith("moekit") else impl)
    # moekit-linears and moekit-compiled: attention and lm_head also through moekit's decode kernel
    # (cpu_kernels.use_for_linears, a custom op under compile); moekit-int8 and moekit-int4: the linears int8 like
    # llama.cpp's quantized types (quantize_linears_int8's codes)
    moekit.nn.cpu_kernels.use_for_linears(model, enable=False)
    moekit.nn.fused_decode.use_fused_decode(model, enable=False)
    moekit.nn.dequantize_linears_int8(model)
    if base in FUSED_IMPLS and not compiled:
        moekit.nn.fused_decode.use_fused_decode(model)
        if base == "moekit-linears-modules":  # the decoder layers' own forwards: each module's fused op
            for module in model.modules():
                if type(module).__name__ in moekit.nn.fused_decode.LAYER_CLASSES:
                    module.__dict__.pop("forward", None)
    if base in ("moekit-linears", "moekit-linears-modules", "moekit-linears-unfused", "moekit"):
        if base != "moekit" or compiled:
            moekit.nn.cpu_kernels.use_for_linears(model)
    elif base in ("moekit-int8", "moekit-int4", INT4_FLOAT_ACTS):
        import types

        from moekit.nn.int8_experts import INT8_LINEAR_BUFFERS, int8_linear_forward

        for module, buffers in INT8_LINEARS.items():
            for name, tensor in zip(INT8_LINEAR_BUFFERS, buffers, strict=True):
                module.register_buffer(name, tensor, persistent=False)
            module.forward = types.MethodType(int8_linear_forward, module)
    return compiled


def prepare_quantized(model, bits: int, group_size: int) -> None:
    """Quantize the experts to int8 (per-row) or packed int4 (groups of ``group_size``) once, and the linears to
    int8, float weights kept for the other implementations, then detach them."""
    from moekit.formats.quantized import INT4_BUFFERS
    from moekit.nn import quantize_experts_int4, quantize_experts_int8, quantize_linears_int8
    from moekit.nn.int8_experts import INT8_BUFFERS, INT8_LINEAR_BUFFERS

    if not INT8_LINEARS:
        quantize_linears_int8(model, keep_float=True)
        for module in model.modules():
            if hasattr(module, INT8_LINEAR_BUFFERS[0]):
                INT8_LINEARS[module] = tuple(getattr(module, name) for name in INT8_LINEAR_BUFFERS)
    if bits == 8:
        quantize_experts_int8(model, keep_float=True)
    else:
        quantize_experts_int4(model, group_size=group_size, keep_float=True)
    store, names = (INT8, INT8_BUFFERS) if bits == 8 else (INT4, INT4_BUFFERS)
    for module in model.modules():
        if hasattr(module, names[0]):
            store[module] = {name: getattr(module, name) for name in names}
    set_impl(model, "eager")


def prepare_offloaded(model, checkpoint: str) -> None:
    """The offloaded rows: ``checkpoint`` (``model`` saved) loaded twice with its experts offloaded, on moekit's
    kernels (experts on the cache's slots, ``use_for_linears``), one engine with every expert cached and filled, one
    with half of each layer's experts."""
    from moekit.nn.cpu_kernels import use_for_linears
    from moekit.nn.dispatch import use_moekit_experts
    from moekit.nn.fused_decode import EXPERTS_PROVIDER, use_fused_decode
    from moekit.serve.engine import OffloadEngine
    from moekit.serve.store import load_offloaded, store_for

    count = num_experts(model.config)
    for impl, slots in zip(OFFLOAD_IMPLS, (count, max(count // 2, model.config.num_experts_per_tok)),
                           strict=True):
        lm = load_offloaded(checkpoint, with_tokenizer=False)
        lm.model.generation_config.eos_token_id = None
        lm.model.generation_config.pad_token_id = 0
        use_moekit_experts(lm.model)
        use_for_linears(lm.model)
        use_fused_decode(lm.model)  # as moekit serve (use_fast_decode)
        engine = OffloadEngine(lm, store_for(lm), slots=slots).start()
        if impl.endswith("-warm"):
            for v in lm.moe:
                engine.access(v.index, list(range(v.num_experts)), decode=False)
                PROVIDERS[v.experts] = getattr(v.experts, EXPERTS_PROVIDER)
        OFFLOADED[impl] = (lm, engine)


def prepare_offloaded_int4(checkpoint: str, out: str, group_size: int) -> None:
    """The packed int4 offload row: ``checkpoint`` quantized as ``moekit quantize --bits 4`` writes it, loaded with
    its experts offloaded and kept packed in the cache's slots (every expert cached), the linears int8 like the
    in-memory moekit-int4 row (same bound)."""
    import moekit
    from moekit.compress.quantize import quantize
    from moekit.nn import quantize_linears_int8
    from moekit.nn.dispatch import use_moekit_experts
    from moekit.nn.fused_decode import use_fused_decode
    from moekit.serve.engine import OffloadEngine
    from moekit.serve.store import load_offloaded, store_for

    quantize(moekit.load(checkpoint, with_tokenizer=False), bits=4, group_size=group_size, out=out)
    lm = load_offloaded(out, with_tokenizer=False, packed_experts=True)
    lm.model.generation_config.eos_token_id = None
    lm.model.generation_config.pad_token_id = 0
    use_moekit_experts(lm.model)
    quantize_linears_int8(lm.model, keep_float=False)
    use_fused_decode(lm.model)  # as moekit generate / serve (use_fast_decode)
    engine = OffloadEngine(lm, store_for(lm), slots=num_experts(lm.model.config)).start()
    for v in lm.moe:
        engine.access(v.index, list(range(v.num_experts)), decode=False)
    OFFLOADED[INT4_OFFLOAD] = (lm, engine)


def release_offloaded() -> None:
    """Stop the offloaded rows' engines and drop their models."""
    for _lm, engine in OFFLOADED.values():
        engine.stop()
    OFFLOADED.clear()
    PROVIDERS.clear()


def model_for(model, impl: str):
    """The model an implementation runs: an offloaded copy for the offload rows (set up once), else ``model``
    switched to ``impl``; returns (model, compiled)."""
    from moekit.nn.fused_decode import EXPERTS_PROVIDER

    os.environ.pop("MOEKIT_INT4_ACTIVATIONS", None)  # int8 activations unless the row is moekit-int4-float-acts
    for experts, provider in PROVIDERS.items():  # the warm row's whole-layer steps: with its experts, or not
        if impl == OFFLOAD_MODULES:
            experts.__dict__.pop(EXPERTS_PROVIDER, None)
        else:
            setattr(experts, EXPERTS_PROVIDER, provider)
    if impl == OFFLOAD_MODULES:
        return OFFLOADED[OFFLOAD_IMPLS[0]][0].model, False
    if impl in OFFLOADED:
        return OFFLOADED[impl][0].model, False
    if impl in HUGE:
        return HUGE[impl], set_impl(HUGE[impl], "moekit-linears")
    if impl.endswith("-compiled"):
        if impl not in COMPILED:
            import copy

            set_impl(model, impl)
            COMPILED[impl] = copy.deepcopy(model)
            set_impl(model, "eager")
        return COMPILED[impl], True
    return model, set_impl(model, impl)


def bench_threads(model, threads: int, dtype: str, args, emit) -> dict:
    """Bound, decode and prefill tokens/s of every implementation at one thread count."""
    import moekit.nn

    if DEVICE.type == "cpu":
        torch.set_num_threads(threads)
    gbps = stream_read_gbps()
    per_token = bytes_read_per_token(model)
    bound = gbps * 1e9 / per_token
    base = {"threads": threads, "dtype": dtype, "clock": CLOCK}
    emit(base | {"kind": "bound", "stream_read_GBps": round(gbps, 2), "GB_per_token": round(per_token / 1e9, 3),
                 "bound_tok_s": round(bound, 2)})
    per_token_int8 = bytes_read_per_token(model, "int8")
    bound_int8 = gbps * 1e9 / per_token_int8 if INT8 else None
    if bound_int8:
        emit(base | {"kind": "bound", "experts": "int8", "GB_per_token": round(per_token_int8 / 1e9, 3),
                     "bound_tok_s": round(bound_int8, 2)})
    per_token_int4 = bytes_read_per_token(model, "int4", args.int4_group_size)
    bound_int4 = gbps * 1e9 / per_token_int4 if INT4 else None
    if bound_int4:
        emit(base | {"kind": "bound", "experts": f"int4 (groups of {args.int4_group_size})",
                     "GB_per_token": round(per_token_int4 / 1e9, 3), "bound_tok_s": round(bound_int4, 2)})
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=g).to(DEVICE)
    impls = [i for i in IMPLS if not (args.no_compile and i.endswith("-compiled"))]
    impls = [i for i in impls if not i.startswith("moekit-linears") or DEVICE.type == "cpu"]
    for quantized, name in ((INT8, "moekit-int8"), (INT4, "moekit-int4")):
        if quantized:  # and compiled (transformers' compiled decode step over the int8 / int4 kernels' custom ops)
            impls += [name] + ([f"{name}-compiled"] if not args.no_compile and DEVICE.type == "cpu" else [])
    if INT4 and moekit.nn.cpu_kernels_int4.kernel_path(args.int4_group_size, model.dtype, "int8") == "avx512-vnni-int8":
        impls.append(INT4_FLOAT_ACTS)  # side by side: the same experts without int8 activations
    impls += [i for i in (*OFFLOAD_IMPLS, INT4_OFFLOAD) if i in OFFLOADED]
    impls += [OFFLOAD_MODULES] if PROVIDERS else []
    impls += list(HUGE)
    for impl in impls:  # warm-up: first calls, and compilation of the decode step
        m, compiled = model_for(model, impl)
        t0 = time.perf_counter()
        generate_seconds(m, prompt, 2, compiled)
        if compiled:  # the timed lengths too: a static cache of another length is another graph
            generate_seconds(m, prompt, 1, compiled)
            generate_seconds(m, prompt, 1 + args.new_tokens, compiled)
            emit(base | {"kind": "compile", "impl": impl, "seconds": round(time.perf_counter() - t0, 1)})
    samples: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:
            m, compiled = model_for(model, impl)
            one = generate_seconds(m, prompt, 1, compiled)
            full = generate_seconds(m, prompt, 1 + args.new_tokens, compiled)
            samples[impl].append(args.new_tokens / max(full - one, 1e-9))
    decode = {i: statistics.median(s) for i, s in samples.items()}
    hit_rates = {}
    for impl, tps in decode.items():
        impl_bound = (bound_int4 if "-int4" in impl else bound_int8 if "-int8" in impl else None) or bound
        extra = {}
        if impl in OFFLOADED:
            st = OFFLOADED[impl][1].stats(belady=False)
            hit_rates[impl] = st["decode_hit_rate"]
            extra = {"cache_slots": OFFLOADED[impl][1].slots, "decode_hit_rate": round(st["decode_hit_rate"], 3),
                     "bytes_read_per_token": st["bytes_read_per_token"]}
        emit(base | {"kind": "decode", "impl": impl, "tok_s": round(tps, 3), "of_bound": round(tps / impl_bound, 3),
                     "rounds": [round(s, 3) for s in samples[impl]]} | extra)
    prefill = bench_prefill(model, args.prefill, args.rounds)
    for impl, tps in prefill.items():
        emit(base | {"kind": "prefill", "impl": impl, "tokens": args.prefill, "tok_s": round(tps, 1)})
    summary = base | {"kind": "summary", "bound_tok_s": round(bound, 2)}
    summary |= {f"{i}_tok_s": round(t, 3) for i, t in decode.items()}
    summary["moekit_of_bound"] = round(decode["moekit"] / bound, 3)
    summary["moekit_vs_eager"] = round(decode["moekit"] / decode["eager"], 3)
    summary["moekit_vs_grouped_mm"] = round(decode["moekit"] / decode["grouped_mm"], 3)
    if "moekit-linears" in decode:
        summary["moekit_linears_of_bound"] = round(decode["moekit-linears"] / bound, 3)
    if "moekit-linears-unfused" in decode:
        summary["moekit_linears_unfused_of_bound"] = round(decode["moekit-linears-unfused"] / bound, 3)
        summary["moekit_linears_vs_unfused"] = round(decode["moekit-linears"] / decode["moekit-linears-unfused"], 3)
    if "moekit-linears-modules" in decode:  # whole-layer steps against the per-module fused ops
        summary["moekit_linears_modules_of_bound"] = round(decode["moekit-linears-modules"] / bound, 3)
        summary["moekit_linears_vs_modules"] = round(decode["moekit-linears"] / decode["moekit-linears-modules"], 3)
    if "moekit-linears-hugepages" in decode:
        summary["moekit_linears_hugepages_of_bound"] = round(decode["moekit-linears-hugepages"] / bound, 3)
        summary["moekit_linears_hugepages_vs_4k"] = round(decode["moekit-linears-hugepages"] / decode["moekit-linears"], 3)
    if "moekit-compiled" in decode:
        summary["moekit_compiled_of_bound"] = round(decode["moekit-compiled"] / bound, 3)
    for impl in OFFLOAD_IMPLS:  # offloaded: of the bound, against the same kernels in memory, and the hit rate
        if impl in decode:
            key = impl.replace("-", "_")
            summary[f"{key}_of_bound"] = round(decode[impl] / bound, 3)
            if "moekit-linears" in decode:
                summary[f"{key}_vs_in_memory"] = round(decode[impl] / decode["moekit-linears"], 3)
            summary[f"{key}_decode_hit_rate"] = round(hit_rates[impl], 3)
    if OFFLOAD_MODULES in decode:
        summary["moekit_offload_warm_modules_of_bound"] = round(decode[OFFLOAD_MODULES] / bound, 3)
        summary["moekit_offload_warm_vs_modules"] = round(decode[OFFLOAD_IMPLS[0]] / decode[OFFLOAD_MODULES], 3)
    if bound_int8:
        summary["int8_bound_tok_s"] = round(bound_int8, 2)
        summary["moekit_int8_of_int8_bound"] = round(decode["moekit-int8"] / bound_int8, 3)
        if "moekit-int8-compiled" in decode:
            summary["moekit_int8_compiled_of_int8_bound"] = round(decode["moekit-int8-compiled"] / bound_int8, 3)
        bf16_row = "moekit-linears" if "moekit-linears" in decode else "moekit"  # int8 runs with the linears kernel
        summary["moekit_int8_vs_bf16"] = round(decode["moekit-int8"] / decode[bf16_row], 3)
    if bound_int4:
        summary["int4_bound_tok_s"] = round(bound_int4, 2)
        summary["moekit_int4_of_int4_bound"] = round(decode["moekit-int4"] / bound_int4, 3)
        if "moekit-int4-compiled" in decode:
            summary["moekit_int4_compiled_of_int4_bound"] = round(decode["moekit-int4-compiled"] / bound_int4, 3)
        float_row = "moekit-linears" if "moekit-linears" in decode else "moekit"  # int4 runs with the linears kernel
        summary["moekit_int4_vs_float"] = round(decode["moekit-int4"] / decode[float_row], 3)
        if "moekit-int8" in decode:
            summary["moekit_int4_vs_int8"] = round(decode["moekit-int4"] / decode["moekit-int8"], 3)
        if INT4_OFFLOAD in decode:
            summary["moekit_int4_offload_warm_of_int4_bound"] = round(decode[INT4_OFFLOAD] / bound_int4, 3)
            summary["moekit_int4_offload_warm_vs_in_memory"] = round(decode[INT4_OFFLOAD] / decode["moekit-int4"], 3)
        if INT4_FLOAT_ACTS in decode:
            summary["moekit_int4_float_acts_of_int4_bound"] = round(decode[INT4_FLOAT_ACTS] / bound_int4, 3)
            summary["moekit_int4_vs_float_acts"] = round(decode["moekit-int4"] / decode[INT4_FLOAT_ACTS], 3)
    summary["prefill_tok_s"] = {i: round(t, 1) for i, t in prefill.items()}
    summary["prefill_moekit_vs_fastest_hf"] = round(prefill["moekit"] / max(prefill["eager"], prefill["grouped_mm"]), 3)
    if "moekit-linears" in prefill:
        summary["prefill_moekit_linears_vs_fastest_hf"] = round(
            prefill["moekit-linears"] / max(prefill["eager"], prefill["grouped_mm"]), 3)
    if args.llama_bench and dtype == "bfloat16":  # equal bits: bf16 GGUF against bf16, q8_0 against int8 experts
        best = "moekit-linears" if "moekit-linears" in decode else "moekit"
        runs = [("", args.gguf, best)] + ([("_q8_0", args.gguf_q8, "moekit-int8")] if args.gguf_q8 else [])
        runs += [("_q4", args.gguf_q4, "moekit-int4")] if args.gguf_q4 else []
        q4_llama = None
        for suffix, gguf, ours in runs:
            if ours not in decode:
                continue
            llama = run_llama_bench(args.llama_bench, gguf, threads, args.new_tokens, args.prefill)
            emit(base | {"kind": "llama.cpp", "gguf": gguf} | llama)
            summary[f"llama_cpp{suffix}_tok_s"] = llama.get("decode_tok_s")
            if llama.get("decode_tok_s"):
                summary[f"{ours.replace('-', '_')}_vs_llama_cpp{suffix}"] = round(decode[ours] / llama["decode_tok_s"], 3)
                q4_llama = llama["decode_tok_s"] if suffix == "_q4" else q4_llama
        if q4_llama and INT4_FLOAT_ACTS in decode:
            summary["moekit_int4_float_acts_vs_llama_cpp_q4"] = round(decode[INT4_FLOAT_ACTS] / q4_llama, 3)
    emit(summary)
    return summary


def bench_prefill(model, tokens: int, rounds: int) -> dict[str, float]:
    """Prefill tokens/s (one forward without a cache) of eager, grouped_mm, moekit, and moekit-linears (on CPU: the
    linears through moekit's kernels too, which a float16 prefill runs on AMX where the CPU has it), interleaved."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(DEVICE)
    impls = ("eager", "grouped_mm", "moekit") + (("moekit-linears",) if DEVICE.type == "cpu" else ())
    times: dict[str, list[float]] = {i: [] for i in impls}
    with torch.no_grad():
        for impl in impls:
            set_impl(model, impl)  # (also detaches the int8/int4 experts: this is moekit on the float weights)
            model(ids, use_cache=False)
        for _ in range(rounds):
            for impl in impls:
                set_impl(model, impl)
                synchronize()
                t0 = now()
                model(ids, use_cache=False)
                synchronize()
                times[impl].append(now() - t0)
    return {i: tokens / statistics.median(t) for i, t in times.items()}


def run_llama_bench(binary: str, gguf: str | None, threads: int, new_tokens: int, prefill: int) -> dict:
    """llama.cpp's own ``llama-bench`` on the converted checkpoint: decode and prefill tokens/s (its wall clock).

    With ``--clock cpu`` also ``decode_tok_s_cpu``: llama-bench's CPU time (of the child process) for a generate of
    ``new_tokens`` + 1 tokens minus one of 1 token, ÷ threads, as moekit's rows are timed. ggml's worker threads
    busy-wait at barriers, which counts as CPU time: at 2 threads this errs against llama.cpp.
    """
    if not gguf:
        return {"error": "--llama-bench needs --gguf (the checkpoint converted by convert_hf_to_gguf.py)"}
    out: dict = {}
    # decode and prefill as separate runs: one may fail alone (this VM's llama.cpp build dies with SIGILL in q8_0
    # prompt processing, while q8_0 decode runs)
    for key, p, n in (("decode_tok_s", 0, new_tokens), ("prefill_tok_s", prefill, 0)):
        cmd = [binary, "-m", gguf, "-t", str(threads), "-p", str(p), "-n", str(n), "-o", "json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            out[key.replace("tok_s", "error")] = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
            continue
        rec = json.loads(proc.stdout)[0]
        out[key] = round(rec["avg_ts"], 3)
        out[key.replace("tok_s", "stdev")] = round(rec.get("stddev_ts", 0.0), 3)
        out["type"] = rec.get("model_type")
    if "decode_tok_s" not in out:
        return out
    if CLOCK == "cpu":
        import resource

        def child_cpu(n: int) -> float:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(n), "-r", "1", "-o", "json"],
                           capture_output=True, check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

        samples = []
        for _ in range(3):
            extra = child_cpu(new_tokens + 1) - child_cpu(1)
            samples.append(new_tokens / max(extra / threads, 1e-9))
        out["decode_tok_s_cpu"] = round(statistics.median(samples), 3)
        out["decode_tok_s"], out["decode_tok_s_wall"] = out["decode_tok_s_cpu"], out.get("decode_tok_s")
    return out


def run_with_tuned_env() -> None:
    """Restart this process with ``MALLOC_ENV`` and moekit's short OpenMP spin (``moekit.openmp``) unless they are set
    or ``--no-env-tuning`` is given: both are read once, when the C library and torch load."""
    if "--no-env-tuning" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        from moekit.openmp import SPIN_COUNT

        env = {**os.environ, **MALLOC_ENV}
        if "OMP_WAIT_POLICY" not in env:  # moekit's short OpenMP spin (see moekit.openmp), unless the user chose
            env.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str] | None = None) -> int:
    run_with_tuned_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="olmoe", choices=tuple(ARCHS),
                    help="the published config to cut: olmoe (OLMoE-1B-7B), qwen2_moe (Qwen1.5-MoE-A2.7B: q/k/v "
                         "biases, a shared expert) or glm4_moe (GLM-4.5-Air: biases, partial rotary, DeepSeek-V3's "
                         "router, a shared expert, a dense first layer)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="cut the vocabulary (embedding, lm_head) to this many tokens (default: the published)")
    ap.add_argument("--experts", type=int, default=16, help="experts per layer (OLMoE-1B-7B has 64, Qwen1.5-MoE 60)")
    ap.add_argument("--layers", type=int, default=4, help="layers (OLMoE-1B-7B has 16, Qwen1.5-MoE 24)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode tokens timed per generate")
    ap.add_argument("--prefill", type=int, default=128, help="tokens in the timed prefill forward")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated checkpoint dtypes: bfloat16, float16, float32")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="wall time, or CPU time ÷ threads (an estimate of a quiet machine's time on a busy one)")
    ap.add_argument("--no-compile", action="store_true", help="skip compiled moekit (compiling takes minutes)")
    ap.add_argument("--no-int8", action="store_true", help="skip moekit with int8 experts (quantize_experts_int8)")
    ap.add_argument("--no-int4", action="store_true", help="skip moekit with packed int4 experts (quantize_experts_int4)")
    ap.add_argument("--int4-group-size", type=int, default=128, help="int4 weights per scale and zero point (32-256)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; kernels are synchronised around timings")
    ap.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of moekit-compiled (default: reduce-overhead, i.e. CUDA graphs, on a GPU; "
                         "default on the CPU)")
    ap.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench binary (optional)")
    ap.add_argument("--gguf", default=None, help="the same checkpoint converted to a bf16 GGUF (for --llama-bench)")
    ap.add_argument("--gguf-q8", default=None, help="the same checkpoint converted to q8_0 (against int8 experts)")
    ap.add_argument("--gguf-q4", default=None, help="the same checkpoint converted to a 4-bit type (against int4 experts)")
    ap.add_argument("--save-checkpoint", default=None, help="write the random checkpoint here (for conversion)")
    ap.add_argument("--no-offload", action="store_true",
                    help="skip the offloaded rows (they save the checkpoint to a temporary directory, or use "
                         "--save-checkpoint's)")
    ap.add_argument("--no-env-tuning", action="store_true", help="keep glibc's and OpenMP's defaults")
    ap.add_argument("--huge-pages", action="store_true",
                    help="add the row moekit-linears-hugepages: a copy of the model with its weights on 2 MiB "
                         "transparent huge pages (moekit.nn.huge_pages.to_huge_pages), beside moekit-linears")
    args = ap.parse_args(argv)
    global DEVICE, CLOCK, COMPILE_MODE
    DEVICE = torch.device(args.device)
    COMPILE_MODE = args.compile_mode or ("reduce-overhead" if DEVICE.type == "cuda" else "default")
    CLOCK = args.clock
    dtypes = args.dtypes.split(",")
    if any(d not in ("bfloat16", "float16", "float32") for d in dtypes):
        print(f"--dtypes {args.dtypes}: choose among bfloat16, float16, float32", file=sys.stderr)
        return 2
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    if args.int4_group_size not in (32, 64, 128, 256):
        print(f"--int4-group-size {args.int4_group_size}: choose 32, 64, 128 or 256", file=sys.stderr)
        return 2
    if args.llama_bench and not Path(args.llama_bench).is_file():
        print(f"--llama-bench {args.llama_bench}: no such file", file=sys.stderr)
        return 2
    import transformers

    import moekit.nn  # noqa: F401  (registers "moekit" with transformers)

    transformers.logging.set_verbosity_error()  # generate warns that max_length (the static cache size) is set

    threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in threads) or args.new_tokens < 1 or args.rounds < 1 or args.prompt < 1 \
            or (args.vocab is not None and args.vocab < 1):
        print("--threads, --new-tokens, --rounds, --prompt and --vocab must be positive", file=sys.stderr)
        return 2

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    t0 = time.perf_counter()
    summaries = []
    for dtype_name in dtypes:
        model = build_model(args.experts, args.layers, getattr(torch, dtype_name), arch=args.arch, vocab=args.vocab)
        if args.save_checkpoint:
            save_checkpoint(model, args.save_checkpoint)
        tmp = tmp_q4 = None
        if not args.no_offload and DEVICE.type == "cpu":
            import tempfile

            ckpt = args.save_checkpoint
            if ckpt is None:
                tmp = tempfile.TemporaryDirectory(prefix="bench-decode-")
                ckpt = tmp.name
                save_checkpoint(model, ckpt)
            prepare_offloaded(model, ckpt)
            if not args.no_int4:
                tmp_q4 = tempfile.TemporaryDirectory(prefix="bench-decode-q4-")
                prepare_offloaded_int4(ckpt, str(Path(tmp_q4.name) / "q4"), args.int4_group_size)
        params = sum(p.numel() for p in model.parameters())
        if args.huge_pages and DEVICE.type == "cpu":  # before quantizing: the copy runs the float weights
            import copy

            from moekit.nn.huge_pages import to_huge_pages

            HUGE["moekit-linears-hugepages"] = copy.deepcopy(model)
            to_huge_pages(HUGE["moekit-linears-hugepages"])
        INT8.clear()
        INT4.clear()
        INT8_LINEARS.clear()
        if not args.no_int8 and DEVICE.type == "cpu":  # torch's int8 weight-only kernel used here is the CPU one
            prepare_quantized(model, 8, 0)
        if not args.no_int4 and DEVICE.type == "cpu":  # the int4 kernel is a CPU one (elsewhere: dequantized GEMMs)
            prepare_quantized(model, 4, args.int4_group_size)
        emit({"kind": "env", "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
              "model": f"{ARCHS[args.arch][0]} cut to {args.experts} experts, {args.layers} layers"
                       + (f", vocab {args.vocab}" if args.vocab else ""), "params": params,
              "dtype": dtype_name, "clock": CLOCK, "loadavg_1m": round(os.getloadavg()[0], 2),
              "omp_wait": os.environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
              "experts_backend": moekit.nn.get_backend(), "cpu_kernels": DEVICE.type == "cpu" and moekit.nn.cpu_kernels.available(),
              "compile_mode": COMPILE_MODE,
              "int4": f"moekit-int4: packed int4 experts, groups of {args.int4_group_size} (quantize_experts_int4, as "
                      "moekit.load(..., packed_experts=True) keeps a moekit quantize --bits 4 checkpoint)",
              "int4_kernel": moekit.nn.cpu_kernels_int4.kernel_path(args.int4_group_size, getattr(torch, dtype_name))
              if DEVICE.type == "cpu" else None})
        for t in threads if DEVICE.type == "cpu" else threads[:1]:
            summaries.append(bench_threads(model, t, dtype_name, args, emit))
        INT8.clear()
        INT4.clear()
        release_offloaded()
        HUGE.clear()
        COMPILED.clear()
        for t in (tmp, tmp_q4):
            if t is not None:
                t.cleanup()
        del model
    keys = ("moekit", "moekit-linears", "moekit-linears-modules", "moekit-linears-unfused", "moekit-linears-hugepages", "eager", "grouped_mm",
            "moekit-compiled", "moekit-int8", "moekit-int4", "moekit-int8-compiled", "moekit-int4-compiled", INT4_FLOAT_ACTS,
            *OFFLOAD_IMPLS, INT4_OFFLOAD, OFFLOAD_MODULES)
    rows = []
    for s in summaries:
        row = {k: s[k] for k in ("dtype", "threads", "bound_tok_s", "int8_bound_tok_s", "int4_bound_tok_s") if k in s}
        row |= {k.replace("-", "_"): s[f"{k}_tok_s"] for k in keys if f"{k}_tok_s" in s}
        row |= {k: v for k, v in s.items() if k.startswith(("llama_cpp", "moekit_of", "moekit_int8_of", "moekit_compiled_of", "moekit_linears_of", "moekit_linears_vs",
                                                            "moekit_vs_llama", "moekit_int8_vs_llama", "moekit_int4_of", "moekit_int8_compiled", "moekit_int4_compiled",
                                                            "moekit_int4_vs", "moekit_int4_float_acts", "moekit_offload", "moekit_linears_hugepages",
                                                            "prefill_moekit"))}
        rows.append(row)
    emit({"kind": "final", "clock": CLOCK, "rows": rows,
          "best_moekit_of_bound": max(s["moekit_of_bound"] for s in summaries),
          "min_moekit_of_bound": min(s["moekit_of_bound"] for s in summaries),
          "min_moekit_vs_eager": min(s["moekit_vs_eager"] for s in summaries),
          "min_prefill_moekit_vs_fastest_hf": min(s["prefill_moekit_vs_fastest_hf"] for s in summaries),
          "loadavg_1m": round(os.getloadavg()[0], 2), "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
