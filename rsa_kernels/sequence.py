"""SPEC section 2: per-token statistics -> per-sequence sums with the nested-risk discount.

R_k = risk_{t_k} + GAMMA R_{k+1} unrolls to R = sum_k GAMMA^(k-1) risk_{t_k}, k counting the
sequence's unmasked positions in order, so one weighted sum per sequence does it.
"""
from __future__ import annotations

import torch


def token_ranks(mask: torch.Tensor, sequence_ids: torch.Tensor | None, num_sequences: int) -> torch.Tensor:
    """k - 1 for each unmasked position: how many unmasked positions precede it in its sequence."""
    if sequence_ids is None:  # padded (S, T)
        return mask.long().cumsum(-1) - 1
    order = torch.sort(sequence_ids, stable=True).indices
    m = mask[order].long()
    counts = torch.bincount(sequence_ids[mask], minlength=num_sequences)
    starts = counts.cumsum(0) - counts
    ranks = torch.empty_like(m)
    ranks[order] = m.cumsum(0) - 1 - starts[sequence_ids[order]]
    return ranks


def discount_weights(mask, gamma: float, sequence_ids=None, num_sequences: int = 0, dtype=torch.float32):
    """GAMMA^(k-1) at unmasked positions, 0 elsewhere."""
    if gamma == 1.0:
        return mask.to(dtype)
    ranks = token_ranks(mask, sequence_ids, num_sequences).clamp_min(0).to(dtype)
    return torch.where(mask, torch.pow(torch.tensor(gamma, dtype=dtype, device=mask.device), ranks), 0.0)


def sequence_sums(values: torch.Tensor, weights: torch.Tensor, sequence_ids=None, num_sequences: int = 0):
    """sum over each sequence's positions of weights * values: (S, T) -> (S,), or packed (N,) -> (S,)."""
    if sequence_ids is None:
        return (values * weights).sum(-1)
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, sequence_ids, values * weights)
