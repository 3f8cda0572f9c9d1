"""Decode speed of `moekit generate`'s loop over the context length: its static KV cache against a dynamic one and
against transformers' static-cache `generate`, side by side in one run.

The model is bench_decode.py's random checkpoint (OLMoE-1B-7B's published config cut to ``--experts`` experts and
``--layers`` layers, bf16), saved to a temporary directory and loaded the way `moekit generate` loads it
(``moekit.load`` + ``use_fast_decode``: moekit's experts and linear kernels, the whole-layer decode step, huge pages).
Rows, each timed as ``--new-tokens`` greedy steps after a prompt of each ``--contexts`` length, in interleaved
rounds (median):

- ``moekit-static``: ``moekit.generation.Decoder`` as `moekit generate` and `moekit serve` run it (a static cache,
  written in place by the native step, grown by doubling);
- ``moekit-dynamic``: the same decoder with transformers' dynamic cache (what it ran before: each step's append
  copies the whole cache);
- ``hf-static``: transformers' ``generate`` with ``cache_implementation="static"`` on the same model (new tokens
  minus one-token generate, as bench_decode.py).

    python bench/bench_generate.py                              # contexts 16, 1500, 3000; 2 threads
    python bench/bench_generate.py --contexts 16,4000 --threads 1,2 --rounds 3

One JSON line per measurement, one summary line per thread count and context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPLS = ("moekit-static", "moekit-dynamic", "hf-static")


def decoder_seconds(lm, prompt: torch.Tensor, steps: int, static: bool) -> float:
    """Wall time of ``steps`` greedy steps of moekit's plain decoder after ``prompt`` (prefill not timed)."""
    from moekit import generation

    saved = generation.static_cache
    if not static:
        generation.static_cache = lambda model, length: None
    try:
        dec = generation.Decoder(lm)
        dec.reserve = steps + 1
        token = int(dec.prefill(prompt).argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            token = int(dec.step(token).argmax())
        return time.perf_counter() - t0
    finally:
        generation.static_cache = saved


def hf_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """transformers' static-cache generate: the time of ``steps`` + 1 new tokens minus that of one."""
    kwargs = dict(do_sample=False, cache_implementation="static", max_length=prompt.numel() + steps + 8,
                  disable_compile=True)
    ids = prompt.view(1, -1)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kwargs)
        t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    from bench_decode import run_with_tuned_env

    run_with_tuned_env()  # glibc's and OpenMP's settings as bench_decode.py runs (--no-env-tuning: the defaults)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16, help="experts per layer (OLMoE-1B-7B has 64)")
    ap.add_argument("--layers", type=int, default=4, help="layers (OLMoE-1B-7B has 16)")
    ap.add_argument("--contexts", default="16,1500,3000", help="comma-separated prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed after each prompt")
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    ap.add_argument("--no-env-tuning", action="store_true", help="keep glibc's and OpenMP's defaults")
    args = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        print("--contexts and --threads take comma-separated integers", file=sys.stderr)
        return 2
    if min(contexts + threads) < 1 or args.new_tokens < 1 or args.rounds < 1 or args.experts < 1 or args.layers < 1:
        print("--contexts, --threads, --new-tokens, --rounds, --experts and --layers must be positive", file=sys.stderr)
        return 2
    import transformers

    import moekit
    from bench_decode import build_model, save_checkpoint
    from moekit.cli.common import use_fast_decode

    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        model = build_model(args.experts, args.layers, torch.bfloat16, vocab=None)
        vocab = model.config.vocab_size
        save_checkpoint(model, tmp)
        del model
        lm = moekit.load(tmp)
        use_fast_decode(lm)
        lm.model.generation_config.eos_token_id = None  # always the full count
        lm.model.generation_config.pad_token_id = 0
        gen = torch.Generator().manual_seed(0)
        for n in threads:
            torch.set_num_threads(n)
            for ctx in contexts:
                prompt = torch.randint(3, vocab, (ctx,), generator=gen)
                times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
                for r in range(args.rounds):
                    for impl in IMPLS:
                        s = (hf_seconds(lm.model, prompt, args.new_tokens) if impl == "hf-static"
                             else decoder_seconds(lm, prompt, args.new_tokens, static=impl == "moekit-static"))
                        times[impl].append(s)
                        print(json.dumps({"threads": n, "context": ctx, "impl": impl, "round": r,
                                          "tok_s": round(args.new_tokens / s, 3)}), flush=True)
                tok = {impl: args.new_tokens / statistics.median(v) for impl, v in times.items()}
                print(json.dumps({"kind": "summary", "threads": n, "context": ctx,
                                  **{f"{impl}_tok_s": round(v, 3) for impl, v in tok.items()},
                                  "static_vs_dynamic": round(tok["moekit-static"] / tok["moekit-dynamic"], 3),
                                  "static_vs_hf_static": round(tok["moekit-static"] / tok["hf-static"], 3)}),
                      flush=True)
    print(json.dumps({"kind": "final", "seconds": round(time.perf_counter() - t_start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
