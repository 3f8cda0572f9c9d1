"""Expert I/O of the offload engine: reads from the store into a cache slot or a scratch buffer, the thread pool
that reads a forward's misses while its hits are computed, and the prefetch thread.

A read goes straight into its destination when that is contiguous host memory (a cache slot on the CPU: one
``pread`` per tensor, no copy); a slot on an accelerator is filled through a per-thread staging buffer (pinned
when CUDA is present).  Scratch buffers (experts not cached) are reused per layer shape and per reading
thread, so a decode step allocates nothing.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from moekit.serve.store import ExpertStore, FileStore


class ExpertIO:
    """Reads experts from ``store`` for one engine; ``start``/``stop`` own the I/O pool and the prefetch thread."""

    def __init__(self, store: ExpertStore, device: torch.device, io_threads: int = 2) -> None:
        self.store = store
        self.device = device
        self.io_threads = io_threads
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._q: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._local = threading.local()
        self._scratch: dict[tuple, dict[str, torch.Tensor]] = {}
        self._scratch_lock = threading.Lock()

    # ----- lifecycle ----------------------------------------------------------------------------------------
    def start(self, prefetch: Callable[[Any], None] | None = None) -> None:
        """Start the I/O pool (when ``io_threads`` > 0) and, given ``prefetch`` (called with each queued task
        on the prefetch thread), the prefetch thread."""
        if self.io_threads > 0:
            self.pool = concurrent.futures.ThreadPoolExecutor(self.io_threads, thread_name_prefix="moekit-io")
        if prefetch is not None:
            self._q = queue.Queue()
            self._worker = threading.Thread(target=self._loop, args=(prefetch,), name="moekit-prefetch",
                                            daemon=True)
            self._worker.start()

    def stop(self) -> None:
        if self._worker is not None and self._q is not None:
            self._q.put(None)
            self._worker.join()
            self._worker = None
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        with self._scratch_lock:
            self._scratch.clear()

    def enqueue(self, task: Any) -> None:
        """Queue a prefetch task (handled in order on the prefetch thread)."""
        assert self._q is not None
        self._q.put(task)

    def _loop(self, handle: Callable[[Any], None]) -> None:
        assert self._q is not None
        while True:
            task = self._q.get()
            if task is None:
                return
            handle(task)

    # ----- reads --------------------------------------------------------------------------------------------
    def _staging(self, layer: int) -> dict[str, torch.Tensor]:
        pool = getattr(self._local, "staging", None)
        if pool is None:
            pool = self._local.staging = {}
        shapes = self.store.shapes(layer)
        key = tuple(sorted((n, s, d) for n, (s, d) in shapes.items()))
        buf = pool.get(key)
        if buf is None:
            pin = torch.cuda.is_available()
            buf = {n: torch.empty(s, dtype=d, pin_memory=pin) for n, (s, d) in shapes.items()}
            pool[key] = buf
        return buf

    def read(self, layer: int, expert: int, dst: dict[str, torch.Tensor]) -> int:
        """Read one expert into ``dst`` (slot views or scratch); returns the bytes read from the store."""
        direct = all(t.device.type == "cpu" and t.is_contiguous() for t in dst.values()) or not isinstance(
            self.store, FileStore)
        if direct:
            return self.store.read(layer, expert, dst)
        stage = self._staging(layer)
        n = self.store.read(layer, expert, stage)
        for k, t in dst.items():
            t.copy_(stage[k], non_blocking=True)
        if dst and next(iter(dst.values())).device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return n

    def scratch(self, layer: int, j: int = -1) -> dict[str, torch.Tensor]:
        """Scratch set ``j`` for an expert of ``layer``'s shape that is not cached (reused across steps)."""
        shapes = self.store.shapes(layer)
        key = (j, *sorted((n, s, d) for n, (s, d) in shapes.items()))
        with self._scratch_lock:
            buf = self._scratch.get(key)
            if buf is None:
                buf = {n: torch.empty(s, dtype=d, device=self.device) for n, (s, d) in shapes.items()}
                self._scratch[key] = buf
        return buf

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the I/O pool (or now, without one)."""
        if self.pool is None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)
            return fut
        return self.pool.submit(fn, *args)
