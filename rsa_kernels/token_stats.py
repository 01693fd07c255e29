"""token_stats: the one autograd boundary. A backend computes the per-token statistics in
one pass over the vocabulary and their gradient in one more; everything above is tiny."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import Call, plan, shared_settings
from .reference import accumulation_dtype
from .risk import Risk, parse_risk
from .validation import check_logits


class TokenStats(NamedTuple):
    """Per-position statistics, each of the labels' shape, in the accumulation dtype."""
    logp: torch.Tensor
    ref_logp: torch.Tensor
    kl: torch.Tensor
    risk: torch.Tensor


class TokenStatsFunction(torch.autograd.Function):
    """Rows (N, V) -> (logp, ref_logp, kl, risk), each (N,); gradient to the policy rows only."""

    @staticmethod
    def forward(ctx, z, zr, labels, risk: Risk, ignore_index: int, backend, chunk_size, inplace: bool):
        stats, saved = backend.forward(z, zr, labels, risk, ignore_index, chunk_size=chunk_size)
        ctx.save_for_backward(z, zr, labels, saved)
        ctx.args = (risk, ignore_index, backend, chunk_size, inplace)
        logp, ref_logp, kl, value = (c.clone() for c in stats.unbind(1))
        ctx.mark_non_differentiable(ref_logp)
        return logp, ref_logp, kl, value

    @staticmethod
    def backward(ctx, g_logp, _g_ref, g_kl, g_risk):
        z, zr, labels, saved = ctx.saved_tensors
        risk, ignore_index, backend, chunk_size, inplace = ctx.args
        zero = torch.zeros(z.shape[0], dtype=saved.dtype, device=z.device)
        grads = torch.stack([zero if g is None else g.to(saved.dtype) for g in (g_logp, g_kl, g_risk)], 1)
        grad = backend.backward(z, zr, labels, saved, grads, risk, ignore_index,
                                inplace=inplace, chunk_size=chunk_size)
        return grad, None, None, None, None, None, None, None


def rows_token_stats(z, zr, labels, risk: Risk, ignore_index: int, backend, chunk_size=None, inplace=False):
    """token_stats on validated 2-D rows with a resolved backend (shared by the fused paths)."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    if zr.stride(-1) != 1:
        zr = zr.contiguous()
    return TokenStatsFunction.apply(z, zr.detach(), labels, risk, ignore_index, backend, chunk_size, inplace)


def token_stats(logits, ref_logits, labels, *, risk="kl", ignore_index: int = -100,
                backend: str = "auto", chunk_size: int | None = None,
                inplace_backward: bool = False, process_group=None, vocab_size: int | None = None) -> TokenStats:
    """Per-token (logp, ref_logp, kl, risk) of SPEC section 1, for logits (..., V).

    Gradients flow to ``logits`` only. ``chunk_size`` bounds the rows processed at once (the
    torch and cpu backends); ``inplace_backward=True`` writes the gradient into ``logits``'
    storage, so use it only when nothing else reads those logits after the backward.
    ``process_group``: the logits are this rank's vocabulary slice (SPEC section 7);
    ``vocab_size``: then the global columns from vocab_size on are padding (no part in the
    statistics, gradient 0).
    """
    def validate(grouped: bool) -> Call:
        r = parse_risk(risk)
        check_logits(logits, ref_logits, labels, ignore_index=ignore_index, global_labels=grouped)
        settings = shared_settings("token_stats", labels, r, ignore_index, logits.dtype, chunk_size,
                                   ("ref_logits (dtype)", str(ref_logits.dtype)), ("inplace_backward", inplace_backward))
        return Call(logits.shape[-1], labels, ignore_index, settings, r)

    where = plan(process_group, backend, logits, validate, vocab_size)
    v = logits.shape[-1]
    lead = labels.shape
    n = logits.shape[:-1].numel()  # not reshape(-1, v): a rank's slice may have v = 0
    out = rows_token_stats(logits.reshape(n, v), ref_logits.reshape(n, v), labels.reshape(-1),
                           where.result, ignore_index, where.rows, chunk_size, inplace_backward)
    return TokenStats(*(t.view(lead) for t in out))


__all__ = ["TokenStats", "token_stats", "rows_token_stats", "accumulation_dtype"]
