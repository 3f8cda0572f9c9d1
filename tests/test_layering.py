"""Layering rules `lint-imports` cannot express (design §2): no private name imported across packages, no
import of the package root below the CLI. Each rule is checked on moekit's sources and on a planted tree
that breaks it, so the check itself is shown to fail."""

from __future__ import annotations

import ast
from pathlib import Path

import moekit

SRC = Path(moekit.__file__).parent
ROOT_ALLOWED = {"cli", "__init__", "__main__"}  # the CLI and the root itself may import the root


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    """The top-level package (or module) of ``moekit.x.y``: ``x``; the root itself: ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` that breaks a rule, as ``"module:line rule detail"``."""
    found = []
    top = root.name
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        pkg = _package(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [(node.module, a.name) for a in node.names]
            else:
                continue
            for target, name in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                if target == top and pkg not in ROOT_ALLOWED:
                    found.append(f"{module}:{node.lineno} root-import {target}" + (f".{name}" if name else ""))
                    continue
                if _package(target) == pkg:
                    continue
                private_part = next((p for p in target.split(".")[1:] if _private(p)), None)
                if private_part or (name is not None and _private(name)):
                    found.append(f"{module}:{node.lineno} private-import {target}.{name or ''}".rstrip("."))
    return found


def test_moekit_has_no_private_cross_package_or_root_imports():
    assert violations(SRC) == []


def test_the_check_finds_planted_violations(tmp_path):
    pkg = tmp_path / "moekit"
    for sub in ("data", "steer", "cli"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from moekit.version import __version__\n")
    (pkg / "version.py").write_text("__version__ = '0'\n")
    (pkg / "data" / "synthetic.py").write_text("_ONES = ['zero']\nWORDS = _ONES\n")
    (pkg / "data" / "use.py").write_text("from moekit.data.synthetic import _ONES\n")  # same package: allowed
    (pkg / "steer" / "effects.py").write_text(
        "import moekit\n"                                    # root import below the CLI
        "from moekit.data.synthetic import WORDS, _ONES\n"   # private name across packages
        "from moekit.data._hidden import thing\n"            # private module across packages
        "from moekit.version import __version__\n"           # dunder: fine
        "from moekit import __version__\n"                   # still the root
    )
    (pkg / "cli" / "main.py").write_text("import moekit\nfrom moekit import __version__\n")  # the CLI may
    assert violations(pkg) == [
        "moekit.steer.effects:1 root-import moekit",
        "moekit.steer.effects:2 private-import moekit.data.synthetic._ONES",
        "moekit.steer.effects:3 private-import moekit.data._hidden.thing",
        "moekit.steer.effects:5 root-import moekit.__version__",
    ]
