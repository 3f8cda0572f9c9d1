"""One expert-output probe (moekit.models.probe) serves calibration and super-expert profiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.compress.observer import observe
from moekit.data import load_corpus
from moekit.models.probe import expert_outputs
from moekit.report import profile_expert_max
from moekit.testing import tiny_lm


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_probe_outputs_weighted_are_the_experts_module_output(arch):
    """Σ_j g_j f_j over the probe's per-expert outputs is what the experts module computes for the routing."""
    lm = tiny_lm(arch)
    view = lm.moe.layers[0]
    hidden_size = lm.model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(12, hidden_size, generator=gen)
    k = view.top_k
    ids = torch.stack([torch.randperm(view.num_experts, generator=gen)[:k] for _ in range(12)])
    w = torch.rand(12, k, generator=gen)
    with torch.no_grad():
        want = view.experts(h, ids, w)
        got = torch.zeros_like(want)
        seen = []
        for j, rows, f in expert_outputs(view.experts, view.num_experts, h, ids):
            seen.append(j)
            g = (w * (ids == j)).sum(dim=1)[rows]
            got[rows] += g[:, None] * f
    assert seen == sorted(set(ids.reshape(-1).tolist()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_profiling_and_calibration_see_the_same_expert_maxima(bundled_tiny):
    lm = bundled_tiny
    docs = load_corpus("validation")[:10]
    kw = {"max_tokens": 400, "seq_len": 48, "batch_size": 4}
    profiled = profile_expert_max(lm, docs, **kw)
    calibrated = observe(lm, docs, **kw).stacked("max_abs")
    assert np.isfinite(profiled).sum() > 0
    np.testing.assert_array_equal(profiled, calibrated)
