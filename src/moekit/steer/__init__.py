"""Steering: find the experts tied to a behaviour, switch / force / boost them, self-contrast decoding
(SCMoE) and test-time rerouting. The ``contrast`` and ``rewire`` decoders are entries of
``moekit.generation.DECODERS`` that import this package's modules on first use."""

from moekit.steer.contrast import ContrastDecoder, contrast_logits
from moekit.steer.demo import demo_step
from moekit.steer.detect import DETECTORS, Example, count_routing, find_experts, read_examples, save_experts
from moekit.steer.presets import control_from_spec, load_experts, parse_steer, steering_control
from moekit.steer.rewire import RewireDecoder, RouterBias

__all__ = [
    "DETECTORS", "ContrastDecoder", "Example", "RewireDecoder", "RouterBias", "contrast_logits", "control_from_spec",
    "count_routing", "demo_step", "find_experts", "load_experts", "parse_steer", "read_examples", "save_experts",
    "steering_control",
]
