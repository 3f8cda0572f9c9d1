"""RoutingTrace: save/load round trips (hypothesis), mmap, selection, concatenation, corrupt files."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.errors import TraceError
from moekit.trace import RoutingTrace


def make_trace(L=2, N=10, K=2, E=8, seed=0, probs=False, docs=3, domains=("a", "b")):
    rng = np.random.default_rng(seed)
    doc = np.sort(rng.integers(0, docs, N)).astype(np.int32)
    pos = np.concatenate([np.arange((doc == d).sum()) for d in range(docs)]).astype(np.int32)
    return RoutingTrace(
        ids=rng.integers(-1, E, (L, N, K)).astype(np.int16),
        weights=rng.random((L, N, K)).astype(np.float32),
        probs=rng.random((L, N, E)).astype(np.float16) if probs else None,
        token_ids=rng.integers(0, 100, N).astype(np.int32), doc=doc, pos=pos,
        domain=(doc % len(domains)).astype(np.int16) if domains else None,
        meta={"layers": list(range(1, L + 1)), "num_experts": [E] * L, "top_k": [K] * L,
              "domains": list(domains), "model": "m"},
    )


def assert_same(a: RoutingTrace, b: RoutingTrace):
    for name in ("ids", "weights", "token_ids", "doc", "pos", "domain"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert (a.probs is None) == (b.probs is None)
    if a.probs is not None:
        np.testing.assert_array_equal(a.probs, b.probs)
    assert a.meta == b.meta


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 4), N=st.integers(0, 50), K=st.integers(1, 4), E=st.integers(2, 16),
       seed=st.integers(0, 10_000), probs=st.booleans(), mmap=st.booleans())
def test_save_load_round_trip(tmp_path_factory, L, N, K, E, seed, probs, mmap):
    t = make_trace(L, N, K, E, seed, probs)
    path = tmp_path_factory.mktemp("t") / "x.trace"
    t.save(path)
    assert_same(t, RoutingTrace.load(path, mmap=mmap))


def test_mmap_does_not_copy(tmp_path):
    t = make_trace(N=1000)
    t.save(tmp_path / "x.trace")

    def backed_by_file(a: np.ndarray) -> bool:  # is a np.memmap anywhere in the chain of bases?
        while a is not None:
            if isinstance(a, np.memmap):
                return True
            a = a.base
        return False

    mapped = RoutingTrace.load(tmp_path / "x.trace", mmap=True)
    read = RoutingTrace.load(tmp_path / "x.trace", mmap=False)
    assert backed_by_file(mapped.ids) and backed_by_file(mapped.weights)
    assert not backed_by_file(read.ids)
    np.testing.assert_array_equal(mapped.ids, read.ids)


def test_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "x.trace"
    make_trace(N=200).save(path)
    data = path.read_bytes()
    (tmp_path / "cut.trace").write_bytes(data[: len(data) - 100])
    with pytest.raises(TraceError, match="truncated"):
        RoutingTrace.load(tmp_path / "cut.trace")
    (tmp_path / "junk.trace").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    with pytest.raises(TraceError):
        RoutingTrace.load(tmp_path / "junk.trace")
    (tmp_path / "tiny.trace").write_bytes(b"ab")
    with pytest.raises(TraceError, match="truncated"):
        RoutingTrace.load(tmp_path / "tiny.trace")
    with pytest.raises(TraceError, match="not found"):
        RoutingTrace.load(tmp_path / "missing.trace")


def test_selection_by_layer_doc_domain():
    t = make_trace(L=3, N=30, seed=1)
    sub = t.select_layers([3, 1])
    np.testing.assert_array_equal(sub.ids[0], t.ids[2])
    np.testing.assert_array_equal(sub.ids[1], t.ids[0])
    assert sub.layers == [3, 1]
    with pytest.raises(TraceError, match="not an MoE layer"):
        t.select_layers([7])
    d1 = t.select_docs([1])
    assert (d1.doc == 1).all() and d1.num_tokens == (t.doc == 1).sum()
    b = t.select_domain("b")
    assert (b.domain == 1).all() and b.num_tokens == (t.domain == 1).sum()


def test_concat_renumbers_docs_and_domains():
    a = make_trace(N=10, seed=1, domains=("x", "y"))
    b = make_trace(N=6, seed=2, K=3, domains=("y", "z"))
    c = RoutingTrace.concat([a, b])
    assert c.num_tokens == 16 and c.ids.shape[2] == 3
    assert c.domains == ["x", "y", "z"]
    np.testing.assert_array_equal(c.ids[:, :10, :2], a.ids)
    assert (c.ids[:, :10, 2] == -1).all()
    assert c.doc[10] == a.doc.max() + 1 + b.doc[0]
    names = [c.domains[i] for i in c.domain[10:]]
    assert names == [b.domains[i] for i in b.domain]


def test_concat_refuses_other_models():
    a = make_trace(E=8)
    b = make_trace(E=16)
    with pytest.raises(TraceError, match="different models"):
        RoutingTrace.concat([a, b])


def test_probs_of_a_router_whose_rule_moekit_does_not_know_is_a_clear_error(tmp_path):
    """Recording router probabilities needs the routing rule: where moekit has none for the router (DeepSeek-V4's
    hash/sqrt-softplus routing), asking for them is one MoekitError, and ids and weights still record."""
    import torch

    import moekit
    from moekit.errors import MoekitError
    from moekit.testing import save_tiny_checkpoint

    lm = moekit.load(save_tiny_checkpoint("deepseek_v4", tmp_path / "m", with_tokenizer=False), with_tokenizer=False)
    assert any(v.rule is None for v in lm.moe)
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MoekitError, match="router probabilities need the routing rule"), torch.no_grad(), \
            moekit.record(lm, fields=("ids", "weights", "probs")):
        lm.model(ids)
    with torch.no_grad(), moekit.record(lm) as rec:
        lm.model(ids)
    assert rec.trace.ids.shape == (len(lm.moe), 6, 2) and (rec.trace.ids >= 0).all()  # [layers, tokens, k]
