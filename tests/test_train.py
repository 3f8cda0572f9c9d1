"""moekit.train: the training loop learns, the router aux loss is part of the loss, checkpoints reload."""

import json

import pytest
import torch
import torch.nn.functional as F

from moekit.train import (
    TrainConfig,
    count_parameters,
    lr_at,
    model_config,
    pack_windows,
    save_checkpoint,
    train_lm,
)

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32)


def _model(seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config("tiny", vocab_size=64, **SMALL))


def test_presets_meet_the_bundled_requirements():
    tiny = model_config("tiny", vocab_size=6144)
    shared = model_config("tiny-shared", vocab_size=6144)
    dense = model_config("dense", vocab_size=6144)
    assert tiny.model_type == "qwen3_moe" and tiny.num_experts >= 16 and tiny.num_experts_per_tok >= 2
    assert shared.model_type == "qwen2_moe" and shared.shared_expert_intermediate_size > 0
    assert tiny.tie_word_embeddings and shared.tie_word_embeddings and dense.tie_word_embeddings
    active = tiny.num_experts_per_tok * tiny.moe_intermediate_size
    assert active == dense.intermediate_size
    assert shared.num_experts_per_tok * shared.moe_intermediate_size + shared.shared_expert_intermediate_size == active


def test_training_reduces_loss_on_a_fixed_batch():
    model = _model()
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup=2, log_every=5, seed=0)
    hist = train_lm(model, batch, cfg, progress=False)
    assert hist.tokens_seen == 20 * 4 * 16
    assert hist.lm_loss[-1] < hist.lm_loss[0] - 0.5
    # one entry per logged step; the logged LM loss is the total minus the weighted aux loss, not the total
    assert hist.steps == [5, 10, 15, 20] and len(hist.loss) == len(hist.lm_loss) == len(hist.aux_loss) == 4
    coef = model.config.router_aux_loss_coef
    assert coef > 0 and all(a > 0 for a in hist.aux_loss)
    for total, lm, aux in zip(hist.loss, hist.lm_loss, hist.aux_loss, strict=True):
        assert total == pytest.approx(lm + coef * aux, rel=1e-6)
    assert not model.training


def test_aux_loss_is_part_of_the_loss():
    model = _model().train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    # the Switch balance loss over all layers' router logits: E * sum_e (share of top-k picks of e) * (mean prob of e)
    logits = torch.cat(out.router_logits).detach()
    probs = logits.softmax(-1)
    e, k = model.config.num_experts, model.config.num_experts_per_tok
    picks = torch.bincount(probs.topk(k, dim=-1).indices.flatten(), minlength=e) / logits.shape[0]
    assert out.aux_loss.item() == pytest.approx(e * float((picks * probs.mean(0)).sum()), rel=1e-5)
    assert out.loss.item() == pytest.approx(lm_loss.item() + model.config.router_aux_loss_coef * out.aux_loss.item(),
                                            rel=1e-5)


def test_pack_windows_and_schedule():
    w = pack_windows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0, seed=0)
    assert w.shape == (3, 4) and (w == 0).sum() == 3
    assert sorted(w.flatten().tolist()) == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from moekit.data import load_tokenizer

    model = _model()
    params = count_parameters(model)
    assert params["active"] < params["total"]
    path = save_checkpoint(model, load_tokenizer(), tmp_path / "ckpt", extra_files={"x.json": json.dumps({})})
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
