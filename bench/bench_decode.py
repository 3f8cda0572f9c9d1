"""Decode speed of an MoE against the memory bound: moekit, transformers eager and grouped_mm, compiled moekit,
optionally llama.cpp, side by side in one run.

The model is a random checkpoint with OLMoE-1B-7B's published config (H=2048, I=1024, 64 experts, top-8, vocab
50304) cut to ``--experts`` experts and ``--layers`` layers, in bf16. Decode of one sequence reads every
non-expert weight (attention, router, norms, lm_head) and the k active experts' weights once per token, so
tokens/s cannot exceed bound = streaming-read bandwidth ÷ bytes of weights read per token. The bandwidth is the
best of torch's streaming reads (``sum``, ``dot``) over a buffer far larger than the caches, measured in the same
run at the same thread count.

Every implementation generates greedily with a static cache from the same prompt. Decode tokens/s is
new tokens ÷ (time of a generate with ``--new-tokens`` + 1 tokens − time of one with 1 token), the median of
``--rounds`` interleaved rounds (every implementation once per round, so load from other processes hits all
alike). Prefill tokens/s is one forward of ``--prefill`` tokens without a cache.

    python bench/bench_decode.py                        # 16 experts, 4 layers, 1 and 2 threads
    python bench/bench_decode.py --threads 2 --no-compile
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
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
IMPLS = ("eager", "grouped_mm", "moekit", "moekit-linears", "moekit-compiled")

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


def build_model(num_experts: int, num_layers: int, dtype: torch.dtype, seed: int = 0):
    """A random OLMoE-1B-7B-shaped causal LM with ``num_experts`` experts and ``num_layers`` layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "olmoe", **{**OLMOE_1B_7B, "num_experts": num_experts, "num_hidden_layers": num_layers}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().to(DEVICE)
    model.generation_config.eos_token_id = None  # always generate the full count
    model.generation_config.pad_token_id = 0
    return model


def save_checkpoint(model, path: str) -> None:
    """Write the random checkpoint with moekit:tiny's BPE tokenizer (its 6144 tokens; convert_hf_to_gguf.py needs a
    tokenizer and pads the vocabulary to the config's 50304 with placeholder tokens)."""
    import shutil

    from moekit.models.loading import zoo_dir

    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_dir() / "tiny" / name, Path(path) / name)


def bytes_read_per_token(model, int8: bool = False) -> int:
    """Weights one decode step reads: everything but the embedding table (one row), k/E of every expert
    (with ``int8``: 1 byte per expert and linear weight plus a 2-byte scale per output row, like moekit-int8)."""
    cfg = model.config
    share = cfg.num_experts_per_tok / cfg.num_experts
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    total = 0.0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if "embed_tokens" in name:
            size = p.shape[-1] * p.element_size()
        elif int8 and name in linears:
            size = p.numel() + 2 * p.shape[0]
        elif ".experts." in name:
            if int8 and p.dim() == 3:  # [E, out, in] (OLMoE's layout): one scale per output row
                size = p.numel() + 2 * p.numel() // p.shape[-1]
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
        config = CompileConfig(fullgraph=True, mode="default")
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
INT8_LINEARS: dict = {}  # nn.Linear → its int8 codes and row scales (quantize_linears_int8), likewise


def set_impl(model, impl: str) -> bool:
    """Switch the experts implementation (and the int8 experts on or off); returns whether this run is compiled."""
    import moekit.nn
    from moekit.nn.int8_experts import INT8_BUFFERS

    for module, buffers in INT8.items():
        for name in INT8_BUFFERS:
            if impl == "moekit-int8":
                module.register_buffer(name, buffers[name], persistent=False)
            elif hasattr(module, name):
                delattr(module, name)
    model.set_experts_implementation("moekit" if impl.startswith("moekit") else impl)
    # moekit-linears and moekit-compiled: attention and lm_head also through moekit's decode kernel
    # (cpu_kernels.use_for_linears);
    # moekit-int8: every matrix int8 like llama.cpp's q8_0 (int8 experts + quantize_linears_int8's int8 linears)
    moekit.nn.cpu_kernels.use_for_linears(model, enable=False)
    moekit.nn.dequantize_linears_int8(model)
    if impl in ("moekit-linears", "moekit-compiled"):  # compiled: the linears' kernel runs as a custom op
        moekit.nn.cpu_kernels.use_for_linears(model)
    elif impl == "moekit-int8":
        import types

        from moekit.nn.int8_experts import INT8_LINEAR_BUFFERS, int8_linear_forward

        for module, buffers in INT8_LINEARS.items():
            for name, tensor in zip(INT8_LINEAR_BUFFERS, buffers, strict=True):
                module.register_buffer(name, tensor, persistent=False)
            module.forward = types.MethodType(int8_linear_forward, module)
    return impl.endswith("-compiled")


def prepare_int8(model) -> None:
    """Quantize the experts and linears to int8 once (float weights kept for the other implementations), then
    detach them."""
    import moekit.nn
    from moekit.nn import quantize_experts_int8
    from moekit.nn.int8_experts import INT8_BUFFERS, INT8_LINEAR_BUFFERS

    quantize_experts_int8(model, keep_float=True)
    moekit.nn.quantize_linears_int8(model, keep_float=True)
    for module in model.modules():
        if hasattr(module, INT8_BUFFERS[0]):
            INT8[module] = {name: getattr(module, name) for name in INT8_BUFFERS}
        if hasattr(module, INT8_LINEAR_BUFFERS[0]):
            INT8_LINEARS[module] = tuple(getattr(module, name) for name in INT8_LINEAR_BUFFERS)
    set_impl(model, "eager")


def bench_threads(model, threads: int, dtype: str, args, emit) -> dict:
    """Bound, decode and prefill tokens/s of every implementation at one thread count."""
    if DEVICE.type == "cpu":
        torch.set_num_threads(threads)
    gbps = stream_read_gbps()
    per_token = bytes_read_per_token(model)
    bound = gbps * 1e9 / per_token
    base = {"threads": threads, "dtype": dtype, "clock": CLOCK}
    emit(base | {"kind": "bound", "stream_read_GBps": round(gbps, 2), "GB_per_token": round(per_token / 1e9, 3),
                 "bound_tok_s": round(bound, 2)})
    per_token_int8 = bytes_read_per_token(model, int8=True)
    bound_int8 = gbps * 1e9 / per_token_int8 if INT8 else None
    if bound_int8:
        emit(base | {"kind": "bound", "experts": "int8", "GB_per_token": round(per_token_int8 / 1e9, 3),
                     "bound_tok_s": round(bound_int8, 2)})
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=g).to(DEVICE)
    impls = [i for i in IMPLS if not (args.no_compile and i.endswith("-compiled"))]
    impls = [i for i in impls if i != "moekit-linears" or DEVICE.type == "cpu"]
    impls += ["moekit-int8"] if INT8 else []
    for impl in impls:  # warm-up: first calls, and compilation of the decode step
        compiled = set_impl(model, impl)
        t0 = time.perf_counter()
        generate_seconds(model, prompt, 2, compiled)
        if compiled:
            emit(base | {"kind": "compile", "impl": impl, "seconds": round(time.perf_counter() - t0, 1)})
    samples: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:
            compiled = set_impl(model, impl)
            one = generate_seconds(model, prompt, 1, compiled)
            full = generate_seconds(model, prompt, 1 + args.new_tokens, compiled)
            samples[impl].append(args.new_tokens / max(full - one, 1e-9))
    decode = {i: statistics.median(s) for i, s in samples.items()}
    for impl, tps in decode.items():
        impl_bound = bound_int8 if impl == "moekit-int8" else bound
        emit(base | {"kind": "decode", "impl": impl, "tok_s": round(tps, 3), "of_bound": round(tps / impl_bound, 3),
                     "rounds": [round(s, 3) for s in samples[impl]]})
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
    if "moekit-compiled" in decode:
        summary["moekit_compiled_of_bound"] = round(decode["moekit-compiled"] / bound, 3)
    if bound_int8:
        summary["int8_bound_tok_s"] = round(bound_int8, 2)
        summary["moekit_int8_of_int8_bound"] = round(decode["moekit-int8"] / bound_int8, 3)
        bf16_row = "moekit-linears" if "moekit-linears" in decode else "moekit"  # int8 runs with the linears kernel
        summary["moekit_int8_vs_bf16"] = round(decode["moekit-int8"] / decode[bf16_row], 3)
    summary["prefill_tok_s"] = {i: round(t, 1) for i, t in prefill.items()}
    summary["prefill_moekit_vs_fastest_hf"] = round(prefill["moekit"] / max(prefill["eager"], prefill["grouped_mm"]), 3)
    if args.llama_bench and dtype == "bfloat16":  # equal bits: bf16 GGUF against bf16, q8_0 against int8 experts
        best = "moekit-linears" if "moekit-linears" in decode else "moekit"
        runs = [("", args.gguf, best)] + ([("_q8_0", args.gguf_q8, "moekit-int8")] if args.gguf_q8 else [])
        for suffix, gguf, ours in runs:
            if ours not in decode:
                continue
            llama = run_llama_bench(args.llama_bench, gguf, threads, args.new_tokens, args.prefill)
            emit(base | {"kind": "llama.cpp", "gguf": gguf} | llama)
            summary[f"llama_cpp{suffix}_tok_s"] = llama.get("decode_tok_s")
            if llama.get("decode_tok_s"):
                summary[f"{ours.replace('-', '_')}_vs_llama_cpp{suffix}"] = round(decode[ours] / llama["decode_tok_s"], 3)
    emit(summary)
    return summary


def bench_prefill(model, tokens: int, rounds: int) -> dict[str, float]:
    """Prefill tokens/s (one forward without a cache) of eager, grouped_mm and moekit, interleaved rounds."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(DEVICE)
    impls = ("eager", "grouped_mm", "moekit")
    times: dict[str, list[float]] = {i: [] for i in impls}
    with torch.no_grad():
        for impl in impls:
            set_impl(model, impl)  # (also detaches the int8 experts: this is moekit on the bf16 weights)
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


def main(argv: list[str] | None = None) -> int:
    if "--no-env-tuning" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        from moekit.openmp import SPIN_COUNT

        env = {**os.environ, **MALLOC_ENV}
        if "OMP_WAIT_POLICY" not in env:  # moekit's short OpenMP spin (see moekit.openmp), unless the user chose
            env.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16, help="experts per layer (OLMoE-1B-7B has 64)")
    ap.add_argument("--layers", type=int, default=4, help="layers (OLMoE-1B-7B has 16)")
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; kernels are synchronised around timings")
    ap.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench binary (optional)")
    ap.add_argument("--gguf", default=None, help="the same checkpoint converted to a bf16 GGUF (for --llama-bench)")
    ap.add_argument("--gguf-q8", default=None, help="the same checkpoint converted to q8_0 (against int8 experts)")
    ap.add_argument("--save-checkpoint", default=None, help="write the random checkpoint here (for conversion)")
    ap.add_argument("--no-env-tuning", action="store_true", help="keep glibc's and OpenMP's defaults")
    args = ap.parse_args(argv)
    global DEVICE, CLOCK
    DEVICE = torch.device(args.device)
    CLOCK = args.clock
    dtypes = args.dtypes.split(",")
    if any(d not in ("bfloat16", "float16", "float32") for d in dtypes):
        print(f"--dtypes {args.dtypes}: choose among bfloat16, float16, float32", file=sys.stderr)
        return 2
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    if args.llama_bench and not Path(args.llama_bench).is_file():
        print(f"--llama-bench {args.llama_bench}: no such file", file=sys.stderr)
        return 2
    import transformers

    import moekit.nn  # noqa: F401  (registers "moekit" with transformers)

    transformers.logging.set_verbosity_error()  # generate warns that max_length (the static cache size) is set

    threads = [int(t) for t in args.threads.split(",")]
    if any(t < 1 for t in threads) or args.new_tokens < 1 or args.rounds < 1 or args.prompt < 1:
        print("--threads, --new-tokens, --rounds and --prompt must be positive", file=sys.stderr)
        return 2

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    t0 = time.perf_counter()
    summaries = []
    for dtype_name in dtypes:
        model = build_model(args.experts, args.layers, getattr(torch, dtype_name))
        if args.save_checkpoint:
            save_checkpoint(model, args.save_checkpoint)
        params = sum(p.numel() for p in model.parameters())
        INT8.clear()
        if not args.no_int8 and DEVICE.type == "cpu":  # torch's int8 weight-only kernel used here is the CPU one
            prepare_int8(model)
        emit({"kind": "env", "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
              "model": f"olmoe-1b-7b cut to {args.experts} experts, {args.layers} layers", "params": params,
              "dtype": dtype_name, "clock": CLOCK, "loadavg_1m": round(os.getloadavg()[0], 2),
              "omp_wait": os.environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
              "experts_backend": moekit.nn.get_backend(), "cpu_kernels": moekit.nn.cpu_kernels.available(),
              "int4": "moekit's int4 experts (moekit quantize --bits 4) load dequantized: they decode as the float rows"})
        for t in threads if DEVICE.type == "cpu" else threads[:1]:
            summaries.append(bench_threads(model, t, dtype_name, args, emit))
        INT8.clear()
        del model
    keys = ("moekit", "moekit-linears", "eager", "grouped_mm", "moekit-compiled", "moekit-int8")
    rows = []
    for s in summaries:
        row = {k: s[k] for k in ("dtype", "threads", "bound_tok_s", "int8_bound_tok_s") if k in s}
        row |= {k.replace("-", "_"): s[f"{k}_tok_s"] for k in keys if f"{k}_tok_s" in s}
        row |= {k: v for k, v in s.items() if k.startswith(("llama_cpp", "moekit_of", "moekit_int8_of", "moekit_compiled_of", "moekit_linears_of",
                                                            "moekit_vs_llama", "moekit_int8_vs_llama"))}
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
