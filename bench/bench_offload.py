"""Offloaded generation: tokens/s per policy, hit rates, misses against Belady, peak RSS.

(i) Bandwidth: a medium random qwen3_moe whose experts dominate its size (16 layers x 64 experts,
top-8, H=512, I=320, fp32: 2.0 GB of experts, built once in ``.work/bench-offload-model``).  Each
configuration runs in a fresh process: all in memory; on demand without a cache, one read at a time
(``none-seq``) and with 2 I/O threads (``none``); LRU; the default (``lru+prefetch``); the default
prefetching only each token's 2 most confident predictions; a cache of 2·k = 16 experts per layer.  Expert reads bypass the page
cache (posix_fadvise DONTNEED), so misses are real storage reads.  Decode tokens/s is measured on
model forwards after the prompt; peak RSS is VmHWM minus the process's own baseline (Python, torch
and transformers imported, no model), compared with non-expert weights + cache budget + 10%.
Random routers route near-uniformly, so (ii) hit rates come from the bundled trained models (a tiny
random model stands in while they are missing): every policy at 2·k slots, the static policy's
profile taken from different prompts than the evaluation (no leakage), misses vs Belady's MIN.

Usage: ``python bench/bench_offload.py [--quick]``.  One JSON line per measurement, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".work" / "bench-offload-model"
MEDIUM = dict(hidden_size=512, moe_intermediate_size=320, intermediate_size=1024, num_experts=64,
              num_experts_per_tok=8, num_hidden_layers=16, mlp_only_layers=[], head_dim=64,
              num_attention_heads=8, num_key_value_heads=2, norm_topk_prob=True, max_position_embeddings=1024)
# name → (policy, offload options); "none-seq" is the plainest on-demand fetch (one read at a time);
# the others read a forward's misses on 2 I/O threads while computing what is resident.
CONFIGS = {"none-seq": ("none", {"io_threads": 0}), "none": ("none", {}), "lru": ("lru", {}),
           "lru+prefetch": ("lru+prefetch", {}), "lru+prefetch-top2": ("lru+prefetch", {"prefetch_top": 2})}
PROMPT = "The history of the expert cache begins with"
EVAL_PROMPTS = ["Mixture of experts models route each token", "def fibonacci(n):\n    ", "The weather today is",
                "In 1905, Einstein published"]
PROFILE_PROMPTS = ["Once upon a time there was", "import numpy as np\n", "The capital of France is",
                   "Large language models are"]


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build_medium() -> Path:
    """Write the medium random checkpoint once (fused expert banks under the model's own names)."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    from safetensors.torch import save_file

    from moekit.data import load_tokenizer
    from moekit.testing import tiny_model

    tok = load_tokenizer()
    model = tiny_model("qwen3_moe", seed=0, vocab_size=len(tok), **MEDIUM)
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
             not model.config.tie_word_embeddings}
    del model
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del state
    for f in tmp.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    os.replace(tmp, MODEL_DIR)
    return MODEL_DIR


class DecodeTimer:
    """Wall time of the model forwards that process one token (decode), and of the others (prefill)."""

    def __init__(self, model) -> None:
        self.decode_s = self.prefill_s = 0.0
        self.decode_tokens = 0
        self._h = [model.register_forward_pre_hook(self._pre, with_kwargs=True), model.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._n = int(ids.shape[-1])
        self._t = time.perf_counter()

    def _post(self, module, args, out) -> None:
        dt = time.perf_counter() - self._t
        if self._n == 1:
            self.decode_s += dt
            self.decode_tokens += 1
        else:
            self.prefill_s += dt

    def close(self) -> None:
        for h in self._h:
            h.remove()


def run_one(config: str, tokens: int) -> dict:
    """One bandwidth configuration, in this (fresh) process."""
    import torch  # noqa: F401
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import moekit
    from moekit.generation import generate
    from moekit.serve import load_offloaded, offload

    base = vm_rss()  # baseline: Python, torch, transformers and moekit loaded; no model
    t0 = time.perf_counter()
    if config == "memory":
        lm = moekit.load(MODEL_DIR)
        engine_ctx = None
    else:
        lm = load_offloaded(MODEL_DIR, bypass_page_cache=True)  # every miss a storage read
        k = max(v.top_k for v in lm.moe)
        policy, options = CONFIGS[config]
        engine_ctx = offload(lm, policy=policy, slots=2 * k, bypass_page_cache=True, **options)
    load_s = time.perf_counter() - t0
    dense_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters() if not p.is_meta)
    dense_bytes += sum(b.numel() * b.element_size() for b in lm.model.buffers() if not b.is_meta)
    timer = DecodeTimer(lm.model)
    stats = None
    if engine_ctx is None:
        res = generate(lm, PROMPT, max_new_tokens=tokens)
    else:
        with engine_ctx as engine:
            res = generate(lm, PROMPT, max_new_tokens=tokens)
            stats = engine.stats()
    timer.close()
    peak = vm_hwm() - base
    out = {"bench": "offload_bandwidth", "config": config, "tokens": len(res.token_ids),
           "decode_tokens_per_s": timer.decode_tokens / timer.decode_s if timer.decode_s else None,
           "prefill_s": round(timer.prefill_s, 3), "load_s": round(load_s, 2),
           "token_ids_head": res.token_ids[:8], "token_ids": res.token_ids,
           "baseline_rss_mb": round(base / 2**20, 1), "peak_rss_above_baseline_mb": round(peak / 2**20, 1),
           "resident_non_expert_mb": round(dense_bytes / 2**20, 1)}
    if stats is not None:
        out.update({
            "cache_mb": round(stats["cache_bytes"] / 2**20, 1), "slots_per_layer": stats["slots_per_layer"],
            "hit_rate": stats["hit_rate"], "decode_hit_rate": stats["decode_hit_rate"], "misses": stats["misses"],
            "bytes_read_per_token_mb": round((stats["bytes_read_per_token"] or 0) / 2**20, 2),
            "stall_s": stats["stall_s"], "prefetch": stats.get("prefetch"), "belady": stats.get("belady"),
            "rss_limit_mb": round((dense_bytes + stats["cache_bytes"]) * 1.1 / 2**20, 1),
        })
        out["rss_within_limit"] = peak <= (dense_bytes + stats["cache_bytes"]) * 1.1
    return out


def hit_rates(quick: bool, multipliers: tuple[float, ...] = (2.0,)) -> list[dict]:
    """Every policy at C = m·k slots per layer (each m) on the bundled models (or a tiny random stand-in);
    decode misses against Belady's MIN replayed on the same requests (``moekit.analysis.cache``)."""
    import tempfile

    import numpy as np

    from moekit.generation import generate
    from moekit.models.loading import bundled_names
    from moekit.serve import POLICIES, load_offloaded, offload
    from moekit.testing import save_tiny_checkpoint

    specs = bundled_names()
    label = {s: "trained" for s in specs}
    if not specs:
        tmp = Path(tempfile.mkdtemp())
        specs = [str(save_tiny_checkpoint("qwen3_moe", tmp / "tiny-random"))]
        label = {specs[0]: "random (bundled models missing)"}
    n_new = 24 if quick else 64
    lines = []
    for spec in specs:
        lm = load_offloaded(spec, bypass_page_cache=True)
        k = max(v.top_k for v in lm.moe)
        E = max(v.num_experts for v in lm.moe)
        # static profile: decode routing on other prompts (an LRU run records the requests)
        with offload(lm, policy="lru", slots=2 * k, bypass_page_cache=True) as eng:
            for p in PROFILE_PROMPTS:
                generate(lm, p, max_new_tokens=n_new)
            profile = {li: np.bincount(log.array()[log.array() >= 0], minlength=E) for li, log in eng.logs.items()}
        for m in multipliers:
            slots = min(max(k, int(m * k)), E)
            for policy in POLICIES.names():
                if policy == "none" and m != multipliers[0]:
                    continue
                with offload(lm, policy=policy, slots=slots, profile=profile if policy == "static" else None,
                             bypass_page_cache=True) as eng:
                    for p in EVAL_PROMPTS:
                        generate(lm, p, max_new_tokens=n_new)
                    s = eng.stats()
                b = s.get("belady") or {}
                lines.append({
                    "bench": "offload_hit_rate", "model": spec, "weights": label[spec], "policy": policy,
                    "experts": E, "top_k": k, "slots_per_layer": slots, "layer_slots": s["layer_slots"],
                    "decode_tokens": s["decode_tokens"], "hit_rate": s["hit_rate"],
                    "decode_hit_rate": s["decode_hit_rate"], "decode_misses": s["decode_misses"],
                    "belady_misses_warm": b.get("belady_misses_warm"),
                    "miss_ratio_to_belady": b.get("miss_ratio_to_belady"),
                    "fetch_ratio_to_belady": b.get("fetch_ratio_to_belady"),
                    "belady_misses_cold": b.get("belady_misses_cold"),
                    "simulated_lru_misses_cold": b.get("simulated_lru_misses_cold"),
                    "prefetch_precision": (s.get("prefetch") or {}).get("precision"),
                    "predictor_recall": (s.get("prefetch") or {}).get("predictor_recall"),
                })
                print(json.dumps(lines[-1]), flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens (about 3 minutes on an idle 2-core box)")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per bandwidth run")
    ap.add_argument("--skip-bandwidth", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch compute threads (default 1: one compute + one I/O thread, as in the protocol)")
    ap.add_argument("--sizes", default="2",
                    help="cache sizes of the hit-rate runs as multiples of k, comma-separated (e.g. 1.5,2,3)")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    tokens = args.tokens or (12 if args.quick else 32)
    if args.run_one:
        print(json.dumps(run_one(args.run_one, tokens)), flush=True)
        return
    t_start = time.time()
    band: dict[str, dict] = {}
    if not args.skip_bandwidth:
        build_medium()
        for config in ("memory", *CONFIGS):
            proc = subprocess.run([sys.executable, __file__, "--run-one", config, "--tokens", str(tokens),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                print(json.dumps({"bench": "offload_bandwidth", "config": config, "error": proc.stderr[-1500:]}))
                continue
            line = json.loads(proc.stdout.strip().splitlines()[-1])
            band[config] = line
            print(json.dumps({k: v for k, v in line.items() if k != "token_ids"}), flush=True)
    hits = hit_rates(args.quick, tuple(float(m) for m in args.sizes.split(",")))
    summary: dict = {"bench": "offload_summary", "seconds": round(time.time() - t_start, 1),
                     "load_average": os.getloadavg(), "cpus": os.cpu_count(), "torch_threads": args.threads}
    if band:
        tps = {c: band[c]["decode_tokens_per_s"] for c in band}
        summary["decode_tokens_per_s"] = tps
        if tps.get("none") and tps.get("lru+prefetch"):
            summary["default_over_on_demand"] = tps["lru+prefetch"] / tps["none"]
            summary["target_default_over_on_demand_1.8x"] = summary["default_over_on_demand"] >= 1.8
        if tps.get("none-seq") and tps.get("lru+prefetch"):
            summary["default_over_sequential_on_demand"] = tps["lru+prefetch"] / tps["none-seq"]
        if tps.get("lru") and tps.get("lru+prefetch"):
            summary["default_over_lru"] = tps["lru+prefetch"] / tps["lru"]
        if "memory" in band:
            summary["exact_vs_memory"] = {c: band[c]["token_ids"] == band["memory"]["token_ids"] for c in band}
        if "lru+prefetch" in band:
            d = band["lru+prefetch"]
            summary["rss_default_mb"] = d["peak_rss_above_baseline_mb"]
            summary["rss_limit_mb"] = d.get("rss_limit_mb")
            summary["rss_within_limit"] = d.get("rss_within_limit")
    trained = [h for h in hits if h["policy"] == "lru+prefetch" and h["slots_per_layer"] == 2 * h["top_k"]]
    if trained:
        summary["miss_ratio_to_belady"] = {h["model"]: h["miss_ratio_to_belady"] for h in trained}
        summary["fetch_ratio_to_belady"] = {h["model"]: h["fetch_ratio_to_belady"] for h in trained}
    lru = [h for h in hits if h["policy"] == "lru" and h["slots_per_layer"] == 2 * h["top_k"]]
    if lru:
        summary["lru_miss_ratio_to_belady"] = {h["model"]: h["miss_ratio_to_belady"] for h in lru}
    table: dict = {}  # model -> policy -> {slots: decode misses / Belady}
    for h in hits:
        if h["miss_ratio_to_belady"] is not None:
            table.setdefault(h["model"], {}).setdefault(h["policy"], {})[h["slots_per_layer"]] = round(
                h["miss_ratio_to_belady"], 3)
    summary["misses_over_belady"] = table
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
