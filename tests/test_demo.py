"""`moekit demo` end to end on the bundled model (issue 3, req. 6; later issues add steps)."""

import json

import numpy as np
import pytest

import moekit
from moekit.cli import main
from moekit.compress.demo import balanced_docs
from moekit.eval import perplexity


# end to end through every step (each step also has fast tests of its own: compress/steer/serve demo steps)
@pytest.mark.slow
def test_demo_writes_every_output(tmp_path, capsys, bundled_tiny):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-tokens", "3000"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed.replace("\n", "")
    names = {p.name for p in out.iterdir()}
    assert {"inspect.json", "test.trace", "stats.json", "perplexity.json", "report.html", "compression.json",
            "steering.json", "offload.json", "summary.json"} <= names
    trace = moekit.RoutingTrace.load(out / "test.trace")
    stats = json.loads((out / "stats.json").read_text())
    assert trace.num_tokens == 3000 == stats["model"]["tokens"]
    assert len(set(trace.domains)) == 6  # the token cap samples every domain
    counts = np.bincount(trace.ids[0][trace.ids[0] >= 0].astype(int), minlength=16)
    assert stats["load"][0] == counts.tolist()
    comp = json.loads((out / "compression.json").read_text())
    assert comp["experts_after"] == int(0.75 * comp["experts_before"])
    # "before" is the plain model's held-out perplexity on the same documents; pruning a quarter of the
    # experts costs some of it, but the model must stay a model
    test_docs = balanced_docs("test", 4096 // 6, bundled_tiny.tokenizer)  # demo_step's defaults
    before = perplexity(bundled_tiny, test_docs, max_tokens=4096, progress=False)["perplexity"]
    assert comp["perplexity_before"] == pytest.approx(before, rel=1e-5)
    assert before < comp["perplexity_after"] < 3 * before
    steer = json.loads((out / "steering.json").read_text())
    assert steer["ppl_digits"]["found_off"] != steer["ppl_digits"]["base"]
    served = json.loads((out / "offload.json").read_text())
    assert served["exact"] is True and 0 <= served["hit_rate"] <= 1
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 5 and "http://" not in html
    assert main(["demo", "--out", str(out), "--max-tokens", "3000"]) == 2  # no overwrite without --force
