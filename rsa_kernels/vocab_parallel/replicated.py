"""A tensor every rank of the group holds whole (the hidden states of the fused-linear forms).

Each rank's lm-head slice contributes its own part of d loss / d hidden; the gradient of
the replicated hidden states is the sum of those parts, so the backward all-reduces it
(Megatron's copy_to_tensor_model_parallel_region). Every rank then holds the gradient a
single process would compute.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def replicated(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` unchanged; its gradient summed over ``group`` in the backward."""
    if not tensor.requires_grad or not torch.is_grad_enabled():
        return tensor
    return _Replicated.apply(tensor, group)
