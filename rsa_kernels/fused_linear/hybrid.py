"""A measurement variant: the fused kernel's forward, then the token schedule's backward.

The fused lm-head kernel (fused_kernel.py) is predicted to pay in the forward, which only
multiplies logits out and reduces them, and not in the backward, whose float32 atomics
move more bytes than the logits they save (docs/fused_linear.md). This joins the two
halves: statistics and saved scalars from the kernel (no logits in memory), gradients by
the token schedule (tokens.py: each chunk's logits recomputed with a matrix product, the
row kernel's gradient in place, two more products). bench/gpu_check_fused_kernel.py times
it next to both; it becomes a public schedule only once a GPU says it is the fastest.
"""
from __future__ import annotations

import torch

from ..risk import SAVED_WIDTH
from . import fused_kernel
from .tokens import FusedTokenStatsFunction, token_chunks


class KernelForwardTokensBackward(FusedTokenStatsFunction):
    """FusedTokenStatsFunction with the fused kernel's forward; its backward is inherited."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, chunks, risk,
                ignore_index, backend):
        n = hidden.shape[0]
        stats = torch.zeros(n, 4, dtype=torch.float32, device=hidden.device)
        saved = torch.zeros(n, SAVED_WIDTH, dtype=torch.float32, device=hidden.device)
        rows = (labels != ignore_index).nonzero().squeeze(1)
        if rows.numel():
            st, sv = fused_kernel._forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, rows,
                                           risk)
            stats.index_copy_(0, rows, st)
            saved.index_copy_(0, rows, sv)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, saved)
        ctx.args = (chunks, risk, ignore_index, backend)
        logp, ref_logp, kl, value = (c.clone() for c in stats.unbind(1))
        ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, kl, value


def hybrid_rows_token_stats(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, risk,
                            ignore_index: int, backend, rows: int):
    """As tokens.fused_rows_token_stats (checked 2-D rows, a backend module, ``rows`` per chunk
    in the backward), with the fused kernel's forward: kl and erm only."""
    fused_kernel.check_kernel_args(risk, "auto", hidden, ref_hidden)
    chunks = token_chunks(labels != ignore_index, rows)
    ref = [t.detach() if t is not None else None for t in (ref_hidden, ref_weight, ref_bias)]
    return KernelForwardTokensBackward.apply(hidden, weight, bias, *ref, labels.contiguous(), chunks, risk,
                                             ignore_index, backend)
