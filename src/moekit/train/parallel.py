"""Expert-parallel training steps (``moekit train`` under torchrun): each rank keeps its shard of every
expert bank; gradients of the replicated parameters are averaged, clipping uses the global norm, and the
checkpoint gathers the shards into the whole model."""

from __future__ import annotations

from typing import Any

import torch

from moekit.nn.model import MoELM


def sync_gradients(model: MoELM, loss: torch.Tensor, grad_clip: float, world: Any) -> torch.Tensor:
    """Expert parallel: average replicated gradients over ranks, scale expert-shard gradients to the global
    mean loss, clip by the global norm; returns the mean loss over ranks (for logging)."""
    import torch.distributed as dist

    from moekit.nn.expert_parallel import ExpertParallelBank

    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelBank) for p in m.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    replicated = [p for p in params if id(p) not in sharded]
    flat = torch.cat([p.grad.reshape(-1) for p in replicated] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in replicated:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
    for p in params:
        if id(p) in sharded:
            p.grad /= world.size  # each rank's loss is a mean over its share: the global loss is their mean
    if grad_clip:
        sq = torch.stack([p.grad.double().pow(2).sum() for p in params if id(p) in sharded] or
                         [torch.zeros((), dtype=torch.float64)]).sum()
        dist.all_reduce(sq)
        sq += sum(p.grad.double().pow(2).sum() for p in replicated)
        coef = (grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return flat[-1]


def gathered_state_dict(model: MoELM, world: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict: every expert-parallel shard gathered from all ranks (a collective)."""
    import torch.distributed as dist

    from moekit.nn.expert_parallel import ExpertParallelBank

    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            for pname, p in module.named_parameters():
                parts = [torch.empty_like(p.data) for _ in range(world.size)]
                dist.all_gather(parts, p.data.contiguous())
                sd[f"{name}.{pname}"] = torch.cat(parts)
    return sd
