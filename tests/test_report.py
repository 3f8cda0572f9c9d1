"""`moekit report`, the super-expert profiling pass and the headless-Chromium check (issue 4, req. 2, 4, 6)."""

import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from moekit.cli import main
from moekit.data import read_documents
from moekit.report import cache_size_for_fraction, profile_expert_max, super_expert_check
from moekit.routing.tracing import trace_documents
from moekit.testing import save_tiny_checkpoint
from moekit.trace import RoutingTrace

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROSE = "the cat sat on a mat and the dog ran in the park while birds sang"
CODE = "def foo ( x ) : return x + 1 import numpy as np for i in range ( 10 ) :"
SMALL = ["--max-tokens", "1500", "--profile-tokens", "256", "--seq-len", "128"]


def _two_domain_jsonl(path: Path) -> Path:
    rng = random.Random(0)
    prose, code = PROSE.split(), CODE.split()
    with path.open("w") as fh:
        for _ in range(6):
            fh.write(json.dumps({"text": " ".join(rng.choice(prose) for _ in range(120)), "domain": "prose"}) + "\n")
            fh.write(json.dumps({"text": " ".join(rng.choice(code) for _ in range(120)), "domain": "code"}) + "\n")
    return path




@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    save_tiny_checkpoint("qwen3_moe", d / "ckpt")
    _two_domain_jsonl(d / "two.jsonl")
    return d


@pytest.fixture(scope="module")
def report(workdir) -> dict:
    out, js = workdir / "report.html", workdir / "stats.json"
    rc = main(["report", str(workdir / "ckpt"), "--data", str(workdir / "two.jsonl"), "--out", str(out),
               "--json", str(js), *SMALL])
    assert rc == 0
    return {"html": out, "json": js, "text": out.read_text(encoding="utf-8"), "stats": json.loads(js.read_text())}


@pytest.fixture
def cli_error(capsys):
    """Run the CLI in-process; assert exit code 2 with a one-line ``error:`` on stderr and return it."""

    def run(*args: str) -> str:
        capsys.readouterr()
        rc = main(list(args))
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        return lines[0]

    return run


# ----------------------------------------------------------------------------------------- the report
def test_report_is_self_contained_and_has_every_section(report):
    html = report["text"]
    assert len(html.encode()) < 2_000_000
    # no external resources: every src / href is a data: URI or an in-page anchor
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r[:40] for r in refs if r[:5] != "data:"]
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower()
    imgs = re.findall(r'<img src="data:image/png;base64,', html)
    assert len(imgs) >= 8  # load, co-activation, domains, MI, entropy, super experts, locality, cache
    for anchor in ("model", "load", "coactivation", "domains", "entropy", "super", "locality", "cache"):
        assert f'id="{anchor}"' in html
    # every figure has a plain-language caption
    assert html.count("<figure>") == html.count("<figcaption>") == len(imgs)
    assert "Top experts per domain" in html and "prose" in html and "code" in html
    assert "Zeroing check" in html


def test_report_json_holds_the_statistics(report):
    st = report["stats"]
    s = st["summary"]
    assert s["model"]["tokens"] == 1500
    assert s["domains"]["names"] == ["prose", "code"]
    assert len(s["load"]) == 2 and len(s["load"][0]) == 8  # MoE layers 0 and 2 of the tiny qwen3_moe
    assert s["dynamic_k"] is not None  # the CLI records router probabilities
    se = st["super_experts"]
    assert np.array(se["max_abs"], dtype=float).shape == (2, 8)
    chk = se["check"]
    assert len(chk["random"]) == 3 and chk["baseline"] > 1 and chk["zeroed"] > 1
    assert set(st["cache_90"]) == {"layer", "global"}
    assert report["html"].stat().st_mode & 0o044  # readable by others, not 0600 from the temp file


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")

    def chromium(url: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as profile:
            return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                                   "--v=0", "--virtual-time-budget=5000", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=180)

    def console(proc: subprocess.CompletedProcess) -> list[str]:
        return [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]

    # control: the console capture does see errors, blocked requests and CSP violations
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                   "content=\"default-src 'none'; img-src data:\"></head><body>"
                   '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>')
    assert console(chromium(bad.as_uri())), "console messages are not captured; the check below would be blind"

    # the report itself: loads with no console message at all (it has no scripts, so any is an error)
    proc = chromium(report["html"].resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console(proc) == []
    assert 'id="cache"' in proc.stdout  # the DOM was rendered

    # the figures decode: a copy with a probe script (CSP removed so it may run) records each image's size
    probe = ("<script>window.addEventListener('load',function(){var r=[];"
             "document.querySelectorAll('img').forEach(function(i){r.push(i.complete+':'+i.naturalWidth+'x'"
             "+i.naturalHeight)});var d=document.createElement('pre');d.id='probe';d.textContent=r.join(' ');"
             "document.body.appendChild(d);});</script>")
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", report["text"], count=1)
    copy = tmp_path / "probe.html"
    copy.write_text(text.replace("</body>", probe + "</body>"), encoding="utf-8")
    proc = chromium(copy.as_uri())
    m = re.search(r'<pre id="probe">([^<]*)</pre>', proc.stdout)
    assert m, proc.stderr[-2000:]
    sizes = m.group(1).split()
    assert len(sizes) == report["text"].count("<img ")
    for s in sizes:
        complete, dims = s.split(":")
        w, h = map(int, dims.split("x"))
        assert complete == "true" and w > 100 and h > 100, sizes
    assert console(proc) == []


def test_screenshot_script_writes_a_png(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    out = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(script), str(report["html"]), str(out), "--width", "1200"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width == 1200 and height > 2000  # the whole page, not one window


# ------------------------------------------------------------------------------------------ bad input
def test_report_from_trace_without_domains_has_the_note(workdir, tmp_path):
    lm = moekit.load(str(workdir / "ckpt"))
    docs = read_documents([str(workdir / "two.jsonl")])
    tr = trace_documents(lm, docs, max_tokens=800, seq_len=128, progress=False)
    tr = RoutingTrace(ids=tr.ids, weights=tr.weights, token_ids=tr.token_ids, doc=tr.doc, pos=tr.pos,
                      meta=dict(tr.meta, domains=[]))  # no labels
    tr.save(tmp_path / "plain.trace")
    out = tmp_path / "plain.html"
    assert main(["report", str(workdir / "ckpt"), "--trace", str(tmp_path / "plain.trace"), "--out", str(out)]) == 0
    html = out.read_text()
    assert "No domain labels in this trace" in html
    assert "domain by expert lift heatmap" not in html and "Top experts per domain" not in html
    assert "Super-expert profiling skipped" in html  # a trace alone has no output magnitudes
    assert "no router probabilities" in html  # traced without probs: dynamic k left out with a note


def test_trace_from_another_model_is_refused(workdir, tmp_path, cli_error):
    other = save_tiny_checkpoint("qwen3_moe", tmp_path / "other", num_experts=4)
    lm = moekit.load(str(other))
    tr = trace_documents(lm, read_documents([str(workdir / "two.jsonl")]), max_tokens=200, progress=False)
    tr.save(tmp_path / "other.trace")
    out = str(tmp_path / "x.html")
    line = cli_error("report", str(workdir / "ckpt"), "--trace", str(tmp_path / "other.trace"), "--out", out)
    assert "trace was recorded from" in line and "experts per layer" in line
    assert not (tmp_path / "x.html").exists()
    mixtral = save_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    line = cli_error("report", str(mixtral), "--trace", str(tmp_path / "other.trace"), "--out", out)
    assert "qwen3_moe" in line and "mixtral" in line


def test_empty_inputs_exit_2(workdir, tmp_path, cli_error):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "", "domain": "x"}) + "\n")
    ck = str(workdir / "ckpt")
    cli_error("report", ck, "--data", str(empty), "--out", str(tmp_path / "a.html"))
    assert "no tokens" in cli_error("report", ck, "--data", str(blank), "--out", str(tmp_path / "b.html"))
    t = RoutingTrace(ids=np.zeros((2, 0, 2), np.int16), weights=np.zeros((2, 0, 2), np.float32),
                     token_ids=np.zeros(0, np.int32), doc=np.zeros(0, np.int32), pos=np.zeros(0, np.int32),
                     meta={"architecture": "qwen3_moe", "layers": [0, 2], "num_experts": [8, 8], "top_k": [2, 2]})
    t.save(tmp_path / "empty.trace")
    assert "empty" in cli_error("report", ck, "--trace", str(tmp_path / "empty.trace"), "--out",
                                str(tmp_path / "c.html"))
    assert "--data" in cli_error("report", ck, "--out", str(tmp_path / "d.html"))
    assert not list(tmp_path.glob("*.html"))


def test_bad_layer_and_existing_output(report, workdir, tmp_path, cli_error):
    ck = str(workdir / "ckpt")
    data = str(workdir / "two.jsonl")
    assert "not an MoE layer" in cli_error("report", ck, "--data", data, "--out", str(tmp_path / "a.html"),
                                           "--layer", "1", *SMALL)
    assert "--force" in cli_error("report", ck, "--data", data, "--out", str(report["html"]))


# ------------------------------------------------------------------------------- profiling and checks
def test_profile_matches_direct_expert_computation(workdir):
    """max |down_proj output| from the pre-hook pass equals the maximum recomputed by hand from the
    expert weights on the hidden states the router saw (qwen3_moe: SiLU-gated MLP, no bias)."""
    lm = moekit.load(str(workdir / "ckpt"))
    docs = read_documents([str(workdir / "two.jsonl")])[:3]
    got = profile_expert_max(lm, docs, max_tokens=300, seq_len=64, batch_size=2)
    from moekit.data.batching import pad_batch
    from moekit.routing.tracing import tokenize_windows

    want = np.full_like(got, np.nan)
    seen = {}
    handles = [v.router.register_forward_hook(lambda m, a, o, pos=pos: seen.__setitem__(pos, (a[0], o[2])))
               for pos, v in enumerate(lm.moe)]
    try:
        for _, _, ids in tokenize_windows(lm, docs, 64, 300):  # one window per call: no padding involved
            with torch.no_grad():
                lm.model(**pad_batch([ids]))
                for pos, v in enumerate(lm.moe):
                    x, idx = seen[pos]
                    for e in range(v.num_experts):
                        rows = (idx == e).any(dim=1)
                        if rows.any():
                            w = v.expert_weights(e)
                            h = torch.nn.functional.silu(x[rows] @ w["gate"].T) * (x[rows] @ w["up"].T)
                            want[pos, e] = np.fmax(want[pos, e], float((h @ w["down"].T).abs().max()))
    finally:
        for h in handles:
            h.remove()
    assert np.isfinite(got).sum() > 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_profile_runs_on_gpt_oss_layout(tmp_path):
    lm = moekit.load(str(save_tiny_checkpoint("gpt_oss", tmp_path / "gptoss")))
    docs = read_documents([str(_two_domain_jsonl(tmp_path / "d.jsonl"))])[:2]
    m = profile_expert_max(lm, docs, max_tokens=200, seq_len=64)
    assert m.shape == (3, 8) and np.isfinite(m).sum() >= 6 and np.nanmin(m) > 0


def test_super_expert_check_zeroing_changes_perplexity(workdir):
    lm = moekit.load(str(workdir / "ckpt"))
    docs = read_documents([str(workdir / "two.jsonl")])
    everything = [(li, e) for li in (0, 2) for e in range(8) if (li, e) != (2, 7)]
    res = super_expert_check(lm, docs, everything[:8], max_tokens=300)
    assert len(res["random"]) == 3 and res["seeds"] == [0, 1, 2]
    # zeroing all eight experts of layer 0 changes the output; the random sets avoid the zeroed ones
    assert abs(res["zeroed"] - res["baseline"]) > 1e-3 * res["baseline"]
    for s in res["random_sets"]:
        assert len(s) == 8 and not {tuple(x) for x in s} & set(everything[:8])
    assert res["ratio"] == pytest.approx(res["zeroed"] / np.mean(res["random"]))


def test_cache_size_for_fraction_hand_worked():
    cache = {"multipliers": [1, 2, 4], "layer": {
        "belady": {"hit_rate": [0.5, 0.8, 1.0]},
        "lru": {"hit_rate": [0.3, 0.6, 0.95]},
        "lfu": {"hit_rate": [0.2, 0.3, 0.4]},
    }}
    got = cache_size_for_fraction(cache, 0.9)["layer"]
    assert got["target"] == pytest.approx(0.9)
    assert got["belady"] == pytest.approx(3.0)  # 0.8 at 2k, 1.0 at 4k: halfway
    assert got["lru"] == pytest.approx(2 + (0.9 - 0.6) / 0.35 * 2)
    assert got["lfu"] is None


def test_interleave_domains_round_robin():
    from moekit.data.corpus import Document, interleave_domains

    docs = [Document(f"t{i}", dom, f"id{i}", "x") for i, dom in enumerate("aaabbc")]
    assert [d.doc_id for d in interleave_domains(docs)] == ["id0", "id3", "id5", "id1", "id4", "id2"]


def test_write_report_without_a_model(workdir, tmp_path):
    """``write_report(None, trace, ...)``: the model summary comes from the trace; super experts are skipped."""
    from moekit.report import write_report

    lm = moekit.load(str(workdir / "ckpt"))
    tr = trace_documents(lm, read_documents([str(workdir / "two.jsonl")]), max_tokens=500, progress=False)
    rep = write_report(None, tr, tmp_path / "r.html", json_path=tmp_path / "r.json")
    html = (tmp_path / "r.html").read_text()
    assert "qwen3_moe" in html and "Super-expert profiling skipped" in html
    assert rep["super_experts"] is None and json.loads((tmp_path / "r.json").read_text())["summary"]["domains"]


_PEAK_CHILD = r"""
import json, sys
import moekit
from moekit.data.corpus import Document
from moekit.eval import perplexity
from moekit.report import profile_expert_max
from moekit.routing.tracing import trace_documents

def status(key):  # bytes, from the kernel's view of this process
    return 1024 * next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

def growth(fn):  # how far peak RSS rises above the RSS before ``fn`` (VmHWM reset through clear_refs)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before

lm = moekit.load(sys.argv[1])
docs = [Document(" ".join(f"word{i} token{i * 7 % 13} text" for i in range(900)), "text", "t", "<text>")]
for n in (1, 8):  # one window (warm-up), then 8
    got = {"profile": growth(lambda: profile_expert_max(lm, docs, max_tokens=128 * n, seq_len=128, batch_size=n)),
           "trace": growth(lambda: trace_documents(lm, docs, max_tokens=128 * n, seq_len=128, batch_size=n,
                                                   progress=False)),
           "perplexity": growth(lambda: perplexity(lm, docs, max_tokens=127 * n, seq_len=128, batch_size=n,
                                                   progress=False))}
print(json.dumps(got))
"""


@pytest.mark.slow
def test_profiling_peak_does_not_scale_with_logits(tmp_path):
    """Issue 13: the profiling pass and the routing trace of a 64k-vocabulary model over 8 × 128-token
    windows would hold [8, 128, 64000] fp32 logits (262 MB); they keep only the last position's, so their peak
    RSS rises above the RSS before the call by a small fraction of that.  Perplexity upcasts one window's
    logits at a time: it rises by the model's own logits plus a fraction of them (measured 1.25-1.5x with the
    locked and the lowest versions; before: logits and a same-size fp32 log-softmax, 3x)."""
    vocab, windows, seq = 64000, 8, 128
    ck = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", vocab_size=vocab)
    logits_bytes = windows * seq * vocab * 4
    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(ck)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["profile"] < logits_bytes / 4 and got["trace"] < logits_bytes / 4, got
    assert got["perplexity"] < 2 * logits_bytes, got
