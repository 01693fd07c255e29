"""Tie-heavy rows for the tests of issue 30: many exact ties of zr - z, from different (z, zr).

SPEC section 1 forms D as (zr - z) + (A - Ar) everywhere, so items with equal zr - z have
equal D on every backend and rank layout; these rows put such ties at the quantile, where
cvar's atom split and ra_dpo_cvar's mask D > Q depend on them.
"""
from __future__ import annotations

import torch

KINDS = ("integer", "bf16", "straddle")


def tie_rows(kind: str, n: int, v: int, seed: int):
    """(z, zr, labels) in float64 (row 0 masked), the same for the same arguments:
    integer   logits from a few small integers;
    bf16      logits quantised to bf16 (8 bits of mantissa), held in float64;
    straddle  u = zr - z in {-1, 0, 0.5} with 0 on 40% to 60% of the items (z varied): a
              block of ties across the quantile.
    The columns of each row are permuted, so ties spread over every vocabulary slice."""
    g = torch.Generator().manual_seed(seed)
    if kind == "integer":
        z = torch.randint(-3, 4, (n, v), generator=g).double()
        zr = torch.randint(-3, 4, (n, v), generator=g).double()
    elif kind == "bf16":
        z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).bfloat16().double()
        zr = (z + torch.randn(n, v, generator=g, dtype=torch.float64)).bfloat16().double()
    elif kind == "straddle":
        z = torch.randint(-40, 41, (n, v), generator=g).double() / 8
        pick = torch.rand(n, v, generator=g, dtype=torch.float64)
        frac = torch.linspace(0.4, 0.6, n, dtype=torch.float64)[:, None]
        u = torch.where(pick < frac, 0.0, torch.where(pick < frac + (1 - frac) / 2, -1.0, 0.5))
        zr = z + u
    else:
        raise ValueError(f"kind: {kind!r}")
    order = torch.argsort(torch.rand(n, v, generator=g), dim=1)
    z, zr = z.gather(1, order), zr.gather(1, order)
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = -100
    return z, zr, y
