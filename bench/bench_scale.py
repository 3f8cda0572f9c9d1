"""Real-size checkpoints: every command on OLMoE-1B-7B (13.8 GB bf16) and DeepSeek-V2-Lite (31 GB bf16) shapes
within a memory budget, side by side with what a user would pick instead.

Models: random bf16 weights in the published configs (allenai/OLMoE-1B-7B-0924, deepseek-ai/DeepSeek-V2-Lite),
written tensor by tensor in the Hugging Face on-disk layout (per-expert tensors, 2 GB shards) with the bundled
tokenizer, once, under ``--models-dir`` (default /work/.bench-models); ``--clean`` deletes them.

Each command runs in a fresh process; peak RSS is sampled with psutil every 20 ms (process tree); ``serve`` is
started, sent one completion of ``--gen-tokens`` tokens once it answers, and stopped. Alternatives in
the same run: plain transformers bf16 in memory (only where the model fits this machine's free memory) and
accelerate's disk offload (``device_map="auto", max_memory={"cpu": budget}, offload_folder``) at the same budget.
Random routers route almost uniformly: their hit rates are a floor; the bundled trained models' are printed too.

``--enforce-memory``: every process that is given the budget (moekit's commands, accelerate) and transformers in
memory run each in a fresh memory cgroup limited to the budget + ``--enforce-margin`` (10%), which counts the page
cache the process reads as well as its own memory (``bench/memlimit.py``); the checkpoint is dropped from the page
cache before each such run, so every tool starts cold and pays its own reads. The rows say ``enforced: true``, the
cgroup's limit, peak usage, how often the limit was hit (``cgroup_failcnt``) and OOM kills. ``--also-unenforced``
runs the unenforced rows too, in the same session.

Usage: ``python bench/bench_scale.py [--models olmoe,dsv2lite] [--clean] [--skip-alternatives] [--enforce-memory]``.
One JSON line per measurement, then a summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import memlimit  # bench/memlimit.py (this script's folder is first on sys.path)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# every process (moekit and the alternatives) gets the short OpenMP spin moekit sets (moekit.openmp)
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false", "GOMP_SPINCOUNT": "1000"}

OLMOE = dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
             max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
             tie_word_embeddings=False, clip_qkv=None, router_aux_loss_coef=0.01, pad_token_id=1, eos_token_id=50279)
DSV2LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                moe_layer_freq=1, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
                norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                 "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "mscale": 0.707, "mscale_all_dim": 0.707},
                bos_token_id=100000, eos_token_id=100001)
MODELS = {"olmoe": ("olmoe-1b-7b", OLMOE, "6GB"), "dsv2lite": ("deepseek-v2-lite", DSV2LITE, "8GB"),
          # a smoke test of this script (seconds): OLMoE's shape scaled down
          "smoke": ("olmoe-smoke", {**OLMOE, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
                                    "num_experts": 16, "vocab_size": 8192}, "900MB")}
PROMPT = "The history of the expert cache begins with"
GEN_TOKENS = 8
MERGE_RATIO = 0.5  # the merged checkpoint keeps 1 - ratio of the experts: its size on disk
MIN_FREE_DISK = 6e9  # accelerate's offload folder (re-saved fused experts) is stopped before the disk fills
CALIB_TOKENS = 256


# ----- building the checkpoints -------------------------------------------------------------------------
def build(path: Path, cfg: dict) -> None:
    """Write a random bf16 checkpoint of ``cfg`` tensor by tensor (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from moekit.data import load_tokenizer
    from moekit.io import atomic_output_dir
    from moekit.models.loading import bank_keys, skeleton

    hf_logging.set_verbosity_error()
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.dtype = torch.bfloat16
    with atomic_output_dir(path, force=True) as tmp:
        config.save_pretrained(tmp)
        model = skeleton(tmp, torch.bfloat16)  # meta parameters: shapes only
        banks = {k: (li, p) for li, d in bank_keys(model).items() for p, k in d.items()}
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
        del model
        gen = torch.Generator().manual_seed(0)
        shards, buf, size = [], {}, 0

        def add(name, shape, dtype, kind):
            nonlocal buf, size
            t = torch.empty(shape, dtype=dtype)
            if kind == "norm":
                t.fill_(1.0)
            elif kind == "zero":
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
            buf[name] = t
            size += t.numel() * t.element_size()
            if size >= 2 << 30:
                flush()

        def flush():
            nonlocal buf, size
            if buf:
                save_file(buf, str(tmp / f"part-{len(shards):05d}.tmp"), metadata={"format": "pt"})
                shards.append(list(buf))
                buf, size = {}, 0

        total = sum(1 for _ in shapes)
        for i, (key, (shape, dtype)) in enumerate(shapes.items()):
            print(f"\rbuilding {path.name}: tensor {i + 1}/{total}", end="", file=sys.stderr, flush=True)
            if key in banks:  # the on-disk layout: per-expert tensors (what save_pretrained writes)
                base = key.rsplit(".", 1)[0]
                E = shape[0]
                for e in range(E):
                    if key.endswith("gate_up_proj"):
                        half = shape[1] // 2
                        add(f"{base}.{e}.gate_proj.weight", (half, shape[2]), dtype, "w")
                        add(f"{base}.{e}.up_proj.weight", (half, shape[2]), dtype, "w")
                    else:
                        add(f"{base}.{e}.down_proj.weight", shape[1:], dtype, "w")
                continue
            kind = "norm" if ("norm" in key and key.endswith("weight")) else \
                "zero" if key.endswith(("bias", "e_score_correction_bias")) else "w"
            add(key, shape, dtype, kind)
        flush()
        print(file=sys.stderr)
        n = len(shards)
        weight_map = {}
        for i, names in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (tmp / f"part-{i:05d}.tmp").rename(tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        load_tokenizer().save_pretrained(tmp)


# ----- measuring one process ----------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


class Limit:
    """Where a measured process runs: unlimited (``limit=None``), or in a fresh memory cgroup of ``limit`` bytes after
    ``cold`` (files, folders) were dropped from the page cache. ``run(cmd)`` gives the argv and, once the process
    ended, ``record()`` the fields of its row."""

    def __init__(self, limit: int | None = None, cold: list[Path] = ()) -> None:
        self.limit, self.cold, self.cg, self.cached_before = limit, list(cold), None, None

    def argv(self, cmd: list[str]) -> list[str]:
        if self.limit is None:
            return cmd
        memlimit.evict(self.cold)
        self.cached_before = memlimit.cached_bytes(self.cold)
        self.cg = memlimit.MemoryCgroup(self.limit, "moekit-bench-scale")
        return self.cg.wrap(cmd)

    def close(self) -> None:
        """Remove the cgroup if ``record`` did not (the measurement stopped early); what still runs in it is killed."""
        if self.cg is not None:
            self.cg.remove()
            self.cg = None

    def record(self) -> dict:
        if self.cg is None:
            return {"enforced": False}
        st = self.cg.stats()
        self.cg.remove()
        self.cg = None
        return {"enforced": True, "cgroup": st["cgroup"], "limit_gb": round(st["limit_bytes"] / 1e9, 3),
                "cgroup_max_usage_gb": None if st["max_usage_bytes"] is None else round(st["max_usage_bytes"] / 1e9, 3),
                "cgroup_failcnt": st["failcnt"], "oom_kills": st["oom_kills"],
                "page_cache_at_start_gb": round(self.cached_before / 1e9, 3)}


def _failure(rec: dict) -> dict:
    """A failed run's row gets a one-line ``error`` instead of its stderr (no tracebacks in the JSON)."""
    if rec.get("rc") in (0, None):
        return rec
    if rec.get("oom_kills"):
        msg = f"killed by the OOM killer of its memory cgroup (limit {rec['limit_gb']} GB)"
    elif rec.get("timed_out_s"):
        msg = f"timed out after {rec['timed_out_s']} s"
    elif rec.get("stopped"):
        msg = f"stopped: {rec['stopped']}"
    else:
        lines = [ln.strip() for ln in (rec.get("stderr") or "").splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit code {rec.get('rc')}"
    return {**rec, "error": rec.get("error") or msg[:300]}


def measure(cmd: list[str], timeout: float = 3600, watch_dir: Path | None = None, min_free_disk: float = 0,
            limit: Limit | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS of its process tree (psutil, 20 ms), exit code, stdout.

    ``watch_dir``: also the peak bytes written under it (checked every second), and the run is stopped when the
    disk it is on has less than ``min_free_disk`` bytes free (accelerate's offload folder on a shared disk).
    ``limit``: run it in a memory cgroup (``Limit``); its numbers join the row."""
    limit = limit or Limit()
    try:
        return _measure(limit.argv(cmd), timeout, watch_dir, min_free_disk, limit)
    finally:
        limit.close()


def _measure(cmd: list[str], timeout: float, watch_dir: Path | None, min_free_disk: float, limit: Limit) -> dict:
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    ps, peak, timed_out = psutil.Process(proc.pid), 0, False
    out_chunks: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    err_chunks: list[str] = []
    err_reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    err_reader.start()
    disk_peak, disk_stop, next_disk = 0, False, 0.0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if time.perf_counter() - t0 > timeout and proc.poll() is None:
            proc.kill()
            timed_out = True
        if watch_dir is not None and time.perf_counter() >= next_disk:
            next_disk = time.perf_counter() + 1.0
            with contextlib.suppress(OSError):  # a file went away while listed
                disk_peak = max(disk_peak, _dir_bytes(watch_dir))
            if shutil.disk_usage(watch_dir.parent).free < min_free_disk and proc.poll() is None:
                proc.kill()
                disk_stop = True
        time.sleep(0.02)
    reader.join()
    err_reader.join()
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(peak / 1e9, 3), "rc": proc.returncode, **limit.record(),
            **({"timed_out_s": timeout} if timed_out else {}),
            **({"offload_folder_gb": round(disk_peak / 1e9, 2)} if watch_dir is not None else {}),
            **({"stopped": f"free disk below {min_free_disk / 1e9:.0f} GB"} if disk_stop else {}),
            "stdout": "".join(out_chunks), "stderr": "".join(err_chunks)[-600:]}


def measure_serve(argv: list[str], port: int, max_tokens: int, timeout: float = 1800, limit: Limit | None = None) -> dict:
    """Start ``moekit serve`` (``argv``) on ``port``, send one completion of ``max_tokens`` tokens once /health
    answers, then stop it: wall seconds to ready, the request's seconds and tokens/s, peak RSS of the server
    (psutil, 20 ms) from start to stop. ``limit``: as ``measure``'s."""
    limit = limit or Limit()
    try:
        return _measure_serve(limit.argv(argv), port, max_tokens, timeout, limit)
    finally:
        limit.close()


def _measure_serve(argv: list[str], port: int, max_tokens: int, timeout: float, limit: Limit) -> dict:
    import threading
    import urllib.request

    import psutil

    base = f"http://127.0.0.1:{port}"
    res: dict = {}

    def client():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        res["ready_s"] = round(time.perf_counter() - t0, 2)
        body = json.dumps({"model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        t1 = time.perf_counter()
        try:
            out = json.loads(urllib.request.urlopen(req, timeout=timeout).read())
            res["request_s"] = round(time.perf_counter() - t1, 2)
            res["completion_tokens"] = out["usage"]["completion_tokens"]
            res["tokens_s"] = round(res["completion_tokens"] / res["request_s"], 3)
            cache = json.loads(urllib.request.urlopen(base + "/metrics", timeout=60).read())["cache"]
            res["hit_rate"] = (cache or {}).get("hit_rate")  # None: the model was resident
        except (OSError, ValueError, KeyError, TypeError) as exc:
            res["error"] = str(exc)[:300]

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    ps, peak = psutil.Process(proc.pid), 0
    th = threading.Thread(target=client, daemon=True)
    th.start()
    while th.is_alive() and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        time.sleep(0.02)
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    ok = "error" not in res and "request_s" in res
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_gb": round(peak / 1e9, 3), "rc": 0 if ok else 1,
            **limit.record(), **res, **({} if ok else {"stderr": (err or "")[-600:]})}


def last_json(text: str) -> dict:
    """The JSON object printed last on stdout (commands print indented JSON)."""
    start = text.rfind("\n{\n") + 1 if "\n{\n" in text else text.find("{")
    try:
        return json.loads(text[start:])
    except ValueError:
        return {}


def emit(rec: dict) -> dict:
    rec = _failure({k: v for k, v in rec.items() if k not in ("stdout",)})
    rec.pop("stderr", None)
    print(json.dumps(rec), flush=True)
    return rec


_ALT = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, mode, budget, folder, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
kw = dict(dtype=torch.bfloat16)
if mode == "accelerate":
    kw.update(device_map="auto", max_memory={"cpu": budget}, offload_folder=folder)
model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
tok = AutoTokenizer.from_pretrained(path)
ids = tok("The history of the expert cache begins with", return_tensors="pt").input_ids
with torch.no_grad():
    t0 = time.perf_counter(); out = model(ids, use_cache=True); t1 = time.perf_counter()
    past, nxt, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(n - 1):
        t = time.perf_counter(); o = model(nxt, past_key_values=past, use_cache=True); times.append(time.perf_counter() - t)
        past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
print(json.dumps({"prefill_s": t1 - t0, "decode_tok_s": len(times) / sum(times)}))
"""


_ACC_NEED = r"""
import json, sys, torch
from accelerate import infer_auto_device_map
from moekit.models.loading import bank_keys, skeleton
from moekit.serve.placement import parse_size
model = skeleton(sys.argv[1], torch.bfloat16)
dm = infer_auto_device_map(model, max_memory={"cpu": parse_size(sys.argv[2])},
                           no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16)
banks = {k for d in bank_keys(model).values() for k in d.values()}
def place(key):
    return max(((n, d) for n, d in dm.items() if n == "" or key == n or key.startswith(n + ".")), key=lambda x: len(x[0]))[1]
out = {"disk": 0, "resaved": 0}
for k, t in model.state_dict().items():
    if place(k) == "disk":
        out["disk"] += t.numel() * t.element_size()
        out["resaved"] += t.numel() * t.element_size() if k in banks else 0
print(json.dumps(out))
"""


def accelerate_disk_need(path: Path, budget: str) -> dict:
    """What accelerate's ``device_map="auto"`` puts on disk at ``budget`` (its own planner on the meta model), and the
    part it re-saves into the offload folder: the routed-expert banks, which transformers fuses while loading, so
    they cannot be read from the original per-expert safetensors."""
    r = measure([PY, "-c", _ACC_NEED, str(path), budget])
    return last_json(r["stdout"]) if r["rc"] == 0 else {}


def run_model(key: str, models_dir: Path, alternatives: bool, only: set[str] | None = None, enforce: bool = False,
              margin: float = 0.10, budget: str | None = None) -> list[dict]:
    """Every command (or ``only`` those) on model ``key`` at its budget (or ``budget``), then the alternatives.
    ``enforce``: each process in a fresh memory cgroup of budget × (1 + ``margin``), started on a cold page cache."""
    import psutil

    from moekit.serve.placement import parse_size

    name, _, default_budget = MODELS[key]
    budget = budget or default_budget
    path = models_dir / name
    recs = []
    base = {"model": name, "bytes_on_disk": sum(f.stat().st_size for f in path.glob("*.safetensors"))}
    limit_bytes = int(parse_size(budget) * (1 + margin)) if enforce else None

    def limit(*cold: Path) -> Limit:
        return Limit(limit_bytes, [path, *cold]) if enforce else Limit()

    with tempfile.TemporaryDirectory(dir=models_dir) as work:
        work = Path(work)
        data = work / "notes.txt"
        data.write_text(("Mixture-of-experts models route every token to a few experts. " * 40 + "\n") * 4)
        pos, neg = work / "pos.txt", work / "neg.txt"
        pos.write_text("The cat sat on the mat.\nThe dog slept by the fire.\n")
        neg.write_text("def f(x):\n    return x + 1\n\nimport os\n")
        mk = [PY, "-m", "moekit.cli"]
        cmds = {
            "inspect": mk + ["inspect", str(path), "--json"],
            "generate": mk + ["generate", str(path), "--prompt", PROMPT, "--max-tokens", str(GEN_TOKENS), "--json",
                              "--stats", "--max-memory", budget],
            "trace": mk + ["trace", str(path), "--data", str(data), "--max-tokens", str(CALIB_TOKENS), "--seq-len",
                           "128", "--out", str(work / "t.trace"), "--json", "--max-memory", budget],
            "eval": mk + ["eval", str(path), "--data", str(data), "--max-tokens", str(CALIB_TOKENS), "--seq-len", "128",
                          "--json", "--max-memory", budget],
            "report": mk + ["report", str(path), "--data", str(data), "--max-tokens", str(CALIB_TOKENS), "--seq-len",
                            "128", "--profile-tokens", str(CALIB_TOKENS), "--out", str(work / "r.html"), "--max-memory",
                            budget],
            "steer find": mk + ["steer", "find", str(path), "--pos", str(pos), "--neg", str(neg), "--out",
                                str(work / "s.json"), "--max-memory", budget],
            "prune": mk + ["prune", str(path), "--method", "frequency", "--ratio", "0.5", "--calib", str(data),
                           "--max-tokens", str(CALIB_TOKENS), "--seq-len", "128", "--out", str(work / "pruned"),
                           "--json", "--max-memory", budget],
            "merge": mk + ["merge", str(path), "--ratio", str(MERGE_RATIO), "--calib", str(data), "--max-tokens", str(CALIB_TOKENS),
                           "--seq-len", "128", "--out", str(work / "merged"), "--json", "--max-memory", budget],
            "quantize": mk + ["quantize", str(path), "--bits", "4", "--group-size", "128", "--out",
                              str(work / "quantized"), "--json", "--max-memory", budget],
        }
        port = 18000 + os.getpid() % 1000
        cmds["serve"] = mk + ["serve", str(path), "--port", str(port), "--max-memory", budget]
        for cmd, argv in cmds.items():
            if only and cmd not in only:
                continue
            r = measure_serve(argv, port, GEN_TOKENS, limit=limit()) if cmd == "serve" else measure(argv, limit=limit())
            res = last_json(r.get("stdout", ""))
            rec = {"bench": "scale", **base, "command": cmd, "tool": "moekit", "budget": budget, **r}
            if cmd == "generate" and res:
                off = res.get("offload") or {}
                rec.update(tokens_s=off.get("tokens_per_s"), hit_rate=off.get("hit_rate"),
                           decode_hit_rate=off.get("decode_hit_rate"), prefill_s=off.get("prefill_s"))
            if cmd in ("trace", "eval") and r["rc"] == 0:
                rec["tokens_s"] = round(CALIB_TOKENS / r["wall_s"], 2)
            recs.append(emit(rec))
            for written in ("pruned", "merged", "quantized"):  # outputs of several GB: gone before the next command
                shutil.rmtree(work / written, ignore_errors=True)
        if alternatives:
            size = base["bytes_on_disk"]
            # under an enforced budget it is run whatever it needs: the cgroup, not this machine, stops it
            if enforce or psutil.virtual_memory().available > size * 1.35 + 2e9:
                r = measure([PY, "-c", _ALT, str(path), "memory", budget, str(work / "off"), str(GEN_TOKENS)],
                            limit=limit())
                res = last_json(r["stdout"])
                recs.append(emit({"bench": "scale", **base, "command": "generate", "tool": "transformers-bf16-memory",
                                  "budget": budget if enforce else None, **r, "tokens_s": res.get("decode_tok_s")}))
            else:
                recs.append(emit({"bench": "scale", **base, "command": "generate", "tool": "transformers-bf16-memory",
                                  "skipped": "does not fit this machine's free memory"}))
            need = accelerate_disk_need(path, budget)
            free = shutil.disk_usage(work).free
            acc = {"bench": "scale", **base, "command": "generate", "tool": "accelerate-disk-offload", "budget": budget,
                   "offload_disk_gb": round(need.get("disk", 0) / 1e9, 2),
                   "offload_folder_needed_gb": round(need.get("resaved", 0) / 1e9, 2), "free_disk_gb": round(free / 1e9, 2)}
            if need.get("resaved", 0) > free - MIN_FREE_DISK:
                recs.append(emit({**acc, "skipped": "its offload folder (re-saved fused experts) does not fit the disk "
                                  "left"}))
            else:
                off = work / "off"
                r = measure([PY, "-c", _ALT, str(path), "accelerate", budget, str(off), str(GEN_TOKENS)],
                            timeout=2400 if enforce else 1200, watch_dir=off, min_free_disk=MIN_FREE_DISK,
                            limit=limit(off))
                shutil.rmtree(off, ignore_errors=True)  # 9 GB on the 7B shape: written afresh by every run
                res = last_json(r["stdout"])
                recs.append(emit({**acc, **r, "tokens_s": res.get("decode_tok_s"),
                                  "prefill_s": res.get("prefill_s")}))
    return recs


def bundled_hit_rates() -> list[dict]:
    out = []
    for name in ("moekit:tiny", "moekit:tiny-shared"):
        r = measure([PY, "-m", "moekit.cli", "generate", name, "--prompt", PROMPT, "--max-tokens", "48", "--json",
                     "--offload", "--stats"])
        off = last_json(r["stdout"]).get("offload") or {}
        out.append(emit({"bench": "scale", "model": name, "command": "generate", "tool": "moekit-offload-2k-slots",
                         "hit_rate": off.get("hit_rate"), "decode_hit_rate": off.get("decode_hit_rate"),
                         "rc": r["rc"]}))
    return out


def main() -> None:
    global GEN_TOKENS, CALIB_TOKENS, MERGE_RATIO
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="olmoe,dsv2lite", help="Comma-separated: olmoe, dsv2lite.")
    ap.add_argument("--models-dir", type=Path, default=Path("/work/.bench-models"))
    ap.add_argument("--clean", action="store_true", help="Delete the built checkpoints and exit.")
    ap.add_argument("--skip-alternatives", action="store_true")
    ap.add_argument("--commands", default="", help="Comma-separated subset of the commands (default: all).")
    ap.add_argument("--gen-tokens", type=int, default=GEN_TOKENS,
                    help=f"Tokens generated by the generate rows, moekit and the alternatives (default {GEN_TOKENS}).")
    ap.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS,
                    help=f"Tokens of trace, eval, calibration and report's profiling (default {CALIB_TOKENS}).")
    ap.add_argument("--merge-ratio", type=float, default=MERGE_RATIO,
                    help=f"merge's --ratio (default {MERGE_RATIO}; higher writes a smaller checkpoint).")
    ap.add_argument("--budget", default=None, help="The memory budget of every row (default: the model's: olmoe 6GB, "
                    "dsv2lite 8GB).")
    ap.add_argument("--enforce-memory", action="store_true",
                    help="Run each process in a fresh memory cgroup limited to the budget + --enforce-margin (page "
                         "cache included), on a cold page cache.")
    ap.add_argument("--enforce-margin", type=float, default=0.10,
                    help="The cgroup limit is budget x (1 + this) (default 0.10: the 10%% the issue allows).")
    ap.add_argument("--also-unenforced", action="store_true",
                    help="With --enforce-memory: afterwards run the same rows unenforced too, in the same session.")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if not (0 <= args.enforce_margin <= 1):
        ap.exit(2, f"error: --enforce-margin must be between 0 and 1, got {args.enforce_margin}\n")
    if args.gen_tokens < 2:
        ap.exit(2, f"error: --gen-tokens must be at least 2 (one prefill, then decode), got {args.gen_tokens}\n")
    if args.budget is not None:
        from moekit.errors import MoekitError
        from moekit.serve.placement import parse_size

        try:
            parse_size(args.budget)
        except MoekitError as exc:
            ap.exit(2, f"error: {exc}\n")
    if args.enforce_memory:
        try:
            memlimit.parent_dir()
        except memlimit.CgroupUnavailable as exc:
            ap.exit(2, f"error: --enforce-memory: {exc}\n")
    GEN_TOKENS, CALIB_TOKENS, MERGE_RATIO = args.gen_tokens, args.calib_tokens, args.merge_ratio
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if args.clean:
        for k in keys:
            shutil.rmtree(args.models_dir / MODELS[k][0], ignore_errors=True)
        print(json.dumps({"bench": "scale", "cleaned": [MODELS[k][0] for k in keys]}))
        return
    args.models_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    for k in keys:
        name, cfg, _ = MODELS[k]
        if not (args.models_dir / name / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            build(args.models_dir / name, cfg)
            emit({"bench": "scale", "model": name, "built_s": round(time.perf_counter() - t0, 1)})
        only = {c.strip() for c in args.commands.split(",") if c.strip()} or None
        for enforce in [True, False] if args.enforce_memory and args.also_unenforced else [args.enforce_memory]:
            recs += run_model(k, args.models_dir, not args.skip_alternatives, only, enforce=enforce,
                              margin=args.enforce_margin, budget=args.budget)
    recs += bundled_hit_rates()
    summary = {}
    for r in recs:
        if "command" in r and "tool" in r and not r.get("model", "").startswith("moekit:"):
            tag = f"/enforced-{r['budget']}" if r.get("enforced") else (f"/{r['budget']}" if r.get("budget") else "")
            summary[f"{r['model']}/{r['command']}/{r['tool']}{tag}"] = {
                k: r.get(k) for k in ("rc", "wall_s", "peak_rss_gb", "tokens_s", "hit_rate", "budget", "skipped",
                          "offload_folder_needed_gb", "offload_folder_gb", "free_disk_gb", "limit_gb",
                          "cgroup_max_usage_gb", "cgroup_failcnt", "oom_kills", "error")
                if r.get(k) is not None}
        elif "hit_rate" in r:
            summary[f"{r['model']}/hit_rate"] = r["hit_rate"]
    print(json.dumps({"bench": "scale", "summary": summary}), flush=True)


if __name__ == "__main__":
    main()
