"""The adapter config: PEFT's ``LoraConfig`` plus one ``moekit`` field naming the method and its settings.

Every moekit adapter is an ordinary PEFT LoRA adapter (``peft_type: LORA``). Methods other than plain
LoRA attach their own layer class through PEFT's custom-module mechanism
(``LoraConfig._register_custom_module``), chosen from ``moekit``. That mapping is not saved by PEFT, so
``import moekit.adapters`` registers :class:`MoekitLoraConfig` as PEFT's config class for ``LORA``: it
reads the ``moekit`` field back and registers the layer again, so
``PeftModel.from_pretrained(base, dir)`` rebuilds the method exactly. Without the ``moekit`` field it is
plain ``LoraConfig`` and writes the same JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig
from peft.utils import PeftType


@dataclass
class MoekitLoraConfig(LoraConfig):
    """``LoraConfig`` with ``moekit = {"method": name, **settings, "base": fingerprint}`` (None: plain LoRA)."""

    moekit: dict[str, Any] | None = field(default=None, metadata={"help": "moekit adapter method and settings"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.moekit:
            from moekit.adapters.methods import METHODS

            layer_cls = METHODS.get(str(self.moekit.get("method"))).layer
            if layer_cls is not None:
                import torch.nn as nn

                self._register_custom_module({nn.Linear: layer_cls})

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("moekit") is None:
            out.pop("moekit", None)  # plain LoRA stays byte-compatible with vanilla PEFT
        return out


def install() -> None:
    """Make PEFT build :class:`MoekitLoraConfig` for every saved LoRA adapter (idempotent)."""
    from peft import mapping

    if mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.LORA) is not MoekitLoraConfig:
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] = MoekitLoraConfig
