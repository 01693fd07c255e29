"""The definition: SPEC section 1 written as plainly as PyTorch allows.

Everything here materialises full (tokens x vocabulary) tensors and differentiates with
autograd, exactly as a naive implementation (or the published Ra-DPO code) would. The
kernels are tested against it, and the benchmarks use it as the baseline. Do not optimise.
"""
from __future__ import annotations

import torch

from .risk import Risk, parse_risk


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpolation_ranks(v: int, level: float) -> tuple[int, int, float]:
    """The ranks LO, HI = LO + 1 (at most v - 1) and weight that torch.quantile's linear
    interpolation reads for ``level`` among v sorted values."""
    pos = level * (v - 1)
    lo = int(pos)
    return lo, min(lo + 1, v - 1), pos - lo


def interpolated_quantile(x: torch.Tensor, level: float) -> torch.Tensor:
    """torch.quantile(x, level, dim=-1) with linear interpolation, without its size limit.

    -inf entries are allowed: a quantile that interpolates from -inf is -inf, as in
    torch.quantile (the formula alone would give -inf + inf = NaN there).
    """
    xs = x.sort(dim=-1).values
    lo, hi, frac = interpolation_ranks(x.shape[-1], level)
    a, b = xs[..., lo], xs[..., hi]
    if frac == 0.0:
        return a
    return torch.where((a == b) | (a == float("-inf")), a, a + frac * (b - a))


def in_support(q: torch.Tensor) -> torch.Tensor:
    """The items that count: q != 0, so a NaN q (NaN reference logits) counts, and is not
    silently dropped as "q > 0" would drop it (SPEC: NaN in gives NaN out)."""
    return q != 0


def deviation(z: torch.Tensor, zr: torch.Tensor, a: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """D = r - s in SPEC section 1's one floating-point form, (zr - z) + (A - Ar): the logits'
    difference first, then the row's constant, so that items with equal zr - z tie on every
    backend and rank layout; -inf where the reference puts no mass (those never count).
    a, ar: the rows' logsumexp of z and zr."""
    q = (zr - ar[..., None]).exp()
    return torch.where(in_support(q), (zr - z) + (a - ar)[..., None], torch.full_like(z, float("-inf")))


def token_risk(z: torch.Tensor, zr: torch.Tensor, a: torch.Tensor, ar: torch.Tensor, risk: Risk) -> torch.Tensor:
    """risk of D under q = exp(zr - Ar), one value per row, from the logits and their
    logsumexps a = A, ar = Ar."""
    r = zr - ar[..., None]
    q = r.exp()
    support = in_support(q)
    d = deviation(z, zr, a, ar)
    qd = torch.where(support, q * d, torch.zeros_like(q))
    kl = qd.sum(-1)
    if risk.kind == "kl":
        return kl
    # a NaN anywhere in the row makes kl NaN; the selections below could hide it
    return torch.where(torch.isnan(kl), kl, _risk_value(q, d, support, r, risk))


def _risk_value(q, d, support, r, risk: Risk) -> torch.Tensor:
    if risk.kind == "erm":
        mu = risk.param
        # (1/mu) log sum q exp(mu D), the log-sum taken over the reference's support
        t = torch.where(support, r + mu * d, torch.full_like(d, float("-inf")))
        return torch.logsumexp(t, -1) / mu
    if risk.kind == "cvar":
        alpha = risk.param
        # tau* = the smallest D (over q > 0) whose cumulative q-mass reaches alpha
        ds, order = d.detach().sort(dim=-1)
        qs = q.detach().gather(-1, order)
        hit = (qs.cumsum(-1) >= alpha) & (qs > 0)
        last_support = (qs > 0).long().cumsum(-1).argmax(-1, keepdim=True)
        first_hit = torch.where(hit.any(-1, keepdim=True), hit.long().argmax(-1, keepdim=True), last_support)
        tau_value = ds.gather(-1, first_hit)
        # tau as the q-weighted mean of D over the atom D_v = tau*: the same value, and its
        # gradient shares the atom's weight among the tied items in proportion to q_v (SPEC)
        atom = support & (d.detach() == tau_value)
        tau = torch.where(atom, q * d, 0.0).sum(-1) / torch.where(atom, q, 0.0).sum(-1)
        above = support & (d.detach() > tau_value)
        excess = torch.where(above, q * (d - tau[..., None]), 0.0).sum(-1)
        return tau + excess / (1 - alpha)
    if risk.kind == "ra_dpo_cvar":
        level = 1 - risk.param
        quantile = interpolated_quantile(d.detach(), level)
        above = d.detach() > quantile[..., None]
        return torch.where(above & support, q * d, torch.zeros_like(q)).sum(-1)
    raise ValueError(f"risk: unknown kind {risk.kind!r}")


def token_stats(logits, ref_logits, labels, *, risk="kl", ignore_index: int = -100):
    """(logp, ref_logp, kl, risk) per position, with autograd to ``logits``; 0 where masked."""
    risk = parse_risk(risk)
    acc = accumulation_dtype(logits.dtype)
    z, zr = logits.to(acc), ref_logits.detach().to(acc)
    a, ar = torch.logsumexp(z, -1), torch.logsumexp(zr, -1)
    s, r = z - a[..., None], zr - ar[..., None]
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    logp = torch.where(mask, s.gather(-1, safe).squeeze(-1), zero)
    ref_logp = torch.where(mask, r.gather(-1, safe).squeeze(-1), zero)
    # masked rows are computed, then replaced: torch.where gives them no gradient
    kl = torch.where(mask, token_risk(z, zr, a, ar, Risk("kl")), zero)
    value = torch.where(mask, token_risk(z, zr, a, ar, risk), zero)
    return logp, ref_logp, kl, value
