"""Distributed moekit on CPU processes (gloo), side by side with one process, and expert-placement traffic.

1. placement: plan on the bundled corpus' validation split, simulate on the test split (held out), for the
   bundled models and a real-shape random model (OLMoE's 64 experts, top-8, 16 MoE layers); every method at
   2, 4 and 8 ranks: all-to-all transfers per token (standard and ExFlow-coherent) and load max/mean.
2. data-parallel tracing: ``moekit trace`` work (tokens/s, model loading excluded) in one process (default
   threads) vs torchrun with 2 and 4 ranks (1 thread each); the merged trace is checked against the
   one-process trace (same ids).
3. expert-parallel layer: forward + backward tokens/s of ``MoELayer`` in one process vs its experts sharded on 2
   and 4 ranks (``ExpertParallelBank``, tokens exchanged with all_to_all_single), and bytes sent to other
   ranks per token.

Prints one JSON line per measurement and a final summary line. Run it under the bench lock; on a 2-core
machine 4 ranks oversubscribe the cores, so their times say what the exchange costs, not what 4 machines gain.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moekit.openmp import configure_openmp_wait

configure_openmp_wait()  # as the CLI does: idle OpenMP threads must not spin on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int, env_extra: dict | None = None) -> None:
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MOEKIT_DIST_TIMEOUT="300", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), __file__, *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


# ----- workers (run under torchrun, or alone for the one-process side) -------------------------------------

def worker_trace(out: str, max_tokens: int) -> None:
    import moekit
    from moekit.data import read_documents
    from moekit.distributed import runtime
    from moekit.distributed.data_parallel import trace_documents_dp
    from moekit.routing.tracing import trace_documents

    world = runtime.init()
    lm = moekit.load("moekit:tiny")
    docs = read_documents(["moekit:corpus:test"])
    kw = dict(max_tokens=max_tokens, seq_len=256, batch_size=8, progress=False)
    if world is not None:
        runtime.barrier(world)
    t0 = time.perf_counter()
    trace = trace_documents_dp(lm, docs, world, **kw) if world else trace_documents(lm, docs, **kw)
    if world is not None:
        runtime.barrier(world)
    seconds = time.perf_counter() - t0
    if world is None or world.is_main:
        trace.save(out + ".trace")
        Path(out + ".json").write_text(json.dumps({"seconds": seconds, "tokens": trace.num_tokens,
                                                   "threads": torch.get_num_threads()}))
    runtime.shutdown()


def worker_ep(out: str, tokens: int, steps: int) -> None:
    import torch.distributed as dist

    from moekit.distributed import runtime
    from moekit.nn import MoELayer, shard_experts

    world = runtime.init()
    hidden, inter, experts, k = 256, 512, 16, 2
    torch.manual_seed(0)
    layer = MoELayer(hidden, inter, experts, k, num_shared=0).train()
    size = world.size if world else 1
    rank = world.rank if world else 0
    if world is not None:
        shard_experts(layer)
    x_all = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    share = tokens // size
    x = x_all[rank * share:(rank + 1) * share].clone().requires_grad_()
    exchanged = 0

    def step() -> None:
        nonlocal exchanged
        y = layer(x)
        y.square().mean().backward()
        if world is not None:
            exchanged += layer.experts.last_exchange
    step()  # warm-up
    exchanged = 0
    if world is not None:
        runtime.barrier(world)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if world is not None:
        runtime.barrier(world)
    seconds = time.perf_counter() - t0
    rows = torch.tensor([exchanged], dtype=torch.float64)
    if world is not None:
        dist.all_reduce(rows)
    if rank == 0:
        # every row sent away comes back as an output row, in the forward and again in the backward
        bytes_fwd = float(rows) * 2 * hidden * 4 / (steps * tokens)
        Path(out + ".json").write_text(json.dumps({"seconds": seconds, "tokens": tokens * steps,
                                                   "threads": torch.get_num_threads(),
                                                   "bytes_per_token_forward": bytes_fwd,
                                                   "bytes_per_token_train": 2 * bytes_fwd}))
    runtime.shutdown()


# ----- the parts -------------------------------------------------------------------------------------------

def placement_part(max_tokens: int) -> list[dict]:
    import moekit
    from moekit.data import read_documents
    from moekit.distributed.placement import PLACEMENTS, plan, simulate
    from moekit.models import from_model
    from moekit.routing.tracing import trace_documents
    from moekit.testing import tiny_model

    val, test = read_documents(["moekit:corpus:validation"]), read_documents(["moekit:corpus:test"])
    tok = moekit.load("moekit:tiny").tokenizer
    real_shape = tiny_model("olmoe", vocab_size=len(tok), hidden_size=64, num_hidden_layers=16, num_experts=64,
                            num_experts_per_tok=8, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4)
    models = [("moekit:tiny", moekit.load("moekit:tiny")), ("moekit:tiny-shared", moekit.load("moekit:tiny-shared")),
              ("random olmoe-shape 64x8x16", from_model(real_shape, tokenizer=tok, name="olmoe-shape"))]
    rows = []
    for name, lm in models:
        t_plan = trace_documents(lm, val, max_tokens=max_tokens, progress=False)
        t_test = trace_documents(lm, test, max_tokens=max_tokens, progress=False)
        for ranks in (2, 4, 8):
            if any(e % ranks for e in t_test.num_experts):
                continue
            for method in PLACEMENTS.names():
                row = simulate(t_test, plan(t_plan, ranks, method, seed=0))
                row = {"part": "placement", "model": name, **row}
                emit({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
                rows.append(row)
    return rows


def trace_part(max_tokens: int, tmp: Path) -> list[dict]:
    from moekit.trace import RoutingTrace

    rows = []
    ref = None
    for nproc, threads in ((1, None), (1, "1"), (2, None), (4, None)):
        out = str(tmp / f"trace{nproc}-{threads}")
        _run(["--worker", "trace", out, str(max_tokens)], nproc, {"OMP_NUM_THREADS": threads} if threads else None)
        r = json.loads(Path(out + ".json").read_text())
        t = RoutingTrace.load(out + ".trace")
        ref = t if ref is None else ref
        row = {"part": "dp_trace", "processes": nproc, "threads_per_process": r["threads"], "tokens": r["tokens"],
               "seconds": round(r["seconds"], 3), "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
               "same_ids_as_one_process": bool(np.array_equal(t.ids, ref.ids))}
        emit(row)
        rows.append(row)
    return rows


def ep_part(tokens: int, steps: int, tmp: Path) -> list[dict]:
    rows = []
    for nproc, threads in ((1, None), (1, "1"), (2, None), (4, None)):
        out = str(tmp / f"ep{nproc}-{threads}")
        _run(["--worker", "ep", out, str(tokens), str(steps)], nproc, {"OMP_NUM_THREADS": threads} if threads else None)
        r = json.loads(Path(out + ".json").read_text())
        row = {"part": "ep_layer", "processes": nproc, "threads_per_process": r["threads"], "tokens": r["tokens"], "seconds": round(r["seconds"], 3),
               "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
               "bytes_per_token_forward": round(r["bytes_per_token_forward"], 1),
               "bytes_per_token_train": round(r["bytes_per_token_train"], 1)}
        emit(row)
        rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        mode, out, *rest = sys.argv[2:]
        if mode == "trace":
            worker_trace(out, int(rest[0]))
        else:
            worker_ep(out, int(rest[0]), int(rest[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and steps")
    ap.add_argument("--parts", default="placement,trace,ep", help="comma-separated parts to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    summary: dict = {"summary": True, "cpu_cores": os.cpu_count(), "gpu": torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "placement" in parts:
            rows = placement_part(8000 if args.quick else 20000)
            table = {}
            for r in rows:
                table.setdefault(f"{r['model']} R={r['ranks']}", {})[r["method"]] = [
                    round(r["coherent_transfers_per_token"], 2), round(r["a2a_transfers_per_token"], 2),
                    round(r["imbalance_mean"], 3)]
            summary["placement_coherent_a2a_imbalance"] = table
        if "trace" in parts:
            rows = trace_part(4000 if args.quick else 20000, tmp)
            summary["dp_trace_tokens_per_s"] = {f"{r['processes']}x{r['threads_per_process']}t": r["tokens_per_s"]
                                                for r in rows}
            summary["dp_trace_same_ids"] = all(r["same_ids_as_one_process"] for r in rows)
        if "ep" in parts:
            rows = ep_part(2048 if args.quick else 8192, 2 if args.quick else 5, tmp)
            summary["ep_layer_tokens_per_s"] = {f"{r['processes']}x{r['threads_per_process']}t": r["tokens_per_s"]
                                                for r in rows}
            summary["ep_bytes_per_token_forward"] = {r["processes"]: r["bytes_per_token_forward"] for r in rows}
    emit(summary)


if __name__ == "__main__":
    main()
