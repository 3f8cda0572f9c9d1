"""MoELM trains, and every router / layer variant runs forward and backward inside it."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import MoekitError
from moekit.nn import ROUTERS
from moekit.nn.model import MoELM, MoELMConfig

TINY = dict(vocab_size=64, hidden=32, num_layers=2, num_heads=4, inter=32, num_experts=4, top_k=2, max_seq=32)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_loss_decreases_on_a_repeated_batch() -> None:
    torch.manual_seed(0)
    model = MoELM(MoELMConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _batch()
    losses = []
    for _ in range(30):
        loss, logits, aux = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert logits.shape == (4, 16, 64)
    assert set(aux) == {"layer0/balance", "layer1/balance"}
    assert losses[0] > 3.5  # ~ln 64 at init
    assert losses[-1] < 0.5 * losses[0]


ROUTER_KWARGS = {
    "top_p": {"p": 0.5, "balance_coef": 0.01},
    "null_experts": {"num_null": 2, "balance_coef": 0.01},
    "sigmoid_bias": {"n_group": 2, "topk_group": 1, "routed_scaling": 2.0, "seq_coef": 1e-3},
    "aux_free": {"bias_update_rate": 1e-2},
    "random_fixed": {"k_start": 1, "ramp_steps": 2},
}


@pytest.mark.parametrize("router", ROUTERS.names())
def test_each_router_trains_in_the_model(router: str) -> None:
    torch.manual_seed(0)
    cfg = MoELMConfig(**TINY, router=router, router_kwargs=ROUTER_KWARGS.get(router, {"z_coef": 1e-3}))
    model = MoELM(cfg)
    ids = _batch(1)
    model.set_step(1)
    loss, _, _ = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
    loss.backward()
    assert torch.isfinite(loss)
    experts = model.layers[0].ffn.experts.gate_up_proj
    assert experts.grad is not None and experts.grad.abs().sum() > 0
    if router == "aux_free":
        assert model.layers[0].ffn.router.e_score_correction_bias.abs().sum() > 0  # updated itself
    if router == "random_fixed":
        assert (
            model.layers[0].ffn.router.current_k == 1 and not model.layers[0].ffn.router.weight.requires_grad
        )
        model.set_step(2)
        assert model.layers[0].ffn.router.current_k == 2


@pytest.mark.parametrize(
    "extra",
    [
        {"granularity": 2, "num_shared": 1},
        {"coe_iterations": 2, "top_k": 1},
        {"moe_every": 2, "first_dense": 0},
        {"rope": False, "tie_embeddings": False},
    ],
)
def test_layer_variants_run(extra: dict) -> None:
    cfg = MoELMConfig(**{**TINY, **extra})
    model = MoELM(cfg)
    ids = _batch(2)
    loss, _, aux = model(ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert len(model.moe_layers()) == (1 if extra.get("moe_every") == 2 else 2)
    if "coe_iterations" in extra:
        assert "layer0/balance/1" in aux


def test_config_errors_are_one_line() -> None:
    with pytest.raises(MoekitError, match="unknown MoELM config keys: bogus"):
        MoELMConfig.from_dict({"bogus": 1})
    with pytest.raises(MoekitError, match="unknown router"):
        MoELMConfig.from_dict({"router": "nope"})
    with pytest.raises(MoekitError, match="does not divide"):
        MoELMConfig.from_dict({"inter": 30, "granularity": 4})
