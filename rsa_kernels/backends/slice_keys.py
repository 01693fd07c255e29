"""Sortable integer keys of the deviations D: what the exact radix search of the
vocabulary-parallel path selects on (rsa_kernels/vocab_parallel/quantile.py), shared by the
slice kernels of every backend (the C++ ones compute the same keys in csrc/slices.cpp).

Each value maps to the IEEE bits with negatives flipped and the sign bit set for the rest,
read as an unsigned KEY_BITS-bit number: the same order as the values, -0.0 and 0.0 one
key (they compare equal), NaN the largest key (last, as in torch.sort). Float64 keys live in
int64 with the top key bit in the sign bit; key_order gives the signed number of the same
order, for comparisons and MIN reductions.
"""
from __future__ import annotations

import torch

RADIX_BITS = 8            # key bits per round of the search
BINS = 1 << RADIX_BITS
NO_KEY = torch.iinfo(torch.int64).max   # key_order of "no key" (nothing above a selection)


def key_bits(dtype: torch.dtype) -> int:
    return 64 if dtype == torch.float64 else 32


def sort_keys(d: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 or float64 values, ascending with D as torch.sort orders it."""
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


def open_bracket(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(n, 2) bounds (-inf, inf): the slice kernels' Chunk.bracket() when they bound nothing."""
    return torch.tensor([float("-inf"), float("inf")], dtype=dtype, device=device).expand(n, 2)


def bracket_keys(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple:
    """Keys of the bounds [lo, hi] (float32 or float64 values); an infinite or NaN bound leaves
    its side open: key 0 below, the all-ones key (NaN's) above."""
    top = -1 if bits == 64 else 2**32 - 1
    lo_key = torch.where(torch.isnan(lo) | (lo == float("-inf")), 0, sort_keys(lo))
    hi_key = torch.where(torch.isnan(hi) | (hi == float("inf")), top, sort_keys(hi))
    return lo_key, hi_key, top


def key_order(key: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys as signed int64 in the same order (its own inverse)."""
    return key ^ torch.iinfo(torch.int64).min if bits == 64 else key


def radix_pick(hist: torch.Tensor, below: torch.Tensor, target: float, shift: int, prefix: torch.Tensor):
    """One round's choice of the radix search, from the group's (rows, BINS) histogram: the
    first bin whose cumulative weight, on top of ``below``, reaches ``target`` (among bins
    with weight; the last such bin if none does, or BINS - 1 for an empty row). Returns the
    new (below, weight at the bin, prefix with the bin at ``shift``). The cpu slice kernels
    have the same in C++ (csrc/slices.cpp: slice_pick), bit for bit."""
    cum = hist.cumsum(1)
    nonempty = hist > 0
    reach = (below[:, None] + cum >= target) & nonempty
    first = reach.byte().argmax(1, keepdim=True)
    last = (BINS - 1) - nonempty.flip(1).byte().argmax(1, keepdim=True)
    pick = torch.where(reach.gather(1, first), first, last)
    before = cum.gather(1, (pick - 1).clamp_min(0))  # the sum of the bins before the pick
    below = below + torch.where(pick > 0, before, 0.0).squeeze(1)
    return below, hist.gather(1, pick).squeeze(1), prefix | (pick.squeeze(1) << shift)
