"""``moekit train``: config parsing errors, exact resume, loss going down, CLI outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from moekit.errors import MoekitError
from moekit.train.config_train import load_run_config, load_state, parse_run_config, run_training

torch.set_num_threads(1)

TINY = {
    "model": {"hidden": 32, "num_layers": 1, "num_heads": 2, "inter": 32, "num_experts": 4, "top_k": 2},
    "data": {"seq_len": 32, "max_train_docs": 40, "val_windows_per_domain": 2},
    "train": {"steps": 10, "batch_size": 4, "warmup": 2, "eval_every": 0, "save_every": 5, "log_every": 1},
}


def _spec(**sections: dict) -> dict:
    spec = copy.deepcopy(TINY)
    for name, values in sections.items():
        spec[name].update(values)
    return spec


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({**TINY, "optim": {}}, "unknown config sections: optim"),
        (_spec(model={"hiden": 3}), "unknown MoELM config keys: hiden"),
        (_spec(model={"router": "nope"}), "nope"),
        (_spec(train={"stepz": 3}), "unknown train config keys: stepz"),
        (_spec(data={"seq": 3}), "unknown data config keys: seq"),
        (_spec(model={"router": "top_p", "router_kwargs": {"p": 2.0}}), "p must be in"),
        (_spec(data={"corpus": "x.txt"}), "not supported"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_config_is_a_one_line_error(spec: object, needle: str) -> None:
    with pytest.raises(MoekitError) as err:
        parse_run_config(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(MoekitError, match="invalid YAML"):
        load_run_config(bad)
    with pytest.raises(MoekitError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_train_coefs_reach_the_router() -> None:
    run = parse_run_config(_spec(train={"z_coef": 0.001}))
    assert run.model.router_kwargs["z_coef"] == 0.001


def test_resume_is_exact(tmp_path: Path) -> None:
    # aux_free: the selection bias (a buffer updated every step) must survive the checkpoint too
    run = parse_run_config(_spec(model={"router": "aux_free", "router_kwargs": {"bias_update_rate": 0.01}}))
    run_training(run, tmp_path / "full", progress=False)
    run_training(run, tmp_path / "split", stop_at=5, progress=False)
    assert load_state(tmp_path / "split/checkpoint/state.pt")["step"] == 5
    with pytest.raises(MoekitError, match="--resume"):
        run_training(run, tmp_path / "split", progress=False)
    log = run_training(run, tmp_path / "split", resume=True, progress=False)
    assert log["steps"] == list(range(1, 11))
    full = load_state(tmp_path / "full/checkpoint/state.pt")
    split = load_state(tmp_path / "split/checkpoint/state.pt")
    assert full["step"] == split["step"] == 10
    for name, value in full["model"].items():
        assert torch.equal(value, split["model"][name]), name
    assert full["log"]["lm_loss"] == split["log"]["lm_loss"]


class _RunsCode:
    """Unpickling this would run ``os.system``: the payload of a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code(tmp_path: Path) -> None:
    run = parse_run_config(_spec())
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _RunsCode(marker)}, out / "checkpoint/state.pt")
    with pytest.raises(MoekitError, match="not a moekit training checkpoint"):
        run_training(run, out, resume=True, progress=False)
    assert not marker.exists()


def test_loss_decreases() -> None:
    run = parse_run_config(_spec(train={"steps": 30, "lr": 1e-2, "save_every": 0}))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = run_training(run, tmp, progress=False)
    assert sum(log["lm_loss"][-5:]) / 5 < sum(log["lm_loss"][:5]) / 5 - 0.5


def test_cli_writes_checkpoint_log_and_plot(tmp_path: Path) -> None:
    import moekit.cli.train_cmd  # noqa: F401  (registers the command)
    from moekit.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_spec(train={"steps": 4, "eval_every": 4, "save_every": 2})))
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    state = load_state(out / "checkpoint/state.pt")
    assert state["step"] == 4 and state["optimizer"] is not None  # the last step's, resumable
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / "log.json").read_text())
    assert log["steps"][-1] == 4
    ev = log["evals"][-1]
    assert set(ev["val_loss"]) >= {"code", "prose"} and ev["active_experts"] == pytest.approx(2.0)
    cfg.write_text(yaml.safe_dump(_spec(model={"router": "nope"})))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o2")]) == 2


def test_example_configs_parse() -> None:
    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert configs
    for path in configs:
        load_run_config(path)
