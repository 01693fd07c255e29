"""The `torch` backend: SPEC section 1 in plain PyTorch, a chunk of token rows at a time.

Forward keeps per-row scalars only (risk.SAVED_WIDTH of them); backward recomputes p, q
and the risk's adversarial distribution w from them and writes
    grad = g_logp ([j = y] - p) + g_kl (p - q) + g_risk (p sum(w) - w).
At most one chunk of (rows x V) temporaries is alive at a time.
"""
from __future__ import annotations

import torch

from ..reference import accumulation_dtype, in_support, interpolated_quantile
from ..risk import SAVED_WIDTH, Risk

CHUNK_BYTES = 256 * 2**20


def rows_per_chunk(n: int, v: int, acc: torch.dtype, risk: Risk, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    # live (rows x V) temporaries of the accumulation dtype; sorting adds values + int64 indices
    temps = 8 if risk.kind in ("kl", "erm") else 12
    per_row = v * temps * torch.finfo(acc).bits // 8
    return max(1, min(n, CHUNK_BYTES // max(per_row, 1)))


def _deviation(z, zr, a, ar):
    """s, r, q, D = r - s (-inf off the reference's support): same bits in both passes.

    D is formed as SPEC section 1 fixes it, (zr - z) + (A - Ar), as every backend and slice
    kernel does: equal logit differences give equal D, the same ties everywhere. The
    support is q != 0 (reference.in_support): a NaN q is kept, so that NaN reference logits
    make D, kl and the risk NaN instead of vanishing from every sum.
    """
    s = z - a[:, None]
    r = zr - ar[:, None]
    q = r.exp()
    d = torch.where(in_support(q), (zr - z) + (a - ar)[:, None], torch.full_like(s, float("-inf")))
    return s, r, q, d


def _cvar_threshold(d, q, alpha):
    """tau* (smallest D with q-mass F(D) >= alpha), and the weights above and at tau*.

    The masses are summed in float64 whatever the input: a float32 running sum over a large
    vocabulary drifts by ~V * 1e-7, enough to move the atom split visibly.
    """
    ds, order = d.sort(dim=-1)
    qs = q.gather(-1, order).double()
    positive = qs > 0
    hit = (qs.cumsum(-1) >= alpha) & positive
    fallback = positive.long().cumsum(-1).argmax(-1)  # last support item, if rounding misses alpha
    idx = torch.where(hit.any(-1), hit.long().argmax(-1), fallback)
    tau = ds.gather(-1, idx[:, None]).squeeze(-1)
    del ds, order, qs, hit
    q64 = q.double()
    f_le = torch.where(d <= tau[:, None], q64, 0.0).sum(-1)
    f_lt = torch.where(d < tau[:, None], q64, 0.0).sum(-1)
    c_above = torch.full_like(tau, 1.0 / (1.0 - alpha))
    c_atom = ((f_le - alpha).clamp_min(0.0) / ((1.0 - alpha) * (f_le - f_lt))).to(tau.dtype)
    return tau, c_above, c_atom


def _forward_chunk(z, zr, risk: Risk):
    a = torch.logsumexp(z, -1)
    ar = torch.logsumexp(zr, -1)
    s, r, q, d = _deviation(z, zr, a, ar)
    support = in_support(q)
    qd = torch.where(support, q * d, 0.0)
    kl = qd.sum(-1)
    saved = torch.zeros(z.shape[0], SAVED_WIDTH, dtype=z.dtype, device=z.device)
    saved[:, 0], saved[:, 1] = a, ar
    if risk.kind == "kl":
        value = kl
    elif risk.kind == "erm":
        mu = risk.param
        t = torch.where(support, r + mu * d, float("-inf"))
        norm = torch.logsumexp(t, -1)
        value = norm / mu
        saved[:, 2] = norm
    elif risk.kind == "cvar":
        alpha = risk.param
        tau, c_above, c_atom = _cvar_threshold(d, q, alpha)
        above = torch.where(d > tau[:, None], qd, 0.0).sum(-1)
        atom = torch.where(d == tau[:, None], q, 0.0).sum(-1) * c_atom
        value = above * c_above + torch.where(atom > 0, atom * tau, 0.0)
        saved[:, 2], saved[:, 3], saved[:, 4] = tau, c_above, c_atom
    elif risk.kind == "ra_dpo_cvar":
        quantile = interpolated_quantile(d, 1.0 - risk.param)
        above = d > quantile[:, None]
        value = torch.where(above, qd, 0.0).sum(-1)
        saved[:, 2], saved[:, 3] = quantile, torch.where(above, q, 0.0).sum(-1)
    else:
        raise ValueError(f"risk: unknown kind {risk.kind!r}")
    value = torch.where(torch.isnan(kl), kl, value)  # a NaN in D must not vanish in a selection
    return a, ar, s, r, kl, value, saved


def forward(z, zr, labels, risk: Risk, ignore_index: int, chunk_size: int | None = None):
    """Per-row (logp, ref_logp, kl, risk) as an (N, 4) tensor, and the (N, 5) saved scalars."""
    n, v = z.shape
    acc = accumulation_dtype(z.dtype)
    stats = torch.zeros(n, 4, dtype=acc, device=z.device)
    saved = torch.zeros(n, SAVED_WIDTH, dtype=acc, device=z.device)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, 0)
    step = rows_per_chunk(n, v, acc, risk, chunk_size)
    for i in range(0, n, step):
        j = min(n, i + step)
        _, _, s, r, kl, value, sv = _forward_chunk(z[i:j].to(acc), zr[i:j].to(acc), risk)
        y = safe[i:j, None]
        stats[i:j, 0] = s.gather(-1, y).squeeze(-1)
        stats[i:j, 1] = r.gather(-1, y).squeeze(-1)
        stats[i:j, 2], stats[i:j, 3] = kl, value
        saved[i:j] = sv
    stats[~mask] = 0.0
    return stats, saved


def adversarial(z, zr, saved, risk: Risk):
    """p, q, w and sum(w) for a chunk, from the saved scalars."""
    a, ar = saved[:, 0], saved[:, 1]
    s, r, q, d = _deviation(z, zr, a, ar)
    p = s.exp()
    total = None
    if risk.kind == "kl":
        w = q
    elif risk.kind == "erm":
        mu = risk.param
        w = torch.where(in_support(q), (r + mu * d - saved[:, 2:3]).exp(), 0.0)
    elif risk.kind == "cvar":
        tau = saved[:, 2:3]
        w = torch.where(d > tau, q * saved[:, 3:4], torch.where(d == tau, q * saved[:, 4:5], 0.0))
    else:  # ra_dpo_cvar: the mask D > Q is held fixed, so w does not sum to 1
        w = torch.where(d > saved[:, 2:3], q, 0.0)
        total = saved[:, 3:4]
    return p, q, w, total


def backward(z, zr, labels, saved, grads, risk: Risk, ignore_index: int,
             inplace: bool = False, chunk_size: int | None = None):
    """d(sum of g * stats)/dz for grads = (N, 3) upstream gradients of (logp, kl, risk)."""
    n, v = z.shape
    mask = labels != ignore_index
    step = rows_per_chunk(n, v, accumulation_dtype(z.dtype), risk, chunk_size)
    out = z if inplace else torch.empty_like(z)
    return backward_columns(z, zr, mask, torch.where(mask, labels, 0), mask, saved, grads, risk, step, out)


def backward_columns(z, zr, mask, label_col, label_here, saved, grads, risk: Risk, step: int, out):
    """The gradient of the columns z holds into ``out`` (z itself for in place), ``step`` rows
    at a time; the logp term goes to column ``label_col`` of the rows where ``label_here`` (a
    vocabulary slice may not hold the label: torch_slices shares this)."""
    acc = accumulation_dtype(z.dtype)
    g = torch.where(mask[:, None], grads.to(acc), 0.0)
    for i in range(0, z.shape[0], step):
        j = min(z.shape[0], i + step)
        p, q, w, total = adversarial(z[i:j].to(acc), zr[i:j].to(acc), saved[i:j], risk)
        g_logp, g_kl, g_risk = g[i:j, 0:1], g[i:j, 1:2], g[i:j, 2:3]
        pw = p if total is None else p * total
        grad = (g_kl - g_logp) * p - g_kl * q + g_risk * (pw - w)
        grad.scatter_add_(-1, label_col[i:j, None], torch.where(label_here[i:j, None], g_logp, 0.0))
        grad[~mask[i:j]] = 0.0
        out[i:j] = grad.to(out.dtype)
    return out


def unsupported(tensor) -> str | None:
    return None
