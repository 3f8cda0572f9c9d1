"""What moekit supports for each MoE architecture of transformers: one table, read by
``moekit inspect --list-architectures``, ``docs/architectures.md`` and ``tests/test_architectures.py``.

Every entry is checked by the tests on a tiny random model of the architecture: the rule it names is the
rule the model map finds, each feature it lists passes its exactness check, and each feature it leaves out
has its reason in ``LIMITS``. An MoE architecture of the installed transformers with no entry fails those
tests with its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.models.architectures import ARCHITECTURES
from moekit.models.rules import RULES

FEATURES = ("map", "route", "record", "generate", "prune", "offload")
FEATURE_HELP = {
    "map": "MoE layers, experts, top-k, shared experts and selection rule found",
    "route": "route() exact: no-op bit-identical; disable, force, top_k, top_p as the rule defines",
    "record": "record() routing, also during generate() with the model's own (hybrid) cache",
    "generate": "generate() with routing recorded",
    "prune": "pruned checkpoint = route(disable) and loads with plain transformers",
    "offload": "offloaded greedy generation = in-memory",
}


ZERO_EXPERTS = "zero-computation experts sit beside the weight bank; the writer and offload engine refuse cleanly"
DENSE_EXPERTS = "Llama4TextExperts runs every expert densely on score-scaled inputs; the offload engine refuses cleanly"
JETMOE = ("MLP and attention experts share one expert count in the config and run JetMoE's own sorted dispatch; "
          "the writer and offload engine refuse cleanly")
TEXT_TOWER = "text tower of a multimodal model: transformers has no causal-LM class for it"
NO_BANK_VIEW = "experts kept as 2-D w1/v1/w2 matrices, not a fused bank the writer and the offload store slice"


@dataclass(frozen=True)
class ArchSupport:
    """One architecture: how moekit maps it, the rule, and what works."""

    model_type: str
    rule: str | None                 # RULES name of the selection rule, None when it is not verified
    rule_text: str = ""              # what the rule computes (the rule's describe(), without numbers)
    note: str = ""
    unsupported: str = ""            # the reason, for an architecture moekit refuses with UnsupportedArchitecture
    limits: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """"registry" (an ArchSpec entry in models.moe_map) or "generic" (rule verified on the router)."""
        return "registry" if self.model_type in ARCHITECTURES else "generic"

    @property
    def level(self) -> str:
        return "unsupported" if self.unsupported else ("route" if self.rule else "record-only")

    def works(self) -> list[str]:
        if self.unsupported:
            return []
        out = [f for f in FEATURES if f not in self.limits]
        return out if self.rule else [f for f in out if f not in ("route", "prune")]


def _g(rule_key: str | None, note: str = "", **limits: str) -> tuple:
    return rule_key, note, limits


_S = "sigmoid_group"
_REC = None  # record-only: the router's rule is not verified, so routing control is refused

# model type → (rule key, note, limits). The key is a ``RULES`` name (its text is the rule's ``formula``), with
# "+renorm" when the rule renormalises the top-k weights, or "scored_topk:<text>" for ScoredTopK entries.
_TABLE: dict[str, tuple] = {
    "afmoe": _g("scored_topk:sigmoid + selection bias → top-k → renorm × scale",
                "the block's expert_bias for selection; shared experts"),
    "aria_text": _g("softmax_then_topk+renorm"),
    "axk1": _g(_S), "axk2": _g(_S),
    "bailing_hybrid": _g(_S, "hybrid: linear attention (KDA) + full attention layers"),
    "beam": _g("scored_topk:sigmoid + selection bias → group-limited top-k → renorm",
               "the block scales the routed output by routed_scaling_factor"),
    "cohere2_moe": _g("softmax_then_topk+renorm"),
    "dbrx": _g("softmax_then_topk+renorm", "router returns logits; the block selects (p=1 normalisation)",
               prune=NO_BANK_VIEW, offload=NO_BANK_VIEW),
    "deepseek_ocr2_text": _g("softmax_then_topk", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "deepseek_v2": _g("softmax_group_max"),
    "deepseek_v3": _g(_S),
    "deepseek_v32": _g(_S, "DeepSeek-V3 routing under sparse indexed attention (DSA)"),
    "deepseek_v4": _g(_REC, "hash routing (experts looked up from the token id) in some layers: no rule of the "
                      "router logits to re-derive, so routing control is refused"),
    "diffusion_gemma_text": _g("scored_topk:softmax → top-k → renorm × per-expert scale",
                               "Gemma 4 MoE block in a diffusion LM", generate=TEXT_TOWER, prune=TEXT_TOWER,
                               offload=TEXT_TOWER),
    "doge": ("unsupported", "product-key retrieval over single-neuron experts (DogeCDMoE): no router and expert "
             "bank in the form moekit maps", {}),
    "dots1": _g(_S),
    "dots3_note_text": _g(_S),
    "ernie4_5_moe": _g("scored_topk:softmax + selection bias → top-k → renorm", "moe_statics bias for selection"),
    "ernie4_5_vl_moe_text": _g("scored_topk:softmax + selection bias → top-k → renorm",
                               "text experts; vision experts serve image/video tokens only",
                               generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "exaone_moe": _g(_S),
    "flex_olmo": _g("softmax_then_topk"),
    "flint": _g("scored_topk:sigmoid → top-k → renorm"),
    "gemma4_text": _g("scored_topk:softmax → top-k → renorm × per-expert scale",
                      "MoE block beside the dense MLP (enable_moe_block); router returns probabilities"),
    "glm4_moe": _g(_S), "glm4_moe_lite": _g(_S),
    "glm4v_moe_text": _g(_S, "", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "glm5_next_text": _g(_S, "DSA attention", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "glm_moe_dsa": _g(_S, "DeepSeek-V3 routing under sparse indexed attention (GLM-5)"),
    "gpt_oss": _g("topk_then_softmax"),
    "granitemoe": _g("topk_then_softmax"),
    "granitemoe_swa": _g("softmax_then_topk+renorm"),
    "granitemoehybrid": _g("softmax_then_topk+renorm", "Granite 4: Mamba-2 + attention layers"),
    "granitemoeshared": _g("softmax_then_topk+renorm"),
    "hunyuan_v1_moe": _g("softmax_then_topk+renorm", "shared MLP always on; routed experts behind their own gate"),
    "hy_v3": _g("scored_topk:sigmoid + selection bias → top-k → renorm × scale", "the block's bias for selection"),
    "hy_v4": _g(_S),
    "hy_v4_vl_text": _g(_S, "", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "inkling2_loop_text": _g("scored_topk:sigmoid + selection bias → top-k → renorm × scale"),
    "inkling2_text": _g("scored_topk:sigmoid + selection bias → top-k → renorm × scale"),
    "inkling_text": _g(_REC, "the router also weighs the shared experts (a 4-tuple output with shared gammas, "
                       "log-sigmoid normalisation over routed + shared): rule not modelled, routing control refused"),
    "jamba": _g("softmax_then_topk", "Mamba + attention layers"),
    "jetmoe": _g("topk_then_softmax", "MLP experts routed; attention experts (MoA) mapped in moe.attention_experts, "
                 "not controlled", prune=JETMOE, offload=JETMOE),
    "kimi_linear": _g(_S, "linear attention (KDA) + MLA layers"),
    "kolibri1": _g("scored_topk:sigmoid (selection: logits + bias) → top-k", "bias added to the logits for selection"),
    "laguna": _g("scored_topk:sigmoid + selection bias → top-k → renorm", "soft-capped logits"),
    "lara_mini": _g("softmax_then_topk+renorm"),
    "lfm2_moe": _g("scored_topk:sigmoid + selection bias → top-k → renorm", "short-conv + attention layers"),
    "llama4_text": _g("scored_topk:sigmoid → top-k", "top-1; the router score multiplies the expert's input; "
                      "shared expert", offload=DENSE_EXPERTS),
    "longcat_flash": _g("scored_topk:softmax + selection bias → top-k × scale",
                        "zero-computation (identity) experts after the real ones", prune=ZERO_EXPERTS,
                        offload=ZERO_EXPERTS),
    "mellum": _g("softmax_then_topk+renorm"),
    "mimo_v2_flash": _g(_S),
    "minimax": _g("softmax_then_topk+renorm", "lightning (linear) attention + softmax attention layers"),
    "minimax_m2": _g("scored_topk:sigmoid + selection bias → top-k → renorm", "the block's bias for selection"),
    "minimax_m3_vl_text": _g("scored_topk:sigmoid + selection bias → top-k → renorm"),
    "mistral_large4_text": _g("scored_topk:softmax → group-limited top-k → renorm", "", generate=TEXT_TOWER,
                              prune=TEXT_TOWER, offload=TEXT_TOWER),
    "mixtral": _g("softmax_then_topk+renorm"),
    "muse_spark_text": _g("scored_topk:sigmoid + selection bias → top-k → renorm", "", generate=TEXT_TOWER,
                          prune=TEXT_TOWER, offload=TEXT_TOWER),
    "nemotron_h": _g(_S, "Mamba-2 + attention + MoE layers"),
    "olmoe": _g("softmax_then_topk"),
    "phimoe": _g("sparsemixer"),
    "qwen2_moe": _g("softmax_then_topk"),
    "qwen3_5_moe_text": _g("softmax_then_topk+renorm", "gated DeltaNet + attention layers"),
    "qwen3_moe": _g("softmax_then_topk+renorm"),
    "qwen3_next": _g("softmax_then_topk+renorm", "gated DeltaNet + attention layers"),
    "qwen3_omni_moe_text": _g("softmax_then_topk+renorm", "", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "qwen3_vl_moe_text": _g("softmax_then_topk+renorm", "", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "qwen4_exp_text": _g("softmax_then_topk+renorm"),
    "sarvam_mla": _g(_S), "sarvam_moe": _g(_S),
    "solar_open": _g(_S),
    "step3p5": _g("scored_topk:sigmoid + selection bias → top-k → renorm", "", generate=TEXT_TOWER,
                  prune=TEXT_TOWER, offload=TEXT_TOWER),
    "unlimited_ocr_text": _g("softmax_then_topk", "", generate=TEXT_TOWER, prune=TEXT_TOWER, offload=TEXT_TOWER),
    "zaya": ("unsupported", "router is an MLP over a down-projected residual (ZayaRouter), not one linear layer "
             "moekit can read and verify", {}),
}


def _entry(model_type: str, key, note: str, limits: dict) -> ArchSupport:
    if key == "unsupported":
        return ArchSupport(model_type, None, "", "", unsupported=note)
    if key is None:
        return ArchSupport(model_type, None, "", note, limits=dict(limits))
    name, _, text = key.partition(":")
    name, renorm, _ = name.partition("+renorm")
    text = text or RULES.get(name).formula + (" → renorm" if renorm else "")
    return ArchSupport(model_type, RULES.canonical(name), text, note, limits=dict(limits))


SUPPORT: dict[str, ArchSupport] = {mt: _entry(mt, *row) for mt, row in sorted(_TABLE.items())}
LIMITS: dict[str, dict[str, str]] = {mt: dict(s.limits) for mt, s in SUPPORT.items() if s.limits}


def installed_support() -> list[ArchSupport]:
    """The table's entries for the architectures the installed transformers knows (the table also holds
    ones that arrived in releases newer than the oldest supported)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return [s for mt, s in SUPPORT.items() if mt in CONFIG_MAPPING_NAMES]


def support_rows() -> list[dict]:
    """The support table as rows (architecture, path, rule, works, not, note), sorted by architecture."""
    rows = []
    for s in installed_support():
        rows.append({"architecture": s.model_type, "level": s.level, "path": s.path,
                     "rule": s.rule_text or ("unverified" if not s.unsupported else "—"),
                     "works": s.works(), "limits": dict(s.limits),
                     "note": s.unsupported or s.note})
    return rows


def support_markdown() -> str:
    """``docs/architectures.md``: the support table as Markdown (``scripts/gen_architectures_doc.py``)."""
    import transformers

    rows = support_rows()
    n = {lvl: sum(r["level"] == lvl for r in rows) for lvl in ("route", "record-only", "unsupported")}
    lines = [
        "# Supported architectures",
        "",
        "<!-- generated by scripts/gen_architectures_doc.py from moekit/models/support.py; do not edit -->",
        "",
        f"Every MoE language model of transformers {transformers.__version__} (causal LMs that declare an expert "
        "count, and the text towers of multimodal MoE models), as `moekit inspect --list-architectures` prints it. "
        f"{n['route']} have exact routing control, {n['record-only']} are record-only (their router's rule is not "
        f"verified, so `route` is refused with `UnsupportedArchitecture`), {n['unsupported']} are refused.",
        "",
        "`tests/test_architectures.py` builds a tiny random model of each and checks every feature listed "
        "(a new MoE architecture in transformers fails there with its name):",
        "",
        *[f"- **{f}**: {h}" for f, h in FEATURE_HELP.items()],
        "",
        "| architecture | path | selection rule | works | not yet (why) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reasons: dict[str, list[str]] = {}
        for f, w in r["limits"].items():
            reasons.setdefault(w, []).append(f)
        why = "; ".join(f"{', '.join(fs)}: {w}" for w, fs in reasons.items())
        lines.append(f"| {r['architecture']} | {r['path']} | {r['rule']} | {', '.join(r['works']) or '—'} | "
                     f"{why or '—'} | {r['note'] or '—'} |")
    lines += ["", "Paths: *registry* = an entry in `moekit.models.architectures.ARCHITECTURES` (rule read from the "
              "modeling code); *generic* = the v5 router/experts convention, rule verified by running the router "
              "against each known rule.", ""]
    return "\n".join(lines)
