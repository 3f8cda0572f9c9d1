"""The ``moekit`` command line: a Typer app; every command is a thin call into the packages.

Each feature adds its commands in its own module here (``inspect_cmd.py``, ...), registered on ``app``.
User mistakes raise ``MoekitError``; ``main`` prints them on one line and exits with code 2.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading

import typer

from moekit.openmp import configure_openmp_wait

# Idle OpenMP threads spin only briefly: long spinning makes every torch op an order of magnitude slower when
# another process is busy on a small machine (see moekit.openmp). Must run before torch is imported.
configure_openmp_wait()

from moekit.cli.common import app, console_err  # noqa: E402

_COMMAND_MODULES = ("inspect_cmd", "trace_cmd", "eval_cmd", "report_cmd", "compress_cmd", "steer_cmd",
                    "generate_cmd", "serve_cmd", "nn_cmd", "train_cmd", "demo_cmd", "placement_cmd",
                    "adapt_cmd")


def _load_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"moekit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moekit.cli.{name}":
                raise


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so that cleanup (``finally``, atomic writes) runs."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    from rich.markup import escape

    console_err.print(f"[bold red]error:[/] {escape(_one_line(message))}", highlight=False, soft_wrap=True)


# Storage failures a user fixes on their side (a full disk, a quota, a file-size limit, a read-only or forbidden
# place): one line and exit code 2, like bad input; the atomic writers (moekit.io) have removed their temp files.
_STORAGE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EFBIG: "file too large for this file system or limit", errno.EROFS: "read-only file system",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moekit`` script: one ``error: ...`` line and exit code 2 for any bad input."""
    from typer.exceptions import TyperException

    from moekit.errors import MoekitError
    from moekit.io import command_name

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _load_commands()
    args = list(sys.argv[1:] if argv is None else argv)
    token = command_name.set(next((a for a in args if not a.startswith("-")), None))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rv = app(args=args, standalone_mode=False, prog_name="moekit")
        return rv if isinstance(rv, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MoekitError as exc:
        _error(str(exc))
        return 2
    except TyperException as exc:  # click's usage errors: a bad option, value or command
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")
            return 2
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error(message + hint)
        return 2
    except typer.Abort:
        console_err.print("aborted")
        return 1
    except KeyboardInterrupt:
        console_err.print("interrupted")
        return 130
    except Terminated:
        _error("terminated by SIGTERM; nothing half-written was kept")
        return 143
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        hint = "free space, or write elsewhere with --out" if exc.errno in _SPACE_ERRORS else "check the path"
        _error(f"{_STORAGE_ERRORS[exc.errno]}{where}: {exc.strerror or exc}; nothing half-written was kept ({hint})")
        return 2
    finally:
        command_name.reset(token)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "moekit.distributed.runtime" in sys.modules:  # leave a torchrun job's process group cleanly
            sys.modules["moekit.distributed.runtime"].shutdown()


def run() -> None:
    sys.exit(main())
