"""Adapter experts (issue 17): every method trains, saves and reloads through PEFT exactly; frozen parts stay
frozen; balancing evens the load; SMoRA sparse == dense; LoRA on fused experts matches a per-expert reference."""

import copy

import pytest
import torch
from peft import PeftModel

import moekit.adapters as ad
from moekit.adapters.core import quiet_peft
from moekit.adapters.layers import FlyLoraLinear, LoraMoELinear, SMoRALinear
from moekit.adapters.train import lm_loss
from moekit.errors import MoekitError
from moekit.testing import random_batch, tiny_model

METHOD_ARGS = {
    "lora": dict(rank=4),
    "lora-experts": dict(method="lora", rank=2, target="experts"),
    "flylora": dict(rank=8, active=2),
    "smora": dict(rank=8, active=2),
    "mora": dict(rank=8, active=3),
    "mixlora": dict(rank=2, experts=3, top_k=2),
    "loramoe": dict(rank=2, experts=4),
    "hydralora": dict(rank=4, experts=3),
}


def _config(model, name):
    kw = dict(METHOD_ARGS[name])
    return ad.make_config(model, kw.pop("method", name), **kw)


def _train(peft_model, steps=3, lr=5e-2, seed=0):
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    for i in range(steps):
        b = random_batch(seed=seed + i, batch=2, seq=10)
        loss = lm_loss(peft_model, b["input_ids"], b["attention_mask"])
        extra = ad.aux_loss(peft_model)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()


def _base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(METHOD_ARGS))
def test_train_save_reload_exact_and_base_frozen(name, tmp_path):
    base = tiny_model("qwen2_moe")
    before = _base_state(base)
    peft_model = ad.attach(copy.deepcopy(base), _config(base, name))
    fly_a = {n: m.lora_A["default"].weight.clone() for n, m in peft_model.named_modules()
             if isinstance(m, FlyLoraLinear)}
    b = random_batch(seed=99)
    at_init = peft_model(**b).logits
    _train(peft_model)
    after = peft_model(**b).logits
    assert not torch.equal(after, at_init)  # the adapter learned something
    # base weights bit-identical after training
    inner = peft_model.get_base_model()
    with peft_model.disable_adapter():
        assert torch.equal(inner(**b).logits, base(**b).logits)
    for n, p in inner.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p, before[key]), n
    for n, m in peft_model.named_modules():
        if isinstance(m, FlyLoraLinear):  # FlyLoRA's A: a frozen buffer, unchanged
            assert torch.equal(m.lora_A["default"].weight, fly_a[n])
            assert not list(m.lora_A["default"].parameters())
    ad.save_adapter(peft_model, tmp_path / "ad")
    with quiet_peft():  # PEFT 0.21 trips a transformers 5.24 deprecation warning on every wrap
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    assert isinstance(reloaded.peft_config["default"], ad.MoekitLoraConfig)
    assert torch.equal(reloaded(**b).logits, after)


def test_flylora_definition():
    base = tiny_model("qwen2_moe")
    peft_model = ad.attach(copy.deepcopy(base), ad.make_config(base, "flylora", rank=8, active=2))
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight
    n = layer.in_features
    assert a.shape == (8, n)
    assert ((a != 0).sum(1) == max(1, int(n * 2 / 8))).all()  # p = n·k/r non-zeros per row
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))
    assert layer.scaling["default"] == 2.0  # α = 2r, scale α/r
    b = random_batch(seed=1)
    assert torch.equal(peft_model(**b).logits, base(**b).logits)  # B = 0: no change at init
    # the update is B (y ⊙ mask) α/r with mask = top-k of |Ax + d|
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_route_bias["default"].value.copy_(torch.linspace(-1, 1, 8))
        x = torch.randn(5, n)
        y = x @ a.T
        idx = (y + layer.lora_route_bias["default"].value).abs().topk(2, -1).indices
        mask = torch.zeros_like(y).scatter(-1, idx, 1.0)
        want = layer.base_layer(x) + (y * mask) @ layer.lora_B["default"].weight.T * 2.0
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


def test_smora_sparse_equals_dense():
    # float64 (eager experts: grouped_mm has no double kernel) so the two paths' different summation orders
    # leave ~1e-14, not float32's ~1e-5 that made a per-element gradient tolerance depend on the CPU
    base = tiny_model("qwen2_moe").double()
    base.set_experts_implementation("eager")
    sparse = ad.attach(copy.deepcopy(base), ad.make_config(base, "smora", rank=8, active=3, compute="sparse"))
    with torch.no_grad():
        for n, p in sparse.named_parameters():
            if "lora_B" in n:
                p.normal_()
    dense = copy.deepcopy(sparse)
    for m in ad.moe_layers(dense):
        m.moe_settings["default"]["compute"] = "dense"
    b = random_batch(seed=3)
    out_s, out_d = sparse(**b).logits, dense(**b).logits
    torch.testing.assert_close(out_s, out_d, rtol=1e-10, atol=1e-10)
    out_s.square().mean().backward()
    out_d.square().mean().backward()
    gs = {n: p.grad for n, p in sparse.named_parameters() if p.grad is not None}
    gd = {n: p.grad for n, p in dense.named_parameters() if p.grad is not None}
    assert gs.keys() == gd.keys() and len(gs) > 0
    for n in gs:
        torch.testing.assert_close(gs[n], gd[n], rtol=1e-9, atol=1e-11 * float(gd[n].abs().max()))
    # renormalised gates: they sum to `active` on every token
    layer = next(m for m in ad.moe_layers(sparse) if isinstance(m, SMoRALinear))
    gates, idx = layer._gates("default", torch.randn(4, layer.in_features, dtype=torch.float64))
    torch.testing.assert_close(gates.sum(-1), torch.full((4,), 3.0, dtype=torch.float64))


def _load_cv_after(method, **kw):
    base = tiny_model("qwen2_moe")
    peft_model = ad.attach(copy.deepcopy(base), ad.make_config(base, method, **kw))
    peft_model.train()
    with torch.no_grad():
        for i in range(40):
            peft_model(**random_batch(seed=i, batch=4, seq=16))
    peft_model.eval()
    ad.reset_load(peft_model)
    with torch.no_grad():
        for i in range(5):
            peft_model(**random_batch(seed=1000 + i, batch=4, seq=16))
    return ad.load_cv(peft_model)


@pytest.mark.parametrize("method,kw", [("smora", dict(bias_lr=0.001)),
                                       ("flylora", dict(bias_lr=0.005, route_bias="outside"))])
def test_sign_rule_evens_the_load(method, kw):
    without = _load_cv_after(method, rank=8, active=2, **{**kw, "bias_lr": 0.0})
    with_rule = _load_cv_after(method, rank=8, active=2, **kw)
    assert with_rule < 0.75 * without, (with_rule, without)


@pytest.mark.parametrize("method", ["flylora", "smora"])
def test_sign_rule_update_is_exact(method):
    base = tiny_model("qwen2_moe")
    pm = ad.attach(copy.deepcopy(base), ad.make_config(base, method, rank=8, active=3, bias_lr=0.25))
    layer = pm.get_base_model().model.layers[1].self_attn.v_proj
    x = torch.randn(2, 7, layer.in_features)
    d0 = layer.lora_route_bias["default"].value.clone()
    layer.eval()
    ad.reset_load(pm)
    layer(x)  # eval: counts recorded, bias untouched
    counts = layer.moe_load["default"].double()
    assert torch.equal(layer.lora_route_bias["default"].value, d0) and counts.sum() == 2 * 7 * 3
    layer.train()
    layer(x)  # train: b_i += u · sign(mean(c) − c_i), c the counts of this forward
    want = d0 + 0.25 * torch.sign(counts.mean() - counts).float()
    assert torch.equal(layer.lora_route_bias["default"].value, want)


def test_mixlora_balance_loss_evens_the_load():
    def cv(coef):
        base = tiny_model("qwen2_moe")
        torch.manual_seed(0)
        peft_model = ad.attach(copy.deepcopy(base), ad.make_config(base, "mixlora", rank=2, experts=4, top_k=1,
                                                                  aux_coef=coef, router_init=1.0))
        _train(peft_model, steps=25, lr=3e-2)
        ad.reset_load(peft_model)
        with torch.no_grad():
            for i in range(5):
                peft_model(**random_batch(seed=1000 + i, batch=4, seq=16))
        return ad.load_cv(peft_model)

    without, with_loss = cv(0.0), cv(1.0)
    assert with_loss < 0.7 * without, (with_loss, without)


def test_switch_and_localized_balance_losses_by_formula():
    base = tiny_model("qwen2_moe")
    pm = ad.attach(copy.deepcopy(base), ad.make_config(base, "loramoe", rank=2, experts=4, balance_delta=0.5))
    layer = next(m for m in ad.moe_layers(pm) if isinstance(m, LoraMoELinear))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    # every token is task data (type 1): experts 2, 3 weighted 1.5, experts 0, 1 weighted 0.5
    q = torch.tensor([0.8 * 0.5, 0.2 * 0.5, 0.2 * 1.5, 0.8 * 1.5])
    want = q.var(unbiased=False) / q.mean() ** 2
    torch.testing.assert_close(layer._balance_loss(layer.moe_settings["default"], probs, None), want)
    # the first sample is world-knowledge data: its weights swap to 1.5 on experts 0, 1 and 0.5 on 2, 3
    ad.set_sample_types(pm, torch.tensor([0.0, 1.0]))
    q = torch.tensor([0.7 * 1.5 + 0.1 * 0.5, 0.1 * 1.5 + 0.1 * 0.5, 0.1 * 0.5 + 0.1 * 1.5, 0.1 * 0.5 + 0.7 * 1.5])
    torch.testing.assert_close(layer._balance_loss(layer.moe_settings["default"], probs, None),
                               q.var(unbiased=False) / q.mean() ** 2)
    s = {"balance": "switch"}
    idx = torch.tensor([[0], [0]])
    # f = (1, 0, 0, 0), P = (0.4, 0.1, 0.1, 0.4): 4 · 0.4
    torch.testing.assert_close(layer._balance_loss(s, probs, idx), torch.tensor(1.6))


def test_mora_prune_keeps_only_the_important_ranks():
    base = tiny_model("qwen2_moe")
    pm = ad.attach(copy.deepcopy(base), ad.make_config(base, "mora", rank=8, active=3))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert ad.prune_ranks(pm, keep=2) == 4 * 3  # q, k, v, o in 3 layers
    ad.reset_load(pm)
    pm(**random_batch(seed=5))
    for m in ad.moe_layers(pm):
        used = (m.moe_load["default"] > 0).nonzero().flatten()
        imp = m.lora_A["default"].weight.norm(dim=1) * m.lora_B["default"].weight.norm(dim=0)
        assert set(used.tolist()) == set(imp.topk(2).indices.tolist())


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_lora_on_fused_experts_matches_per_expert_reference(arch):
    base = tiny_model(arch)
    cfg = ad.make_config(base, "lora", rank=2, target="experts", alpha=3.0)
    pm = ad.attach(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    b = random_batch(seed=4)
    out = pm(**b).logits
    # reference: add s · B_e A_e to every expert's weight by hand, in the model's own layout
    ref = copy.deepcopy(base)
    s = 3.0 / 2
    for name, mod in pm.get_base_model().named_modules():
        if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}) or not hasattr(mod,
                                                                                                  "parameter_name"):
            continue
        a = mod.lora_A["default"].weight  # [E·r, in]
        bb = mod.lora_B["default"].weight  # [out, r·E]
        e = a.shape[0] // 2
        delta = torch.einsum("ore,eri->eoi", bb.reshape(bb.shape[0], 2, e), a.reshape(e, 2, -1)) * s  # [E,out,in]
        param_name = name.replace(".base_layer", "") + "." + mod.parameter_name
        param = ref.get_parameter(param_name)
        transposed = getattr(mod.get_base_layer(), "is_transposed", False)
        with torch.no_grad():
            param += delta.transpose(1, 2) if transposed else delta
    torch.testing.assert_close(out, ref(**b).logits, rtol=1e-4, atol=1e-5)
    # merge / unmerge round trip
    weights = {n: p.clone() for n, p in pm.get_base_model().named_parameters() if "lora_" not in n}
    pm.merge_adapter()
    torch.testing.assert_close(pm(**b).logits, out, rtol=1e-4, atol=1e-5)
    pm.unmerge_adapter()
    for n, p in pm.get_base_model().named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(pm(**b).logits, out, rtol=1e-5, atol=1e-6)


def test_plain_lora_merge_unmerge_and_routed_methods_refuse_merge():
    base = tiny_model("qwen2_moe")
    pm = ad.attach(copy.deepcopy(base), ad.make_config(base, "lora", rank=4))
    _train(pm)
    b = random_batch(seed=7)
    out = pm(**b).logits
    merged = copy.deepcopy(pm).merge_and_unload()
    torch.testing.assert_close(merged(**b).logits, out, rtol=1e-5, atol=1e-5)
    fly = ad.attach(copy.deepcopy(base), ad.make_config(base, "flylora", rank=8, active=2))
    with pytest.raises(MoekitError, match="cannot be merged"):
        fly.merge_adapter()


def test_bad_inputs():
    base = tiny_model("qwen2_moe")  # hidden size 32
    with pytest.raises(MoekitError, match="larger than the hidden size"):
        ad.make_config(base, "lora", rank=64)
    with pytest.raises(MoekitError, match="larger than the rank"):
        ad.make_config(base, "flylora", rank=4, active=8)
    with pytest.raises(MoekitError, match="--active applies"):
        ad.make_config(base, "lora", rank=4, active=2)
    with pytest.raises(MoekitError, match="supports --method lora only"):
        ad.make_config(base, "flylora", rank=4, active=2, target="experts")
    with pytest.raises(MoekitError, match="unknown adapter method"):
        ad.make_config(base, "dora")
    with pytest.raises(MoekitError, match="matches no linear layer"):
        ad.make_config(base, "lora", target="nothing_here")
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(MoekitError, match="bias_lr"):
            ad.make_config(base, "flylora", rank=4, active=2, bias_lr=bad)
    with pytest.raises(MoekitError, match="top-k 5 is larger"):
        ad.make_config(base, "mixlora", experts=4, top_k=5)
    with pytest.raises(MoekitError, match="no fused 3-D expert"):
        ad.expert_target_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_adapter_for_a_different_base_is_refused(tmp_path):
    base = tiny_model("qwen2_moe")
    pm = ad.attach(copy.deepcopy(base), ad.make_config(base, "lora", rank=2))
    ad.save_adapter(pm, tmp_path / "ad")
    with pytest.raises(MoekitError, match="already exists"):
        ad.save_adapter(pm, tmp_path / "ad")
    other = tiny_model("qwen2_moe", seed=1)  # same shapes, different weights
    with pytest.raises(MoekitError, match="different base model.*embedding"):
        ad.load_adapter(other, tmp_path / "ad")
    with pytest.raises(MoekitError, match="not an adapter directory"):
        ad.load_adapter(base, tmp_path)
    assert isinstance(ad.load_adapter(copy.deepcopy(base), tmp_path / "ad"), PeftModel)
