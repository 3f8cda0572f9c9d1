"""``import moekit`` alone makes ``experts_implementation="moekit"`` available, without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHECK = """
import sys
{first}
import moekit
assert ("torch" in sys.modules) == {torch_expected}, "import moekit changed whether torch is loaded"
assert "moekit.nn" not in sys.modules or {torch_expected}
import torch
from moekit.testing import random_batch, tiny_model
model = tiny_model("olmoe")
ref = model(**random_batch()).logits
model.set_experts_implementation("moekit")
assert model.config._experts_implementation == "moekit"
import moekit.nn.dispatch as d
calls = []
orig = d.expert_forward
def counting(*a, **k):
    calls.append(1)
    return orig(*a, **k)
d.expert_forward = counting
out = model(**random_batch()).logits
assert calls, "the moekit implementation was not used"
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
print("ok")
"""


# each case is a fresh interpreter importing torch + transformers: the second runs with the slow tests
@pytest.mark.parametrize("first,torch_expected", [
    ("", False), pytest.param("import transformers.integrations.moe", True, marks=pytest.mark.slow)])
def test_import_moekit_registers_experts_implementation(first: str, torch_expected: bool) -> None:
    code = _CHECK.format(first=first, torch_expected=torch_expected)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_use_moekit_experts_switches_supported_models_and_keeps_their_logits() -> None:
    """generate/serve switch resident models to moekit's experts: same logits as transformers' own; models whose
    experts sit outside transformers' experts interface are left as they are."""
    import torch

    from moekit.nn.dispatch import use_moekit_experts
    from moekit.testing import tiny_model

    for arch in ("olmoe", "gpt_oss", "deepseek_v3"):
        model = tiny_model(arch).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
        assert model.config._experts_implementation != "moekit"
        assert use_moekit_experts(model)
        assert model.config._experts_implementation == "moekit"
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    outside = tiny_model("jetmoe")
    before = outside.config._experts_implementation
    assert not use_moekit_experts(outside)
    assert outside.config._experts_implementation == before
