"""One checkpoint writer (moekit.formats.writer): every command's output is the same kind of directory, loads in
transformers, and its config declares the dtype its weights were written in."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moekit
from moekit.compress.lowmem import meta_model, write_pruned_files
from moekit.compress.merge import merge
from moekit.compress.observer import observe_batches
from moekit.compress.quantize import quantize
from moekit.compress.writer import write_pruned
from moekit.distributed.apply import write_placed
from moekit.distributed.placement import Placement
from moekit.formats import Checkpoint, read_header
from moekit.formats.writer import write_checkpoint
from moekit.io import MARKER
from moekit.testing import random_batch, save_tiny_checkpoint
from moekit.train.upcycle import upcycle_checkpoint


@pytest.fixture(scope="module")
def src_bf16(tmp_path_factory):
    """A tiny qwen3_moe checkpoint (with tokenizer) stored in bfloat16."""
    root = tmp_path_factory.mktemp("writer")
    fp32 = save_tiny_checkpoint("qwen3_moe", root / "fp32")
    lm = moekit.load(fp32, dtype="bfloat16")
    return write_checkpoint(root / "bf16", model=lm.model, tokenizer=fp32)


def _dtypes_written(path) -> set[torch.dtype]:
    ck = Checkpoint(path)
    return {ck.tensors[k].dtype for k in ck.tensors}


def _check_output(path, record: str | None, dtype: torch.dtype):
    """A marked directory; config dtype = the float dtype in the files = what transformers loads with."""
    assert (path / MARKER).is_file()
    assert json.loads((path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {dtype}
    if record is not None:
        assert json.loads((path / record).read_text())["tokenizer_copied"] is True
    assert (path / "tokenizer.json").is_file()
    return model


def test_prune_merge_placement_and_lowmem_write_the_dtype_they_write(src_bf16, tmp_path):
    lm = moekit.load(src_bf16)
    kept = {li: [0, 2, 3, 5, 6, 7] for li in lm.moe.indices}
    ids = random_batch(batch=1, seq=10, seed=3)["input_ids"]

    mem = write_pruned(lm, kept, tmp_path / "pruned")
    assert _dtypes_written(mem) == {torch.bfloat16}
    pruned = _check_output(mem, "moekit_compression.json", torch.bfloat16)

    files = write_pruned_files(src_bf16, meta_model(src_bf16), kept, tmp_path / "lowmem", shard_bytes=20_000)
    assert len(list(files.glob("model-*.safetensors"))) > 1 and (files / "model.safetensors.index.json").is_file()
    assert _dtypes_written(files) == {torch.bfloat16}
    lowmem = _check_output(files, "moekit_compression.json", torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, lowmem(ids).logits)  # two ways of writing, one checkpoint

    stats = observe_batches(lm, [random_batch(batch=2, seq=12, seed=s) for s in range(2)])
    res, _ = merge(lm, 0.25, stats, out=tmp_path / "merged")
    _check_output(res.out, "moekit_compression.json", torch.bfloat16)

    assignment = [[e % 2 for e in range(v.num_experts)] for v in lm.moe]
    placed = write_placed(lm, Placement(2, lm.moe.indices, assignment), tmp_path / "placed")
    _check_output(placed, "moekit_placement.json", torch.bfloat16)


def test_quantized_checkpoint_declares_the_model_dtype(src_bf16, tmp_path):
    lm = moekit.load(src_bf16)
    quantize(lm, bits=8, group_size=32, out=tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "moekit_quantization.json").read_text())
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == meta["dtype"] == "bfloat16"
    assert meta["tokenizer_copied"] is True and (tmp_path / "q" / MARKER).is_file()
    assert {p.dtype for p in moekit.load(tmp_path / "q").model.parameters()} == {torch.bfloat16}


def test_upcycled_checkpoint_goes_through_the_writer(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2)
    out = tmp_path / "moe"
    assert (out / MARKER).is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _dtypes_written(out) == {torch.bfloat16}


def test_tensor_writer_declares_the_dominant_float_dtype_and_refuses_two_sources(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3", vocab_size=8, hidden_size=8, num_hidden_layers=1)
    tensors = [("a", torch.zeros(64, dtype=torch.float16)), ("b", torch.zeros(4, dtype=torch.float32)),
               ("c", torch.zeros(8, dtype=torch.int64))]
    out = write_checkpoint(tmp_path / "t", tensors=tensors, config=cfg, record=("r.json", {"x": 1}),
                           extra_files={"note.txt": "hi", "missing.json": tmp_path / "nope.json"})
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((out / "r.json").read_text()) == {"x": 1, "tokenizer_copied": False}
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "config.json", "model.safetensors", "r.json",
                                                            "note.txt"])
    assert cfg.dtype != "float16"  # the caller's config is not changed
    with pytest.raises(ValueError, match="exactly one of model and tensors"):
        write_checkpoint(tmp_path / "u", tensors=tensors, model=torch.nn.Linear(1, 1))


def test_spooled_writer_failing_copy_raises_its_own_error(tmp_path):
    """When writing the finished file fails (here its spooled data went missing; on a full disk, ENOSPC), the
    writer raises that error, not an 'internal error: tensors were not written' that hides it, and leaves no data
    file behind."""
    from moekit.formats.safetensors import SpooledWriter

    ok = SpooledWriter(tmp_path / "ok.safetensors")
    ok.write("a", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    ok.close()
    assert read_header(tmp_path / "ok.safetensors")[0]["a"]["shape"] == [2, 3]
    w = SpooledWriter(tmp_path / "x.safetensors")
    w.write("a", torch.ones(3))
    (tmp_path / "x.safetensors.data").unlink()
    with pytest.raises(FileNotFoundError):
        w.close()
    assert not (tmp_path / "x.safetensors.data").exists()
