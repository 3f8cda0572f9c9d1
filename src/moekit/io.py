"""Safe output writing: everything is written to a temporary sibling and renamed into place.

- ``check_writable(path, force, kind)`` validates an output path before any work starts: the parent
  must be (or become) a writable directory, an existing output needs ``force``, and ``force`` replaces
  only what moekit itself wrote: a directory holding moekit's marker file (``.moekit-output.json``,
  written into every output directory) or a file of the expected kind (a routing trace, an HTML
  report, a moekit JSON file). ``.``, ``~``, ``/``, the working directory and its ancestors are never
  replaced.
- Temporary siblings are named ``.NAME.PID.XXXX.tmp``; the next write of the same output removes the
  ones whose process is gone (a kill -9 or power loss leaves them behind).
- Outputs get the permissions the umask gives (0644 files / 0755 directories under umask 022), not the
  private 0600/0700 of ``mkstemp``/``mkdtemp``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from moekit.errors import MoekitError

MARKER = ".moekit-output.json"
"""The file moekit writes into every output directory; ``--force`` replaces only directories holding it."""

command_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("moekit_command", default=None)
"""The CLI command being run (set by ``moekit.cli.main``); recorded in the marker file."""


# ----- what moekit wrote: recognisers of its own outputs ------------------------------------------------
def _is_marked_dir(p: Path) -> bool:
    return p.is_dir() and (p / MARKER).is_file()


def _is_trace(p: Path) -> bool:
    """A safetensors file whose header metadata holds ``moekit_trace`` (``RoutingTrace.save``)."""
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return False
            header = json.loads(fh.read(n))
        return isinstance(header, dict) and "moekit_trace" in (header.get("__metadata__") or {})
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _is_report_html(p: Path) -> bool:
    """An HTML page ending with the footer every moekit report has (``Written by moekit``)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
            fh.seek(max(p.stat().st_size - 65536, 0))
            tail = fh.read()
    except OSError:
        return False
    return head.lstrip().lower().startswith(b"<!doctype html") and b"<footer>Written by moekit" in tail


# JSON files moekit writes, each told apart by the keys it always has.
_JSON_SIGNATURES = (
    ("format", "entries", "method"),  # experts file (moekit steer find)
    ("timings", "trace_only"),  # report statistics (moekit report --json)
    ("steps", "lm_loss"),  # training log (moekit train)
    ("method", "experts", "ranking"),  # ROCKET selection (moekit adapt select)
    ("experts", "written_by"),  # expert set (moekit.experts.ExpertSet.save, moekit report --super-experts)
)


def _is_moekit_json(p: Path) -> bool:
    try:
        if p.stat().st_size > 1_000_000_000:
            return False
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and any(all(k in data for k in sig) for sig in _JSON_SIGNATURES)


OUTPUT_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "dir": ("a moekit output directory (with its .moekit-output.json marker)", _is_marked_dir),
    "trace": ("a moekit routing trace", lambda p: p.is_file() and _is_trace(p)),
    "html": ("a moekit HTML report", lambda p: p.is_file() and _is_report_html(p)),
    "json": ("a moekit JSON file", lambda p: p.is_file() and _is_moekit_json(p)),
    "file": ("a file written by moekit",
             lambda p: p.is_file() and (_is_trace(p) or _is_report_html(p) or _is_moekit_json(p))),
    "output": ("a moekit output", lambda p: _is_marked_dir(p) or OUTPUT_KINDS["file"][1](p)),
    "any": ("a regular file", lambda p: p.is_file()),  # for tools writing into paths they own (scripts/)
}
"""Output kind → (description, recogniser): what ``--force`` may replace for that kind of output."""


# ----- path checks ----------------------------------------------------------------------------------------
def _protected(p: Path) -> str | None:
    """Why ``p`` must never be replaced (the root, home, the working directory or an ancestor), or None."""
    try:
        real = p.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError):
        return None
    if real == Path(real.anchor):
        return "the filesystem root"
    with contextlib.suppress(RuntimeError, KeyError):
        if real == Path.home().resolve():
            return "your home directory"
    if real == cwd:
        return "the current directory"
    if real in cwd.parents:
        return "an ancestor of the current directory"
    return None


def check_parent(path: str | os.PathLike) -> Path:
    """Fail now (not after the work) when ``path`` cannot be created: a parent is a file or not writable."""
    p = Path(path)
    if not p.name or p.name in (".", ".."):
        raise MoekitError(f"{path} is not a valid output name; give a new file or directory name")
    anc = p.parent
    while not anc.exists():
        if anc.is_symlink():
            raise MoekitError(f"cannot write {p}: {anc} is a broken link")
        if anc == anc.parent:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise MoekitError(f"cannot write {p}: {anc} is a file, not a directory")
    if anc.exists() and not os.access(anc, os.W_OK | os.X_OK):
        raise MoekitError(f"cannot write {p}: no permission to write in {anc}")
    return p


def check_writable(path: str | os.PathLike, force: bool, kind: str = "output") -> Path:
    """Validate an output path before the work starts; returns it as a Path.

    ``kind`` names what will be written (``dir``, ``trace``, ``html``, ``json``, ``file``: any of
    these files, ``output``: any moekit output, file or directory, or ``any``: any regular file, for tools
    that own the path); an existing output is replaced only with ``force`` and only when it is that kind of moekit output.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    p = Path(path).expanduser()
    why = _protected(p)
    if why is not None:
        raise MoekitError(f"refusing to write to {path}: it is {why}; give a new path such as ./moekit-out")
    check_parent(p)
    if not (p.exists() or p.is_symlink()):
        return p
    if not force:
        raise MoekitError(f"{p} already exists; pass --force to overwrite it")
    what, recognise = OUTPUT_KINDS[kind]
    if p.is_symlink() or not recognise(p):
        raise MoekitError(f"refusing to overwrite {p} with --force: it is not {what}; "
                          "remove it yourself or choose another output path")
    return p


# ----- temporary siblings --------------------------------------------------------------------------------
def _tmp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.PID.XXXX.tmp`` siblings of ``path`` left by moekit processes that no longer run."""
    final = Path(path)
    pattern = _tmp_pattern(final.name)
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give a freshly written tree the permissions plain ``open``/``mkdir`` would have given it."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            f = Path(dirpath) / name
            if not f.is_symlink():
                exe = f.stat().st_mode & 0o111
                f.chmod((0o777 if exe else 0o666) & ~mask)
        for name in dirnames:
            d = Path(dirpath) / name
            if not d.is_symlink():
                d.chmod(0o777 & ~mask)
    root.chmod(0o777 & ~mask)


def _write_marker(directory: Path) -> None:
    info = {"written_by": "moekit", "command": command_name.get()}
    (directory / MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


# ----- the writers ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` in one rename.

    An exception (or Ctrl-C, or SIGTERM in the CLI) inside the block removes the temporary directory,
    so no half-written output is ever left at ``path``. The result holds moekit's marker file.
    """
    final = check_writable(path, force, kind="dir")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _write_marker(tmp)
        _apply_umask(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, force: bool = False, mode: str = "wb", kind: str = "file") -> Iterator:
    """Open a temporary file next to ``path`` for writing; rename it over ``path`` when the block ends.

    ``kind`` (see ``check_writable``) says which existing file ``force`` may replace."""
    final = check_writable(path, force, kind=kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
