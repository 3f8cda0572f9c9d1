"""OpenMP wait policy for small shared machines; import (and call) before torch is imported.

torch's CPU ops run on libgomp threads. By default an idle thread spins for a long time before it sleeps, so any
other busy process on a 2-core machine makes every torch op 10-25x slower (each parallel region waits for a
thread that is spinning on a descheduled core). ``OMP_WAIT_POLICY=PASSIVE`` fixes that but adds a wake-up
(~60 µs) to every parallel region, which dominates small matmuls. A short spin (``GOMP_SPINCOUNT=1000``, a few
microseconds) keeps both: back-to-back ops find their threads awake, a loaded machine loses nothing.
Measured in docs/nn.md ("Threads").
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"


def configure_openmp_wait() -> None:
    """Set a short OpenMP spin unless the user chose a wait policy or spin count; no effect once torch is loaded."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
