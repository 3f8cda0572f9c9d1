"""Benchmark moekit's expert dispatch against transformers' experts implementations on identical weights.

One JSON line per measurement (median wall time of a few repeats after warmup), then one summary line per
case and a final summary line. Efficiency = time of a dense matmul pair with the same FLOPs
([T·k, H]×[H, 2I] and [T·k, I]×[I, H]) divided by moekit's time.

    python bench/bench_experts.py            # full run (a few minutes on 2 CPU cores)
    python bench/bench_experts.py --quick    # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moekit.nn  # noqa: F401  (registers "moekit")
from moekit.nn.dispatch import moekit_experts_forward
from moekit.openmp import SPIN_COUNT


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape: hidden H, expert width I, E experts, k active."""

    name: str
    hidden: int
    inter: int
    num_experts: int
    top_k: int


FULL_SHAPES = [Shape("mixtral-like", 512, 1024, 8, 2), Shape("olmoe-like", 512, 256, 64, 8)]
# OLMoE-1B-7B's published expert shape, cut to 32 experts (bench_decode.py's 3.7B checkpoint): for --shape olmoe-1b-7b
PUBLISHED_SHAPES = {"olmoe-1b-7b": Shape("olmoe-1b-7b", 2048, 1024, 32, 8), "olmoe-1b-7b-64": Shape("olmoe-1b-7b-64", 2048, 1024, 64, 8)}
QUICK_SHAPES = [Shape("mixtral-like", 64, 128, 8, 2), Shape("olmoe-like", 64, 32, 64, 8)]
FULL_TOKENS = [1, 16, 512, 4096]
QUICK_TOKENS = [1, 16, 128]


def make_experts(shape: Shape, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers experts module (Qwen3-MoE layout, gate;up concatenated) with random weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(
        hidden_size=shape.hidden,
        moe_intermediate_size=shape.inter,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
    )
    experts = Qwen3MoeExperts(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, shape.hidden**-0.5)
        experts.down_proj.normal_(0, shape.inter**-0.5)
    return experts.to(dtype)


def forced(path: str) -> Callable:
    """moekit's experts forward with its grouped-matmul path forced (``--paths``: what ``auto`` chooses among)."""

    def run(module: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        before = moekit.nn.get_backend()
        moekit.nn.set_backend(path)
        try:
            return moekit_experts_forward(module, x, ids, weights)
        finally:
            moekit.nn.set_backend(before)

    return run


PATHS: tuple[str, ...] = ()  # set by --paths


def implementations(experts: torch.nn.Module, tokens: int) -> dict[str, Callable]:
    """name → f(module, x, ids, weights); transformers' eager is the undecorated forward."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    impls: dict[str, Callable] = {
        "eager": type(experts).forward.__wrapped__,
        "grouped_mm": ALL_EXPERTS_FUNCTIONS["grouped_mm"],
        "moekit": moekit_experts_forward,
    }
    impls |= {f"moekit-{p}": forced(p) for p in PATHS}
    if tokens <= 16:  # batched_mm gathers a weight copy per (token, k): hopeless beyond decode sizes
        impls["batched_mm"] = ALL_EXPERTS_FUNCTIONS["batched_mm"]
    return impls


DEVICE = torch.device("cpu")  # set by --device


def synchronize() -> None:
    """Wait for queued kernels, so that wall time measures the work (a no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved_median_times(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (s) of each runner after one warmup; rounds interleave the runners so that load from
    other processes hits every implementation alike."""
    for fn in runners.values():
        fn()
    synchronize()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            synchronize()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def repeats_for(tokens: int, shape: Shape) -> int:
    """Fewer repeats for the big cases, to keep the full run within a few minutes."""
    work = tokens * shape.top_k  # sub-millisecond decode calls get many repeats: their noise is ±15% otherwise
    return 2 if work >= 16384 else 3 if work >= 8192 else 5 if work >= 1024 else 15 if work > 16 else 51


def bench_case(
    shape: Shape, tokens: int, dtype: torch.dtype, mode: str, emit: Callable[[dict], None]
) -> dict:
    """Time every implementation and the dense equivalent for one (shape, T, dtype, mode); returns the summary."""
    experts = make_experts(shape, dtype).to(DEVICE)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, shape.hidden, generator=g).to(DEVICE, dtype)
    logits = torch.randn(tokens, shape.num_experts, generator=g).to(DEVICE)
    weights, ids = torch.softmax(logits, -1).topk(shape.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    backward = mode == "fwd+bwd"
    if backward:
        x.requires_grad_(True)
        weights.requires_grad_(True)
    else:
        experts.requires_grad_(False)
    grad_out = torch.randn(tokens, shape.hidden, generator=g).to(DEVICE, dtype)
    reps = repeats_for(tokens, shape)
    base = {
        "shape": shape.name,
        "H": shape.hidden,
        "I": shape.inter,
        "E": shape.num_experts,
        "k": shape.top_k,
    }
    base |= {"T": tokens, "dtype": str(dtype).removeprefix("torch."), "mode": mode}

    def runner(fn: Callable) -> Callable[[], object]:
        def run() -> object:
            if not backward:
                with torch.no_grad():
                    return fn(experts, x, ids, weights)
            for p in (x, weights, *experts.parameters()):
                p.grad = None
            out = fn(experts, x, ids, weights)
            out.backward(grad_out)
            return out

        return run

    rows = tokens * shape.top_k
    a = torch.randn(rows, shape.hidden, generator=g).to(DEVICE, dtype).requires_grad_(backward)
    w1 = torch.randn(shape.hidden, 2 * shape.inter, generator=g).to(DEVICE, dtype).requires_grad_(backward)
    w2 = torch.randn(shape.inter, shape.hidden, generator=g).to(DEVICE, dtype).requires_grad_(backward)
    h = torch.randn(rows, shape.inter, generator=g).to(DEVICE, dtype).requires_grad_(backward)
    gy1 = torch.randn(rows, 2 * shape.inter, generator=g).to(DEVICE, dtype)
    gy2 = torch.randn(rows, shape.hidden, generator=g).to(DEVICE, dtype)

    def dense() -> None:
        if not backward:
            with torch.no_grad():
                a @ w1, h @ w2
            return
        for p in (a, w1, w2, h):
            p.grad = None
        torch.autograd.backward([a @ w1, h @ w2], [gy1, gy2])

    runners = {name: runner(fn) for name, fn in implementations(experts, tokens).items()} | {"dense": dense}
    times = interleaved_median_times(runners, reps)
    for name, t in times.items():
        emit(base | {"impl": "dense-equivalent" if name == "dense" else name, "ms": round(t * 1e3, 3)})

    hf = {n: t for n, t in times.items() if n != "dense" and not n.startswith("moekit")}
    fastest = min(hf, key=hf.get)
    summary = base | {
        "kind": "summary",
        "fastest_hf": fastest,
        "moekit_vs_fastest_hf": round(times["moekit"] / hf[fastest], 3),  # ≤ 1.05 is the target
        "speedup_vs_eager": round(times["eager"] / times["moekit"], 3),
        "dense_efficiency": round(times["dense"] / times["moekit"], 3),
    }
    if PATHS:
        paths = {n: t for n, t in times.items() if n.startswith("moekit-")}
        summary["fastest_moekit_path"] = min(paths, key=paths.get).removeprefix("moekit-")
    emit(summary)
    return summary


# Keep freed large blocks in the heap: otherwise every big gradient buffer is a fresh mmap whose page faults
# (slow in VMs) dominate the timing of every implementation alike. Applied by re-executing once.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def main(argv: list[str] | None = None) -> int:
    if "--no-malloc-tuning" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        env = {**os.environ, **MALLOC_ENV}
        if "OMP_WAIT_POLICY" not in env:  # the CLI's short OpenMP spin (moekit.openmp), unless the user chose
            env.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and token counts, a few seconds")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default mmap threshold")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts, run in this order")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; kernels are synchronised per call")
    parser.add_argument("--shape", default=None, choices=sorted(PUBLISHED_SHAPES), help="one published shape only")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    parser.add_argument("--paths", default="", help="also time moekit with these paths forced (padded,grouped_mm,loop,amx)")
    args = parser.parse_args(argv)
    global PATHS
    PATHS = tuple(p for p in args.paths.split(",") if p)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, token_counts = (QUICK_SHAPES, QUICK_TOKENS) if args.quick else (FULL_SHAPES, FULL_TOKENS)
    if args.shape:
        shapes = [PUBLISHED_SHAPES[args.shape]]

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    emit(
        {
            "kind": "env",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
            "grouped_mm": hasattr(F, "grouped_mm"),
            "malloc_tuned": os.environ.get("MALLOC_MMAP_THRESHOLD_") == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"],
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "omp_wait": os.environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
            "experts_backend": moekit.nn.get_backend(),
        }
    )
    t0 = time.perf_counter()
    summaries = []
    if args.tokens:
        token_counts = [int(t) for t in args.tokens.split(",")]
    for tokens in token_counts:  # T outermost, in the given order: a partial run still covers whole T rows
        for shape in shapes:
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                for mode in args.modes.split(","):
                    summaries.append(bench_case(shape, tokens, dtype, mode, emit))
    big = [s for s in summaries if s["T"] >= 512]
    bf16_512 = [s for s in summaries if s["T"] == 512 and s["dtype"] == "bfloat16"]
    emit(
        {
            "kind": "final",
            "cases": len(summaries),
            "worst_moekit_vs_fastest_hf": max(s["moekit_vs_fastest_hf"] for s in summaries),
            "median_moekit_vs_fastest_hf": statistics.median(s["moekit_vs_fastest_hf"] for s in summaries),
            "min_speedup_vs_eager_bf16_T512": min((s["speedup_vs_eager"] for s in bf16_512), default=None),
            "min_dense_efficiency_T>=512": min((s["dense_efficiency"] for s in big), default=None),
            "median_dense_efficiency_T>=512": statistics.median([s["dense_efficiency"] for s in big])
            if big
            else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
