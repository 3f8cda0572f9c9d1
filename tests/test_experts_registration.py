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
