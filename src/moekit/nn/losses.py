"""Router auxiliary losses (Switch balance, DeepSeek sequence balance, z-loss) and their injection into autograd.

All balance losses are computed for one layer at a time (not pooled over layers, unlike transformers'
``load_balancing_loss_func``, #28255), count only real experts (ids < E), and skip padded tokens.
"""

from __future__ import annotations

import torch


def _flat_mask(mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    """A float ``[T]`` validity mask (1 = real token) from an optional bool/0-1 mask of any shape."""
    if mask is None:
        return torch.ones(num_tokens, device=device)
    return mask.reshape(-1).to(device=device, dtype=torch.float32)


def _one_hot_counts(ids: torch.Tensor, num_experts: int, weight: torch.Tensor) -> torch.Tensor:
    """``[..., E]`` counts of ids < E over the last (k) axis, each slot weighted by ``weight[...]``."""
    valid = (ids < num_experts) & (ids >= 0)
    onehot = torch.zeros(*ids.shape[:-1], num_experts + 1, device=ids.device)
    onehot.scatter_add_(-1, torch.where(valid, ids, num_experts).long(), valid.float())
    return onehot[..., :num_experts] * weight.unsqueeze(-1)


def switch_balance_loss(
    probs: torch.Tensor, ids: torch.Tensor, num_experts: int | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balance loss ``E · Σ_e f_e · P_e`` for one layer (1.0 when perfectly balanced).

    ``probs [T,E]`` are the router probabilities, ``ids [T,k]`` the selected experts (ids ≥ E ignored),
    ``f_e`` the fraction of all real selections that went to e, ``P_e`` the mean probability of e, both over
    unmasked tokens only.
    """
    num_experts = num_experts or probs.shape[-1]
    probs = probs.reshape(-1, probs.shape[-1]).float()
    m = _flat_mask(mask, probs.shape[0], probs.device)
    counts = _one_hot_counts(ids.reshape(probs.shape[0], -1), num_experts, m).sum(0)
    f = counts / counts.sum().clamp(min=1.0)
    p = (probs[:, :num_experts] * m.unsqueeze(-1)).sum(0) / m.sum().clamp(min=1.0)
    return num_experts * (f * p).sum()


def seq_balance_loss(
    probs: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int | None = None,
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """DeepSeek sequence-level balance loss ``mean_b Σ_e ce[b,e] · mean_t s[b,t,e]``, ``ce = count_b(e) / (S·k/E)``.

    ``probs [B,S,E]``, ``ids [B,S,k]`` (2-D inputs are one sequence); ``S`` counts unmasked tokens of each
    sequence and ``k`` defaults to the width of ``ids``.
    """
    num_experts = num_experts or probs.shape[-1]
    if probs.dim() == 2:
        probs, ids = probs.unsqueeze(0), ids.unsqueeze(0)
        mask = None if mask is None else mask.reshape(1, -1)
    batch, seq = probs.shape[:2]
    k = top_k or ids.shape[-1]
    m = torch.ones(batch, seq, device=probs.device) if mask is None else mask.reshape(batch, seq).float()
    counts = _one_hot_counts(ids, num_experts, m).sum(1)  # [B,E]
    n_tok = m.sum(1, keepdim=True).clamp(min=1.0)  # [B,1]
    ce = counts / (n_tok * k / num_experts)
    mean_s = (probs[..., :num_experts].float() * m.unsqueeze(-1)).sum(1) / n_tok
    return (ce * mean_s).sum(-1).mean()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over unmasked tokens of ``logsumexp(logits)²``, keeps logits small."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    m = _flat_mask(mask, logits.shape[0], logits.device)
    return (torch.logsumexp(logits, dim=-1).square() * m).sum() / m.sum().clamp(min=1.0)


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient 1 into ``loss``.

    Attaching a layer's aux loss to its output this way lets the loss reach the optimiser through an ordinary
    ``main_loss.backward()``: the training loop never has to collect it (DeepSeekMoE's trick).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        ctx.loss_needs_grad = loss.requires_grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_loss = None
        if ctx.loss_needs_grad:
            grad_loss = torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad_out.device)
        return grad_out, grad_loss


def add_aux_loss(x: torch.Tensor, loss: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with ``coef · loss`` added to whatever objective ``x`` later flows into."""
    if coef == 0.0 or not torch.is_grad_enabled() or not loss.requires_grad:
        return x
    return AddAuxiliaryLoss.apply(x, loss * coef)
