"""Make moekit's experts implementation known to transformers as soon as both are imported.

``import moekit`` must be enough for ``model.set_experts_implementation("moekit")`` without importing
torch at ``import moekit`` time. If transformers' experts registry is already loaded, moekit registers
now; otherwise a one-shot import hook registers it right after ``transformers.integrations.moe`` loads
(transformers imports it with its modeling code, before any model can be built).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.integrations.moe"


def _register() -> None:
    from moekit.nn.dispatch import register_with_transformers

    register_with_transformers()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.integrations.moe`` with the normal finders and runs ``_register`` after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; the normal finders locate the real module
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Register now if transformers' experts registry is loaded, else when it is (idempotent)."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
