"""The distributed quantile search: exact order statistics of a row split across ranks.

Each value D maps to an integer key with the same order (rsa_kernels/backends/slice_keys),
so a selection on D is a selection on keys, and the search over keys is a radix search:
RADIX_BITS bits per round, from the top. A round histograms the keys that still match the
chosen prefix by their next digit (the slice kernels' Search.histogram), all-reduces the
(rows x 2**RADIX_BITS) histogram, and every rank picks the same digit from the same sums.
After KEY_BITS / RADIX_BITS rounds the prefix is the whole key of the selected value: the
same value a sort of the concatenated row would select, whatever the values, ties or
widths; the number of rounds never depends on the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.slice_keys import BINS, RADIX_BITS
from .comm import Comm


@dataclass
class Selection:
    key: torch.Tensor      # (rows,) key of the selected value
    below: torch.Tensor    # (rows,) float64 weight of the keys smaller than it, over all ranks
    at: torch.Tensor       # (rows,) float64 weight of the keys equal to it, over all ranks
    carried: torch.Tensor  # the sums carried along in the first round's all-reduce


def select(comm: Comm, search, pick, target: float, bits: int, carry: torch.Tensor) -> Selection:
    """The smallest key whose cumulative weight (over all ranks) reaches ``target``.

    ``search``: a slice kernels' Search (its histogram(level, prefix) weighs the items that
    count: cvar's support by q, every item for ra_dpo_cvar); ``pick``: the kernels' choice
    of a round (slice_keys.radix_pick or the same in C++). Among items with positive
    weight only; if rounding keeps the total below ``target``, the largest such key (what a
    sorted cumulative sum's fallback picks). ``carry`` (rows, c) float64 partial sums that
    ride along in the first all-reduce.
    """
    rows = carry.shape[0]
    prefix = torch.zeros(rows, dtype=torch.int64, device=carry.device)
    below = torch.zeros(rows, dtype=torch.float64, device=carry.device)
    at = torch.zeros(rows, dtype=torch.float64, device=carry.device)
    carried = carry
    for level in range(bits // RADIX_BITS):
        shift = bits - (level + 1) * RADIX_BITS
        hist = search.histogram(level, prefix)
        if level == 0:
            both = comm.sum(torch.cat([hist, carry.to(torch.float64)], 1), inplace=True)
            hist, carried = both[:, :BINS], both[:, BINS:].to(carry.dtype)
        else:
            hist = comm.sum(hist, inplace=True)
        below, at, prefix = pick(hist, below, target, shift, prefix)
    return Selection(prefix, below, at, carried)
