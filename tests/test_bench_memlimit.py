"""bench/memlimit.py: the enforced budgets of bench_scale.py (a fresh memory cgroup per process, a cold page cache).

Skipped where no memory cgroup is writable (CI containers often have none)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("memlimit", Path(__file__).resolve().parent.parent / "bench" / "memlimit.py")
memlimit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memlimit)


def _cgroups() -> None:
    try:
        memlimit.parent_dir()
    except memlimit.CgroupUnavailable as exc:
        pytest.skip(str(exc))


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fstype, *_ = line.split()
        if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
            best, kind = mnt, fstype
    return kind


_CHILD = r"""
import sys
from pathlib import Path
line = next(l for l in Path("/proc/self/cgroup").read_text().splitlines() if "memory" in l.split(":")[1] or l.startswith("0::"))
print(line.split(":", 2)[2])
"""


def test_child_runs_in_its_own_limited_cgroup_which_is_removed_after():
    _cgroups()
    limit = 64 << 20
    with memlimit.MemoryCgroup(limit) as cg:
        path = cg.path
        assert path.is_dir() and cg.limit == limit
        limit_file = "memory.limit_in_bytes" if cg.kind == "v1" else "memory.max"
        assert int((path / limit_file).read_text()) == limit
        out = subprocess.run(cg.wrap([sys.executable, "-c", _CHILD]), capture_output=True, text=True, check=True)
        # the child's own cgroup (as the kernel reports it) is the fresh one, under the caller's
        assert path.as_posix().endswith(out.stdout.strip())
        assert out.stdout.strip().rsplit("/", 1)[1] == path.name
        stats = cg.stats()
        assert stats["limit_bytes"] == limit and stats["oom_kills"] == 0
        assert 0 < stats["max_usage_bytes"] <= limit
    assert not path.exists()


def test_child_over_the_limit_is_oom_killed_and_counted():
    _cgroups()
    with memlimit.MemoryCgroup(48 << 20) as cg:
        r = subprocess.run(cg.wrap([sys.executable, "-c", "x = bytearray(200 << 20); print('survived')"]),
                           capture_output=True, text=True)
        stats = cg.stats()
    assert r.returncode == -9 and "survived" not in r.stdout
    assert stats["oom_kills"] == 1 and stats["failcnt"] >= 1


def test_page_cache_is_evicted_and_then_charged_to_the_reader(tmp_path):
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages cannot be dropped")
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(8 << 20))
    assert memlimit.cached_bytes([f]) == 8 << 20  # just written: every page cached
    memlimit.evict([tmp_path])  # a directory: every file under it
    assert memlimit.cached_bytes([f]) == 0
    _cgroups()
    limit = 4 << 20  # half the file: reading it all must reclaim within the cgroup
    with memlimit.MemoryCgroup(limit) as cg:
        subprocess.run(cg.wrap(["/bin/sh", "-c", 'cat "$0" > /dev/null', str(f)]), check=True)
        stats = cg.stats()
        cached = memlimit.cached_bytes([f])
    assert stats["oom_kills"] == 0 and stats["failcnt"] >= 1
    assert 0 < cached <= limit


def test_bad_limit_is_refused():
    with pytest.raises(ValueError, match="positive"):
        memlimit.MemoryCgroup(0)


def test_bench_scale_rows_of_an_enforced_run(monkeypatch, tmp_path):
    """bench_scale.measure under a Limit: the row says enforced, the cgroup's numbers, and a one-line error when the
    cgroup's OOM killer stopped the process; the cgroup is gone afterwards."""
    _cgroups()
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_scale

    f = tmp_path / "ckpt"
    f.write_bytes(os.urandom(1 << 20))
    lim = bench_scale.Limit(64 << 20, [tmp_path])
    ok = bench_scale.measure([sys.executable, "-c", "print('fine')"], limit=lim)
    assert ok["rc"] == 0 and ok["stdout"] == "fine\n" and lim.cg is None
    assert ok["enforced"] is True and ok["oom_kills"] == 0 and ok["limit_gb"] == round((64 << 20) / 1e9, 3)
    if _fs_type(tmp_path) not in ("tmpfs", "ramfs", "overlay"):
        assert ok["page_cache_at_start_gb"] == 0.0
    lim = bench_scale.Limit(48 << 20, [])
    killed = bench_scale._failure(bench_scale.measure([sys.executable, "-c", "x = bytearray(200 << 20)"], limit=lim))
    assert killed["rc"] == -9 and killed["oom_kills"] == 1
    assert killed["error"] == f"killed by the OOM killer of its memory cgroup (limit {round((48 << 20) / 1e9, 3)} GB)"
    failed = bench_scale._failure(bench_scale.measure([sys.executable, "-c", "raise SystemExit('no such model')"]))
    assert failed["enforced"] is False and failed["error"] == "no such model"
