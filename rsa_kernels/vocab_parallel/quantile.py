"""The distributed quantile search: exact order statistics of a row split across ranks.

Each value D maps to an integer key with the same order (rsa_kernels/backends/slice_keys),
so a selection on D is a selection on keys, and the search over keys is a radix search:
RADIX_BITS bits per round, from the top. A round histograms the keys that still match the
chosen prefix by their next digit (the slice kernels' Search.histogram), all-reduces the
(rows x 2**RADIX_BITS) histogram, and every rank picks the same digit from the same sums.
After KEY_BITS / RADIX_BITS rounds the prefix is the whole key of the selected value: the
same value a sort of the concatenated row would select, whatever the values, ties or
widths. The rounds are decided from numbers every rank shares, so every rank runs the same
ones: fewer where a bracket's ends share the top digit or the candidates left after
GATHER_LEVEL rounds are few enough to gather whole (_gathered).

With a bracket (ra_dpo_cvar: keys [lo, hi] per row that every rank derived alike from the
slices' samples), the first round histograms only the items inside it and carries the
group's counts below and above it: those tell every rank alike whether the selection lies
in the bracket (Selection.hit); the rows where it does not are searched again (rows.py), so
a bracket decides the time, never the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.slice_keys import BINS, NO_KEY, RADIX_BITS, bracket_keys, key_order, sort_keys
from .comm import Comm

GATHER_LEVEL = 2  # float32 keys: after two radix rounds, the candidates left under the prefix are
GATHERED = 64     # few (a handful a rank): up to this many a rank are gathered whole instead


@dataclass
class Selection:
    key: torch.Tensor      # (rows,) key of the selected value
    below: torch.Tensor    # (rows,) float64 weight of the keys smaller than it, over all ranks
    at: torch.Tensor       # (rows,) float64 weight of the keys equal to it, over all ranks
    carried: torch.Tensor  # the sums carried along in the first round's all-reduce
    hit: torch.Tensor | None = None  # (rows,) bool: the selection lies in the bracket (None: no bracket)
    next_key: torch.Tensor | None = None  # (rows,) the smallest key above it, as key_order, where gathered


def bracket_of(u_bounds: torch.Tensor, a: torch.Tensor, ar: torch.Tensor, bits: int) -> tuple:
    """select's bracket: the keys of D = u + (A - Ar) at the group's bounds (rows, 2) of
    u = zr - z, formed as the slice kernels form D (SPEC section 1; the same keys on every
    rank: from the same numbers). The search counts every item by its own key, so the
    bracket decides the time only, never the result."""
    d = u_bounds.to(a.dtype) + (a - ar)[:, None]
    return bracket_keys(d[:, 0].contiguous(), d[:, 1].contiguous(), bits)


def collected_bracket(col: torch.Tensor, group: torch.Tensor, a, ar, bits: int, acc: torch.dtype):
    """select's bracket for the candidates a rank's partials kept (the slice kernels'
    Chunk.collected(), ``col``): keys [lo, hi] of D such that every item a rank left out lies
    strictly outside, from the group's ``group`` (rows, 2): the intersection [L, H] of the
    slices' brackets of u = zr - z (every rank kept all its items with u in [L, H]).

    D = u + (A - Ar) is formed from u itself (SPEC section 1) and adding one constant is
    monotone in floating point, so an item left out below (u < L) has D <= D(L) = L + (A - Ar)
    (or D = -inf where q = 0), one left out above has D >= D(H) if its q != 0, which its rank
    proves from its row's smallest finite zr. The bracket is [key(D(L)) + 1, key(D(H)) - 1]:
    a kept item that ties with D(L) or D(H) counts below or above with the items left out,
    exactly. Returns the bracket (the same keys on every rank: open where the group's numbers
    give no proof) and where this rank proved all that: rows.py makes the other rows miss on
    every rank."""
    lo_u, hi_u = group[:, 0].to(acc), group[:, 1].to(acc)
    shift = a.to(acc) - ar.to(acc)
    lo_d, hi_d = lo_u + shift, hi_u + shift
    inf = float("inf")
    # an infinite end is itself (below u = +inf lies every finite u, above -inf every one),
    # a finite one must stay finite as D
    ok = ~torch.isnan(shift) & ~torch.isnan(lo_u) & ~torch.isnan(hi_u) & (lo_u <= hi_u)
    ok &= (lo_u.abs() == inf) | (lo_d.abs() < inf)
    ok &= (hi_u.abs() == inf) | (hi_d.abs() < inf)
    top = -1 if bits == 64 else 2**32 - 1
    safe = lambda d: sort_keys(torch.where(ok, d, 0.0))  # noqa: E731
    lo_key = torch.where(lo_u == -inf, 0, torch.where(lo_u == inf, safe(lo_u), safe(lo_d) + 1))
    hi_key = torch.where(hi_u == inf, top, torch.where(hi_u == -inf, safe(hi_u), safe(hi_d) - 1))
    # a key strictly between hi and lo would count both below and above: then no proof
    lo_o, hi_o = key_order(lo_key, bits), key_order(hi_key, bits)
    ok &= (lo_o <= hi_o) | (lo_o - 1 == hi_o)  # (no overflow: lo_o - 1 wraps only where lo_o <= hi_o)
    lo_key, hi_key = torch.where(ok, lo_key, 0), torch.where(ok, hi_key, top)
    # the keys come from the group's numbers only (select's rounds depend on them); this rank's
    # own proof, that its items left out above have q != 0, only makes the row miss
    floor = -90.0 if acc != torch.float64 else -700.0  # exp(zr - Ar) of the smallest zr above is > 0
    proved = (col[:, 3] == 0) | ((col[:, 6].double() - ar.double()) >= floor)
    return (lo_key, hi_key, top), ok & proved


def missed(below, inside, above, target: float) -> torch.Tensor:
    """Rows whose selection (see select) lies outside the bracket, from the group's weight
    below it, inside it and above it: an item below reaches the target, or none inside does
    and the first that does, or else the largest item with weight, lies outside."""
    reached = (below + inside >= target) & (inside > 0)
    return ((below > 0) & (below >= target)) | (~reached & ((above > 0) | ((inside == 0) & (below > 0))))


def select(comm: Comm, search, pick, target: float, bits: int, carry: torch.Tensor, bracket=None,
           wire=torch.float64, outside=None, need_next: bool = False, finish=None) -> Selection:
    """The smallest key whose cumulative weight (over all ranks) reaches ``target``.

    ``search``: a slice kernels' Search (its histogram(level, prefix) weighs the items that
    count: cvar's support by q, every item for ra_dpo_cvar); ``pick``: the kernels' choice
    of a round (slice_keys.radix_pick or the same in C++). Among items with positive
    weight only; if rounding keeps the total below ``target``, the largest such key (what a
    sorted cumulative sum's fallback picks). ``carry`` (rows, c) float64 partial sums that
    ride along in the first all-reduce. ``bracket``: (lo, hi, top) of
    slice_keys.bracket_keys, the same on every rank; with it the first all-reduce carries
    the counts below and above it too, and the result's ``hit`` says where it held.
    ``wire``: the dtype the rounds travel in (float32 for counts and float32 carries: exact).
    ``outside``: (below, above) weights of items this rank knows lie below and above the
    bracket without their keys (the candidates its partials kept, rows.py): they add to the
    search's, and the bracket's level 0 runs even where it is open. ``need_next``: a hit also
    needs the next item after the selection inside the bracket (ra_dpo_cvar's HI: the keys
    of the items left out are not known). ``finish``: the Search.finish of the slice kernels
    the group agreed on where they end a float32 search with one all-gather of the
    candidates left (_gathered; None: radix rounds to the end). It is the group's choice,
    never read off this rank's own search: a rank whose slice is all padding searches with
    other kernels (rows.EmptySlice), and every rank must run the same collectives.
    """
    rows = carry.shape[0]
    f64 = dict(dtype=torch.float64, device=carry.device)
    prefix = torch.zeros(rows, dtype=torch.int64, device=carry.device)
    below, at = torch.zeros(rows, **f64), torch.zeros(rows, **f64)
    known, carried, outside, hit = outside, carry, torch.zeros(rows, 0, **f64), None
    level, first = 0, True
    while level < bits // RADIX_BITS:
        shift = bits - (level + 1) * RADIX_BITS
        if level == 0 and bracket is not None:
            lo, hi, top = bracket
            if known is not None or bool(((lo != 0) | (hi != top)).any()):  # some row is bounded
                hist, n_below, n_above = search.bracket(lo, hi)
                if known is not None:
                    n_below, n_above = n_below + known[0], n_above + known[1]
                outside = torch.stack([n_below, n_above], 1).to(torch.float64)
                digit = lo >> shift
                if known is not None and bool(((hi >> shift) == digit).all()):
                    # every row's bracket lies under one top digit: the group picks it wherever
                    # the bracket holds, so the first round carries the next level's histogram
                    prefix, level, shift = digit << shift, 1, shift - RADIX_BITS
                    hist = search.histogram(level, prefix)
            else:
                hist, outside = search.histogram(level, prefix), torch.zeros(rows, 2, **f64)
        else:
            hist = search.histogram(level, prefix)
        if first:
            first = False
            k = BINS + outside.shape[1]
            both = comm.sum(torch.cat([hist.to(wire), outside.to(wire), carry.to(wire)], 1), inplace=True,
                            wire_dtype=wire).to(torch.float64)
            hist, outside, carried = both[:, :BINS], both[:, BINS:k], both[:, k:].to(carry.dtype)
            if bracket is not None:
                below, inside = outside[:, 0].clone(), hist.sum(1)
                hit = ~missed(below, inside, outside[:, 1], target)
                if need_next:
                    hit &= below + inside >= target + 1
        else:
            hist = comm.sum(hist.to(wire), inplace=True, wire_dtype=wire).to(torch.float64)
        below, at, prefix = pick(hist, below, target, shift, prefix)
        level += 1
        if level == GATHER_LEVEL and bits == 32 and finish is not None:
            done = _gathered(comm, search, finish, level, prefix, below, target, bits)
            if done is not None:
                return Selection(done[0], done[1], done[2], carried, hit, done[3])
    return Selection(prefix, below, at, carried, hit)


def _gathered(comm: Comm, search, finish, level: int, prefix, below, target: float, bits: int):
    """The rest of the search in one round: every rank's candidates under the prefix's top
    ``level`` digits (at most GATHERED a rank, else None: the radix rounds go on), their keys
    and weights all-gathered, the selection made by each rank alike from the same numbers,
    with the smallest key above it (ra_dpo_cvar's HI, no MIN round). Returns (key, below, at,
    next key) as select's."""
    payload = search.candidates(level, prefix, GATHERED)  # count, next key above, keys, weights
    parts = comm.gather(payload)  # (P, rows, 2 + 2 GATHERED): the same on every rank
    if bool((parts[:, :, 0] > GATHERED).any()):
        return None
    search.use_candidates()
    empty = prefix | ((1 << (bits - level * RADIX_BITS)) - 1)  # radix_pick's last bin at every level left
    key, new_below, at, next_key = finish(parts, below, target, empty)
    return key, new_below, at, next_key
