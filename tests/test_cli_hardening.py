"""Issue 12: bad CLI input, corrupt checkpoints and unsafe writes give one ``error:`` line and exit 2.

Every case runs the real CLI (``moekit.cli.main``, in-process like the other CLI tests; a subprocess
where a signal or a fresh process matters). Where a check must happen *before the work starts*, the
model argument is a directory that does not exist: reaching the model would give a different error.
"""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekit
from cli_helpers import one_error, run_cli
from moekit.data.corpus import CorpusSpec, corpus_documents, load_corpus, parse_corpus_spec, read_documents
from moekit.errors import MoekitError
from moekit.experts import ExpertRef
from moekit.io import MARKER, atomic_output_dir, atomic_write, clean_stale_temps
from moekit.steer.detect import model_signature
from moekit.steer.presets import control_from_spec, load_experts
from moekit.testing import save_tiny_checkpoint, tiny_model

_cli, _one_error = run_cli, one_error

NO_MODEL = "./no-such-model-dir"  # reaching the model gives "model ... not found"


def _tmp_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ck") / "q3")


# ----- 1. corrupt checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, ckpt):
    import shutil

    from moekit.data import load_tokenizer

    root = tmp_path_factory.mktemp("corrupt")
    made = {}
    for name in ("truncated", "garbage_header", "config_not_json"):
        made[name] = Path(shutil.copytree(ckpt, root / name))
    st_file = made["truncated"] / "model.safetensors"
    with open(st_file, "r+b") as fh:
        fh.truncate(st_file.stat().st_size // 2)
    (made["garbage_header"] / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{garbage header!}" + b"x" * 99)
    (made["config_not_json"] / "config.json").write_text("{not json")
    tok = load_tokenizer()
    tiny_model("qwen3_moe", vocab_size=len(tok)).save_pretrained(root / "missing_shard", max_shard_size="300KB")
    tok.save_pretrained(root / "missing_shard")
    shards = sorted((root / "missing_shard").glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    made["missing_shard"] = root / "missing_shard"
    return made


@pytest.mark.parametrize("kind", ["truncated", "garbage_header", "missing_shard", "config_not_json"])
def test_corrupt_checkpoint_is_one_line_in_every_command(corrupt, kind, tmp_path):
    path = corrupt[kind]
    commands = [
        ["inspect", path],
        ["eval", path, "--max-tokens", "32"],
        ["generate", path, "--prompt", "hi", "--offload", "--max-tokens", "2"],
        ["prune", path, "--method", "frequency", "--ratio", "0.25", "--calib", "moekit:corpus:test",
         "--max-tokens", "64", "--low-memory", "--out", tmp_path / "pruned"],
    ]
    expected = {"truncated": "truncated", "garbage_header": "not a valid safetensors file",
                "missing_shard": "is missing", "config_not_json": "config.json is not readable JSON"}[kind]
    for argv in commands:
        code, _, err = _cli(argv)
        _one_error(code, err, expected)
    assert not (tmp_path / "pruned").exists()


def test_corrupt_checkpoint_through_the_api(corrupt):
    with pytest.raises(MoekitError, match="truncated"):
        moekit.load(corrupt["truncated"])


# ----- 2. --force replaces only what moekit wrote ----------------------------------------------------------
def test_force_refuses_the_working_directory_home_and_root(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "keep.txt").write_text("mine")
    for out, why in ((".", "the current directory"), ("..", "an ancestor of the current directory"),
                     (str(tmp_path), "an ancestor"), ("~", "your home directory"), ("/", "the filesystem root")):
        for argv in (["demo", "--out", out, "--force"],
                     ["quantize", NO_MODEL, "--out", out, "--force"],
                     ["trace", NO_MODEL, "--data", "moekit:corpus", "--out", out, "--force"]):
            code, _, err = _cli(argv)
            _one_error(code, err, "refusing to write to", why)
    assert (work / "keep.txt").read_text() == "mine"
    for folder in (work, work.parent, tmp_path):
        assert _tmp_siblings(folder) == [], folder


def test_force_refuses_what_moekit_did_not_write(tmp_path):
    user_dir = tmp_path / "photos"
    user_dir.mkdir()
    (user_dir / "cat.jpg").write_bytes(b"\xff\xd8 not a checkpoint")
    user_file = tmp_path / "notes.trace"
    user_file.write_text("my notes")
    cases = [
        (["quantize", NO_MODEL, "--out", user_dir, "--force"], "not a moekit output directory"),
        (["prune", NO_MODEL, "--ratio", "0.5", "--method", "random", "--out", user_dir, "--force"], "not a moekit"),
        (["trace", NO_MODEL, "--data", "moekit:corpus", "--out", user_file, "--force"], "not a moekit routing trace"),
        (["trace", NO_MODEL, "--data", "moekit:corpus", "--out", user_dir, "--force"], "not a moekit routing trace"),
        (["report", NO_MODEL, "--data", "moekit:corpus", "--out", user_file, "--force"], "not a moekit HTML report"),
        (["steer", "find", NO_MODEL, "--pos", "moekit:corpus", "--neg", "moekit:corpus:validation",
          "--out", user_file, "--force"], "not a moekit JSON file"),
        (["demo", "--out", user_dir, "--force"], "not a moekit output directory"),
    ]
    for argv, pattern in cases:
        code, _, err = _cli(argv)
        _one_error(code, err, "refusing to overwrite", pattern)
    assert (user_dir / "cat.jpg").read_bytes() == b"\xff\xd8 not a checkpoint"
    assert user_file.read_text() == "my notes"
    assert _tmp_siblings(tmp_path) == []


def test_force_replaces_moekit_outputs_of_the_same_kind(ckpt, tmp_path):
    out = tmp_path / "q8"
    assert _cli(["quantize", ckpt, "--bits", "8", "--out", out, "--json"])[0] == 0
    assert json.loads((out / MARKER).read_text()) == {"written_by": "moekit", "command": "quantize"}
    (out / "stale-extra-file").write_text("x")
    assert _cli(["quantize", ckpt, "--bits", "4", "--out", out, "--force", "--json"])[0] == 0
    assert not (out / "stale-extra-file").exists()  # the whole directory was replaced
    code, _, err = _cli(["quantize", ckpt, "--bits", "4", "--out", out])
    _one_error(code, err, "already exists; pass --force")
    trace = tmp_path / "t.trace"
    args = ["trace", ckpt, "--data", "moekit:corpus:test:code", "--max-tokens", "40", "--seq-len", "32", "--out", trace]
    assert _cli(args)[0] == 0
    assert _cli([*args, "--force"])[0] == 0
    assert moekit.RoutingTrace.load(trace).num_tokens == 40
    # a trace is not a report: --force does not let one kind of output replace another
    code, _, err = _cli(["report", NO_MODEL, "--trace", trace, "--out", trace, "--force"])
    _one_error(code, err, "not a moekit HTML report")
    assert _tmp_siblings(tmp_path) == []


# ----- 3. output paths are checked before the work ---------------------------------------------------------
def test_output_paths_are_checked_before_any_work(tmp_path):
    a_file = tmp_path / "existing_file"
    a_file.write_text("x")
    exists = tmp_path / "exists.trace"
    exists.write_text("x")
    cases = [
        (["report", NO_MODEL, "--data", "moekit:corpus", "--out", a_file / "r.html"], "is a file, not a directory"),
        (["trace", NO_MODEL, "--data", "moekit:corpus", "--out", a_file / "sub" / "t.trace"], "is a file"),
        (["prune", NO_MODEL, "--method", "random", "--ratio", "0.5", "--out", a_file / "p"], "is a file"),
        (["steer", "find", NO_MODEL, "--pos", "moekit:corpus", "--neg", "moekit:corpus", "--out", a_file / "e.json"],
         "is a file"),
        (["demo", "--out", a_file / "d"], "is a file"),
        (["upcycle", NO_MODEL, "--experts", "4", "--top-k", "1", "--out", a_file / "u"], "is a file"),
        (["train", "--config", "no.yaml", "--out", a_file], "is a file"),
        (["trace", NO_MODEL, "--data", "moekit:corpus", "--out", exists], "already exists; pass --force"),
        (["report", NO_MODEL, "--data", "moekit:corpus", "--out", tmp_path / "r.html", "--json", exists],
         "already exists"),
    ]
    for argv, pattern in cases:
        code, _, err = _cli(argv)
        _one_error(code, err, pattern)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_directory_fails_first(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = _cli(["trace", NO_MODEL, "--data", "moekit:corpus", "--out", ro / "t.trace"])
        _one_error(code, err, "no permission to write in")
    finally:
        ro.chmod(0o755)


# ----- 4. numeric options ------------------------------------------------------------------------------------
NUMERIC_CASES = [
    (["trace", NO_MODEL, "--data", "moekit:corpus", "--out", "{tmp}/t.trace", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["eval", NO_MODEL, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", NO_MODEL, "--max-tokens", "-5"], "--max-tokens must be >= 1"),
    (["generate", NO_MODEL, "--prompt", "x", "--max-tokens", "-3"], "--max-tokens must be >= 1, got -3"),
    (["generate", NO_MODEL, "--prompt", "x", "--max-tokens=-3"], "--max-tokens must be >= 1, got -3"),
    (["prune", NO_MODEL, "--ratio", "0", "--method", "random", "--out", "{tmp}/p"], "--ratio must be in (0, 1), got 0"),
    (["prune", NO_MODEL, "--ratio", "1", "--method", "random", "--out", "{tmp}/p"], "--ratio must be in (0, 1)"),
    (["prune", NO_MODEL, "--ratio", "nan", "--method", "random", "--out", "{tmp}/p"], "--ratio must be a finite"),
    (["merge", NO_MODEL, "--ratio", "-0.5", "--out", "{tmp}/p"], "--ratio must be in (0, 1)"),
    (["quantize", NO_MODEL, "--bits", "3", "--out", "{tmp}/q"], "--bits must be 8 or 4, got 3"),
    (["quantize", NO_MODEL, "--avg-bits", "inf", "--out", "{tmp}/q"], "--avg-bits must be a finite number"),
    (["quantize", NO_MODEL, "--group-size", "0", "--out", "{tmp}/q"], "--group-size must be >= 2"),
    (["generate", NO_MODEL, "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["generate", NO_MODEL, "--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", NO_MODEL, "--prompt", "x", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", NO_MODEL, "--prompt", "x", "--sample-top-p", "nan"], "--sample-top-p must be a finite"),
    (["generate", NO_MODEL, "--prompt", "x", "--boost", "1:2=nan"], "--boost", "nan"),
    (["generate", NO_MODEL, "--prompt", "x", "--boost", "1:2=-1"], "must be in [0, inf)"),
    (["generate", NO_MODEL, "--prompt", "x", "--bias", "1:2=inf"], "--bias"),
    (["generate", NO_MODEL, "--prompt", "x", "--disable", "1:-2"], "decoder-layer and expert indices 0..32767"),
    (["generate", NO_MODEL, "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", NO_MODEL, "--prompt", "x", "--temperature", "-1"], "--temperature must be in [0, inf)"),
    (["generate", NO_MODEL, "--prompt", "x", "--contrast", "inf"], "--contrast must be a finite number"),
    (["generate", NO_MODEL, "--prompt", "x", "--seed", "-1"], "--seed must be in [0, "),
    (["generate", NO_MODEL, "--prompt", "x", "--seed", str(2**64)], "--seed must be in [0, "),
    (["generate", NO_MODEL, "--prompt", "x", "--offload", "--cache-mb", "0"], "--cache-mb must be in (0, inf)"),
    (["generate", NO_MODEL, "--prompt", "x", "--steer", "e.json:boost=nan"], "does not exist"),
    (["steer", "find", NO_MODEL, "--pos", "moekit:corpus", "--neg", "moekit:corpus", "--out", "{tmp}/e.json",
      "--top", "0"], "--top must be >= 1"),
    (["report", NO_MODEL, "--data", "moekit:corpus", "--out", "{tmp}/r.html", "--max-tokens", "0"],
     "--max-tokens must be >= 1"),
    (["demo", "--out", "{tmp}/d", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["upcycle", NO_MODEL, "--experts", "0", "--top-k", "1", "--out", "{tmp}/u"], "--experts must be >= 1"),
    (["train", "--config", "x.yaml", "--stop-at", "0"], "--stop-at must be >= 1"),
    (["trace", NO_MODEL, "--data", "moekit:corpus", "--out", "{tmp}/t.trace", "--seq-len", "abc"],
     "Invalid value for '--seq-len'"),
]


@pytest.mark.parametrize("argv,patterns", [(c[0], c[1:]) for c in NUMERIC_CASES],
                         ids=[f"{i}-{c[0][0]}" for i, c in enumerate(NUMERIC_CASES)])
def test_bad_numbers_fail_before_the_model_loads(argv, patterns, tmp_path):
    code, _, err = _cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    _one_error(code, err, *patterns)
    assert list(tmp_path.iterdir()) == []


def test_device_is_checked():
    with pytest.raises(MoekitError, match="unknown device 'tpu'"):
        moekit.load("moekit:tiny", device="tpu")


@pytest.mark.parametrize("kwargs,pattern", [
    ({"scale": {"L": math.nan}}, "routing-weight factor .* finite"),
    ({"scale": {"L": math.inf}}, "routing-weight factor .* finite"),
    ({"scale": {"L": -2.0}}, r"routing-weight factor .* \[0, 10000\]"),
    ({"bias": {"L": -math.inf}}, "logit bias .* finite"),
    ({"bias": {"L": 1e30}}, "logit bias"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_k": 1.5}, "top_k must be an integer"),
])
def test_route_refuses_nan_inf_and_huge_values(bundled_tiny, kwargs, pattern):
    lm = bundled_tiny
    key = (lm.moe.indices[0], 1)
    kwargs = {k: ({key: v["L"]} if isinstance(v, dict) else v) for k, v in kwargs.items()}
    with pytest.raises(MoekitError, match=pattern), moekit.route(lm, **kwargs):
        pass
    assert issubclass(MoekitError, Exception)
    # a valid control still works and changes nothing after the block
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with moekit.route(lm, scale={key: 2.0}, bias={key: -1.5}):
            steered = lm.model(input_ids=ids).logits
        after = lm.model(input_ids=ids).logits
    assert torch.isfinite(steered).all() and torch.equal(base, after)


# ----- 5. steer files ----------------------------------------------------------------------------------------
def _experts_file(path: Path, entries, **extra) -> str:
    data = {"format": 1, "model": "moekit:tiny", "architecture": "x", "layers": [0], "num_experts": [8],
            "method": "risk_diff", "top": 2, "entries": entries, **extra}
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("entries,extra,pattern", [
    ([{"layer": "1", "expert": 2, "score": 0.5}], {}, "entry 0 layer must be an integer, got '1'"),
    ([{"layer": 1, "expert": -2, "score": 0.5}], {}, "entry 0 expert must be in [0, 32767], got -2"),
    ([{"layer": 1, "score": 0.5}], {}, "entry 0 has no 'expert'"),
    ([{"layer": 1, "expert": 2, "score": "high"}], {}, "entry 0 score must be a number"),
    ([{"layer": 1, "expert": 2, "score": math.nan}], {}, "entry 0 score must be a finite number"),
    ([[1, 2, 0.5]], {}, "entry 0 is not an object"),
    ({"layer": 1}, {}, "is not a moekit experts file"),
    ([{"layer": 1, "expert": 2, "score": 0.5}], {"top": 0}, "top must be >= 1"),
])
def test_steer_files_with_wrong_fields_fail_in_one_line(tmp_path, entries, extra, pattern):
    f = _experts_file(tmp_path / "e.json", entries, **extra)
    code, _, err = _cli(["generate", NO_MODEL, "--prompt", "x", "--steer", f + ":off"])
    _one_error(code, err, pattern)
    with pytest.raises(MoekitError, match="moekit experts file|valid experts file"):
        load_experts(f)


def test_steer_boost_factor_must_be_finite(bundled_tiny, tmp_path):
    lm = bundled_tiny
    data = {"format": 1, **model_signature(lm),
            "method": "risk_diff", "top": 1, "entries": [{"layer": lm.moe.indices[0], "expert": 3, "score": 0.4}]}
    f = tmp_path / "e.json"
    f.write_text(json.dumps(data))
    for factor, pattern in (("nan", "finite"), ("inf", "finite"), ("-1", r"\[0, inf\)"), ("x", "not a number")):
        with pytest.raises(MoekitError, match=pattern):
            control_from_spec(f"{f}:boost={factor}", lm)
    assert control_from_spec(f"{f}:boost=2", lm).scale == {ExpertRef(lm.moe.indices[0], 3): 2.0}


# ----- 6. a model without a tokenizer -------------------------------------------------------------------------
def test_text_prompt_on_a_model_without_tokenizer(tmp_path):
    path = save_tiny_checkpoint("qwen3_moe", tmp_path / "notok", with_tokenizer=False)
    assert moekit.load(path).tokenizer is None
    code, _, err = _cli(["generate", path, "--prompt", "hello", "--max-tokens", "2"])
    _one_error(code, err, "this model", "has no tokenizer")


# ----- 7. outputs honour the umask ---------------------------------------------------------------------------
@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_outputs_get_the_umask_permissions(ckpt, tmp_path):
    with _umask(0o022):
        trace = tmp_path / "new" / "t.trace"
        assert _cli(["trace", ckpt, "--data", "moekit:corpus:test", "--max-tokens", "20", "--out", trace])[0] == 0
        assert trace.stat().st_mode & 0o777 == 0o644 and trace.parent.stat().st_mode & 0o777 == 0o755
        assert _cli(["quantize", ckpt, "--out", tmp_path / "q", "--json"])[0] == 0
        assert _modes(tmp_path / "q") == {("d", 0o755), ("f", 0o644)}
    with _umask(0o027):
        assert _cli(["quantize", ckpt, "--out", tmp_path / "q", "--force", "--json"])[0] == 0
        assert _modes(tmp_path / "q") == {("d", 0o750), ("f", 0o640)}
        with atomic_write(tmp_path / "x.bin") as fh:
            fh.write(b"1")
        assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o640
    with _umask(0o002), atomic_output_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
    assert _modes(tmp_path / "d") == {("d", 0o775), ("f", 0o664)}


# ----- 8. temporary siblings: cleaned when stale, and on SIGTERM ----------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temp_siblings_are_removed_on_the_next_write(tmp_path):
    dead = _dead_pid()
    stale_file = tmp_path / f".t.trace.{dead}.ab12_x.tmp"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".out.{dead}.zz9.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    live = tmp_path / f".t.trace.{os.getpid()}.live.tmp"  # a write in progress in a running process
    live.write_text("busy")
    other = [tmp_path / ".t.trace.legacy.tmp", tmp_path / f".other.trace.{dead}.ab.tmp", tmp_path / f"t.trace.{dead}.x.tmp"]
    for p in other:
        p.write_text("not ours to touch")
    with atomic_write(tmp_path / "t.trace") as fh:
        fh.write(b"data")
    assert not stale_file.exists() and live.exists() and all(p.exists() for p in other)
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.{os.getpid()}.") and tmp.name.endswith(".tmp")
    assert not stale_dir.exists() and (tmp_path / "out" / MARKER).is_file()
    assert clean_stale_temps(tmp_path / "t.trace") == []


@pytest.mark.slow
def test_sigterm_during_a_write_leaves_nothing_behind(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(moekit.__file__).parent.parent), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "demo", "--out", str(tmp_path / "demo")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _tmp_siblings(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tmp_siblings(tmp_path), "the demo never started writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: terminated by SIGTERM; nothing half-written was kept"]
    assert _tmp_siblings(tmp_path) == [] and not (tmp_path / "demo").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    """A write that the storage refuses (here a file-size limit, EFBIG, the way a full disk refuses with ENOSPC)
    ends with one error line and exit code 2, and the atomic writer leaves no temp directory or output."""
    import resource

    ckpt = tmp_path / "ckpt"
    save_tiny_checkpoint("qwen3_moe", ckpt)
    limit = 64 * 1024  # smaller than the quantized shard, larger than the config and marker files

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=str(Path(moekit.__file__).parent.parent), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "moekit.cli", "quantize", str(ckpt), "--bits", "8", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_files)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: file too large for this file system or limit")
    assert errors[0].endswith("nothing half-written was kept (free space, or write elsewhere with --out)")
    assert not out.exists() and _tmp_siblings(tmp_path) == []


# ----- 9. one corpus-spec grammar ----------------------------------------------------------------------------
def test_corpus_spec_grammar():
    assert parse_corpus_spec("notes.txt") is None
    assert parse_corpus_spec("moekit:corpus") == CorpusSpec("test")
    assert parse_corpus_spec("moekit:corpus:train") == CorpusSpec("train")
    assert parse_corpus_spec("moekit:corpus:train:code") == CorpusSpec("train", ("code",))
    assert parse_corpus_spec("moekit:corpus::code,prose,code") == CorpusSpec("test", ("code", "prose"))
    for bad, pattern in (("moekit:corpus:dev", "unknown corpus split"), ("moekit:corpus:train:nope", "unknown corpus domain"),
                         ("moekit:corpus:train:code:x", "bad corpus spec"), ("moekit:corpusX", "bad corpus spec"),
                         ("moekit:corpus:train:", "unknown corpus domain")):
        with pytest.raises(MoekitError, match=pattern):
            parse_corpus_spec(bad)
    docs = read_documents(["moekit:corpus:validation:code,prose"])
    assert docs == [d for d in load_corpus("validation") if d.domain in ("code", "prose")]
    assert {d.domain for d in docs} == {"code", "prose"}
    from moekit.steer.detect import read_examples

    assert [e.response for e in read_examples("moekit:corpus:validation:code")] == [
        d.text for d in corpus_documents(CorpusSpec("validation", ("code",)))]


def test_every_command_takes_the_same_corpus_specs(ckpt, tmp_path):
    code, out, err = _cli(["trace", ckpt, "--data", "moekit:corpus:train:code", "--max-tokens", "30", "--out",
                           tmp_path / "c.trace", "--json"])
    assert code == 0, err
    assert moekit.RoutingTrace.load(tmp_path / "c.trace").domains == ["code"]
    code, out, _ = _cli(["eval", ckpt, "--data", "moekit:corpus:train:code,prose", "--max-tokens", "40", "--json"])
    assert code == 0 and set(json.loads(out)["by_domain"]) <= {"code", "prose"}
    bad = "moekit:corpus:train:klingon"
    for argv in (["trace", NO_MODEL, "--data", bad, "--out", tmp_path / "x.trace"],
                 ["eval", NO_MODEL, "--data", bad],
                 ["report", NO_MODEL, "--data", bad, "--out", tmp_path / "r.html"],
                 ["prune", NO_MODEL, "--ratio", "0.5", "--calib", bad, "--out", tmp_path / "p"],
                 ["merge", NO_MODEL, "--ratio", "0.5", "--calib", bad, "--out", tmp_path / "p"],
                 ["quantize", NO_MODEL, "--calib", bad, "--out", tmp_path / "p"],
                 ["steer", "find", NO_MODEL, "--pos", bad, "--neg", "moekit:corpus", "--out", tmp_path / "e.json"],
                 ["steer", "find", NO_MODEL, "--pos", "moekit:corpus:train:code", "--neg", bad, "--out", tmp_path / "e.json"]):
        code, _, err = _cli(argv)
        _one_error(code, err, "unknown corpus domain 'klingon'")


# ----- 10. fuzz: the parsers either accept or give one line -------------------------------------------------
argv_text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cc",)), max_size=24)
number_text = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                        st.sampled_from(["nan", "-inf", "1e309", "0x10", "", " 1", "1_0", "+3", "--5"]), argv_text)
expert_text = st.one_of(
    argv_text,
    st.lists(st.tuples(st.integers(-3, 99), st.integers(-3, 99)), max_size=3).map(
        lambda xs: ",".join(f"{a}:{b}" for a, b in xs)),
    st.lists(st.tuples(st.integers(-3, 99), st.integers(-3, 99), number_text), max_size=3).map(
        lambda xs: ",".join(f"{a}:{b}={v}" for a, b, v in xs)),
)
corpus_text = st.one_of(argv_text.map(lambda s: "moekit:corpus" + s),
                        st.lists(st.sampled_from(["", "train", "test", "code", "prose", "x", "code,prose", ":"]),
                                 max_size=4).map(lambda xs: ":".join(["moekit", "corpus", *xs])))
NUMERIC_OPTIONS = [("generate", o) for o in ("--max-tokens", "--top-k", "--top-p", "--temperature", "--sample-top-p",
                                             "--seed", "--contrast", "--contrast-alpha", "--weak-top-k")] + [
    ("trace", o) for o in ("--seq-len", "--batch-size", "--max-tokens")] + [
    ("prune", o) for o in ("--ratio", "--seed", "--max-tokens", "--seq-len")] + [
    ("quantize", o) for o in ("--bits", "--group-size", "--avg-bits")]
BASE = {"generate": ["generate", NO_MODEL, "--prompt", "x"],
        "trace": ["trace", NO_MODEL, "--data", "moekit:corpus:test:code", "--out", "/nonexistent-dir/t.trace"],
        "prune": ["prune", NO_MODEL, "--method", "random", "--out", "/nonexistent-dir/p"],
        "quantize": ["quantize", NO_MODEL, "--out", "/nonexistent-dir/q"]}


def _contract(argv) -> None:
    code, _, err = _cli(argv)
    if code != 0:
        _one_error(code, err)


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(NUMERIC_OPTIONS), value=number_text)
def test_fuzz_numeric_options(option, value):
    cmd, name = option
    argv = [*BASE[cmd], f"{name}={value}"]
    if cmd == "prune" and name != "--ratio":
        argv.append("--ratio=0.5")
    _contract(argv)


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(["--disable", "--force", "--boost", "--bias"]), value=expert_text)
def test_fuzz_expert_specs(option, value):
    _contract([*BASE["generate"], f"{option}={value}"])


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=corpus_text, where=st.sampled_from(["trace", "eval", "steer"]))
def test_fuzz_corpus_specs(spec, where):
    argv = {"trace": ["trace", NO_MODEL, "--data", spec, "--out", "/nonexistent-dir/t.trace"],
            "eval": ["eval", NO_MODEL, "--data", spec, "--max-tokens", "8"],
            "steer": ["steer", "find", NO_MODEL, "--pos", spec, "--neg", "moekit:corpus",
                      "--out", "/nonexistent-dir/e.json"]}[where]
    code, _, err = _cli(argv)
    _one_error(code, err)  # the model never exists here, so every run ends in one line


@settings(max_examples=200, deadline=None)
@given(text=expert_text)
def test_fuzz_expert_parsers_in_process(text):
    from moekit.cli.common import parse_expert_values, parse_experts

    for parse in (parse_experts, parse_expert_values):
        try:
            out = parse(text)
        except MoekitError as exc:
            assert "\n" not in str(exc)
            continue
        if parse is parse_expert_values:
            assert all(math.isfinite(v) for v in out.values())
        assert all(layer >= 0 and expert >= 0 for layer, expert in out)
