"""Pair chunks: each chunk's logits are computed once, and its gradients right away.

The pair loss couples a chosen sequence i with its rejected partner i + B, and nothing
else, so a chunk that holds whole pairs can finish its part of the loss on its own: the
row kernel's statistics feed loss_from_token_stats on the chunk's pairs (a tiny autograd
graph), whose gradient with respect to the statistics goes back through the row kernel
(in place into the policy logits) and the two weight products. Four N x H x V products in
all; the backward only scales the stored gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loss import Layout, loss_from_token_stats
from ..reference import accumulation_dtype
from ..token_stats import TokenStats
from .linear import LinearGrads, chunk_logits, kernel_rows


@dataclass
class PairChunk:
    rows: torch.Tensor          # unmasked hidden rows of the chunk's sequences, in token order
    sub_ids: torch.Tensor       # each row's sequence within the chunk: chosen 0..c-1, rejected c..2c-1
    pairs: int                  # c


def row_sequences(layout: Layout) -> torch.Tensor:
    """The sequence of each flattened label row."""
    if layout.sequence_ids is not None:
        return layout.sequence_ids
    s, t = layout.labels.shape
    return torch.arange(s * t, device=layout.labels.device) // max(t, 1)


def pair_rows(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unmasked rows sorted by pair, stably; their sequences; unmasked rows per pair)."""
    b = layout.num_sequences // 2
    active = layout.mask.reshape(-1).nonzero().squeeze(1)
    seq = row_sequences(layout).index_select(0, active)
    pair = seq % b
    order = torch.sort(pair, stable=True).indices  # stable: each sequence's tokens stay in order
    return active[order], seq[order], torch.bincount(pair, minlength=b)


def largest_pair_rows(layout: Layout) -> int:
    """Unmasked rows of the largest pair (chosen and rejected together)."""
    return int(pair_rows(layout)[2].max())


def pair_chunks(layout: Layout, rows: int) -> list[PairChunk]:
    """Whole pairs, consecutive, as many per chunk as fit ``rows`` unmasked rows (at least one)."""
    b = layout.num_sequences // 2
    active, seq, counts = pair_rows(layout)
    chunks, start, p0, size = [], 0, 0, 0
    for p, k in enumerate(counts.tolist() + [None]):
        if p == b or (p > p0 and size + k > rows):
            c = p - p0
            r, s = active[start:start + size], seq[start:start + size]
            sub = torch.where(s < b, s - p0, s - b - p0 + c)
            chunks.append(PairChunk(r, sub, c))
            start, p0, size = start + size, p, 0
        if p < b:
            size += k
    return chunks


class FusedPairLossFunction(torch.autograd.Function):
    """(hidden, weight, bias; reference) -> (mean pair loss, stacked metrics)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, chunks, num_pairs,
                risk, ignore_index, backend, loss_args, keys_out, grad_enabled):
        acc = accumulation_dtype(hidden.dtype)
        # the gradients are computed here, so only when the caller's autograd will want them
        grads = LinearGrads(hidden, weight, bias, [grad_enabled and n for n in ctx.needs_input_grad[:3]])
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        metrics: dict = {}
        for chunk in chunks:
            lab = labels.index_select(0, chunk.rows)
            if chunk.rows.numel():
                z, h = chunk_logits(hidden, chunk.rows, weight, bias)
                zr, _ = chunk_logits(ref_hidden, chunk.rows, ref_weight, ref_bias, z.dtype)
                st, saved = backend.forward(z, zr, lab, risk, ignore_index, chunk_size=kernel_rows(len(lab)))
            else:  # a pair with no response token still counts, with Delta = R = 0
                st = torch.zeros(0, 4, dtype=acc, device=hidden.device)
            weight_c = chunk.pairs / num_pairs  # the chunk's share of the mean over pairs
            with torch.enable_grad():
                st = st.to(acc).detach().requires_grad_(grads.wanted)
                layout = Layout(lab, torch.ones_like(lab, dtype=torch.bool), chunk.sub_ids, 2 * chunk.pairs)
                part, m = loss_from_token_stats(TokenStats(*st.unbind(1)), layout, **loss_args)
                part = part * weight_c
                g = None
                if grads.wanted and chunk.rows.numel():
                    (g,) = torch.autograd.grad(part, st, allow_unused=True)
            loss += part.detach()
            for k, val in m.items():
                metrics[k] = metrics.get(k, 0.0) + val * weight_c
            if g is not None:
                # columns (logp, kl, risk) of the statistics' gradient; ref_logp has none
                gz = backend.backward(z, zr, lab, saved, g[:, [0, 2, 3]].contiguous(), risk, ignore_index,
                                      inplace=True, chunk_size=kernel_rows(len(lab)))
                del zr
                grads.add(chunk.rows, h, gz, weight)
                del gz
            z = zr = None
        keys_out.extend(metrics)
        ctx.save_for_backward(*grads.result(weight, bias))  # in the inputs' dtypes
        values = torch.stack([metrics[k].to(acc) for k in keys_out])
        ctx.mark_non_differentiable(values)
        return loss, values

    @staticmethod
    def backward(ctx, g_loss, _g_metrics):
        scale = None if bool(g_loss == 1) else g_loss  # the common case needs no copy (as Liger does)
        out = [g if g is None or scale is None else g * scale.to(g.dtype) for g in ctx.saved_tensors]
        return (*out, None, None, None, None, None, None, None, None, None, None, None, None)


def fused_pair_loss(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, layout: Layout, *, risk,
                    ignore_index: int, backend, rows: int, loss_args: dict):
    """(loss, metrics) of 2-D hidden rows laid out as ``layout`` says, by pair chunks."""
    chunks = pair_chunks(layout, rows)
    ref = [t.detach() if t is not None else None for t in (ref_hidden, ref_weight, ref_bias)]
    keys: list[str] = []
    loss, values = FusedPairLossFunction.apply(hidden, weight, bias, *ref, layout.labels.reshape(-1), chunks,
                                               layout.num_sequences // 2, risk, ignore_index, backend, loss_args,
                                               keys, torch.is_grad_enabled())
    return loss, dict(zip(keys, values.unbind(0)))
