"""Expert parallelism: an expert bank sharded over the ranks of a process group, tokens moved by all-to-all.

Rank r of R holds experts ``r·E/R … (r+1)·E/R − 1`` (contiguous, as every EP engine shards; ``moekit
placement apply`` permutes a checkpoint so this is a planned placement). A forward sends every (token,
expert) pair to the rank of its expert with ``torch.distributed.all_to_all_single`` (gloo and NCCL), runs the
local experts through moekit's dispatch, sends the outputs back with a second all-to-all and weights and sums
the k slots at home. Both exchanges are autograd functions whose backward is the reverse all-to-all, so
forward and backward equal the single-process ``ExpertBank`` on the union of the ranks' tokens (float
rounding aside). Every rank must call forward (and backward) in the same order: they are collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.nn.dispatch import combine_slots, expert_forward
from moekit.nn.layers import ACTIVATIONS, ExpertBank


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: send ``in_splits[r]`` rows of ``x`` to rank r, receive ``out_splits``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelBank(nn.Module):
    """This rank's E/R experts of an E-expert bank (``ExpertBank`` layout); ``forward`` as ``ExpertBank.forward``.

    ``last_exchange`` holds the rows sent to other ranks by the last forward (dispatch; the combine sends as
    many back), for traffic accounting.
    """

    def __init__(self, hidden: int, inter: int, num_experts: int, act: str = "silu", group=None) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelBank needs an initialised torch.distributed process group")
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.world} ranks")
        self.hidden, self.inter, self.num_experts, self.act_name = hidden, inter, num_experts, act
        self.num_local = num_experts // self.world
        self.first = self.rank * self.num_local
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_local, hidden, inter))
        nn.init.normal_(self.gate_up_proj, std=hidden**-0.5)
        nn.init.normal_(self.down_proj, std=inter**-0.5)
        self.last_exchange = 0

    @classmethod
    @torch.no_grad()
    def from_bank(cls, bank: ExpertBank, group=None) -> ExpertParallelBank:
        """This rank's shard of a full ``bank`` (every rank builds the same bank, then keeps its slice)."""
        ep = cls(bank.hidden, bank.inter, bank.num_experts, bank.act_name, group)
        rows = slice(ep.first, ep.first + ep.num_local)
        ep.gate_up_proj.copy_(bank.gate_up_proj[rows])
        ep.down_proj.copy_(bank.down_proj[rows])
        return ep.to(bank.gate_up_proj.device)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_k weights · expert_ids(x)`` for this rank's tokens ``x [T,H]``; ids ≥ E (or < 0) add nothing."""
        num_tokens, top_k = ids.shape
        flat = ids.reshape(-1).long()
        valid = (flat >= 0) & (flat < self.num_experts)
        dest = torch.where(valid, flat // self.num_local, self.world)  # world = "nowhere"
        order = torch.argsort(dest, stable=True)
        counts = torch.bincount(dest, minlength=self.world + 1)[: self.world]
        n_send = int(counts.sum())
        order = order[:n_send]
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        in_splits, out_splits = counts.tolist(), recv.tolist()
        self.last_exchange = n_send - in_splits[self.rank]
        local_ids = (flat[order] - dest[order] * self.num_local).unsqueeze(-1)
        x_recv = all_to_all(x.index_select(0, order // top_k), out_splits, in_splits, self.group)
        ids_recv = torch.empty(sum(out_splits), 1, dtype=local_ids.dtype, device=x.device)
        dist.all_to_all_single(ids_recv, local_ids, out_splits, in_splits, group=self.group)
        ones = torch.ones(ids_recv.shape, dtype=x.dtype, device=x.device)
        y_recv = expert_forward(x_recv, ids_recv, ones, self.gate_up_proj, self.down_proj, ACTIVATIONS[self.act_name])
        y_back = all_to_all(y_recv, in_splits, out_splits, self.group)
        # slot s reads its expert output row; slots with no expert read an appended zero row
        y_rows = torch.cat([y_back, y_back.new_zeros(1, y_back.shape[-1])])
        slot_rows = torch.full((num_tokens * top_k,), n_send, dtype=torch.long, device=x.device)
        slot_rows[order] = torch.arange(n_send, device=x.device)
        return combine_slots(y_rows, slot_rows, weights).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local={self.first}..{self.first + self.num_local - 1}, "
                f"hidden={self.hidden}, inter={self.inter}, act={self.act_name}")


def shard_experts(model: nn.Module, group=None) -> int:
    """Replace every ``ExpertBank`` in ``model`` by this rank's ``ExpertParallelBank`` shard (in place) and make
    aux-loss-free routers balance on loads summed over the ranks; returns how many banks were sharded."""
    from moekit.nn.routers import Router

    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ExpertBank):
                setattr(module, name, ExpertParallelBank.from_bank(child, group))
                n += 1
        if isinstance(module, Router):
            module.load_group = group if group is not None else "world"  # not the group object: see Router
    return n


def is_expert_parallel(param_name: str, model: nn.Module) -> bool:
    """Whether the named parameter belongs to an ``ExpertParallelBank`` (sharded, not replicated)."""
    owner = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return isinstance(owner, ExpertParallelBank)
