"""The speed baselines: what a user would run instead of these kernels.

- ``plain``: the formulation of the published Ra-DPO code (TDPO's ``_tdpo_get_batch_logps``
  and its risk variants): log_softmax of the policy, softmax and log_softmax of the
  reference, their products over full (N, V) tensors, torch.quantile for the unweighted
  threshold of ``ra_dpo_cvar``, autograd for the backward. The risk values are the SPEC's
  (tests/test_bench_baselines.py checks every risk string against rsa_kernels.reference):
  ``erm`` as a logsumexp, ``cvar`` as Rockafellar-Uryasev's tau + E_q[(D - tau)+] / (1 - ALPHA)
  with tau the q-weighted ALPHA-quantile found by a sort and a cumulative sum.
- ``compiled``: torch.compile of the same function (one compilation per shape and risk;
  callers run it once untimed, so the compile time is warm-up, not measured).
- ``plain_pair_loss``: the fused-linear path's baseline: both models' logits materialised
  (h @ W.T), then the plain formulation and the pair loss.

rsa_kernels.reference stays the correctness oracle; it is never timed as a baseline (it
computes the exact definition with extra sorts and selections a user would not write).

Like the published code, the plain formulation assumes finite logits whose reference
probabilities do not underflow to 0: there, SPEC's D = -inf convention (which the
reference and the kernels follow) moves the quantiles, and the plain cvar / ra_dpo_cvar
differ. Ties in D at the cvar threshold give the whole atom's gradient to one of the tied
items (a subgradient) instead of sharing it in proportion to q.
"""
from __future__ import annotations

import functools

import torch

from rsa_kernels.loss import loss_from_token_stats, make_layout
from rsa_kernels.risk import parse_risk
from rsa_kernels.token_stats import TokenStats

# torch.quantile refuses inputs of more than 2**24 elements; rows go through in pieces below it
QUANTILE_MAX_ELEMENTS = 2 ** 24


def row_quantile(x: torch.Tensor, level: float) -> torch.Tensor:
    """torch.quantile(x, level, dim=-1), a block of rows at a time (as a user hits its size limit)."""
    v = x.shape[-1]
    flat = x.reshape(-1, v)
    per = max(1, QUANTILE_MAX_ELEMENTS // v)
    parts = [torch.quantile(part, level, dim=-1) for part in flat.split(per)]
    return torch.cat(parts).reshape(x.shape[:-1])


def _risk_value(kind: str, param: float, q, logq, d, kl):
    if kind == "kl":
        return kl
    if kind == "erm":  # (1/MU) log E_q[exp(MU D)]
        return torch.logsumexp(logq + param * d, dim=-1) / param
    if kind == "cvar":
        # tau = the q-weighted ALPHA-quantile of D: sort D, accumulate q, first index past ALPHA.
        # tau keeps its gradient (gathered from d), so the threshold item gets SPEC's weight
        # (F(tau) - ALPHA) / (1 - ALPHA); relu gives the items above tau q / (1 - ALPHA)
        order = d.detach().argsort(dim=-1)
        cum = q.gather(-1, order).cumsum(-1)
        target = torch.full((*cum.shape[:-1], 1), param, dtype=cum.dtype, device=cum.device)
        k = torch.searchsorted(cum, target).clamp_(max=d.shape[-1] - 1)
        tau = d.gather(-1, order.gather(-1, k))
        return tau.squeeze(-1) + (q * torch.relu(d - tau)).sum(-1) / (1 - param)
    if kind == "ra_dpo_cvar":  # the published code: E_q[D [D > Q]], Q the unweighted (1-C)-quantile
        threshold = row_quantile(d.detach(), 1 - param)
        return (q * d * (d > threshold.unsqueeze(-1))).sum(-1)
    raise ValueError(f"risk: unknown kind {kind!r}")


def _plain(kind: str, param: float, logits, ref_logits, labels, ignore_index: int):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp_all = logits.to(acc).log_softmax(-1)
    ref = ref_logits.detach().to(acc)
    q = ref.softmax(-1)
    logq = ref.log_softmax(-1)
    d = logq - logp_all                                  # D = r - s
    kl = (q * d).sum(-1)
    value = _risk_value(kind, param, q, logq, d, kl)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    logp = torch.where(mask, logp_all.gather(-1, safe).squeeze(-1), zero)
    ref_logp = torch.where(mask, logq.gather(-1, safe).squeeze(-1), zero)
    return logp, ref_logp, torch.where(mask, kl, zero), torch.where(mask, value, zero)


def plain_token_stats(logits, ref_logits, labels, *, risk="kl", ignore_index: int = -100):
    """(logp, ref_logp, kl, risk) per position by the plain formulation; autograd to ``logits``."""
    r = parse_risk(risk)
    return _plain(r.kind, r.param, logits, ref_logits, labels, ignore_index)


def _compile(fn):
    """torch.compile for fixed shapes. Benchmarks compile the same code for many shapes and
    risks, so lift dynamo's recompile limit: past it dynamo would quietly run it uncompiled."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    return torch.compile(fn, dynamic=False)


@functools.lru_cache(maxsize=None)
def compiled_token_stats_fn(risk: str):
    """The plain formulation of ``risk`` under torch.compile: fn(logits, ref_logits, labels, ignore_index)."""
    r = parse_risk(risk)
    return _compile(functools.partial(_plain, r.kind, r.param))


def compiled_token_stats(logits, ref_logits, labels, *, risk="kl", ignore_index: int = -100):
    """plain_token_stats under torch.compile (the first call for a shape compiles)."""
    return compiled_token_stats_fn(str(parse_risk(risk)))(logits, ref_logits, labels, ignore_index)


def plain_pair_loss(hidden, weight, ref_hidden, ref_weight, labels, *, risk, objective, beta=0.1, alpha=0.5,
                    gamma=1.0, ignore_index: int = -100, stats_fn=plain_token_stats):
    """The materialised-logits loss: both models' (N, V) logits, then the plain formulation.

    hidden (S, T, H) and labels (S, T) padded, chosen sequences first (as the grid's inputs)."""
    z = hidden @ weight.t()
    with torch.no_grad():
        zr = ref_hidden @ ref_weight.t()
    layout = make_layout(labels, ignore_index=ignore_index, shift=False)
    stats = TokenStats(*stats_fn(z, zr, labels, risk=risk, ignore_index=ignore_index))
    loss, _ = loss_from_token_stats(stats, layout, objective=objective, beta=beta, alpha=alpha, gamma=gamma,
                                    label_smoothing=0.0)
    return loss


@functools.lru_cache(maxsize=None)
def _compiled_pair_fn(risk: str, objective: str, beta: float):
    return _compile(functools.partial(plain_pair_loss, risk=risk, objective=objective, beta=beta))


def compiled_pair_loss(hidden, weight, ref_hidden, ref_weight, labels, *, risk, objective, beta=0.1):
    """plain_pair_loss (products, statistics and pair loss) under torch.compile."""
    return _compiled_pair_fn(str(parse_risk(risk)), objective, beta)(hidden, weight, ref_hidden, ref_weight, labels)
