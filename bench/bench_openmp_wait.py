"""How the OpenMP wait policy changes torch CPU op times, on a quiet machine and beside one busy process.

libgomp reads its wait policy when torch loads, so every policy runs in its own child process. Each child
times matmuls of a few sizes (bf16 and fp32, median of many calls) and a forward of the bundled tiny model;
the parent runs the policies in interleaved rounds (A, B, C, A, B, C, ...: load from elsewhere hits all alike)
and prints one JSON line per (load, policy, op) with the median over rounds, then ratios against moekit's
choice (``GOMP_SPINCOUNT=1000``, see ``moekit.openmp``).

    python bench/bench_openmp_wait.py            # ~4 minutes
    python bench/bench_openmp_wait.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = {
    "torch default (long spin)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=1000 (moekit)": {"GOMP_SPINCOUNT": "1000"},
}
REFERENCE = "GOMP_SPINCOUNT=1000 (moekit)"


def child(threads: int, repeats: int) -> None:
    """Time the ops in this process (its OpenMP policy is fixed) and print one JSON object."""
    import torch

    import moekit
    from moekit.testing import random_batch

    torch.set_num_threads(threads)

    def median_us(fn, n: int) -> float:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return round(statistics.median(samples) * 1e6, 1)

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 8, 128, 1024):
            x = torch.randn(rows, 512).to(dtype)
            w = torch.randn(512, 2048).to(dtype)
            out[f"matmul {rows}x512x2048 {str(dtype).removeprefix('torch.')}"] = median_us(
                lambda x=x, w=w: x @ w, repeats if rows <= 128 else max(5, repeats // 10)
            )
    lm = moekit.load("moekit:tiny")
    batch = random_batch(lm.model.config.vocab_size, batch=4, seq=128, seed=0)
    with torch.no_grad():
        out["tiny model forward 4x128"] = median_us(lambda: lm.model(**batch), max(5, repeats // 10))
    print(json.dumps(out))


def busy_processes(count: int) -> list[subprocess.Popen]:
    """Processes that each keep a core busy (pure Python, no OpenMP), as other users' jobs would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads in the children")
    parser.add_argument("--repeats", type=int, default=100, help="calls per small op (big ops: a tenth)")
    parser.add_argument("--rounds", type=int, default=3, help="child runs per (load, policy), interleaved")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.threads, args.repeats)
        return 0
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    print(json.dumps({"kind": "env", "threads": args.threads, "cpus": os.cpu_count(),
                      "loadavg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    results: dict[tuple[str, str], dict[str, float]] = {}
    loads = {"quiet": 0, "1 busy process": 1, f"{os.cpu_count()} busy processes": os.cpu_count() or 1}
    for load, hogs in loads.items():
        busy = busy_processes(hogs)
        try:
            runs: dict[str, list[dict[str, float]]] = {policy: [] for policy in POLICIES}
            for _ in range(args.rounds):
                for policy, env in POLICIES.items():
                    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads),
                           "--repeats", str(args.repeats)]
                    done = subprocess.run(cmd, env={**base_env, **env}, capture_output=True, text=True, timeout=600)
                    if done.returncode != 0:
                        print(done.stderr, file=sys.stderr)
                        return 1
                    runs[policy].append(json.loads(done.stdout.strip().splitlines()[-1]))
            for policy, samples in runs.items():
                times = {op: round(statistics.median(s[op] for s in samples), 1) for op in samples[0]}
                results[(load, policy)] = times
                for op, us in times.items():
                    print(json.dumps({"kind": "time", "load": load, "policy": policy, "op": op, "us": us}),
                          flush=True)
        finally:
            for proc in busy:
                proc.kill()
    for (load, policy), times in results.items():
        ref = results[(load, REFERENCE)]
        ratios = {op: round(us / ref[op], 2) for op, us in times.items()}
        print(json.dumps({"kind": "ratio_vs_moekit", "load": load, "policy": policy, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
