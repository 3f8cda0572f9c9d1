"""Loading models and mapping their MoE layers (design §2, models/)."""

from moekit.models.architectures import ARCHITECTURES, ArchSpec
from moekit.models.loading import DEFAULT_MODEL, LoadedModel, bundled_names, from_model, load, resolve
from moekit.models.moe_map import MoELayerView, MoEMap, build_moe_map
from moekit.models.rules import RULES, Rule, Selection, top_p_counts

__all__ = [
    "ARCHITECTURES", "ArchSpec", "DEFAULT_MODEL", "LoadedModel", "MoELayerView", "MoEMap", "RULES", "Rule",
    "Selection", "build_moe_map", "bundled_names", "from_model", "load", "resolve", "top_p_counts",
]
