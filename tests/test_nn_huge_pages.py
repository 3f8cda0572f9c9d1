"""Weights moved onto transparent huge pages: same values, 2 MiB-aligned, backed by huge pages, model unchanged."""

from __future__ import annotations

import gc
import re

import pytest
import torch

from moekit.nn.huge_pages import (
    HUGE_PAGE,
    huge_pages_supported,
    is_on_huge_page_boundary,
    on_huge_pages,
    to_huge_pages,
)
from moekit.testing import tiny_model

needs_thp = pytest.mark.skipif(not huge_pages_supported(), reason="no transparent huge pages on this system")


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping that holds ``address`` in this process."""
    from pathlib import Path

    text = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        lo, hi = (int(v, 16) for v in block.split(" ", 1)[0].split("-"))
        if lo <= address < hi:
            return int(re.search(r"AnonHugePages:\s+(\d+) kB", block).group(1))
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_fallbacks() -> int:
    """Huge-page faults the kernel could not satisfy so far (it fell back to 4 KiB pages: fragmented memory)."""
    from pathlib import Path

    stats = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return int(stats.get("thp_fault_fallback", 0))


@needs_thp
def test_on_huge_pages_copies_exactly_onto_huge_pages():
    t = torch.randn(3, 1000, 1024, dtype=torch.bfloat16)
    fallbacks = _thp_fallbacks()
    h = on_huge_pages(t)
    assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous()
    assert torch.equal(h, t) and h.data_ptr() != t.data_ptr()
    assert h.data_ptr() % HUGE_PAGE == 0
    if _anon_huge_kb(h.data_ptr()) < 2048 and _thp_fallbacks() > fallbacks:
        pytest.skip("the kernel had no free huge page (it fell back to 4 KiB pages): nothing to check here")
    assert _anon_huge_kb(h.data_ptr()) >= 2048  # at least the first full 2 MiB extent is a huge page
    del t
    gc.collect()
    h.add_(1)  # the mapping lives as long as the tensor
    assert torch.isfinite(h.float()).all()


@needs_thp
def test_to_huge_pages_keeps_the_model_and_its_outputs():
    model = tiny_model("olmoe", dtype=torch.bfloat16, hidden_size=256, intermediate_size=512, vocab_size=4096)
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    params = {name: p for name, p in model.named_parameters()}
    big = {name for name, p in params.items() if p.numel() * p.element_size() >= HUGE_PAGE}
    assert big  # the embedding, lm_head and expert banks at this size
    moved = to_huge_pages(model)
    assert moved == sum(params[n].numel() * params[n].element_size() for n in big)
    for name, p in model.named_parameters():
        assert p is params[name]  # the same Parameter objects, new storage
        assert is_on_huge_page_boundary(p) == (name in big)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert to_huge_pages(model) == 0  # already placed


@needs_thp
def test_to_huge_pages_keeps_tied_weights_tied():
    emb = torch.nn.Embedding(4096, 256)
    head = torch.nn.Linear(256, 4096, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    assert to_huge_pages(model) == 4096 * 256 * 4  # counted once
    assert head.weight is emb.weight and is_on_huge_page_boundary(emb.weight)


@needs_thp
def test_use_fast_decode_puts_a_loaded_model_on_huge_pages(tmp_path):
    from moekit.cli.common import load_model, use_fast_decode
    from moekit.testing import save_tiny_checkpoint

    path = save_tiny_checkpoint("olmoe", tmp_path / "m", with_tokenizer=False, hidden_size=256, vocab_size=4096)
    lm = load_model(str(path), "float32")
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.model(ids).logits
    use_fast_decode(lm)
    big = [p for p in lm.model.parameters() if p.numel() * p.element_size() >= HUGE_PAGE]
    assert big and all(is_on_huge_page_boundary(p) for p in big)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, before, rtol=0, atol=1e-5)  # the decode kernels' sums


@needs_thp
def test_to_huge_pages_leaves_views_of_a_shared_storage_alone():
    base = torch.randn(2, 1024, 1024)
    a, b = torch.nn.Parameter(base[0]), torch.nn.Parameter(base[1])  # contiguous views of one 8 MiB storage
    model = torch.nn.Module()
    model.register_parameter("a", a)
    model.register_parameter("b", b)
    assert to_huge_pages(model) == 0
    assert model.a.data_ptr() == base.data_ptr() and model.b.data_ptr() == base[1].data_ptr()
