"""The exact quantile of cvar and ra_dpo_cvar for the triton backend: passes 2 to 4, then scratch.

After pass 1 (triton/stats.py) has A and Ar, two histogram launches (triton/histogram.py)
narrow a bracket of D around the target; a row whose bracket shrinks to one value ends
there (policy = reference, heavy ties). The rest, typically a few hundred items of 10^5,
are copied out by one more read (triton/collect.py) and finished here on that copy: sorted
by (D, q), the q-mass summed in float64. So every row is read at most 4 times in the
forward, whatever its values. Only this step waits for the GPU (to size the scratch).

Results land where the single-key finish of histogram.py puts them: stats[:, 3] = risk,
saved[:, 2:5] = (tau, c_above, c_atom) or (Q, S, 0), with rsa_kernels.risk's meaning.
"""
from __future__ import annotations

import torch

from ..reference import interpolation_ranks
from ..risk import Risk

NBINS = 16             # thresholds per histogram launch
HIST_BLOCK = 256       # items per step: (NBINS x HIST_BLOCK) per-lane tiles
INTERPRET_BLOCK = 1024  # the interpreter pays per operation, not per element
HIST_WARPS = 8
COLLECT_BLOCK = 1024   # items per step of the collect pass (four per thread: wide loads)
SCRATCH_BYTES = 256 << 20  # the scratch and its sort's temporaries, per batch of open rows
_BYTES_PER_ITEM = 72       # d, q; keys, sorted keys, order, sorted q (f64), cumsums, ...
_PAD_KEY = 1 << 33         # sorts after every real key


def quantile_forward(kernels, z, zr, labels, stats, saved, aux, risk: Risk, ignore_index: int,
                     interpreting: bool, launch_opts: dict) -> None:
    if NBINS < 8 or NBINS & (NBINS - 1):
        raise ValueError(f"NBINS must be a power of two >= 8 (the first histogram keeps 4 bins for "
                         f"-inf, +inf and the tails), got {NBINS}")
    n, v = z.shape
    ra = risk.kind == "ra_dpo_cvar"
    alpha, (lo, hi, frac) = (0.0, interpolation_ranks(v, 1.0 - risk.param)) if ra else (risk.param, (0, 0, 0.0))
    ist = torch.empty(n, 4, dtype=torch.int64, device=z.device)
    fst = torch.empty(n, 3, dtype=torch.float32, device=z.device)
    block = INTERPRET_BLOCK if interpreting else HIST_BLOCK
    for first in (True, False):
        kernels.histogram[(n,)](z, zr, labels, stats, saved, aux, ist, fst, z.stride(0), zr.stride(0), v,
                                ignore_index, alpha, lo, hi, frac, FIRST=first, RA=ra, NB=NBINS,
                                BLOCK=block, num_warps=HIST_WARPS, **launch_opts)
    count = ist[:, 3].cpu()  # the forward's one wait for the GPU: it sizes the scratch
    open_rows = (count > 0).nonzero().squeeze(1)
    if open_rows.numel() == 0:
        return
    cap = int(count[open_rows].max())
    open_rows = open_rows.to(z.device)
    per_batch = max(1, SCRATCH_BYTES // (cap * _BYTES_PER_ITEM))
    for rows in open_rows.split(per_batch):
        d = torch.empty(len(rows), cap, dtype=torch.float32, device=z.device)
        q = torch.empty_like(d)
        fill = torch.zeros(len(rows), dtype=torch.int32, device=z.device)
        kernels.collect[(len(rows),)](z, zr, rows, saved, ist, d, q, fill, z.stride(0), zr.stride(0), v, cap,
                                      RA=ra, BLOCK=INTERPRET_BLOCK if interpreting else COLLECT_BLOCK,
                                      num_warps=HIST_WARPS, **launch_opts)
        finish_from_scratch(rows, d, q, ist, fst, stats, saved, risk, alpha, lo, hi, frac)


def sort_keys(d: torch.Tensor) -> torch.Tensor:
    """triton/_common._key on the host: float32 -> int64, monotone, exact (D has no -0)."""
    b = d.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(b >= 0x80000000, 0xFFFFFFFF - b, b + 0x80000000)


def _item_order(d: torch.Tensor, q: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """One int64 per item ordering by D, then by q (q >= 0: its bits sort as integers), so
    that items tie only if equal in both: the result cannot depend on the collect order."""
    return torch.where(filled, ((sort_keys(d) - (1 << 31)) << 32) | q.view(torch.int32).to(torch.int64),
                       torch.iinfo(torch.int64).max)


def finish_from_scratch(rows, d, q, ist, fst, stats, saved, risk: Risk, alpha, lo, hi, frac) -> None:
    """Exact selection over each open row's bracket items (D, q), with the totals below/above."""
    count = ist[rows, 3]
    below_cnt = ist[rows, 2]
    below_mass, above_qd, above_mass = (fst[rows, c].double() for c in range(3))
    slots = torch.arange(d.shape[1], device=d.device)
    filled = slots[None, :] < count[:, None]
    order = _item_order(d, q, filled).sort(dim=1).indices
    ds = d.gather(1, order)
    valid = filled  # the filled slots sort first
    keys = torch.where(valid, sort_keys(ds), _PAD_KEY)
    qs = torch.where(valid, q.gather(1, order).double(), 0.0)
    # q*D over q != 0 (a -inf item with q = 0 adds nothing, not NaN)
    qd = torch.where(valid & (qs != 0), qs * ds.double(), 0.0)
    if risk.kind == "cvar":
        # F at each item's last tie; tau* = the first item whose F reaches alpha, else the largest
        f_le = (below_mass[:, None] + qs.cumsum(1)).gather(1, torch.searchsorted(keys, keys, right=True) - 1)
        hit = valid & (f_le >= alpha)
        idx = torch.where(hit.any(1), hit.long().argmax(1), count - 1)[:, None]
        tau_key = keys.gather(1, idx)
        tau = ds.gather(1, idx).squeeze(1)
        atom = torch.where(keys == tau_key, qs, 0.0).sum(1)
        c_above = torch.full_like(atom, 1.0 / (1.0 - alpha))
        c_atom = (f_le.gather(1, idx).squeeze(1) - alpha).clamp_min(0.0) / ((1.0 - alpha) * atom)
        atom_w = atom * c_atom
        value = (above_qd + torch.where(keys > tau_key, qd, 0.0).sum(1)) * c_above
        value = value + torch.where(atom_w > 0, atom_w * tau.double(), 0.0)
        cols = (tau, c_above, c_atom)
    else:
        # both ranks lie in the bracket (histogram.py keeps them there)
        v_lo = ds.gather(1, (lo - below_cnt)[:, None]).squeeze(1)
        v_hi = ds.gather(1, (hi - below_cnt)[:, None]).squeeze(1)
        quant = v_lo if frac == 0.0 else torch.where((v_lo == v_hi) | (v_lo == float("-inf")), v_lo,
                                                      v_lo + frac * (v_hi - v_lo))
        take = valid & (ds > quant[:, None])
        defined = quant == quant  # as in torch, D > NaN selects nothing
        value = torch.where(defined, above_qd + torch.where(take, qd, 0.0).sum(1), 0.0)
        s_above = torch.where(defined, above_mass + torch.where(take, qs, 0.0).sum(1), 0.0)
        cols = (quant, s_above, torch.zeros_like(s_above))
    stats[rows, 3] = value.float()
    for c, col in enumerate(cols):
        saved[rows, 2 + c] = col.float()
