"""Expert placement: planners, the traffic simulator (hand-computed numbers), exact checkpoint permutation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moekit.distributed.apply import check_placement, placed_model, write_placed
from moekit.distributed.placement import PLACEMENTS, Placement, RoutingStats, plan, simulate
from moekit.errors import MoekitError
from moekit.trace import RoutingTrace


def _trace(ids, weights=None, doc=None, num_experts=4) -> RoutingTrace:
    ids = np.asarray(ids, dtype=np.int16)
    L, N, _ = ids.shape
    w = np.ones(ids.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
    return RoutingTrace(ids=ids, weights=w, token_ids=np.zeros(N, np.int32),
                        doc=np.arange(N, dtype=np.int32) if doc is None else np.asarray(doc, np.int32),
                        pos=np.zeros(N, np.int32),
                        meta={"layers": list(range(L)), "num_experts": [num_experts] * L, "top_k": [ids.shape[2]] * L})


# top-1, 4 experts, 2 ranks; layer-0 expert a always hands its tokens to layer-1 expert (a + 2) mod 4
ROUTES = [0, 1, 2, 3, 0, 1, 2, 3]
AFFINE = _trace([[[a] for a in ROUTES], [[(a + 2) % 4] for a in ROUTES]])


def test_simulator_matches_hand_count():
    contiguous = Placement(2, [0, 1], [[0, 0, 1, 1], [0, 0, 1, 1]], "contiguous")
    row = simulate(AFFINE, contiguous, bytes_per_token=100.0)
    # home = doc mod 2 = token index mod 2; layer-0 rank = a // 2
    homes = np.arange(8) % 2
    r0 = np.array(ROUTES) // 2
    r1 = ((np.array(ROUTES) + 2) % 4) // 2
    a2a = 2 * ((r0 != homes).sum() + (r1 != homes).sum())
    coherent = (r0 != homes).sum() + (r1 != r0).sum()  # top-1: no partial outputs to gather
    assert row["a2a_transfers_per_token"] == a2a / 8
    assert row["coherent_transfers_per_token"] == coherent / 8 == (4 + 8) / 8
    assert row["a2a_bytes_per_token"] == pytest.approx(100.0 * a2a / 8)
    assert row["imbalance_max"] == 1.0  # every expert has 2 tokens, every rank 4


def test_affinity_keeps_consecutive_experts_together():
    p = plan(AFFINE, 2, "affinity")
    # layer-1 expert (a+2)%4 lands on the rank of layer-0 expert a: no transfer between the layers
    for a in range(4):
        assert p.assignment[1][(a + 2) % 4] == p.assignment[0][a]
    row = simulate(AFFINE, p)
    homes = np.arange(8) % 2
    assert row["coherent_transfers_per_token"] == (p.assignment[0][ROUTES] != homes).sum() / 8
    contiguous = simulate(AFFINE, plan(AFFINE, 2, "contiguous"))
    assert row["coherent_transfers_per_token"] < contiguous["coherent_transfers_per_token"]


def test_least_loaded_balances_the_busiest_rank():
    # loads 10, 9, 1, 1 (top-1): contiguous puts 19 on rank 0; least-loaded pairs 10+1 and 9+1
    ids = [[[0]] * 10 + [[1]] * 9 + [[2]] + [[3]]]
    t = _trace(ids)
    assert simulate(t, plan(t, 2, "contiguous"))["imbalance_max"] == pytest.approx(19 / 10.5)
    p = plan(t, 2, "least-loaded")
    assert p.assignment[0][0] != p.assignment[0][1]
    assert simulate(t, p)["imbalance_max"] == pytest.approx(11 / 10.5)


@pytest.mark.parametrize("method", PLACEMENTS.names())
def test_every_method_gives_equal_shares(method):
    rng = np.random.default_rng(0)
    t = _trace(rng.integers(0, 16, size=(3, 200, 2)), num_experts=16)
    p = plan(t, 4, method, seed=1)
    for a in p.assignment:
        assert np.bincount(a, minlength=4).tolist() == [4, 4, 4, 4]
    assert sorted(p.order(0)) == list(range(16))


def test_routing_stats_counts():
    s = RoutingStats.from_trace(AFFINE)
    assert s.loads[0].tolist() == [2, 2, 2, 2]
    assert s.transitions[0][0, 2] == 2 and s.transitions[0][0, 0] == 0


def test_placement_roundtrip_and_bad_input(tmp_path):
    p = plan(AFFINE, 2, "affinity")
    path = p.save(tmp_path / "p.json")
    q = Placement.load(path)
    assert q.ranks == 2 and q.method == "affinity" and [a.tolist() for a in q.assignment] == [a.tolist() for a in p.assignment]
    with pytest.raises(MoekitError, match="already exists"):
        p.save(path)
    with pytest.raises(MoekitError, match="do not divide"):
        plan(AFFINE, 3)
    with pytest.raises(MoekitError, match="positive integer"):
        plan(AFFINE, 0)
    with pytest.raises(MoekitError, match="unknown placement method"):
        plan(AFFINE, 2, "nope")
    with pytest.raises(MoekitError, match="every rank must hold 2"):
        Placement(2, [0], [[0, 0, 0, 1]])
    with pytest.raises(MoekitError, match="positive number"):
        simulate(AFFINE, p, bytes_per_token=float("nan"))
    (tmp_path / "bad.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(MoekitError, match="not a moekit placement"):
        Placement.load(tmp_path / "bad.json")


def _permuted_check(lm, placement):
    """Placed model: logits equal, and every routing decision is the original one under the new ids."""
    from moekit.models.loading import from_model
    from moekit.routing import record

    model = placed_model(lm, placement)
    placed = from_model(model, name="placed")
    x = torch.randint(0, lm.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(lm) as r0:
        a = lm.model(input_ids=x).logits
    with torch.no_grad(), record(placed) as r1:
        b = model(input_ids=x).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    t0, t1 = r0.trace, r1.trace
    for pos in range(len(placement.layers)):
        inv = np.argsort(placement.order(pos))  # new id of each old expert
        old = t0.ids[pos].astype(np.int64)
        mapped = np.where(old >= 0, inv[np.clip(old, 0, None)], -1)
        # the k slots are a set (DeepSeek's top-k is unsorted): compare (id, weight) pairs sorted by id
        a_ord, b_ord = np.argsort(mapped, axis=1), np.argsort(t1.ids[pos], axis=1)
        np.testing.assert_array_equal(np.take_along_axis(mapped, a_ord, 1), np.take_along_axis(t1.ids[pos], b_ord, 1))
        np.testing.assert_allclose(np.take_along_axis(t1.weights[pos], b_ord, 1),
                                   np.take_along_axis(t0.weights[pos], a_ord, 1), rtol=1e-5, atol=1e-6)
    return model


@pytest.mark.parametrize("arch", ["olmoe", "mixtral", "gpt_oss", "qwen2_moe"])
def test_apply_permutes_exactly(arch):
    from moekit.models.loading import from_model
    from moekit.testing import tiny_model

    lm = from_model(tiny_model(arch), name=arch)
    rng = np.random.default_rng(3)
    assignment = []
    for view in lm.moe:
        a = np.empty(view.num_experts, np.int64)
        a[rng.permutation(view.num_experts)] = np.arange(view.num_experts) // (view.num_experts // 2)
        assignment.append(a)
    p = Placement(2, lm.moe.indices, assignment, "random")
    assert any(p.order(i) != list(range(8)) for i in range(len(lm.moe)))
    _permuted_check(lm, p)


def test_apply_deepseek_v3_moves_whole_groups_only():
    from moekit.models.loading import from_model
    from moekit.testing import tiny_model

    lm = from_model(tiny_model("deepseek_v3"), name="dsv3")  # 4 groups of 2 experts
    groups_13_on_rank0 = [1, 1, 0, 0, 1, 1, 0, 0]
    p = Placement(2, lm.moe.indices, [groups_13_on_rank0] * len(lm.moe), "manual")
    model = _permuted_check(lm, p)
    bias = model.model.layers[lm.moe.indices[0]].mlp.gate.e_score_correction_bias
    orig = lm.moe.layers[0].router.e_score_correction_bias
    torch.testing.assert_close(bias, orig[p.order(0)])
    split = Placement(2, lm.moe.indices, [[0, 1, 0, 1, 0, 1, 0, 1]] * len(lm.moe), "manual")
    with pytest.raises(MoekitError, match="splits a routing group"):
        check_placement(lm, split)


def test_apply_writes_a_plain_transformers_checkpoint(tmp_path, bundled_tiny):
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    assignment = [rng.permutation(np.arange(v.num_experts) // (v.num_experts // 4)) for v in bundled_tiny.moe]
    p = Placement(4, bundled_tiny.moe.indices, assignment, "random")
    out = write_placed(bundled_tiny, p, tmp_path / "placed")
    meta = json.loads((out / "moekit_placement.json").read_text())
    assert meta["order"][str(bundled_tiny.moe.indices[0])] == p.order(0) and meta["source_model"] == bundled_tiny.name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.arange(1, 30).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, bundled_tiny.model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(MoekitError, match="already exists"):
        write_placed(bundled_tiny, p, out)
    wrong = Placement(2, [0], [[0, 1] * 8])
    with pytest.raises(MoekitError, match="MoE layers"):
        check_placement(bundled_tiny, wrong)


def test_cli_plan_simulate_apply(tmp_path, bundled_tiny, capsys):
    from moekit.cli import main
    from moekit.routing.tracing import trace_documents

    def run_cli(args):
        capsys.readouterr()
        code = main(args)
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    docs = [type("D", (), {"text": "the quick brown fox jumps over the lazy dog " * 6, "domain": None})()] * 3
    trace = trace_documents(bundled_tiny, docs, progress=False)
    trace.save(tmp_path / "t.trace")
    code, out, _ = run_cli(["placement", "plan", str(tmp_path / "t.trace"), "--ranks", "2", "--out",
                            str(tmp_path / "p.json"), "--json"])
    assert code == 0
    rows = json.loads(out)["simulation"]
    assert [r["method"] for r in rows] == ["affinity", "contiguous", "random"]
    p = Placement.load(tmp_path / "p.json")
    assert rows[0] == simulate(trace, p)
    code, out, _ = run_cli(["placement", "simulate", str(tmp_path / "t.trace"), str(tmp_path / "p.json"), "--json"])
    assert code == 0 and json.loads(out)[0]["coherent_transfers_per_token"] == rows[0]["coherent_transfers_per_token"]
    code, _, err = run_cli(["placement", "plan", str(tmp_path / "t.trace"), "--ranks", "3", "--out",
                            str(tmp_path / "q.json")])
    assert code == 2 and "do not divide" in err
    code, _, err = run_cli(["placement", "apply", "moekit:tiny", str(tmp_path / "nope.json"), "--out",
                            str(tmp_path / "m")])
    assert code == 2 and "not found" in err


def test_affinity_balanced_keeps_the_load_cap():
    from moekit.distributed.placement import BALANCE_SLACK

    rng = np.random.default_rng(5)
    # skewed loads and a layer-to-layer pattern: swaps must respect the cap
    first = rng.choice(16, size=(3000, 1), p=np.r_[np.full(4, 0.15), np.full(12, 0.4 / 12)])
    t = _trace(np.stack([first, (first * 5 + 3) % 16]), num_experts=16)
    stats = RoutingStats.from_trace(t)
    bal, ll = plan(t, 4, "affinity-balanced"), plan(t, 4, "least-loaded")
    for pos in range(2):
        load = stats.loads[pos].astype(float)
        cap = max(np.bincount(ll.assignment[pos], weights=load, minlength=4).max(), (1 + BALANCE_SLACK) * load.sum() / 4)
        assert np.bincount(bal.assignment[pos], weights=load, minlength=4).max() <= cap + 1e-9
    # equal loads: least-loaded deals experts round-robin (e -> e mod 4), so every layer-0 -> layer-1 hand-off
    # (e -> 5e+3 mod 16) crosses ranks; the balanced swaps bring every pair together at no cost in balance
    first = (np.arange(3200) % 16)[:, None]
    doc = rng.permutation(3200)  # home ranks independent of the experts
    t = _trace(np.stack([first, (first * 5 + 3) % 16]), doc=doc, num_experts=16)
    p_ll, p_bal = plan(t, 4, "least-loaded"), plan(t, 4, "affinity-balanced")
    ll, bal = simulate(t, p_ll), simulate(t, p_bal)
    homes = doc % 4
    assert ll["coherent_transfers_per_token"] == ((p_ll.assignment[0][first[:, 0]] != homes).sum() + 3200) / 3200
    assert bal["coherent_transfers_per_token"] == (p_bal.assignment[0][first[:, 0]] != homes).sum() / 3200
    assert bal["imbalance_max"] == 1.0
