"""Token chunks with recomputation: memory O(chunk x V) whatever the sequence length.

Forward: per chunk, the two logit products and the row kernel's forward; only the
per-token statistics and the row kernel's saved scalars survive. Backward: per chunk,
recompute both products, let the row kernel turn the policy logits into their gradient
G in place, then grad_hidden = G W, grad_weight += G^T h, grad_bias += sum(G). Six
N x H x V products in all.
"""
from __future__ import annotations

import torch

from ..reference import accumulation_dtype
from ..risk import SAVED_WIDTH
from .linear import LinearGrads, chunk_logits, kernel_rows


def token_chunks(mask: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """The indices of the unmasked rows, cut into pieces of at most ``rows``."""
    active = mask.reshape(-1).nonzero().squeeze(1)
    return list(active.split(rows))


class FusedTokenStatsFunction(torch.autograd.Function):
    """(hidden, weight, bias; reference) -> (logp, ref_logp, kl, risk) per row, each (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, chunks, risk,
                ignore_index, backend):
        n = hidden.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        stats = torch.zeros(n, 4, dtype=acc, device=hidden.device)
        saved = torch.zeros(n, SAVED_WIDTH, dtype=acc, device=hidden.device)
        for rows in chunks:
            z, _ = chunk_logits(hidden, rows, weight, bias)
            zr, _ = chunk_logits(ref_hidden, rows, ref_weight, ref_bias, z.dtype)
            st, sv = backend.forward(z, zr, labels.index_select(0, rows), risk, ignore_index,
                                           chunk_size=kernel_rows(len(rows)))
            stats.index_copy_(0, rows, st.to(acc))
            saved.index_copy_(0, rows, sv.to(acc))
            del z, zr
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, saved)
        ctx.args = (chunks, risk, ignore_index, backend)
        logp, ref_logp, kl, value = (c.clone() for c in stats.unbind(1))
        ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, kl, value

    @staticmethod
    def backward(ctx, g_logp, _g_ref, g_kl, g_risk):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, saved = ctx.saved_tensors
        chunks, risk, ignore_index, backend = ctx.args
        grads = LinearGrads(hidden, weight, bias, ctx.needs_input_grad[:3])
        if grads.wanted:
            zero = torch.zeros(hidden.shape[0], dtype=saved.dtype, device=saved.device)
            g = torch.stack([zero if t is None else t.to(saved.dtype) for t in (g_logp, g_kl, g_risk)], 1)
            for rows in chunks:
                z, h = chunk_logits(hidden, rows, weight, bias)
                zr, _ = chunk_logits(ref_hidden, rows, ref_weight, ref_bias, z.dtype)
                gz = backend.backward(z, zr, labels.index_select(0, rows), saved.index_select(0, rows),
                                      g.index_select(0, rows), risk, ignore_index, inplace=True,
                                      chunk_size=kernel_rows(len(rows)))
                del zr
                grads.add(rows, h, gz, weight)
                del z, gz
        return (*grads.result(weight, bias), None, None, None, None, None, None, None, None)


def fused_rows_token_stats(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *, risk,
                           ignore_index: int, backend, rows: int):
    """Token statistics of 2-D hidden rows (N, H) and labels (N,), gradient to the policy only."""
    chunks = token_chunks(labels != ignore_index, rows)
    ref = [t.detach() if t is not None else None for t in (ref_hidden, ref_weight, ref_bias)]
    return FusedTokenStatsFunction.apply(hidden, weight, bias, *ref, labels, chunks, risk, ignore_index, backend)
