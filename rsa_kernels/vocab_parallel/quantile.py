"""The distributed quantile search: exact order statistics of a row split across ranks.

Each value D (float32 or float64) maps to an integer key with the same order (the sign-
magnitude bits of IEEE floats, flipped for negatives), so a selection on D is a selection
on keys, and the search over keys is a radix search: RADIX_BITS bits per round, from the
top. A round histograms the keys that still match the chosen prefix by their next digit,
all-reduces the (rows x 2**RADIX_BITS) histogram, and every rank picks the same digit from
the same sums. After KEY_BITS / RADIX_BITS rounds the prefix is the whole key of the
selected value: the same value a sort of the concatenated row would select, whatever the
values, ties or widths; the number of rounds never depends on the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Comm

RADIX_BITS = 8
BINS = 1 << RADIX_BITS


def key_bits(dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float64 else 32


def sort_keys(d: torch.Tensor) -> torch.Tensor:
    """int64 keys, ascending with D as torch.sort orders it: -0.0 and 0.0 tie, NaN is last.

    The key's bit pattern read as an unsigned KEY_BITS-bit number is what the radix
    search walks (for float64 the sign bit of the int64 carries the top key bit).
    """
    d = d + 0.0  # -0.0 + 0.0 = +0.0: one key for the two zeros, which compare equal
    if d.dtype == torch.float64:
        bits = d.view(torch.int64)
        signed = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        key = signed ^ torch.iinfo(torch.int64).min  # flip the sign bit: unsigned order
        nan_key = -1  # all ones
    else:
        bits = d.to(torch.float32).view(torch.int32).to(torch.int64)
        signed = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = signed + 2**31
        nan_key = 2**32 - 1
    return torch.where(torch.isnan(d), torch.full_like(key, nan_key), key)


def key_values(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of sort_keys (the values themselves, in ``dtype``)."""
    if dtype == torch.float64:
        signed = key ^ torch.iinfo(torch.int64).min
        bits = torch.where(signed < 0, signed ^ 0x7FFFFFFFFFFFFFFF, signed)
        return bits.view(torch.float64)
    signed = key - 2**31
    bits = torch.where(signed < 0, signed ^ 0x7FFFFFFF, signed)
    return bits.to(torch.int32).view(torch.float32).to(dtype)


def key_order(key: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys as signed int64 in the same order, for comparisons and MIN/MAX reductions."""
    return key ^ torch.iinfo(torch.int64).min if bits == 64 else key


@dataclass
class Selection:
    key: torch.Tensor      # (rows,) key of the selected value
    below: torch.Tensor    # (rows,) float64 weight of the keys smaller than it, over all ranks
    at: torch.Tensor       # (rows,) float64 weight of the keys equal to it, over all ranks
    carried: torch.Tensor  # the sums carried along in the first round's all-reduce


def select(comm: Comm, key: torch.Tensor, weight: torch.Tensor, target: float, bits: int,
           carry: torch.Tensor) -> Selection:
    """The smallest key whose cumulative weight (over all ranks) reaches ``target``.

    key (rows, width) int64 from sort_keys; weight (rows, width) float64, 0 for items that
    do not count. Among items with positive weight only; if rounding keeps the total below
    ``target``, the largest such key (what a sorted cumulative sum's fallback picks).
    ``carry`` (rows, c) float64 partial sums that ride along in the first all-reduce.
    """
    rows = key.shape[0]
    prefix = torch.zeros(rows, dtype=torch.int64, device=key.device)
    below = torch.zeros(rows, dtype=torch.float64, device=key.device)
    at = torch.zeros(rows, dtype=torch.float64, device=key.device)
    carried = carry
    for r in range(bits // RADIX_BITS):
        shift = bits - (r + 1) * RADIX_BITS
        digit = (key >> shift) & (BINS - 1)
        w = weight
        if r:  # only the items whose higher digits are the prefix chosen so far
            w = torch.where((key >> (shift + RADIX_BITS)) == (prefix >> (shift + RADIX_BITS))[:, None], weight, 0.0)
        hist = torch.zeros(rows, BINS, dtype=torch.float64, device=key.device).scatter_add_(1, digit, w)
        if r == 0:
            both = comm.sum(torch.cat([hist, carry.to(torch.float64)], 1))
            hist, carried = both[:, :BINS], both[:, BINS:].to(carry.dtype)
        else:
            hist = comm.sum(hist)
        cum = hist.cumsum(1)
        nonempty = hist > 0
        reach = (below[:, None] + cum >= target) & nonempty
        last = nonempty.long().cumsum(1).argmax(1)  # the last nonempty bin (first index of the max)
        pick = torch.where(reach.any(1), reach.long().argmax(1), last)[:, None]
        before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # the sums of the bins before each
        below = below + before.gather(1, pick).squeeze(1)
        at = hist.gather(1, pick).squeeze(1)
        prefix = prefix | (pick.squeeze(1) << shift)
    return Selection(prefix, below, at, carried)
