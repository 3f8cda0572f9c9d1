"""Enforced memory budgets for benchmarks: a fresh memory cgroup per measured process, and a cold page cache.

A ``max_memory`` a tool is given is only a request: a tool whose weights are memory-mapped keeps them in the page
cache and stays fast on a machine that has the RAM, while the user who sets a budget is the one whose machine does
not. ``MemoryCgroup`` runs a command in its own cgroup whose limit counts anonymous memory *and* the page cache the
process brings in (cgroup v1: ``memory.limit_in_bytes``; v2: ``memory.max``), so every tool pays for what it keeps.
The cgroup is made under the caller's own memory cgroup (the limits above it still apply) and removed afterwards.

Page-cache pages are charged to the cgroup that first read them: pages already cached (by an earlier run, charged
elsewhere) would be free to the measured process. ``evict`` drops files from the page cache first
(``posix_fadvise(DONTNEED)``), and ``cached_bytes`` checks it with ``mincore``.

Bench tooling only (Linux, root or a delegated cgroup), not library code.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shlex
import signal
import time
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here: the budget cannot be enforced."""


def _own_cgroup(kind: str) -> str:
    """This process's cgroup path in the v1 memory hierarchy (``kind="v1"``) or the v2 one (``"v2"``)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if (kind == "v1" and "memory" in ctrls.split(",")) or (kind == "v2" and hid == "0" and ctrls == ""):
            return path
    raise CgroupUnavailable(f"this process is in no {kind} memory cgroup")


def parent_dir() -> tuple[str, Path]:
    """Where fresh memory cgroups can be made: ``("v1" | "v2", directory)`` under this process's own cgroup.

    Raises ``CgroupUnavailable`` with the reason when there is none (no memory controller, not writable)."""
    reasons = []
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        try:
            d = V1_ROOT / _own_cgroup("v1").lstrip("/")
            if os.access(d, os.W_OK):
                return "v1", d
            reasons.append(f"{d} is not writable")
        except (CgroupUnavailable, OSError) as exc:
            reasons.append(str(exc))
    for root in V2_ROOTS:
        if not (root / "cgroup.controllers").exists():
            continue
        try:
            d = root / _own_cgroup("v2").lstrip("/")
            if "memory" not in (d / "cgroup.subtree_control").read_text().split():
                reasons.append(f"{d}: memory is not in cgroup.subtree_control")
            elif not os.access(d, os.W_OK):
                reasons.append(f"{d} is not writable")
            else:
                return "v2", d
        except (CgroupUnavailable, OSError) as exc:
            reasons.append(str(exc))
        break
    raise CgroupUnavailable("no writable memory cgroup (" + ("; ".join(reasons) or "no cgroup filesystem") + ")")


class MemoryCgroup:
    """A fresh memory cgroup limited to ``limit`` bytes; ``wrap(cmd)`` runs ``cmd`` inside it; ``stats()``; ``remove()``.

    Use as a context manager: the cgroup is removed on exit (its processes must have ended)."""

    _count = 0

    def __init__(self, limit: int, name: str = "moekit-bench") -> None:
        if limit <= 0:
            raise ValueError(f"memory limit must be positive, got {limit}")
        self.kind, parent = parent_dir()
        MemoryCgroup._count += 1
        self.path = parent / f"{name}-{os.getpid()}-{MemoryCgroup._count}"
        self.path.mkdir()
        self.limit = limit
        try:
            if self.kind == "v1":
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                got = int((self.path / "memory.limit_in_bytes").read_text())
            else:
                (self.path / "memory.max").write_text(str(limit))
                if (self.path / "memory.swap.max").exists():  # the budget is RAM: no swapping past it
                    (self.path / "memory.swap.max").write_text("0")
                got = int((self.path / "memory.max").read_text())
        except OSError:
            self.path.rmdir()
            raise
        self.limit = got  # the kernel rounds down to a page

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` prefixed by a shell that moves itself into the cgroup and then execs ``cmd`` (same pid)."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["/bin/sh", "-c", f'echo 0 > {procs} && exec "$@"', "sh", *cmd]

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def stats(self) -> dict:
        """Limit, peak usage (anonymous + page cache), times the limit was hit and OOM kills."""
        if self.kind == "v1":
            oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
            return {"cgroup": "v1", "limit_bytes": self.limit,
                    "max_usage_bytes": int((self.path / "memory.max_usage_in_bytes").read_text()),
                    "failcnt": int((self.path / "memory.failcnt").read_text()),
                    "oom_kills": int(oom.get("oom_kill", 0))}
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        peak = self.path / "memory.peak"
        return {"cgroup": "v2", "limit_bytes": self.limit,
                "max_usage_bytes": int(peak.read_text()) if peak.exists() else None,
                "failcnt": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}

    def remove(self) -> None:
        """Remove the cgroup (its page-cache charges move to the parent). Processes still in it are killed first."""
        for _ in range(50):
            pids = self.procs() if self.path.exists() else []
            if not pids:
                break
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.1)
        if self.path.exists():
            self.path.rmdir()

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ----- the page cache -------------------------------------------------------------------------------------
def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
    return out


def evict(paths: list[Path]) -> None:
    """Drop every file under ``paths`` from the page cache (written data is flushed first: dirty pages stay)."""
    from moekit.formats import drop_file_cache

    for f in _files(paths):
        drop_file_cache(f)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def cached_bytes(paths: list[Path]) -> int:
    """Bytes of the files under ``paths`` that sit in the page cache now (``mincore`` on a mapping; maps, reads
    nothing)."""
    total = 0
    page = mmap.PAGESIZE
    for f in _files(paths):
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {f}")
            try:
                n = -(-size // page)
                vec = (ctypes.c_ubyte * n)()
                if _LIBC.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {f}")
                total += (n - bytes(vec).count(0)) * page
            finally:
                _LIBC.munmap(addr, size)
        finally:
            os.close(fd)
    return total


__all__ = ["CgroupUnavailable", "MemoryCgroup", "cached_bytes", "evict", "parent_dir"]
