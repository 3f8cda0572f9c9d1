"""Offloaded generation from a quantized checkpoint vs the original: bytes read per token, tokens/s, exactness.

Quantizes the bundled tiny model (int4, group 64) into a temporary directory, then generates the same greedy
continuation with each checkpoint offloaded (default policy) and compares it with the checkpoint loaded whole.
One JSON line per checkpoint, then the ratios (quantized / original).

    python bench/bench_offload_quantized.py [--model moekit:tiny] [--bits 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import moekit
from moekit.compress.quantize import quantize
from moekit.generation import generate
from moekit.serve import load_offloaded, offload

PROMPT = "The history of the city begins"


def run(spec: str, label: str, tokens: int) -> dict:
    """Generate offloaded from ``spec``; check the tokens against the checkpoint loaded whole."""
    ref = generate(moekit.load(spec), PROMPT, max_new_tokens=tokens)
    lm = load_offloaded(spec)
    with offload(lm) as engine:
        t0 = time.perf_counter()
        got = generate(lm, PROMPT, max_new_tokens=tokens)
        seconds = time.perf_counter() - t0
        stats = engine.stats()
    return {"model": label, "exact": got.token_ids == ref.token_ids, "expert_bytes_in_cache": stats["expert_bytes"],
            "bytes_read_per_token": round(stats["bytes_read_per_token"]), "tokens_per_s": round(stats["tokens_per_s"], 1),
            "decode_hit_rate": round(stats["decode_hit_rate"], 3), "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moekit:tiny")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quantized"
        quantize(moekit.load(args.model), bits=args.bits, group_size=args.group_size, out=out)
        base = run(args.model, args.model, args.tokens)
        quant = run(str(out), f"{args.model} int{args.bits} g{args.group_size}", args.tokens)
    for row in (base, quant):
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": True,
                      "bytes_read_ratio": round(quant["bytes_read_per_token"] / base["bytes_read_per_token"], 3),
                      "tokens_per_s_ratio": round(quant["tokens_per_s"] / base["tokens_per_s"], 3),
                      "exact": base["exact"] and quant["exact"]}))


if __name__ == "__main__":
    main()
