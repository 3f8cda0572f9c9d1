"""`moekit adapt train|select|compose` and `moekit eval --adapter` on a real checkpoint; ROCKET on a constructed
pool (issue 17, requirements 2 and 4)."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from peft import PeftModel

import moekit
import moekit.adapters as ad
from moekit.adapters.core import quiet_peft
from moekit.adapters.layers import FlyLoraLinear, LoraMoELinear
from moekit.adapters.rocket import compose, read_shots, retrieve, select
from moekit.adapters.train import train_adapter
from moekit.cli import main
from moekit.data.corpus import Document
from moekit.eval import perplexity
from moekit.testing import random_batch, save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("ck") / "qwen2_moe")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    facts = [(3, 4), (12, 5), (7, 7), (20, 1), (9, 30), (14, 2), (6, 11), (40, 8)]
    path.write_text("".join(json.dumps({"prompt": f"{a} + {b} =", "answer": f" {a + b}."}) + "\n" for a, b in facts))
    return path


def test_cli_train_then_eval_with_adapter(ckpt, tmp_path, capsys):
    data = tmp_path / "code.txt"
    data.write_text("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 20)
    out = tmp_path / "ad"
    assert main(["adapt", "train", str(ckpt), "--method", "flylora", "--rank", "8", "--active", "2",
                 "--data", str(data), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "0.05",
                 "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["method"] == "flylora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert main(["eval", str(ckpt), "--adapter", str(out), "--data", str(data), "--json"]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["eval", str(ckpt), "--data", str(data), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert with_adapter["perplexity"] != plain["perplexity"]
    lm = moekit.load(ckpt)
    with quiet_peft():
        model = PeftModel.from_pretrained(lm.model, str(out))
    want = perplexity(dataclasses.replace(lm, model=model), [Document(data.read_text(), "code", "x", str(data))],
                      progress=False)
    assert with_adapter["perplexity"] == pytest.approx(want["perplexity"], rel=1e-9)
    # FlyLoRA trains B only (out x rank per adapted layer): A is frozen random and the routing bias d is not trained
    fly = [m for m in model.modules() if isinstance(m, FlyLoraLinear)]
    assert fly and got["trainable_params"] == sum(m.out_features * 8 for m in fly)
    capsys.readouterr()
    assert main(["eval", "moekit:tiny", "--adapter", str(out), "--data", str(data)]) == 2  # another base model
    err = capsys.readouterr().err
    assert "different base model" in err and len(err.strip().splitlines()) == 1


def test_cli_bad_inputs_exit_2(ckpt, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("hello world, some text to train on. " * 10)
    base = ["adapt", "train", str(ckpt), "--data", str(data), "--steps", "1"]
    assert main([*base, "--method", "flylora", "--rank", "4", "--active", "8", "--out", str(tmp_path / "a")]) == 2
    assert main([*base, "--rank", "64", "--out", str(tmp_path / "b")]) == 2
    assert main([*base, "--method", "nope", "--out", str(tmp_path / "c")]) == 2
    assert main([*base, "--lr", "nan", "--out", str(tmp_path / "d")]) == 2
    (tmp_path / "exists").mkdir()
    assert main([*base, "--out", str(tmp_path / "exists")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["adapt", "select", "--pool", str(tmp_path / "empty"), "--data", str(data), "--model", str(ckpt),
                 "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    for needle in ("larger than the rank", "larger than the hidden size", "unknown adapter method",
                   "--lr must be a finite number", "already exists", "holds no adapters"):
        assert needle in err, needle
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 6
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _pool_adapter(lm, path, scale, direction_seed, train_on=None):
    """A rank-2 LoRA with random factors (seeded), optionally then trained on ``train_on`` shots."""
    model = copy.deepcopy(lm.model)
    pm = ad.attach(model, ad.make_config(model, "lora", rank=2))
    gen = torch.Generator().manual_seed(direction_seed)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    if train_on is not None:
        train_adapter(pm, lm.tokenizer, [s.text for s in train_on], steps=12, lr=0.05, batch_size=4, seq_len=16,
                      seed=direction_seed, progress=False)
    ad.save_adapter(pm, path, extra={"model": str(lm.path)})
    return path


def test_rocket_select_picks_the_better_and_diverse_experts(ckpt, shots, tmp_path, capsys):
    lm = moekit.load(ckpt)
    pool = tmp_path / "pool"
    # good: trained on the task (good_a2 is good_a again: cosine 1); bad: untrained random updates
    task = read_shots(shots)
    _pool_adapter(lm, pool / "good_a", 0.1, 1, train_on=task)
    shutil.copytree(pool / "good_a", pool / "good_a2")
    _pool_adapter(lm, pool / "good_b", 0.1, 2, train_on=task)
    _pool_adapter(lm, pool / "bad_1", 0.1, 3)
    _pool_adapter(lm, pool / "bad_2", 0.1, 4)
    result = select(lm, pool, task, keep=2, candidates=3, progress=False)
    names = [r["adapter"].rsplit("/", 1)[-1] for r in result["ranking"]]
    assert set(names[:3]) == {"good_a", "good_a2", "good_b"} and set(names[3:]) == {"bad_1", "bad_2"}
    chosen = {e.rsplit("/", 1)[-1] for e in result["experts"]}
    assert "good_b" in chosen and len(chosen & {"good_a", "good_a2"}) == 1  # never the two identical ones
    ppl = {r["adapter"].rsplit("/", 1)[-1]: r["perplexity"] for r in result["ranking"]}
    assert max(ppl["good_a"], ppl["good_b"]) < min(ppl["bad_1"], ppl["bad_2"])
    # the CLI writes the same choice; the base model is read from the pool
    out = tmp_path / "chosen.json"
    assert main(["adapt", "select", "--pool", str(pool), "--data", str(shots), "--keep", "2", "--candidates", "3",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["experts"] == result["experts"]
    capsys.readouterr()
    moe = tmp_path / "moe"
    assert main(["adapt", "compose", str(ckpt), "--experts", str(out), "--top-k", "1", "--data", str(shots),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--out", str(moe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts"] == result["experts"]
    reloaded = ad.load_adapter(moekit.load(ckpt).model, moe)
    assert sum(isinstance(m, LoraMoELinear) for m in reloaded.modules()) == 4 * 3


def test_compose_starts_from_the_source_loras_exactly(ckpt, tmp_path):
    lm = moekit.load(ckpt)
    src = _pool_adapter(lm, tmp_path / "one", 0.3, 5)
    b = random_batch(vocab=100, seed=2)
    single = ad.load_adapter(copy.deepcopy(lm.model), src)
    want = single(**b).logits
    moe = compose(moekit.load(ckpt), [str(src)], top_k=1)
    torch.testing.assert_close(moe(**b).logits, want, rtol=1e-5, atol=1e-5)
    # two identical experts with any router: the convex combination is the same LoRA again
    moe2 = compose(moekit.load(ckpt), [str(src), str(src)], top_k=2)
    torch.testing.assert_close(moe2(**b).logits, want, rtol=1e-5, atol=1e-5)


def test_retrieve_prefers_similar_and_deduplicates(ckpt, shots):
    lm = moekit.load(ckpt)
    task = read_shots(shots)
    same = Document(task[0].text, "arith", "p0", "pool")
    pool = [Document("import os\nprint(os.getcwd())\n", "code", "c", "pool"), same,
            Document(task[0].text, "arith", "p1", "pool"),
            Document("The rain in the valley fell softly on the old stone bridge.", "prose", "q", "pool")]
    got = retrieve(lm, task, pool, budget=2, dedup=0.9)
    assert got[0].text == task[0].text and len(got) == 2
    assert got[1].text != task[0].text  # its exact duplicate is skipped
