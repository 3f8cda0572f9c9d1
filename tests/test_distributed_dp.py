"""Data-parallel tracing, evaluation and calibration with real 2-process gloo jobs (torchrun), and failures.

Each job is bounded (subprocess timeout, ``MOEKIT_DIST_TIMEOUT`` on every collective) and uses a free port on
127.0.0.1. Results must equal the single-process ones byte for byte (both run one thread per process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               MOEKIT_DIST_TIMEOUT="60", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


class Job(subprocess.CompletedProcess):
    """A finished torchrun job; ``stderr`` is torchrun's own, ``ranks_stderr`` each rank's (from its log file)."""

    ranks_stderr: dict[int, str]

    def failure(self) -> str:
        """What went wrong, for an assertion message: every rank's whole stderr, then the tail of torchrun's.

        torchrun's summary says only "exitcode -6 (SIGABRT)"; the rank's own words (an abort message, a gloo
        error, a Python traceback) are in its stderr, which would otherwise be cut off or lost."""
        parts = [f"torchrun exit code {self.returncode}"]
        for rank, text in sorted(self.ranks_stderr.items()):
            parts.append(f"----- rank {rank} stderr -----\n{text.strip() or '(empty)'}")
        parts.append(f"----- torchrun stderr (tail) -----\n{self.stderr[-1500:]}")
        return "\n".join(parts)


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> Job:
    """Run ``args`` as ``nproc`` ranks; each rank's stderr goes to a log file (stdout stays torchrun's, which
    rank 0's JSON needs) and comes back in ``Job.ranks_stderr``."""
    logs = Path(tempfile.mkdtemp(prefix="torchrun-logs-"))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "--log-dir", str(logs), "--redirects", "2", *args]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
        job = Job(res.args, res.returncode, res.stdout, res.stderr)
        job.ranks_stderr = {int(f.parent.name): f.read_text(errors="replace")
                            for f in logs.glob("*/attempt_*/*/stderr.log")}
        return job
    finally:
        shutil.rmtree(logs, ignore_errors=True)


@pytest.mark.slow
def test_trace_cli_two_ranks_same_bytes(tmp_path, bundled_tiny):
    from moekit.data import read_documents
    from moekit.routing.tracing import trace_documents

    args = ["--data", "moekit:corpus:test", "--max-tokens", "2500", "--seq-len", "96", "--batch-size", "3", "--probs"]
    res = torchrun(["-m", "moekit", "trace", "moekit:tiny", *args, "--out", str(tmp_path / "two.trace"), "--json"])
    assert res.returncode == 0, res.failure()
    assert json.loads(res.stdout)["tokens"] == 2500  # rank 0 alone prints
    docs = read_documents(["moekit:corpus:test"])
    one = trace_documents(bundled_tiny, docs, max_tokens=2500, seq_len=96, batch_size=3,
                          fields=("ids", "weights", "probs"), progress=False)
    one.save(tmp_path / "one.trace")
    assert (tmp_path / "two.trace").read_bytes() == (tmp_path / "one.trace").read_bytes()


@pytest.mark.slow
def test_eval_and_calibration_two_ranks_exact(tmp_path, bundled_tiny):
    from moekit.compress.observer import observe
    from moekit.data import read_documents
    from moekit.eval import perplexity

    res = torchrun([str(WORKER), "dp", str(tmp_path)])
    assert res.returncode == 0, res.failure()
    docs = read_documents(["moekit:corpus:test"])[:12]
    assert json.loads((tmp_path / "ppl.json").read_text()) == json.loads(json.dumps(
        perplexity(bundled_tiny, docs, max_tokens=1500, batch_size=3, seq_len=64, progress=False)))
    got = np.load(tmp_path / "calib.npz")
    want = observe(bundled_tiny, docs, seq_len=64, max_tokens=1200, batch_size=3)
    assert str(got["data_hash"]) == want.data_hash
    for key, value in want.to_arrays().items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)  # bit for bit, NaN where never routed


def _plain_rank(rank: int, world: int, port: int, args: list[str], timeout_s: str) -> subprocess.Popen:
    env = _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), MOEKIT_DIST_TIMEOUT=timeout_s)
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_missing_rank_is_a_clear_error(tmp_path):
    """WORLD_SIZE=2 but only one process starts: a one-line error after the timeout, not a hang."""
    p = _plain_rank(0, 2, free_port(), ["-m", "moekit", "trace", "moekit:tiny", "--data", "moekit:corpus:test",
                                        "--out", str(tmp_path / "t.trace")], "5")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "could not join the job within 5s" in err and "Traceback" not in err
    assert not (tmp_path / "t.trace").exists()


@pytest.mark.slow
def test_dead_rank_is_a_clear_error(tmp_path):
    """Rank 1 exits after joining: rank 0's next collective fails with a one-line error."""
    port = free_port()
    procs = [_plain_rank(r, 2, port, [str(WORKER), "dead", str(tmp_path)], "30") for r in (0, 1)]
    outs = [p.communicate(timeout=150) for p in procs]
    assert procs[1].returncode == 0
    assert procs[0].returncode == 2, outs[0][1][-2000:]
    assert "a rank died or stopped answering" in outs[0][1] and "Traceback" not in outs[0][1]


@pytest.mark.slow
def test_failed_rank_stderr_is_in_the_failure_message(tmp_path):
    """torchrun reports a killed rank only as "exitcode -6 (SIGABRT)": the harness shows the rank's own stderr."""
    res = torchrun([str(WORKER), "abort", str(tmp_path)], timeout=120)
    assert res.returncode != 0
    assert "rank 1 aborts on purpose" in res.ranks_stderr[1]
    message = res.failure()
    assert "----- rank 1 stderr -----\nrank 1 aborts on purpose" in message and "SIGABRT" in message


@pytest.mark.slow
def test_process_group_is_destroyed_at_shutdown(tmp_path):
    """Nothing imported after joining keeps the process group alive past ``runtime.shutdown()``: a group that
    outlives it is destroyed during interpreter teardown, where gloo aborted a rank now and then (SIGABRT,
    "terminate called without an active exception"; seen in test_expert_parallel_layer_equals_single_process).
    The ranks import moekit.nn after joining, which imports torch._dynamo and torch.distributed.nn.functional, and
    keep an expert-parallel layer (whose routers balance on all ranks' loads) alive past shutdown."""
    import torch

    res = torchrun([str(WORKER), "teardown", str(tmp_path)])
    assert res.returncode == 0, res.failure()
    for rank in (0, 1):
        report = json.loads((tmp_path / f"teardown{rank}.json").read_text())
        # summed loads [1, 0, 0, 2], mean 0.75: the bias moves by +-rate (1e-3) against each expert's load
        assert report == {"sum": [2.0, 2.0, 2.0], "bias": torch.tensor([-1e-3, 1e-3, 1e-3, -1e-3]).tolist(),
                          "group_alive_after_shutdown": False}, (rank, report)


@pytest.mark.parametrize("bad", ["abc", "-1", "nan"])
def test_bad_timeout_setting(bad, monkeypatch):
    from moekit.distributed.runtime import timeout_seconds
    from moekit.errors import MoekitError

    monkeypatch.setenv("MOEKIT_DIST_TIMEOUT", bad)
    with pytest.raises(MoekitError, match="MOEKIT_DIST_TIMEOUT"):
        timeout_seconds()


@pytest.mark.slow
def test_expert_parallel_layer_equals_single_process(tmp_path):
    """2 gloo ranks, uneven token counts, three routers (incl. top-p sentinels and the aux-loss-free bias step)."""
    res = torchrun([str(WORKER), "ep", str(tmp_path)])
    assert res.returncode == 0, res.failure()
    for rank in (0, 1):
        report = json.loads((tmp_path / f"ep{rank}.json").read_text())
        assert set(report) == {"softmax_then_topk", "aux_free", "top_p"}
        for router, diff in report.items():
            assert diff["scale"] > 0.1, router
            assert diff["forward"] <= 1e-6, (router, diff)
            for key in ("grad_x", "grad_gate_up", "grad_down", "grad_router", "grad_shared"):
                assert diff[key] <= 2e-6, (router, key, diff)
        assert report["aux_free"]["bias"] == 0.0 and report["aux_free"]["bias_moved"] > 0


EP_CONFIG = """\
model: {hidden: 32, num_layers: 2, num_heads: 4, inter: 48, num_experts: 4, top_k: 2, router: aux_free,
        router_kwargs: {bias_update_rate: 0.01}}
data: {seq_len: 32, max_train_docs: 30, val_windows_per_domain: 2}
train: {steps: 5, batch_size: 4, lr: 3.0e-3, warmup: 2, eval_every: 5, save_every: 5, log_every: 1, seed: 0}
"""


@pytest.mark.slow
def test_expert_parallel_training_matches_one_process(tmp_path):
    """`torchrun -m moekit train` (experts sharded on 2 ranks, aux-loss-free biases on all-reduced loads) follows
    the single-process run: same losses, evaluation and final weights within float rounding."""
    import torch

    from moekit.train.config_train import load_run_config, load_state, run_training

    (tmp_path / "ep.yaml").write_text(EP_CONFIG)
    res = torchrun(["-m", "moekit", "train", "--config", str(tmp_path / "ep.yaml"), "--out", str(tmp_path / "ep"),
                    "--no-progress", "--json"])
    assert res.returncode == 0, res.failure()
    assert json.loads(res.stdout)["step"] == 5
    one = run_training(load_run_config(tmp_path / "ep.yaml"), tmp_path / "one", progress=False)
    ep = json.loads((tmp_path / "ep" / "log.json").read_text())
    np.testing.assert_allclose(ep["lm_loss"], one["lm_loss"], rtol=1e-5)
    assert ep["evals"][-1]["load_cv"] == pytest.approx(one["evals"][-1]["load_cv"], rel=1e-6)
    a = load_state(tmp_path / "ep" / "checkpoint" / "state.pt")
    b = load_state(tmp_path / "one" / "checkpoint" / "state.pt")
    assert a["optimizer"] is None and set(a["model"]) == set(b["model"])
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    bias = [k for k in b["model"] if k.endswith("e_score_correction_bias")]
    assert bias and all(b["model"][k].abs().max() > 0 for k in bias)  # the balancing step did move the biases


@pytest.mark.slow
def test_transformers_expert_parallel_trace_and_route(tmp_path):
    """transformers' expert parallelism on 2 gloo ranks (DistributedConfig ep_size=2, moekit experts function):
    each rank holds half the experts; route and record work; the trace equals the one-process trace."""
    from moekit.data import read_documents
    from moekit.models.loading import load
    from moekit.routing.tracing import trace_documents
    from moekit.testing import save_tiny_checkpoint
    from moekit.trace import RoutingTrace

    save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    res = torchrun([str(WORKER), "hfep", str(tmp_path)])
    assert res.returncode == 0, res.failure()
    for rank in (0, 1):
        report = json.loads((tmp_path / f"hfep{rank}.json").read_text())
        assert report["local_experts"] == 4 and report["num_experts"] == 8
        for name in ("plain", "disable"):
            assert report[name]["ids_equal"], (rank, name)
            assert report[name]["logits"] <= 1e-5 and report[name]["weights"] <= 1e-6, (rank, name, report)
        assert report["disable"]["uses_disabled"] == 0
    one = trace_documents(load(tmp_path / "olmoe"), read_documents(["moekit:corpus:test"])[:10], max_tokens=700,
                          seq_len=64, batch_size=3, progress=False)
    ep = RoutingTrace.load(tmp_path / "ep.trace")
    for name in ("ids", "token_ids", "doc", "pos", "domain"):
        np.testing.assert_array_equal(getattr(ep, name), getattr(one, name), err_msg=name)
    np.testing.assert_allclose(ep.weights, one.weights, rtol=0, atol=1e-6)  # the expert sums round differently
    assert ep.meta == one.meta
