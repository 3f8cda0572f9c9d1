"""Where a decode step goes: one greedy static-cache step of moekit's decode path split into the decoder layers'
calls, ``lm_head``, the model around them (embedding, rotary, the cache's mask, the final norm) and transformers'
``generate`` loop, and the Python that builds each layer's native arguments (``fused_decode._layer_args``, inside the
layers' time). A step's time is that of a ``--new-tokens``-token generate minus a 1-token one, over the tokens between;
the parts are timed around the modules' forwards on the one-token calls only (wall clock, the bench's wrappers
included). One JSON line per implementation and thread count (the fastest of ``--rounds``), then a summary line.

    python bench/bench_decode_step.py                                  # moekit-linears, -int8, -int4; 1 and 2 threads
    python bench/bench_decode_step.py --impls moekit-int8 --threads 2 --experts 64

The model is ``bench_decode``'s random OLMoE cut; bytes per token (and GB/s of the layers and ``lm_head``) as
``bench_decode.bytes_read_per_token`` counts them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench_decode import (
    build_model,
    bytes_read_per_token,
    generate_seconds,
    prepare_quantized,
    run_with_tuned_env,
    set_impl,
)

EXPERTS = {"moekit-linears": "float", "moekit-int8": "int8", "moekit-int4": "int4"}  # impl → its experts' bytes
IMPLS = tuple(EXPERTS)


INPUT_NAMES = ("input_ids", "inputs_embeds", "hidden_states")  # a forward's token input, when passed by name


class StepClock:
    """Wall time spent in wrapped forwards on one-token inputs, per part, and how many such calls there were."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.wrapped: list[tuple] = []

    def add(self, part: str, spent: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + spent
        self.calls[part] = self.calls.get(part, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, module: torch.nn.Module, part: str) -> None:
        """Time ``module.forward`` under ``part`` on one-token inputs (its first argument, or its token input by
        name); ``unwrap`` puts the forward it had back."""
        own = module.__dict__.get("forward")
        inner = module.forward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            spent = time.perf_counter() - t0
            x = args[0] if args else next((kwargs[n] for n in INPUT_NAMES if kwargs.get(n) is not None), None)
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == 1:
                self.add(part, spent)
            return out

        module.forward = timed
        self.wrapped.append((module, own))

    def unwrap(self) -> None:
        for module, own in reversed(self.wrapped):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self.wrapped.clear()


def instrument(model, clock: StepClock) -> None:
    """Wrap the decoder layers, ``lm_head``, the base model and the causal LM (after ``set_impl``, which sets
    forwards of its own)."""
    for layer in model.model.layers:
        clock.wrap(layer, "layers")
    clock.wrap(model.lm_head, "lm_head")
    clock.wrap(model.model, "model")
    clock.wrap(model, "causal_lm")


def time_layer_args(clock: StepClock) -> None:
    """Time ``fused_decode._layer_args`` (module-wide) under ``layer_args``."""
    import moekit.nn.fused_decode as fused_decode

    inner = fused_decode._layer_args

    def layer_args(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        clock.add("layer_args", time.perf_counter() - t0)
        return out

    fused_decode._layer_args = layer_args


def lm_head_bytes(model, experts: str) -> int:
    """Bytes of ``lm_head`` a step reads, as ``bytes_read_per_token`` counts them: the float weight, or (int8 and int4
    rows: the linears int8) one byte a weight and a 2-byte scale a row."""
    w = model.lm_head.weight
    return w.numel() * w.element_size() if experts == "float" else w.numel() + 2 * w.shape[0]


def profile(model, impl: str, threads: int, args, clock: StepClock) -> dict:
    """The fastest of ``args.rounds`` step splits of ``impl`` at ``threads``."""
    torch.set_num_threads(threads)
    set_impl(model, impl)
    per_token, per_token_lm = bytes_read_per_token(model, EXPERTS[impl]), lm_head_bytes(model, EXPERTS[impl])
    instrument(model, clock)
    prompt = torch.randint(3, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    generate_seconds(model, prompt, 4, False)  # warm: kernels built, caches allocated
    best = None
    for _ in range(args.rounds):
        clock.reset()
        many = generate_seconds(model, prompt, args.new_tokens, False)
        one = generate_seconds(model, prompt, 1, False)
        steps = clock.calls.get("lm_head", 0)  # one-token forwards of both generates
        step = (many - one) / (args.new_tokens - 1)
        if steps and (best is None or step < best["step_ms"] / 1e3):
            per = {k: v / steps for k, v in clock.seconds.items()}
            layers, lm = per.get("layers", 0.0), per.get("lm_head", 0.0)
            best = {
                "kind": "step", "impl": impl, "threads": threads, "step_ms": round(step * 1e3, 3),
                "tok_s": round(1 / step, 2), "layers_ms": round(layers * 1e3, 3), "lm_head_ms": round(lm * 1e3, 3),
                "model_around_layers_ms": round((per.get("model", 0.0) - layers) * 1e3, 3),
                "generate_loop_ms": round((step - per.get("causal_lm", 0.0)) * 1e3, 3),
                "layer_args_us_per_layer": round(clock.seconds.get("layer_args", 0.0)
                                                 / max(clock.calls.get("layer_args", 0), 1) * 1e6, 1),
                "layers_GBps": round((per_token - per_token_lm) / layers / 1e9, 2) if layers else None,
                "lm_head_GBps": round(per_token_lm / lm / 1e9, 2) if lm else None,
            }
    clock.unwrap()
    return best or {"kind": "step", "impl": impl, "threads": threads, "error": "no one-token steps timed"}


def main(argv: list[str] | None = None) -> int:
    run_with_tuned_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--experts", type=int, default=16, help="experts per layer (OLMoE-1B-7B has 64)")
    ap.add_argument("--layers", type=int, default=4, help="layers (OLMoE-1B-7B has 16)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens of the long generate (the step's divisor + 1)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the fastest step is reported")
    ap.add_argument("--no-env-tuning", action="store_true", help="keep glibc's and OpenMP's defaults")
    args = ap.parse_args(argv)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    threads = [int(t) for t in args.threads.split(",")]
    if any(i not in IMPLS for i in impls) or any(t < 1 for t in threads) or args.new_tokens < 2 or args.rounds < 1:
        ap.error(f"--impls from {', '.join(IMPLS)}; --threads >= 1; --new-tokens >= 2; --rounds >= 1")
    model = build_model(args.experts, args.layers, getattr(torch, args.dtype))
    if "moekit-int8" in impls:
        prepare_quantized(model, 8, 128)
    if "moekit-int4" in impls:
        prepare_quantized(model, 4, 128)
    clock = StepClock()
    time_layer_args(clock)
    rows = []
    for impl in impls:
        for t in threads:
            row = profile(model, impl, t, args, clock)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps({"kind": "summary", "experts": args.experts, "layers": args.layers, "dtype": args.dtype,
                      "rows": rows}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
