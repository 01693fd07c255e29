"""The distributed quantile search: exact order statistics of a row split across ranks.

Each value D maps to an integer key with the same order (rsa_kernels/backends/slice_keys),
so a selection on D is a selection on keys, and the search over keys is a radix search:
RADIX_BITS bits per round, from the top. A round histograms the keys that still match the
chosen prefix by their next digit (the slice kernels' Search.histogram), all-reduces the
(rows x 2**RADIX_BITS) histogram, and every rank picks the same digit from the same sums.
After KEY_BITS / RADIX_BITS rounds the prefix is the whole key of the selected value: the
same value a sort of the concatenated row would select, whatever the values, ties or
widths; the number of rounds never depends on the data.

With a bracket (ra_dpo_cvar: keys [lo, hi] per row that every rank derived alike from the
slices' samples), the first round histograms only the items inside it and carries the
group's counts below and above it: those tell every rank alike whether the selection lies
in the bracket (Selection.hit); the rows where it does not are searched again without one
(rows.py), so a bracket decides the time, never the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.slice_keys import BINS, RADIX_BITS, bracket_keys
from .comm import Comm


@dataclass
class Selection:
    key: torch.Tensor      # (rows,) key of the selected value
    below: torch.Tensor    # (rows,) float64 weight of the keys smaller than it, over all ranks
    at: torch.Tensor       # (rows,) float64 weight of the keys equal to it, over all ranks
    carried: torch.Tensor  # the sums carried along in the first round's all-reduce
    hit: torch.Tensor | None = None  # (rows,) bool: the selection lies in the bracket (None: no bracket)


def bracket_of(u_bounds: torch.Tensor, a: torch.Tensor, ar: torch.Tensor, bits: int) -> tuple:
    """select's bracket: the keys of D = u + (A - Ar) over the group's bounds (rows, 2) of
    u = zr - z, widened by far more than the rounding that separates the computed D from
    u + (A - Ar) (the same keys on every rank: from the same numbers)."""
    u, shift = u_bounds.double(), (a.double() - ar.double())[:, None]
    slack = 64 * torch.finfo(a.dtype).eps * (u.abs() + a.double().abs()[:, None] + ar.double().abs()[:, None])
    d = (u + shift + slack * torch.tensor([-1.0, 1.0], dtype=torch.float64, device=u.device)).to(a.dtype)
    return bracket_keys(d[:, 0].contiguous(), d[:, 1].contiguous(), bits)


def missed(below, inside, above, target: float) -> torch.Tensor:
    """Rows whose selection (see select) lies outside the bracket, from the group's weight
    below it, inside it and above it: an item below reaches the target, or none inside does
    and the first that does, or else the largest item with weight, lies outside."""
    reached = (below + inside >= target) & (inside > 0)
    return ((below > 0) & (below >= target)) | (~reached & ((above > 0) | ((inside == 0) & (below > 0))))


def select(comm: Comm, search, pick, target: float, bits: int, carry: torch.Tensor, bracket=None) -> Selection:
    """The smallest key whose cumulative weight (over all ranks) reaches ``target``.

    ``search``: a slice kernels' Search (its histogram(level, prefix) weighs the items that
    count: cvar's support by q, every item for ra_dpo_cvar); ``pick``: the kernels' choice
    of a round (slice_keys.radix_pick or the same in C++). Among items with positive
    weight only; if rounding keeps the total below ``target``, the largest such key (what a
    sorted cumulative sum's fallback picks). ``carry`` (rows, c) float64 partial sums that
    ride along in the first all-reduce. ``bracket``: (lo, hi, top) of
    slice_keys.bracket_keys, the same on every rank; with it the first all-reduce carries
    the counts below and above it too, and the result's ``hit`` says where it held.
    """
    rows = carry.shape[0]
    f64 = dict(dtype=torch.float64, device=carry.device)
    prefix = torch.zeros(rows, dtype=torch.int64, device=carry.device)
    below, at = torch.zeros(rows, **f64), torch.zeros(rows, **f64)
    carried, outside, hit = carry, torch.zeros(rows, 0, **f64), None
    for level in range(bits // RADIX_BITS):
        shift = bits - (level + 1) * RADIX_BITS
        if level == 0 and bracket is not None:
            lo, hi, top = bracket
            if bool(((lo != 0) | (hi != top)).any()):  # some row is bounded (only kernels that bracket bound)
                hist, n_below, n_above = search.bracket(lo, hi)
                outside = torch.stack([n_below, n_above], 1).to(torch.float64)
            else:
                hist, outside = search.histogram(level, prefix), torch.zeros(rows, 2, **f64)
        else:
            hist = search.histogram(level, prefix)
        if level == 0:
            k = BINS + outside.shape[1]
            both = comm.sum(torch.cat([hist, outside, carry.to(torch.float64)], 1), inplace=True)
            hist, outside, carried = both[:, :BINS], both[:, BINS:k], both[:, k:].to(carry.dtype)
            if bracket is not None:
                below = outside[:, 0].clone()
                hit = ~missed(below, hist.sum(1), outside[:, 1], target)
        else:
            hist = comm.sum(hist, inplace=True)
        below, at, prefix = pick(hist, below, target, shift, prefix)
    return Selection(prefix, below, at, carried, hit)
