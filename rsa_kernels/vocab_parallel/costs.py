"""What the vocabulary-parallel path sends: the formula docs/distributed.md states.

Per chunk of unmasked rows, the forward runs the all-reduces listed here, each carrying
``values`` float64 (MIN: int64) numbers per row, 8 bytes each, whatever the input dtype
(ra_dpo_cvar: plus the radix rounds again, unbracketed, for the rows where the group's
bracket of its quantile missed: none in the usual case, see quantile.py);
the backward of the statistics sends nothing. Once per call, the input agreement
all-gathers AGREEMENT_BYTES per rank; the fused-linear forms add, in the backward, one
all-reduce of the hidden states' gradient (rows x H in hidden's dtype). The bytes are the
payload each rank hands to all_reduce; a ring all-reduce moves about 2 (P-1)/P times that
per rank over the wire.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..backends.slice_keys import BINS, RADIX_BITS, key_bits
from ..reference import accumulation_dtype, interpolation_ranks
from ..risk import parse_risk
from .agreement import _HEAD, MAX_SETTINGS, MESSAGE_BYTES

AGREEMENT_BYTES = 8 * (_HEAD + MAX_SETTINGS) + MESSAGE_BYTES


class Cost(NamedTuple):
    collectives: tuple      # ((op, values per row), ...) in order
    rounds: int
    bytes_per_row: int


def forward_communication(risk, dtype: torch.dtype, vocab: int) -> Cost:
    """The forward's all-reduces per chunk of unmasked rows, for ``risk`` on ``dtype`` logits
    over a vocabulary of ``vocab`` columns (without padding), whatever the slice kernels."""
    risk = parse_risk(risk)
    bracketed = risk.kind == "ra_dpo_cvar"               # its quantile's bracket: bounds, counts outside
    steps = [("max", 4 if bracketed else 2), ("sum", 4)]  # row maxima; exp-sums and the label's logits
    if risk.kind == "kl":
        steps += [("sum", 1)]                            # kl
    elif risk.kind == "erm":
        steps += [("max", 1), ("sum", 2)]                # the log-sums of r + MU D; kl and the exp-sums
    else:
        radix = key_bits(accumulation_dtype(dtype)) // RADIX_BITS
        first = BINS + 1 + (2 if bracketed else 0)
        steps += [("sum", first)] + [("sum", BINS)] * (radix - 1)   # histograms, kl in the first
        if risk.kind == "ra_dpo_cvar" and interpolation_ranks(vocab, 1.0 - risk.param)[2] != 0.0:
            steps += [("min", 1)]                        # the next larger value (HI)
        steps += [("sum", 2)]                            # the sums above (and at) the threshold
    return Cost(tuple(steps), len(steps), 8 * sum(v for _, v in steps))
