"""Rank program for the multi-process tests (started by torchrun or as plain processes; not a test module).

``python distributed_worker.py MODE OUT``: ``dp`` writes the data-parallel perplexity and calibration
statistics; ``dead`` has rank 1 leave right after joining, so rank 0's next collective must fail clearly.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

torch.set_num_threads(1)


def main(mode: str, out: str) -> int:
    from moekit.distributed import runtime
    from moekit.errors import MoekitError

    try:
        world = runtime.init()
        assert world is not None, "not launched as several ranks"
        if mode == "dp":
            import moekit
            from moekit.data import read_documents
            from moekit.distributed.data_parallel import observe_dp, perplexity_dp

            lm = moekit.load("moekit:tiny")
            docs = read_documents(["moekit:corpus:test"])[:12]
            ppl = perplexity_dp(lm, docs, world, max_tokens=1500, batch_size=3, seq_len=64, progress=False)
            stats = observe_dp(lm, docs, world, seq_len=64, max_tokens=1200, batch_size=3)
            if world.is_main:
                with open(os.path.join(out, "ppl.json"), "w") as fh:
                    json.dump(ppl, fh)
                np.savez(os.path.join(out, "calib.npz"), data_hash=np.array(stats.data_hash), **stats.to_arrays())
        elif mode == "dead":
            if world.rank == 1:
                os._exit(0)
            runtime.all_gather_bytes(b"hello", world)
        runtime.shutdown()
    except MoekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
