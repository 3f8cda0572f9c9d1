"""Rank program for the multi-process tests (started by torchrun or as plain processes; not a test module).

``python distributed_worker.py MODE OUT``: ``dp`` writes the data-parallel perplexity and calibration
statistics; ``dead`` has rank 1 leave right after joining, so rank 0's next collective must fail clearly;
``abort`` has rank 1 die by SIGABRT; ``teardown`` records whether the process group outlives ``runtime.shutdown()``.
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
        elif mode == "ep":
            report = _expert_parallel(world)
            with open(os.path.join(out, f"ep{world.rank}.json"), "w") as fh:
                json.dump(report, fh)
        elif mode == "hfep":
            report = _transformers_ep(world, out)
            with open(os.path.join(out, f"hfep{world.rank}.json"), "w") as fh:
                json.dump(report, fh)
        elif mode == "teardown":
            _teardown(world, out)
            return 0
        elif mode == "abort":  # rank 1 dies by SIGABRT after a last word on stderr (the harness must show it)
            if world.rank == 1:
                print("rank 1 aborts on purpose", file=sys.stderr, flush=True)
                os.abort()
            runtime.all_gather_bytes(b"hello", world)
        elif mode == "dead":
            if world.rank == 1:
                os._exit(0)
            runtime.all_gather_bytes(b"hello", world)
        runtime.shutdown()
    except MoekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _teardown(world, out: str) -> None:
    """Import what the ranks import after joining (moekit.nn pulls in torch._dynamo and its imports), run a
    collective and an expert-parallel router's balancing step, shut down with the layer still alive, and record
    whether anything still holds the process group: one held past shutdown is destroyed during interpreter
    teardown, where gloo can abort the rank."""
    import gc
    import weakref

    import torch.distributed as dist

    from moekit.distributed import runtime
    from moekit.nn import MoELayer, shard_experts

    group = weakref.ref(dist.group.WORLD)
    t = torch.ones(3)
    dist.all_reduce(t)
    layer = MoELayer(16, 24, 4, 2, router="aux_free")  # kept alive past shutdown, as a script's global model is
    shard_experts(layer)
    layer.router.update_bias(torch.tensor([world.rank, 0, 0, 1]))  # balances on the loads of both ranks
    runtime.shutdown()
    gc.collect()
    with open(os.path.join(out, f"teardown{world.rank}.json"), "w") as fh:
        json.dump({"sum": t.tolist(), "bias": layer.router.e_score_correction_bias.tolist(),
                   "group_alive_after_shutdown": group() is not None}, fh)


def _expert_parallel(world) -> dict:
    """Max differences between the expert-parallel layer and the single-process layer on all ranks' tokens."""
    import torch.distributed as dist

    from moekit.nn import MoELayer, shard_experts

    torch.manual_seed(0)
    sizes = [7, 5, 6, 4][: world.size]  # uneven token counts per rank
    hidden, total = 16, sum(sizes)
    report = {}
    for router, kwargs in (("softmax_then_topk", {}), ("aux_free", {}), ("top_p", {"p": 0.5})):
        torch.manual_seed(1)
        ref = MoELayer(hidden, 24, 8, 2, router=router, num_shared=1, router_kwargs=kwargs).train()
        ep = MoELayer(hidden, 24, 8, 2, router=router, num_shared=1, router_kwargs=kwargs).train()
        ep.load_state_dict(ref.state_dict())
        assert shard_experts(ep) == 1
        x_all = torch.randn(total, hidden, generator=torch.Generator().manual_seed(2)).requires_grad_()
        g_all = torch.randn(total, hidden, generator=torch.Generator().manual_seed(3))
        lo = sum(sizes[: world.rank])
        rows = slice(lo, lo + sizes[world.rank])
        y_ref = ref(x_all)
        (y_ref * g_all).sum().backward()
        x = x_all.detach()[rows].clone().requires_grad_()
        y = ep(x)
        (y * g_all[rows]).sum().backward()
        first, n = ep.experts.first, ep.experts.num_local
        router_grad = ep.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        shared_grad = ep.shared.down.weight.grad.clone()
        dist.all_reduce(shared_grad)
        diff = {
            "forward": (y - y_ref[rows]).abs().max().item(),
            "grad_x": (x.grad - x_all.grad[rows]).abs().max().item(),
            "grad_gate_up": (ep.experts.gate_up_proj.grad - ref.experts.gate_up_proj.grad[first:first + n]).abs().max().item(),
            "grad_down": (ep.experts.down_proj.grad - ref.experts.down_proj.grad[first:first + n]).abs().max().item(),
            "grad_router": (router_grad - ref.router.weight.grad).abs().max().item(),
            "grad_shared": (shared_grad - ref.shared.down.weight.grad).abs().max().item(),
            "scale": y_ref.abs().max().item(),
        }
        if router == "aux_free":  # the bias step used the loads of all ranks: the same bias as one process
            diff["bias"] = (ep.router.e_score_correction_bias - ref.router.e_score_correction_bias).abs().max().item()
            diff["bias_moved"] = ref.router.e_score_correction_bias.abs().max().item()
        report[router] = diff
    return report


def _transformers_ep(world, out: str) -> dict:
    """A tiny OLMoE checkpoint placed with transformers' expert parallelism (moekit experts implementation):
    data-parallel trace of documents (rank 0 saves it), and route + record on one batch vs the whole model."""
    import moekit
    import moekit.nn  # noqa: F401  (registers the "moekit" experts implementation)
    from moekit.data import read_documents
    from moekit.distributed.data_parallel import load_expert_parallel, trace_documents_dp
    from moekit.routing import record, route

    path = os.path.join(out, "olmoe")
    ep = load_expert_parallel(path, world)
    ep.model.set_experts_implementation("moekit")
    docs = read_documents(["moekit:corpus:test"])[:10]
    trace = trace_documents_dp(ep, docs, world, max_tokens=700, seq_len=64, batch_size=3, progress=False)
    if world.is_main:
        trace.save(os.path.join(out, "ep.trace"))
    whole = moekit.load(path)
    x = torch.arange(1, 25).view(2, 12) + 7 * world.rank
    report = {"local_experts": int(ep.moe.layers[0].experts.gate_up_proj.to_local().shape[0]),
              "num_experts": ep.moe.layers[0].num_experts}
    for name, kwargs in (("plain", {}), ("disable", {"disable": [(0, 1), (1, 3)]})):
        with torch.no_grad(), route(whole, **kwargs), record(whole) as r0:
            a = whole.model(input_ids=x).logits
        with torch.no_grad(), route(ep, **kwargs), record(ep) as r1:
            b = ep.model(input_ids=x).logits
        report[name] = {"logits": (a - b).abs().max().item(), "ids_equal": bool((r0.trace.ids == r1.trace.ids).all()),
                        "weights": float(np.abs(r0.trace.weights - r1.trace.weights).max()),
                        "uses_disabled": int(sum((r1.trace.ids[i] == e).sum() for i, e in ((0, 1), (1, 3))))}
    return report


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
