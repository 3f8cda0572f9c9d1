"""The int4 decode kernel alone, against the streaming-read rate: bytes of expert weights it streams per second for
one decode step's products (k active experts of an OLMoE-shaped bank), with int8 activations (AVX512-VNNI) and with
float activations (the bf16 / fp32 loops), beside the int8, bf16 and fp16 kernels on the same shape (fp16 has no dot
instruction here: ``vcvtph2ps`` + FMA, so its row shows what that conversion costs against the bandwidth).

Several banks are cycled so that no call finds its weights in the (large, shared) L3. One JSON line per
measurement, then a summary line. Time is wall clock, the median of ``--repeats`` passes over the banks.

    python bench/bench_int4_kernel.py                          # 1 and 2 threads, gate;up shape [64, 2048, 2048], k=8
    python bench/bench_int4_kernel.py --threads 1 --group-size 64 --cols 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moekit.formats.quantized import quantize_matrix
from moekit.nn import cpu_kernels, cpu_kernels_int4
from moekit.nn.int8_experts import quantize_rows_int8


def stream_read_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """Best streaming-read rate (GB/s) of torch's ``sum`` over a buffer far larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def int4_bank(experts: int, rows: int, cols: int, group_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A random packed int4 bank (codes, fp16 scales, uint8 zeros) in moekit's codec: one expert quantized and
    repeated with shifted codes (quantizing every expert would take minutes; the kernel's work does not depend on
    the values)."""
    g = torch.Generator().manual_seed(seed)
    qt = quantize_matrix(torch.randn(rows, cols, generator=g), 4, group_size)
    q = torch.stack([(qt.qweight + e) for e in range(experts)])  # uint8 wraps: other (valid) code pairs
    return q.contiguous(), qt.scales.expand(experts, -1, -1).contiguous(), qt.zeros.expand(experts, -1, -1).contiguous()


def timed(call, passes: int, repeats: int) -> float:
    """Median wall seconds of one pass (``passes`` calls, one per bank; ``call(bank, rep)``: each repeat takes the
    next k experts of every bank, so a call's weights were last read ``E / k`` passes ago, not in the L3)."""
    call(0, 0)
    times = []
    for rep in range(1, repeats + 1):
        t0 = time.perf_counter()
        for b in range(passes):
            call(b, rep)
        times.append((time.perf_counter() - t0) / passes)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--banks", type=int, default=6, help="int4 banks cycled (each experts x rows x cols / 2 bytes)")
    ap.add_argument("--repeats", type=int, default=7, help="passes; the median is reported (each on other experts)")
    ap.add_argument("--no-float", action="store_true", help="skip the int8, bf16 and fp16 kernels")
    args = ap.parse_args()
    e, r, c, k = args.experts, args.rows, args.cols, args.top_k
    banks4 = [int4_bank(e, r, c, args.group_size, seed) for seed in range(args.banks)]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, c, generator=g).bfloat16()
    perms = [torch.randperm(e, generator=g) for _ in range(args.banks)]

    def ids(b: int, rep: int) -> torch.Tensor:  # repeat rep: the rep-th k experts of bank b's permutation
        return perms[b].roll(-k * rep)[:k].reshape(1, k)

    bytes4 = k * (r * c // 2 + 3 * r * (c // args.group_size))
    rows_out = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        gbps = stream_read_gbps()
        row = {"threads": threads, "stream_read_GBps": round(gbps, 2)}
        for name, acts in (("int4_vnni", "int8"), ("int4_float", "float")):
            path = cpu_kernels_int4.kernel_path(args.group_size, x.dtype, acts)
            sec = timed(lambda b, rep, acts=acts: cpu_kernels_int4.expert_gemv_int4(x, *banks4[b], ids(b, rep), acts),
                        args.banks, args.repeats)
            rate = bytes4 / sec / 1e9
            print(json.dumps({"kind": "kernel", "kernel": name, "path": path, "threads": threads,
                              "GBps": round(rate, 2), "of_stream": round(rate / gbps, 3),
                              "G_weights_per_s": round(k * r * c / sec / 1e9, 2), "us_per_call": round(sec * 1e6, 1)}))
            row[name + "_of_stream"] = round(rate / gbps, 3)
            row[name + "_us"] = round(sec * 1e6, 1)
        if not args.no_float:
            nb = max(2, args.banks // 3)
            for name in ("int8_vnni", "bf16", "fp16"):
                if name == "int8_vnni":
                    w8 = [quantize_rows_int8(torch.randn(e, r, c, generator=g).bfloat16()) for _ in range(nb)]
                    call = lambda b, rep, w8=w8: cpu_kernels.expert_gemv(x, w8[b][0], ids(b, rep), w8[b][1], "int8")  # noqa: E731
                    nbytes = k * r * c * 1
                else:
                    dtype = torch.bfloat16 if name == "bf16" else torch.float16
                    wb = [torch.randn(e, r, c, generator=g).to(dtype) for _ in range(nb)]
                    xf = x.to(dtype)
                    call = lambda b, rep, wb=wb, xf=xf: cpu_kernels.expert_gemv(xf, wb[b], ids(b, rep))  # noqa: E731
                    nbytes = k * r * c * 2
                sec = timed(call, nb, args.repeats)
                rate = nbytes / sec / 1e9
                print(json.dumps({"kind": "kernel", "kernel": name, "threads": threads, "GBps": round(rate, 2),
                                  "of_stream": round(rate / gbps, 3), "us_per_call": round(sec * 1e6, 1)}))
                row[name + "_of_stream"] = round(rate / gbps, 3)
                del call
        row["int4_vnni_vs_float"] = round(row["int4_float_us"] / row["int4_vnni_us"], 3)
        rows_out.append(row)
    print(json.dumps({"kind": "summary", "shape": [e, r, c], "top_k": k, "group_size": args.group_size,
                      "rows": rows_out}))


if __name__ == "__main__":
    main()
