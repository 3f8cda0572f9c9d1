"""torchrun integration: join the process group torchrun describes, and the few collectives moekit needs.

``torchrun --nproc-per-node N -m moekit CMD ...`` starts N copies of the CLI with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; ``init()`` joins them with ``torch.distributed`` (gloo on CPU, NCCL
when CUDA is available) under a timeout (``MOEKIT_DIST_TIMEOUT`` seconds, default 600), so a rank that dies
or never arrives ends the job with a clear error instead of a hang. Results travel between ranks as
safetensors blobs in uint8 tensors (``gather_arrays``): no pickling, the same bytes on every backend.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from moekit.errors import MoekitError

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size``, and the device its collectives use."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """``(rank, size)``: the share of batches this rank runs (batch b goes to rank b mod size)."""
        return self.rank, self.size


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise MoekitError(f"environment variable {name}={raw!r} is not an integer") from None


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started this process as one of several ranks."""
    size = _env_int("WORLD_SIZE")
    return size is not None and size > 1


def timeout_seconds() -> float:
    """The collective timeout (``MOEKIT_DIST_TIMEOUT``, seconds)."""
    raw = os.environ.get("MOEKIT_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < 1e7):
        raise MoekitError(f"MOEKIT_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def init(backend: str | None = None) -> World | None:
    """Join the job torchrun describes (idempotent); None when this is a single process."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return None
    rank, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None or not 0 <= rank < size:
        raise MoekitError(f"RANK={os.environ.get('RANK')!r} is not a rank of WORLD_SIZE={size}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise MoekitError(f"{name} is not set: start the job with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = timeout_seconds()
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK") or 0)
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments at import: imported after
    # the group exists (torch._dynamo imports it, and moekit.nn imports torch._dynamo), ten functions would keep
    # the group alive past shutdown(), to be destroyed during interpreter teardown, where gloo sometimes aborts
    # the rank ("terminate called without an active exception", exit code -6). Imported first, they hold None.
    importlib.import_module("torch.distributed.nn.functional")
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistError) as exc:
        raise MoekitError(f"rank {rank} of {size} could not join the job within {timeout:g}s "
                          f"({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}); "
                          "are all ranks started with the same --nproc-per-node?") from None
    return current()


def current() -> World | None:
    """The joined job, or None when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device)


def shutdown() -> None:
    """Leave the process group, if one was joined; the group is destroyed here (nothing of moekit's or torch's
    imports keeps it alive, see ``init``), not during interpreter teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective(what: str, fn, *args, **kwargs):
    """Run a collective; a timeout or a lost peer becomes a one-line MoekitError."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise MoekitError(f"{what} failed on rank {dist.get_rank()} of {dist.get_world_size()}: {first} "
                          "(a rank died or stopped answering)") from None


def all_gather_bytes(blob: bytes, world: World) -> list[bytes]:
    """Every rank's ``blob``, in rank order, on every rank."""
    size = torch.tensor([len(blob)], dtype=torch.int64, device=world.device)
    sizes = [torch.zeros_like(size) for _ in range(world.size)]
    _collective("gathering sizes", dist.all_gather, sizes, size)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if blob:
        buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    buf = buf.to(world.device)
    bufs = [torch.empty_like(buf) for _ in range(world.size)]
    _collective("gathering results", dist.all_gather, bufs, buf)
    return [bytes(b[: int(s)].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes, strict=True)]


def all_gather_arrays(arrays: dict[str, np.ndarray], world: World, meta: dict[str, str] | None = None
                      ) -> list[tuple[dict[str, np.ndarray], dict[str, str]]]:
    """Every rank's named numpy arrays (+ string metadata), in rank order, via safetensors blobs."""
    import json

    from safetensors.numpy import load, save

    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta or {})
    out = []
    for b in all_gather_bytes(blob, world):
        header = json.loads(b[8 : 8 + int.from_bytes(b[:8], "little")])
        out.append((load(b), header.get("__metadata__") or {}))
    return out


def barrier(world: World) -> None:
    """Wait for every rank."""
    _collective("barrier", dist.barrier)
