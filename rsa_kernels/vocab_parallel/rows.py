"""The vocabulary-parallel row kernel: the backends' contract over one rank's vocabulary slice.

forward and backward have the signatures of rsa_kernels.backends (so token_stats' autograd
boundary and the fused-linear schedules use it unchanged), with two differences: z and zr
hold this rank's columns [start, start + width) of the rows, and labels are global ids.
forward returns the statistics of the full rows, the same on every rank, and the same
saved per-row scalars as the single-process backends; backward then needs no
communication at all: p, q and w of this rank's columns follow from those scalars.

The work on the slice is done by a backend's slice kernels (torch_slices, cpu_slices,
triton_slices: the contract is in rsa_kernels/backends/__init__.py); this file is the
protocol between the ranks. Forward rounds per chunk of unmasked rows (docs/distributed.md
lists their bytes):
  0. (no round) each slice's maxima, its exp-sums under its own shifts, U = sum e u,
     erm's log-sum and the largest zr the policy rules out, in one read of the rows
     (partials)
  1. MAX  the row maxima of z and zr (ra_dpo_cvar: and the slices' sample brackets of its
          quantile in u = zr - z, their union: every rank gets the same bracket)
  2. SUM  the exp-sums rescaled to the group's maxima, z_y and zr_y (the label's owner
          sends them) -> A, Ar, logp, ref_logp on every rank; each slice's part of kl is
          then exp(ar - Ar) (U + c Sr), c = D - u, without another read
  kl:          3. SUM  kl
  erm:         3. MAX  each slice's log-sum of r + MU D;  4. SUM  kl, the rescaled exp-sums
  cvar:        3.. SUM radix rounds (quantile.select; kl rides in the first);  last: SUM the
               mass above tau and at tau
  ra_dpo_cvar: 3.. SUM radix rounds for the order statistic LO;  MIN the next larger value
               (only when the interpolation weight is not 0);  last: SUM value and sum(w)
  Slice kernels that keep the candidates in their first read (COLLECTS: cpu) send the
  intersection of the slices' brackets in round 1, search among the candidates only (the
  first radix round carries the weights each rank left out below and above), and on
  float32 rows end the search with one all-gather of the few candidates left (quantile.py),
  which also gives HI. ra_dpo_cvar's union of the brackets (round 1) is for the others, and
  for the rows whose selection lies outside the kept candidates: those (rare: an unlucky
  sample) are searched again within the union, then without a bracket.
Only unmasked rows take part: masked rows are 0 by definition and every rank agrees
which rows those are (agreement.py checked the labels). Columns past the vocabulary's end
(layout.vocab_size: Megatron's padding) take no part at all and get a zero gradient.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..backends.slice_keys import BINS, NO_KEY, key_bits, key_order, key_values, radix_pick
from ..backends.torch_rows import CHUNK_BYTES
from ..backends.torch_slices import lse_shift
from ..reference import accumulation_dtype, interpolation_ranks
from ..risk import SAVED_WIDTH, Risk
from .agreement import VocabLayout
from .comm import Comm
from .quantile import bracket_of, collected_bracket, select


class Kept(NamedTuple):
    """The candidates a rank's slice kernels kept in their first read (COLLECTS)."""
    collected: torch.Tensor  # (n, 9) Chunk.collected()
    group: torch.Tensor      # (n, 2) the intersection [L, H] of the slices' brackets of u = zr - z
    above: torch.Tensor      # (n, 2) sum q D, sum q over what the rank left out above
    outside: torch.Tensor    # (n, 2) float64 weights it left out below and above


class VocabParallelRows:
    """A backend object (see rsa_kernels.backends) for one rank of a vocabulary-parallel group,
    running its slice's work on ``kernels`` (a slice-kernel module of rsa_kernels.backends)."""

    def __init__(self, layout: VocabLayout, kernels):
        self.layout = layout
        self.agreed = kernels  # every rank's chunks are sized by the kernels the group agreed on
        self.kernels = kernels if layout.real_width else EmptySlice
        self.comm = Comm(layout.group)

    @staticmethod
    def unsupported(tensor) -> str | None:
        return None

    def _local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The label's column in this rank's slice, or -1 where another rank holds it."""
        local = labels.long() - self.layout.start
        return torch.where((local >= 0) & (local < self.layout.real_width), local, -1)

    def _chunk_rows(self, n: int, acc: torch.dtype, risk: Risk, chunk_size: int | None) -> int:
        """Rows per chunk, the same on every rank: from the widest slice, for the slice
        kernels the group agreed on."""
        if chunk_size is not None:
            return max(1, int(chunk_size))
        per_row = self.agreed.chunk_row_bytes(self.layout.max_width, acc, risk)
        return max(1, min(n, CHUNK_BYTES // max(per_row, 1)))

    def _check(self, z):
        if z.shape[1] != self.layout.width:
            raise ValueError(f"logits have {z.shape[1]} vocabulary columns on rank {self.layout.rank}, "
                             f"the group agreed on {self.layout.width}")

    def forward(self, z, zr, labels, risk: Risk, ignore_index: int, chunk_size: int | None = None):
        self._check(z)
        n = z.shape[0]
        acc = accumulation_dtype(z.dtype)
        stats = torch.zeros(n, 4, dtype=acc, device=z.device)
        saved = torch.zeros(n, SAVED_WIDTH, dtype=acc, device=z.device)
        real = self.layout.real_width
        z, zr = z[:, :real], zr[:, :real]
        active = (labels != ignore_index).nonzero().squeeze(1)
        for rows in active.split(self._chunk_rows(len(active), acc, risk, chunk_size)):
            chunk = self.kernels.Chunk(z, zr, rows)
            st, sv = self._forward_rows(chunk, self._local_labels(labels.index_select(0, rows)), risk, acc)
            stats.index_copy_(0, rows, st)
            saved.index_copy_(0, rows, sv)
        return stats, saved

    def _forward_rows(self, chunk, local, risk: Risk, acc):
        """All the rounds for a chunk of unmasked rows: (stats (n, 4), saved (n, 5))."""
        comm = self.comm
        part = chunk.partials(local, risk).to(acc)
        n = part.shape[0]
        mine = lse_shift(part[:, 0:2])                 # this slice's shifts of z and zr
        bounds = kept = None
        sent = [part[:, 0:2]]  # the row maxima
        if risk.kind == "ra_dpo_cvar":  # the union of the slices' brackets rides along: -lo and hi
            bounds = chunk.bracket().to(acc)
            sent += [-bounds[:, :1], bounds[:, 1:]]
        if risk.kind in ("cvar", "ra_dpo_cvar") and getattr(self.agreed, "COLLECTS", False):
            kept = chunk.collected()  # their intersection
            sent += [kept[:, :1].to(acc), -kept[:, 1:2].to(acc)]
        maxed = comm.max(torch.cat(sent, 1))
        group = lse_shift(maxed[:, 0:2])
        if bounds is not None:
            bounds = torch.stack([-maxed[:, 2], maxed[:, 3]], 1)
        if kept is not None:
            k = maxed.shape[1] - 2
            group_kept = torch.stack([maxed[:, k], -maxed[:, k + 1]], 1)
        exp_sums = part[:, 2:4]
        # a slice without mass adds 0 (never 0 * inf); a NaN sum stays NaN
        rescaled = torch.where(exp_sums != 0, exp_sums * (mine - group).exp(), 0.0)
        sums = comm.sum(torch.cat([rescaled, part[:, 6:8]], 1))
        a, ar = sums[:, 0].log() + group[:, 0], sums[:, 1].log() + group[:, 1]
        # D = u + c on this slice, u = (zr - its shift) - (z - its shift): its part of kl is
        # sum q D = exp(shift_r - Ar) (U + c Sr) over its support
        c = (mine[:, 1] - ar) - (mine[:, 0] - a)
        kl_part = torch.where(part[:, 3] != 0, (mine[:, 1] - ar).exp() * (part[:, 4] + c * part[:, 3]), 0.0)
        # an item the policy rules out (z = -inf) where q != 0: D = +inf, so kl and erm are +inf
        ruled_out = ((part[:, 8] - ar).exp() > 0) & ~torch.isnan(kl_part)
        kl_part = torch.where(ruled_out, float("inf"), kl_part)
        saved = torch.zeros(n, SAVED_WIDTH, dtype=acc, device=part.device)
        saved[:, 0], saved[:, 1] = a, ar
        if kept is not None:
            kept = self._kept(kept, group_kept, mine, ar, c, risk, acc)
        if risk.kind == "kl":
            kl = value = comm.sum(kl_part[:, None])[:, 0]
        elif risk.kind == "erm":
            # this slice's logsumexp of t = r + MU D = (its T) + (shift_r - Ar) + MU c
            t = torch.where(ruled_out, float("inf"), part[:, 5] + (mine[:, 1] - ar) + risk.param * c)
            shift = lse_shift(comm.max(t[:, None])[:, 0])
            both = comm.sum(torch.stack([kl_part, (t - shift).exp()], 1))
            kl, saved[:, 2] = both[:, 0], both[:, 1].log() + shift
            value = saved[:, 2] / risk.param
        elif risk.kind == "cvar":
            sel, search, closed = self._select(chunk, a, ar, risk, risk.param, risk.param, bounds, kl_part, acc, kept)
            kl, value, saved[:, 2], saved[:, 3], saved[:, 4] = self._cvar(sel, closed, risk.param, acc)
        elif risk.kind == "ra_dpo_cvar":
            lo, hi, frac = interpolation_ranks(self.layout.vocab, 1.0 - risk.param)
            sel, search, closed = self._select(chunk, a, ar, risk, lo + 1, (lo + 1) / self.layout.vocab, bounds,
                                               kl_part, acc, kept)
            kl, value, saved[:, 2], saved[:, 3] = self._ra_dpo_cvar(sel, search, closed, (lo, hi, frac), acc)
        else:
            raise ValueError(f"risk: unknown kind {risk.kind!r}")
        value = torch.where(torch.isnan(kl), kl, value)  # a NaN in D must not vanish in a selection
        stats = torch.stack([sums[:, 2] - a, sums[:, 3] - ar, kl, value], 1)
        return stats, saved

    @staticmethod
    def _kept(collected, group, mine, ar, c, risk, acc) -> "Kept":
        """What the rank left out of the candidates it kept, as kl_part is computed: above them
        sum q D and sum q; the weights below and above (counts, or cvar's q-masses in float64:
        F at the quantile decides the atom's weight, so exp(shift - Ar) in float64 too)."""
        col, scale = collected.to(acc), (mine[:, 1] - ar).exp()[:, None]
        above = torch.where(col[:, 4:5] != 0, torch.stack([col[:, 5] + c * col[:, 4], col[:, 4]], 1) * scale, 0.0)
        if risk.kind == "cvar":
            exact = collected[:, [8, 4]] * (mine[:, 1].double() - ar.double()).exp()[:, None]
            outside = torch.where(collected[:, [8, 4]] != 0, exact, 0.0)
        else:
            outside = collected[:, 2:4].double()
        return Kept(collected, group, above, outside)

    def _select(self, chunk, a, ar, risk, target, hint, bounds, kl_part, acc, kept=None):
        """The search (quantile.select; kl rides in its first round): among the candidates the
        slices kept (``kept``), else within the group's bracket ``bounds`` where given; the rows
        whose selection lies outside go on to the next of these, the last without a bracket.
        Returns (selection, the search, its sums above and its next larger keys (close))."""
        bits, wire = key_bits(acc), _wire(risk, acc)
        # every choice of a collective comes from the kernels the group agreed on, never from
        # this rank's own (an all-padding slice searches with EmptySlice's)
        pick, finish = self.agreed.pick, getattr(self.agreed.Search, "finish", None)
        search = chunk.search(a, ar, risk, hint)
        union = None if bounds is None else bracket_of(bounds, a, ar, bits)
        if kept is not None:
            bracket, ok = collected_bracket(kept.collected, kept.group, a, ar, bits, acc)
            # a row the rank cannot prove it left nothing out of misses, on every rank (2**30 below)
            outside = (kept.outside[:, 0] + torch.where(ok, 0.0, 2.0**30), kept.outside[:, 1])
            sel = select(self.comm, search, pick, target, bits, kl_part[:, None], bracket=bracket,
                         wire=wire, outside=outside, need_next=risk.kind == "ra_dpo_cvar", finish=finish)
            above, min_above = search.close(sel.key)
            sums, later = (above + F.pad(kept.above.to(above.dtype), (0, 1)), min_above), [union, None]
        else:
            sel = select(self.comm, search, pick, target, bits, kl_part[:, None], bracket=union,
                         wire=wire, finish=finish)
            sums, later = search.close(sel.key), ([] if union is None else [None])
        left = torch.zeros(0, dtype=torch.int64) if sel.hit is None else (~sel.hit).nonzero().squeeze(1)
        for bracket in later:  # rare: an unlucky sample; the same rows on every rank (the group's counts)
            if not len(left):
                break
            retry = chunk.subset(left).search(a[left], ar[left], risk, hint)
            other = select(self.comm, retry, pick, target, bits, kl_part.new_zeros(len(left), 0),
                           bracket=None if bracket is None else tuple(t[left] for t in bracket[:2]) + bracket[2:],
                           wire=wire, finish=finish)
            more = retry.close(other.key)
            done = torch.ones_like(left, dtype=torch.bool) if other.hit is None else other.hit
            rows = left[done]
            sel.key[rows], sel.below[rows], sel.at[rows] = other.key[done], other.below[done], other.at[done]
            if sel.next_key is not None:  # gathered: the next keys too, or else the MIN round for all
                if other.next_key is None:
                    sel.next_key = None
                else:
                    sel.next_key[rows] = other.next_key[done]
            sums = tuple(t.clone() for t in sums)
            for t, m in zip(sums, more):
                t[rows] = m[done]
            left = left[~done]
        return sel, search, sums

    def _cvar(self, sel, closed, alpha, acc):
        """tau* = the smallest D whose q-mass F(D) over all ranks reaches ALPHA (torch_rows)."""
        sums, _ = closed
        tau = key_values(sel.key, acc)
        f_le, f_lt = sel.below + sel.at, sel.below
        c_above = torch.full_like(tau, 1.0 / (1.0 - alpha))
        c_atom = ((f_le - alpha).clamp_min(0.0) / ((1.0 - alpha) * (f_le - f_lt))).to(acc)
        total = self.comm.sum(sums[:, [0, 2]]).to(acc)  # q D above tau, q at tau
        above, atom = total[:, 0], total[:, 1] * c_atom
        value = above * c_above + torch.where(atom > 0, atom * tau, 0.0)
        return sel.carried[:, 0], value, tau, c_above, c_atom

    def _ra_dpo_cvar(self, sel, search, closed, ranks, acc):
        """Q = torch.quantile(D, 1 - C) of the concatenated row: order statistics LO and HI."""
        bits = key_bits(acc)
        lo, hi, frac = ranks
        sums, min_above = closed
        low = key_values(sel.key, acc)
        quantile = low
        if frac != 0.0:  # HI is LO's value again, unless LO's value ends at rank LO: then the next larger key
            chosen = key_order(sel.key, bits)
            nxt = sel.next_key if sel.next_key is not None else self.comm.min(min_above[:, None])[:, 0]
            high_key = torch.where(sel.below + sel.at >= hi + 1, chosen, nxt)
            high = key_values(key_order(high_key, bits), acc)
            quantile = torch.where((low == high) | (low == float("-inf")), low, low + frac * (high - low))
            # the sums above LO are those above Q, unless the interpolation rounded onto HI
            onto = ((quantile >= high) & (high > low)).nonzero().squeeze(1)
            if len(onto):
                sums = sums.clone()
                sums[onto, :2] = search.sums_above(onto, quantile.index_select(0, onto))
        above = torch.where(torch.isnan(quantile)[:, None], 0.0, sums[:, :2])  # D > NaN selects nothing
        total = self.comm.sum(above).to(acc)
        return sel.carried[:, 0], total[:, 0], quantile, total[:, 1]

    def backward(self, z, zr, labels, saved, grads, risk: Risk, ignore_index: int,
                 inplace: bool = False, chunk_size: int | None = None):
        """This rank's columns of d(sum of g * stats)/dz: local work only, from the saved scalars."""
        self._check(z)
        real = self.layout.real_width
        out = z if inplace else self.kernels.fresh_like(z)
        out[:, real:] = 0  # padding: outside the vocabulary
        local = torch.where(labels != ignore_index, self._local_labels(labels), -2)
        self.kernels.backward(z[:, :real], zr[:, :real], local, saved, grads, risk, out[:, :real], chunk_size)
        return out


def _wire(risk: Risk, acc: torch.dtype) -> torch.dtype:
    """What the radix rounds travel in: float32 for ra_dpo_cvar's counts (exact below 2**24)
    on float32 rows (its kl carry is float32 too), float64 otherwise (cvar's q-masses: its
    atom's weight divides a difference of them)."""
    return torch.float32 if acc == torch.float32 and risk.kind == "ra_dpo_cvar" else torch.float64


class EmptySlice:
    """The slice kernels of a rank whose columns are all padding: it adds nothing."""

    pick = staticmethod(radix_pick)
    fresh_like = staticmethod(torch.empty_like)

    class Chunk:
        def __init__(self, z, zr, rows):
            self.n, self.dtype, self.device = len(rows), accumulation_dtype(z.dtype), z.device

        def partials(self, local, risk):
            empty = torch.tensor([float("-inf")] * 2 + [0.0] * 3 + [float("-inf"), 0.0, 0.0, float("-inf")],
                                 dtype=self.dtype)
            return empty.to(self.device).expand(self.n, 9)

        def bracket(self):  # bounds nothing in the group's union
            return torch.tensor([float("inf"), float("-inf")], dtype=self.dtype, device=self.device).expand(self.n, 2)

        def collected(self):  # nothing kept, nothing left out: bounds nothing in the intersection
            inf = float("inf")
            return torch.tensor([-inf, inf, 0.0, 0.0, 0.0, 0.0, inf, 0.0, 0.0], dtype=self.dtype,
                                device=self.device).expand(self.n, 9)

        def subset(self, idx):
            sub = copy.copy(self)
            sub.n = len(idx)
            return sub

        def search(self, a, ar, risk, target):
            return EmptySlice.Search(self.n, self.device)

    class Search:
        def __init__(self, n, device):
            self.n, self.device = n, device

        def histogram(self, level, prefix):
            return torch.zeros(self.n, BINS, dtype=torch.float64, device=self.device)

        def bracket(self, lo, hi):
            zero = torch.zeros(self.n, dtype=torch.float64, device=self.device)
            return self.histogram(0, lo), zero, zero

        def close(self, prefix):
            return (torch.zeros(self.n, 3, dtype=torch.float64, device=self.device),
                    torch.full((self.n,), NO_KEY, dtype=torch.int64, device=self.device))

        def sums_above(self, idx, threshold):
            return torch.zeros(len(idx), 2, dtype=torch.float64, device=self.device)

        def candidates(self, level, prefix, most):  # none: count 0, no key above, empty slots
            payload = torch.full((self.n, 2 + 2 * most), NO_KEY, dtype=torch.int64, device=self.device)
            payload[:, 0] = 0
            payload[:, 2 + most:] = 0  # weights 0.0 (float64 bits)
            return payload

        def use_candidates(self):
            pass

    @staticmethod
    def backward(z, zr, local, saved, grads, risk, out, chunk_size=None):
        return out
