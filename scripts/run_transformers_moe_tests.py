"""Run transformers' own model tests for six MoE architectures with moekit's experts switched on.

transformers' wheel carries no tests, and its sdist only the top-level ``tests/*.py`` (no ``tests/models`` or
``tests/generation``), so the test files come from a transformers git repository at the tag of the installed version
(``v<transformers.__version__>``), read with ``git archive``, or from a directory laid out like a checkout (a real
checkout, or a tree assembled by hand as docs/nn.md describes). They are copied into a temporary directory for the
run and deleted afterwards; nothing of transformers' is written into this repository.

"Switched on" (``--experts moekit``, the default) means every model a test builds without naming an experts
implementation gets ``"moekit"`` (transformers' default is ``grouped_mm``), and in the eager-equivalence test
(``test_eager_matches_batched_and_grouped_inference``, which names its implementations) the slot called
``grouped_mm`` runs moekit, so moekit is compared with eager at fp32, fp16 and bf16. ``--experts grouped_mm`` runs
the same tests with transformers' own default, to tell moekit's failures from failures that are not moekit's.

    python scripts/run_transformers_moe_tests.py --source /path/to/transformers.git
    python scripts/run_transformers_moe_tests.py --source ~/src/transformers --archs olmoe,mixtral -- -k compile
    python scripts/run_transformers_moe_tests.py --source /tmp/tf-src --experts grouped_mm --archs olmoe

Needs pytest and ``parameterized`` (transformers' tests import it). Prints one JSON line per architecture
(passed / failed / errors / skipped, and the failing test ids) and a final tally line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ARCHS = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss")
# What the model test files import besides themselves: the common testers and mixins at tests/, the generation
# tester, and the package markers.
COMMON = ("tests/*.py", "tests/generation", "tests/utils", "tests/exporters", "tests/models/__init__.py")
EXPERTS = ("moekit", "grouped_mm")

CONFTEST = '''
"""Written by moekit's run_transformers_moe_tests.py: make "moekit" the default experts implementation, and let
the eager-equivalence test's "grouped_mm" slot run moekit (the test imports the function by name, after this)."""
import transformers.integrations.moe as moe
from transformers import PreTrainedModel

from moekit.nn.dispatch import moekit_experts_forward, register_with_transformers

register_with_transformers()
_original = PreTrainedModel.get_correct_experts_implementation


def _moekit_by_default(self, requested_experts):
    return _original(self, "moekit" if requested_experts is None else requested_experts)


PreTrainedModel.get_correct_experts_implementation = _moekit_by_default
moe.grouped_mm_experts_forward = moekit_experts_forward
'''


def copy_tests(source: Path, tag: str, archs: list[str], dest: Path) -> None:
    """Copy the needed test files of transformers at ``tag`` from a git repository or a checkout into ``dest``."""
    paths = [*COMMON, *(f"tests/models/{a}" for a in archs)]
    if (source / "HEAD").is_file() or (source / ".git").exists():
        git_dir = source / ".git" if (source / ".git").exists() else source
        archive = subprocess.run(
            ["git", f"--git-dir={git_dir}", "archive", "--format=tar", tag, "--", *paths],
            capture_output=True,
            check=False,
        )
        if archive.returncode:
            raise SystemExit(f"error: git archive {tag} failed: {archive.stderr.decode().strip()[-300:]}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return
    for pattern in paths:
        for src in source.glob(pattern):
            target = dest / src.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, target)


def tally(junit: Path) -> dict:
    """passed / failed / errors / skipped and the ids of the failing tests, from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    if not junit.exists():
        return counts | {"errors": 1, "failing": ["(no report: the run did not start)"]}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, type=Path, help="transformers git directory or checkout")
    ap.add_argument("--tag", default=f"v{transformers.__version__}", help="git tag (default: the installed one)")
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {', '.join(ARCHS)}")
    ap.add_argument("--experts", default="moekit", choices=EXPERTS,
                    help="moekit (switched on), or grouped_mm (transformers' default, to classify failures)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per architecture")
    ap.add_argument("--junit-dir", type=Path, help="keep each architecture's JUnit XML here")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        print(f"error: unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    if not args.source.exists():
        print(f"error: --source {args.source}: no such directory", file=sys.stderr)
        return 2
    try:
        import parameterized  # noqa: F401
    except ImportError:
        print("error: transformers' tests need the 'parameterized' package (pip install parameterized)", file=sys.stderr)
        return 2

    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    with tempfile.TemporaryDirectory(prefix="moekit-hf-tests-") as tmp:
        root = Path(tmp)
        copy_tests(args.source, args.tag, archs, root)
        if args.experts == "moekit":
            (root / "conftest.py").write_text(CONFTEST)
        for arch in archs:
            test_file = root / "tests" / "models" / arch / f"test_modeling_{arch}.py"
            if not test_file.exists():
                print(json.dumps({"arch": arch, "error": f"{test_file.relative_to(root)} not in {args.tag}"}))
                continue
            junit = root / f"{arch}.xml"
            # no -W filters: some tests assert that a deprecation warning is raised
            cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *args.pytest_args]
            try:
                subprocess.run(cmd, cwd=root, timeout=args.timeout, capture_output=True, check=False)
            except subprocess.TimeoutExpired:
                print(json.dumps({"arch": arch, "error": f"timed out after {args.timeout} s"}))
                continue
            result = tally(junit)
            if args.junit_dir is not None and junit.exists():
                args.junit_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(junit, args.junit_dir / f"{arch}-{args.experts}.xml")
            for key in total:
                total[key] += result[key]
            print(json.dumps({"arch": arch, "experts_implementation": args.experts, **result}), flush=True)
    print(json.dumps({"kind": "tally", "tag": args.tag, "experts_implementation": args.experts, **total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
