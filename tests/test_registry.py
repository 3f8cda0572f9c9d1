"""Registries are the single source of method names, help and needs: lazy entries, aliases, the CLI's
generated help and choice errors, and one meaning per name across ROUTERS and RULES (issue 16, req. 5)."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from moekit.adapters.methods import METHODS
from moekit.cli import main
from moekit.compress.criteria import CRITERIA
from moekit.compress.merge import MERGERS
from moekit.distributed.placement import PLACEMENTS
from moekit.errors import MoekitError
from moekit.generation import DECODERS
from moekit.models.moe_map import ARCHITECTURES
from moekit.models.rules import RULES
from moekit.nn.dispatch import BACKENDS
from moekit.nn.routers import ROUTERS, build_router
from moekit.registry import NEEDS, Registry
from moekit.serve import POLICIES
from moekit.steer.detect import DETECTORS

ALL = (CRITERIA, MERGERS, PLACEMENTS, METHODS, DECODERS, ARCHITECTURES, RULES, BACKENDS, ROUTERS, POLICIES,
       DETECTORS)
NO_MODEL = "./no-such-model-dir"


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _flat(text: str) -> str:
    """Help text without rich's box and line wrapping, so a registry's help reads as one string."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# ----- the registry itself -------------------------------------------------------------------------------
def test_entries_carry_help_needs_and_list_in_order():
    reg: Registry = Registry("thing")

    @reg.register("a", needs=["calibration"])
    def a():
        """First line of a.

        Not this paragraph."""

    reg.add("b", 2, help="explicit help")
    assert reg.names() == ["a", "b"] and len(reg) == 2
    assert reg.help("a") == "First line of a." and reg.needs("a") == {"calibration"}
    assert reg.describe({"calibration": "--calib"}) == "a: First line of a (needs --calib); b: explicit help"
    with pytest.raises(MoekitError, match=r"^thing a needs calibration data \(--calib\)$"):
        reg.check_needs("a", [], {"calibration": "--calib"})
    reg.check_needs("a", ["calibration"])  # given: no error
    with pytest.raises(MoekitError, match=r"^unknown thing 'c'; choose one of: a, b$"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", 3, help="again")
    with pytest.raises(ValueError, match="no help"):
        reg.add("c", 3)  # an instance: its class's docstring is not its help
    with pytest.raises(ValueError, match="unknown needs"):
        reg.add("d", 4, help="d", needs=["gpu"])


def test_lazy_entry_is_imported_on_first_get_only(tmp_path, monkeypatch):
    (tmp_path / "moekit_lazy_probe.py").write_text("VALUE = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("probe")
    reg.register_lazy("p", "moekit_lazy_probe:VALUE", help="a probe")
    assert reg.names() == ["p"] and reg.help("p") == "a probe" and reg.canonical("p") == "p"
    assert "moekit_lazy_probe" not in sys.modules
    value = reg.get("p")
    assert value is sys.modules["moekit_lazy_probe"].VALUE and reg.get("p") is value
    monkeypatch.delitem(sys.modules, "moekit_lazy_probe")
    with pytest.raises(ValueError, match="module:attr"):
        reg.register_lazy("q", "no_colon", help="x")


def test_alias_reads_old_name_as_new():
    reg: Registry = Registry("thing")
    reg.add("new", 1, help="the new name")
    reg.alias("old", "new", note="renamed")
    assert reg.get("old") == 1 and reg.canonical("old") == "new" and "old" in reg
    assert reg.names() == ["new"] and reg.aliases() == {"old": "new"}
    with pytest.raises(ValueError):
        reg.alias("x", "missing", note="")


def test_every_registered_method_has_help_and_known_needs():
    for reg in ALL:
        assert len(reg) > 0, reg.kind
        for e in reg.entries():
            assert e.help.strip() and "\n" not in e.help, (reg.kind, e.name)
            assert e.needs <= set(NEEDS), (reg.kind, e.name)
    # what each method needs is declared once, in its entry
    assert {n for n in CRITERIA.names() if "calibration" not in CRITERIA.needs(n)} == {"random"}
    assert DETECTORS.needs("risk_diff") == DETECTORS.needs("contrast") == {"negative"}
    assert DETECTORS.needs("npmi") == {"markers"}
    assert MERGERS.names() == ["m-smoe"] and MERGERS.needs("m-smoe") == {"calibration"}
    assert BACKENDS.names() == ["auto", "grouped_mm", "loop", "padded", "gemv", "amx"]


# ----- one meaning per name ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["softmax_then_topk", "topk_then_softmax"])
def test_routers_and_rules_agree_on_what_a_name_computes(name):
    """The same name selects the same experts with the same weights in nn.ROUTERS and models.RULES."""
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 3
    cfg, gate = SimpleNamespace(num_experts_per_tok=2), SimpleNamespace(top_k=2)
    if name == "softmax_then_topk":  # without renormalisation, where the two orders give different weights
        router, rule = build_router(name, 16, 8, 2, renorm=False), RULES.get(name)(gate, cfg, renormalize=False)
    else:
        router, rule = build_router(name, 16, 8, 2), RULES.get(name)(gate, cfg)
    weights, ids = router.select(logits)[:2]
    sel = rule.select(logits)
    assert torch.equal(sel.ids, ids)
    torch.testing.assert_close(sel.weights, weights.float())
    other = "topk_then_softmax" if name == "softmax_then_topk" else "softmax_then_topk"
    assert not torch.allclose(build_router(other, 16, 8, 2, **({"renorm": False} if other == "softmax_then_topk"
                                                                 else {})).select(logits)[0], weights)


def test_old_router_name_in_saved_configs_still_loads():
    from moekit.nn.model import MoELM, MoELMConfig

    assert ROUTERS.get("topk_softmax") is ROUTERS.get("softmax_then_topk")
    assert "topk_softmax" not in ROUTERS.names() and "topk_softmax" not in RULES
    old = dict(vocab_size=32, hidden=16, num_layers=1, num_heads=2, inter=8, num_experts=4, top_k=2)
    torch.manual_seed(0)
    a = MoELM(MoELMConfig.from_dict({**old, "router": "topk_softmax"}))
    torch.manual_seed(0)
    b = MoELM(MoELMConfig.from_dict({**old, "router": "softmax_then_topk"}))
    ids = torch.randint(0, 32, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(ids)[1], b(ids)[1])
    assert {type(m).__name__ for m in a.modules() if "Router" in type(m).__name__} == {"SoftmaxThenTopKRouter"}


# ----- the CLI takes its choices and help from the registries -----------------------------------------
@pytest.mark.parametrize(("argv", "registry", "options"), [
    (["prune", "--help"], CRITERIA, {"calibration": "--calib"}),
    (["merge", "--help"], MERGERS, {"calibration": "--calib"}),
    (["steer", "find", "--help"], DETECTORS, {"negative": "--neg", "markers": "--markers"}),
    (["generate", "--help"], POLICIES, None),
    (["serve", "--help"], POLICIES, None),
    (["placement", "plan", "--help"], PLACEMENTS, None),
    (["adapt", "train", "--help"], METHODS, None),
])
def test_help_lists_every_registry_entry(argv, registry, options):
    code, out, _ = _cli(argv)
    assert code == 0
    assert _flat(registry.describe(options)) in _flat(out)


def test_generate_help_takes_decoder_help_from_the_registry():
    code, out, _ = _cli(["generate", "--help"])
    assert code == 0
    flat = _flat(out)
    assert _flat(DECODERS.help("contrast")) in flat and _flat(DECODERS.help("rewire")) in flat


@pytest.mark.parametrize(("argv", "registry"), [
    (["prune", NO_MODEL, "--method", "nope", "--ratio", "0.25", "--out", "{tmp}/o"], CRITERIA),
    (["merge", NO_MODEL, "--method", "nope", "--ratio", "0.25", "--out", "{tmp}/o"], MERGERS),
    (["steer", "find", NO_MODEL, "--pos", "moekit:corpus", "--method", "nope", "--out", "{tmp}/e.json"], DETECTORS),
    (["generate", NO_MODEL, "--prompt", "x", "--offload", "--policy", "nope"], POLICIES),
    (["serve", NO_MODEL, "--policy", "nope"], POLICIES),
    (["placement", "plan", "{tmp}/t.npz", "--ranks", "2", "--method", "nope", "--out", "{tmp}/p.json"], PLACEMENTS),
    (["adapt", "train", NO_MODEL, "--method", "nope", "--out", "{tmp}/a"], METHODS),
])
def test_unknown_choice_is_one_line_naming_every_entry_before_any_work(argv, registry, tmp_path):
    code, out, err = _cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err
    assert lines == [f"error: unknown {registry.kind} 'nope'; choose one of: {', '.join(registry.names())}"]
    assert list(tmp_path.iterdir()) == []  # nothing written, no model looked for


def test_needs_are_checked_from_the_registry_before_the_model_loads(tmp_path):
    pos = tmp_path / "pos.txt"
    pos.write_text("one plus one\n")
    code, _, err = _cli(["steer", "find", NO_MODEL, "--pos", pos, "--out", tmp_path / "e.json"])
    assert code == 2 and err.strip() == ("error: detection method risk_diff needs a second, contrasting example set "
                                         "(--neg)")
    code, _, err = _cli(["steer", "find", NO_MODEL, "--pos", pos, "--method", "npmi", "--out", tmp_path / "e.json"])
    assert code == 2 and err.strip() == "error: detection method npmi needs marker tokens (--markers)"
