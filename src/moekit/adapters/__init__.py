"""Adapter experts (MoE-LoRA) as ordinary PEFT LoRA adapters, and K-shot assembly of LoRA experts (ROCKET).

``import moekit.adapters`` registers moekit's LoRA config class with PEFT, so every adapter saved here
loads with ``peft.PeftModel.from_pretrained(base, dir)``. Methods are listed in :data:`METHODS`.
"""

from moekit.adapters.config import MoekitLoraConfig, install
from moekit.adapters.core import (
    TARGETS,
    attach,
    aux_loss,
    base_fingerprint,
    check_base,
    expert_target_parameters,
    load_adapter,
    load_cv,
    make_config,
    moe_layers,
    prune_ranks,
    read_adapter_config,
    reset_load,
    save_adapter,
    set_sample_types,
)
from moekit.adapters.methods import METHODS, AdapterMethod

install()

__all__ = ["METHODS", "TARGETS", "AdapterMethod", "MoekitLoraConfig", "attach", "aux_loss", "base_fingerprint",
           "check_base", "expert_target_parameters", "install", "load_adapter", "load_cv", "make_config",
           "moe_layers", "prune_ranks", "read_adapter_config", "reset_load", "save_adapter", "set_sample_types"]
