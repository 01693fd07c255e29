"""The `torch` slice kernels: one rank's share of the vocabulary-parallel statistics in plain
PyTorch, a chunk of rows at a time (the contract is in rsa_kernels/backends/__init__.py).

A chunk's rows are copied out in the accumulation dtype, and the search keeps D, q and the
keys of the whole chunk in memory; rsa_kernels/vocab_parallel/rows.py sizes the chunks by
chunk_row_bytes so that these temporaries stay near torch_rows' budget.
"""
from __future__ import annotations

import torch

from ..reference import accumulation_dtype, in_support
from ..risk import Risk
from .slice_keys import (BINS, NO_KEY, RADIX_BITS, key_bits, key_order, open_bracket,  # noqa: F401
                         radix_pick as pick, sort_keys)
from .torch_rows import _deviation, backward_columns, rows_per_chunk


def lse_shift(m: torch.Tensor) -> torch.Tensor:
    """A logsumexp's shift: the maximum, or 0 where it is infinite (as torch.logsumexp)."""
    return torch.where(torch.isfinite(m), m, 0.0)


def fresh_like(z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z)


def chunk_row_bytes(width: int, acc: torch.dtype, risk: Risk) -> int:
    """Temporaries per row of a chunk: about 8 (rows x width) of the accumulation dtype, and
    for the quantile searches keys, weights, digits and masks of 8 bytes each on top."""
    return width * (8 * torch.finfo(acc).bits // 8 + (40 if risk.kind in ("cvar", "ra_dpo_cvar") else 0))


class Chunk:
    """The rows ``rows`` of one rank's columns, copied out in the accumulation dtype."""

    def __init__(self, z, zr, rows):
        acc = accumulation_dtype(z.dtype)
        self.z = z.index_select(0, rows).to(acc)
        self.zr = zr.index_select(0, rows).to(acc)

    def partials(self, local: torch.Tensor, risk: Risk) -> torch.Tensor:
        """(n, 9): max z, max zr, S, Sr, U, T, z_y, zr_y, M of each row (see the contract)."""
        z, zr = self.z, self.zr
        mz, mr = z.amax(-1), zr.amax(-1)
        xz, xr = z - lse_shift(mz)[:, None], zr - lse_shift(mr)[:, None]
        er = xr.exp()
        u = xr - xz
        ruled_out = z == float("-inf")  # by the policy: D = +inf where q != 0, decided later
        support = in_support(er) & ~ruled_out
        m_inf = torch.where(ruled_out, zr, float("-inf")).amax(-1)
        if risk.kind == "erm":
            t = torch.logsumexp(torch.where(support, xr + risk.param * u, float("-inf")), -1)
        else:
            t = torch.full_like(mz, float("-inf"))
        own = local >= 0
        col = local.clamp_min(0)[:, None]
        picked = [torch.where(own, m.gather(1, col).squeeze(1), 0.0) for m in (z, zr)]
        return torch.stack([mz, mr, xz.exp().sum(-1), er.sum(-1), torch.where(support, er * u, 0.0).sum(-1), t,
                            *picked, m_inf], 1)

    def bracket(self) -> torch.Tensor:
        return open_bracket(self.z.shape[0], self.z.dtype, self.z.device)  # no bracketed search here

    def search(self, a: torch.Tensor, ar: torch.Tensor, risk: Risk, target: float) -> "Search":
        return Search(self.z, self.zr, a, ar, risk)


class Search:
    """The radix search over a chunk's keys; D, q and the keys stay in memory."""

    def __init__(self, z, zr, a, ar, risk: Risk):
        _, _, q, d = _deviation(z, zr, a, ar)
        self.d, self.q, self.bits = d, q, key_bits(d.dtype)
        self.key = sort_keys(d)
        self.qd = torch.where(in_support(q), q * d, 0.0)
        q64 = q.double()
        # cvar weighs the support by q; ra_dpo_cvar counts every item
        self.weight = torch.where(q64 > 0, q64, 0.0) if risk.kind == "cvar" else torch.ones_like(q64)

    def histogram(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """(n, BINS) float64: the weight of the items under the prefix's top ``level`` digits,
        by their next digit."""
        shift = self.bits - (level + 1) * RADIX_BITS
        digit = (self.key >> shift) & (BINS - 1)
        w = self.weight
        if level:
            under = (self.key >> (shift + RADIX_BITS)) == (prefix >> (shift + RADIX_BITS))[:, None]
            w = torch.where(under, w, 0.0)
        return torch.zeros(self.key.shape[0], BINS, dtype=torch.float64, device=w.device).scatter_add_(1, digit, w)

    def close(self, prefix: torch.Tensor):
        """((n, 3) float64: sum q D and sum q above the key ``prefix``, q at it; (n,) the smallest
        key above it as key_order, NO_KEY where none)."""
        order, chosen = key_order(self.key, self.bits), key_order(prefix, self.bits)[:, None]
        above = order > chosen
        sums = torch.stack([torch.where(above, self.qd, 0.0).sum(-1), torch.where(above, self.q, 0.0).sum(-1),
                            torch.where(self.key == prefix[:, None], self.q, 0.0).sum(-1)], 1).double()
        return sums, torch.where(above, order, NO_KEY).amin(-1)

    def sums_above(self, idx: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """(m, 2) float64: sum q D and sum q over D > threshold, for the rows ``idx``."""
        above = self.d[idx] > threshold[:, None]
        return torch.stack([torch.where(above, self.qd[idx], 0.0).sum(-1),
                            torch.where(above, self.q[idx], 0.0).sum(-1)], 1).double()


def backward(z, zr, local, saved, grads, risk: Risk, out, chunk_size: int | None = None):
    """The slice's gradient into ``out``; local: label column, -1 elsewhere, -2 masked."""
    mask = local != -2
    step = rows_per_chunk(z.shape[0], max(z.shape[1], 1), accumulation_dtype(z.dtype), risk, chunk_size)
    return backward_columns(z, zr, mask, local.clamp_min(0), local >= 0, saved, grads, risk, step, out)


def unsupported(tensor) -> str | None:
    return None
