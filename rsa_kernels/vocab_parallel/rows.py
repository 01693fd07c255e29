"""The vocabulary-parallel row kernel: the backends' contract over one rank's vocabulary slice.

forward and backward have the signatures of rsa_kernels.backends (so token_stats' autograd
boundary and the fused-linear schedules use it unchanged), with two differences: z and zr
hold this rank's columns [start, start + width) of the rows, and labels are global ids.
forward returns the statistics of the full rows, the same on every rank, and the same
saved per-row scalars as the single-process backends; backward then needs no
communication at all: p, q and w of this rank's columns follow from those scalars.

Forward rounds per chunk of unmasked rows (docs/distributed.md lists their bytes):
  1. MAX  row maxima of z and zr
  2. SUM  sum exp(z - max), sum exp(zr - max), z_y and zr_y (the label's owner sends them)
     -> A, Ar, logp, ref_logp on every rank
  kl:          3. SUM  kl
  erm:         3. MAX  max of t = r + MU D;  4. SUM  kl, sum exp(t - max)
  cvar:        3.. SUM radix rounds (quantile.select; kl rides in the first);  last: SUM the
               mass above tau and at tau
  ra_dpo_cvar: 3.. SUM radix rounds for the order statistic LO;  MIN the next larger value
               (only when the interpolation weight is not 0);  last: SUM value and sum(w)
Only unmasked rows take part: masked rows are 0 by definition and every rank agrees
which rows those are (agreement.py checked the labels).
"""
from __future__ import annotations

import torch

from ..backends.torch_rows import CHUNK_BYTES, _deviation, backward_columns
from ..reference import accumulation_dtype, in_support, interpolation_ranks
from ..risk import SAVED_WIDTH, Risk
from .agreement import VocabLayout
from .comm import Comm
from .quantile import key_bits, key_order, key_values, select, sort_keys


def rows_per_chunk(n: int, width: int, acc: torch.dtype, risk: Risk, chunk_size: int | None) -> int:
    """Rows per chunk, the same on every rank (``width`` is the widest slice of the group)."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    # live (rows x width) temporaries: about 8 of the accumulation dtype, and for the
    # quantile searches keys, weights, digits and masks of 8 bytes each on top
    per_row = width * (8 * torch.finfo(acc).bits // 8 + (40 if risk.kind in ("cvar", "ra_dpo_cvar") else 0))
    return max(1, min(n, CHUNK_BYTES // max(per_row, 1)))


class VocabParallelRows:
    """A backend object (see rsa_kernels.backends) for one rank of a vocabulary-parallel group."""

    def __init__(self, layout: VocabLayout):
        self.layout = layout
        self.comm = Comm(layout.group)

    @staticmethod
    def unsupported(tensor) -> str | None:
        return None

    def _local_labels(self, labels: torch.Tensor, width: int):
        """(this rank owns the label, its local column, clamped so that gather is safe)."""
        local = labels.long() - self.layout.start
        own = (local >= 0) & (local < width)
        return own, local.clamp(0, width - 1)

    def forward(self, z, zr, labels, risk: Risk, ignore_index: int, chunk_size: int | None = None):
        n, width = z.shape
        if width != self.layout.width:
            raise ValueError(f"logits have {width} vocabulary columns on rank {self.layout.rank}, "
                             f"the group agreed on {self.layout.width}")
        acc = accumulation_dtype(z.dtype)
        stats = torch.zeros(n, 4, dtype=acc, device=z.device)
        saved = torch.zeros(n, SAVED_WIDTH, dtype=acc, device=z.device)
        active = (labels != ignore_index).nonzero().squeeze(1)
        step = rows_per_chunk(len(active), self.layout.max_width, acc, risk, chunk_size)
        for rows in active.split(step):
            st, sv = self._forward_rows(z.index_select(0, rows).to(acc), zr.index_select(0, rows).to(acc),
                                        labels.index_select(0, rows), risk)
            stats.index_copy_(0, rows, st)
            saved.index_copy_(0, rows, sv)
        return stats, saved

    def _forward_rows(self, z, zr, labels, risk: Risk):
        """All the rounds for a chunk of unmasked rows: (stats (n, 4), saved (n, 5))."""
        comm = self.comm
        n, width = z.shape
        own, local = self._local_labels(labels, width)
        top = comm.max(torch.stack([z.amax(-1), zr.amax(-1)], 1))
        shift = torch.where(torch.isfinite(top), top, 0.0)  # as torch.logsumexp: a row of -inf gives -inf
        picked = [torch.where(own, t.gather(1, local[:, None]).squeeze(1), 0.0) for t in (z, zr)]
        sums = comm.sum(torch.stack([(z - shift[:, :1]).exp().sum(-1), (zr - shift[:, 1:]).exp().sum(-1), *picked], 1))
        a, ar = sums[:, 0].log() + shift[:, 0], sums[:, 1].log() + shift[:, 1]
        s, r, q, d = _deviation(z, zr, a, ar)
        support = in_support(q)
        qd = torch.where(support, q * d, 0.0)
        kl_part = qd.sum(-1)
        saved = torch.zeros(n, SAVED_WIDTH, dtype=z.dtype, device=z.device)
        saved[:, 0], saved[:, 1] = a, ar
        if risk.kind == "kl":
            kl = value = comm.sum(kl_part[:, None])[:, 0]
        elif risk.kind == "erm":
            kl, value, saved[:, 2] = self._erm(r, d, support, kl_part, risk.param)
        elif risk.kind == "cvar":
            kl, value, saved[:, 2], saved[:, 3], saved[:, 4] = self._cvar(q, d, qd, kl_part, risk.param)
        elif risk.kind == "ra_dpo_cvar":
            kl, value, saved[:, 2], saved[:, 3] = self._ra_dpo_cvar(q, d, qd, kl_part, risk.param)
        else:
            raise ValueError(f"risk: unknown kind {risk.kind!r}")
        value = torch.where(torch.isnan(kl), kl, value)  # a NaN in D must not vanish in a selection
        stats = torch.stack([sums[:, 2] - a, sums[:, 3] - ar, kl, value], 1)
        return stats, saved

    def _erm(self, r, d, support, kl_part, mu):
        t = torch.where(support, r + mu * d, float("-inf"))
        top = self.comm.max(t.amax(-1)[:, None])[:, 0]
        shift = torch.where(torch.isfinite(top), top, 0.0)
        sums = self.comm.sum(torch.stack([kl_part, (t - shift[:, None]).exp().sum(-1)], 1))
        norm = sums[:, 1].log() + shift
        return sums[:, 0], norm / mu, norm

    def _cvar(self, q, d, qd, kl_part, alpha):
        """tau* = the smallest D whose q-mass F(D) over all ranks reaches ALPHA (torch_rows)."""
        bits = key_bits(d.dtype)
        q64 = q.double()
        sel = select(self.comm, sort_keys(d), torch.where(q64 > 0, q64, 0.0), alpha, bits, kl_part[:, None])
        tau = key_values(sel.key, d.dtype)
        f_le, f_lt = sel.below + sel.at, sel.below
        c_above = torch.full_like(tau, 1.0 / (1.0 - alpha))
        c_atom = ((f_le - alpha).clamp_min(0.0) / ((1.0 - alpha) * (f_le - f_lt))).to(tau.dtype)
        sums = self.comm.sum(torch.stack([torch.where(d > tau[:, None], qd, 0.0).sum(-1),
                                          torch.where(d == tau[:, None], q, 0.0).sum(-1)], 1))
        above, atom = sums[:, 0], sums[:, 1] * c_atom
        value = above * c_above + torch.where(atom > 0, atom * tau, 0.0)
        return sel.carried[:, 0], value, tau, c_above, c_atom

    def _ra_dpo_cvar(self, q, d, qd, kl_part, c):
        """Q = torch.quantile(D, 1 - C) of the concatenated row: order statistics LO and HI."""
        bits = key_bits(d.dtype)
        lo, hi, frac = interpolation_ranks(self.layout.vocab, 1.0 - c)
        key = sort_keys(d)
        sel = select(self.comm, key, torch.ones(d.shape, dtype=torch.float64, device=d.device), lo + 1, bits,
                     kl_part[:, None])
        low = key_values(sel.key, d.dtype)
        if frac == 0.0:
            quantile = low
        else:  # HI is LO's value again, unless LO's value ends at rank LO: then the next larger key
            order, chosen = key_order(key, bits), key_order(sel.key, bits)
            larger = torch.where(order > chosen[:, None], order, torch.iinfo(torch.int64).max).amin(-1)
            nxt = self.comm.min(larger[:, None])[:, 0]
            high_key = torch.where(sel.below + sel.at >= hi + 1, chosen, nxt)
            high = key_values(key_order(high_key, bits), d.dtype)
            quantile = torch.where((low == high) | (low == float("-inf")), low, low + frac * (high - low))
        above = d > quantile[:, None]
        sums = self.comm.sum(torch.stack([torch.where(above, qd, 0.0).sum(-1), torch.where(above, q, 0.0).sum(-1)], 1))
        return sel.carried[:, 0], sums[:, 0], quantile, sums[:, 1]

    def backward(self, z, zr, labels, saved, grads, risk: Risk, ignore_index: int,
                 inplace: bool = False, chunk_size: int | None = None):
        """This rank's columns of d(sum of g * stats)/dz: local work only, from the saved scalars."""
        n, width = z.shape
        own, local = self._local_labels(labels, width)
        step = rows_per_chunk(n, width, accumulation_dtype(z.dtype), risk, chunk_size)
        return backward_columns(z, zr, labels != ignore_index, local, own, saved, grads, risk, step, inplace)
