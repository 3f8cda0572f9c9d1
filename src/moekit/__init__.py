"""moekit: see, steer, compress, serve and build Mixture-of-Experts language models.

The top-level names are imported lazily so that torch-free parts (``moekit.analysis``,
``moekit.trace``) load without torch.
"""

from __future__ import annotations

import importlib

from moekit.version import __version__

_LAZY = {
    "MoekitError": "moekit.errors", "NotAnMoEModel": "moekit.errors", "TraceError": "moekit.errors",
    "UnsupportedArchitecture": "moekit.errors",
    "LoadedModel": "moekit.models", "MoEMap": "moekit.models", "load": "moekit.serve.placement",
    "RoutingControl": "moekit.routing", "record": "moekit.routing", "route": "moekit.routing",
    "RoutingTrace": "moekit.trace",
    "generate": "moekit.generation",
}

__all__ = [*_LAZY, "__version__"]

_integration = importlib.import_module("moekit.integration")
_integration.install()  # experts_implementation="moekit" works after a bare `import moekit`


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
