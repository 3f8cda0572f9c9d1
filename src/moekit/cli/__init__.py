"""The ``moekit`` command line: a Typer app; every command is a thin call into the packages.

Each feature adds its commands in its own module here (``inspect_cmd.py``, ...), registered on ``app``.
User mistakes raise ``MoekitError``; ``main`` prints them on one line and exits with code 2.
"""

from __future__ import annotations

import os
import sys

from moekit.openmp import configure_openmp_wait

# Idle OpenMP threads spin only briefly: long spinning makes every torch op an order of magnitude slower when
# another process is busy on a small machine (see moekit.openmp). Must run before torch is imported.
configure_openmp_wait()

from moekit.cli.common import app, console_err  # noqa: E402

_COMMAND_MODULES = ("inspect_cmd", "trace_cmd", "eval_cmd", "report_cmd", "compress_cmd", "steer_cmd",
                    "generate_cmd", "serve_cmd", "nn_cmd", "train_cmd", "demo_cmd")


def _load_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"moekit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moekit.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moekit`` script."""
    from moekit.errors import MoekitError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _load_commands()
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    except MoekitError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console_err.print("interrupted")
        return 130
    return 0


def run() -> None:
    sys.exit(main())
