"""What the vocabulary-parallel path sends: the formula docs/distributed.md states.

Per chunk of unmasked rows, the forward runs the rounds listed here, each a reduction
(sum, max or min) of ``values`` numbers per row: float64 (MIN: int64), 8 bytes each, but
for ra_dpo_cvar's radix rounds, which travel in the accumulation dtype (4 bytes on float32
rows: its counts are exact there, below 2**24; cvar's q-masses stay float64: its atom's
weight divides a difference of them).
Slice kernels that keep the quantile's candidates in their first read (COLLECTS: cpu) send 2
more values in the MAX round (the intersection of the slices' brackets)
and 2 more in the first radix round (the weights they left out below and above); on float32
rows they end the search after GATHER_LEVEL radix rounds with one all-gather of the
candidates left (at most GATHERED a rank: count, next key above, keys, weights; int64),
which also gives ra_dpo_cvar's HI (no MIN round). Where a rank holds more, the radix rounds
go on (and the MIN round comes back) for the chunk: not in the usual case. The rows
whose selection lies outside the group's bracket are searched again (ra_dpo_cvar: within the
union of the slices' brackets, then without one; cvar: without one): their radix rounds
come on top, none in the usual case (see quantile.py). The backward of the statistics sends
nothing. Once per call, the input agreement all-gathers AGREEMENT_BYTES per rank; the
fused-linear forms add, in the backward, one all-reduce of the hidden states' gradient (rows
x H in hidden's dtype). The bytes are the payload each rank hands to the collective: an
all-reduce (a ring moves about 2 (P-1)/P times that per rank) or, on gloo, an all-gather
whose result every rank reduces itself (comm.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..backends.slice_keys import BINS, RADIX_BITS, key_bits
from ..reference import accumulation_dtype, interpolation_ranks
from ..risk import parse_risk
from .agreement import _HEAD, MAX_SETTINGS, MESSAGE_BYTES
from .quantile import GATHER_LEVEL, GATHERED

AGREEMENT_BYTES = 8 * (_HEAD + MAX_SETTINGS) + MESSAGE_BYTES


class Cost(NamedTuple):
    collectives: tuple      # ((op, values per row), ...) in order
    rounds: int
    bytes_per_row: int


def forward_communication(risk, dtype: torch.dtype, vocab: int, collects: bool = False) -> Cost:
    """The forward's rounds per chunk of unmasked rows, for ``risk`` on ``dtype`` logits over a
    vocabulary of ``vocab`` columns (without padding), on slice kernels that keep the
    quantile's candidates in their first read (``collects``: cpu) or not (torch, triton)."""
    risk = parse_risk(risk)
    acc_bytes = torch.finfo(accumulation_dtype(dtype)).bits // 8
    selects = risk.kind in ("cvar", "ra_dpo_cvar")
    kept = collects and selects
    union = risk.kind == "ra_dpo_cvar"                   # the union of the slices' brackets: -lo, hi
    steps = [("max", 2 + 2 * union + 2 * kept, 8), ("sum", 4, 8)]  # row maxima; exp-sums, the label's logits
    if risk.kind == "kl":
        steps += [("sum", 1, 8)]                         # kl
    elif risk.kind == "erm":
        steps += [("max", 1, 8), ("sum", 2, 8)]          # the log-sums of r + MU D; kl and the exp-sums
    else:
        radix = key_bits(accumulation_dtype(dtype)) // RADIX_BITS
        first = BINS + 1 + (2 if union or kept else 0)   # kl, and the weights outside the bracket
        wire = acc_bytes if risk.kind == "ra_dpo_cvar" else 8  # counts; cvar's q-masses stay float64
        gathered = collects and radix * RADIX_BITS == 32   # the candidates left after GATHER_LEVEL rounds
        rounds = GATHER_LEVEL if gathered else radix
        steps += [("sum", first, wire)] + [("sum", BINS, wire)] * (rounds - 1)
        if gathered:
            steps += [("gather", 2 + 2 * GATHERED, 8)]   # their count, keys and weights, the next key above
        elif risk.kind == "ra_dpo_cvar" and interpolation_ranks(vocab, 1.0 - risk.param)[2] != 0.0:
            steps += [("min", 1, 8)]                     # the next larger value (HI)
        steps += [("sum", 2, 8)]                         # the sums above (and at) the threshold
    return Cost(tuple((op, n) for op, n, _ in steps), len(steps), sum(n * w for _, n, w in steps))
