"""Naive formulas of SPEC sections 1-3, written plainly and independently of the package.

Everything is full-size tensors and autograd; the cvar minimum is taken over every
candidate tau = D_v, so it checks the package's quantile logic from a different angle.
"""
import torch
import torch.nn.functional as F


def naive_token_stats(z, zr, y, risk, ignore_index=-100):
    z = z.double() if z.dtype != torch.float64 else z
    zr = zr.detach().double()
    s, r = F.log_softmax(z, -1), F.log_softmax(zr, -1)
    q = F.softmax(zr, -1)
    d = r - s
    kl = (q * d).sum(-1)
    kind, _, arg = risk.partition(":")
    if kind == "kl":
        value = kl
    elif kind == "erm":
        mu = float(arg)
        a, ar = torch.logsumexp(z, -1), torch.logsumexp(zr, -1)
        value = (torch.logsumexp((1 + mu) * zr - mu * z, -1) - (1 + mu) * ar + mu * a) / mu
    elif kind == "cvar":
        alpha = float(arg)
        # g(tau) = tau + E_q[(D - tau)+] / (1 - alpha) is convex piecewise linear: its minimum
        # lies at a breakpoint tau = D_v; autograd flows through the chosen D_v as well.
        tau = d.unsqueeze(-1)                                  # (..., V candidates, 1)
        excess = (q.unsqueeze(-2) * torch.relu(d.unsqueeze(-2) - tau)).sum(-1)
        g = d + excess / (1 - alpha)
        value = g.min(-1).values
    elif kind == "ra_dpo_cvar":
        c = float(arg)
        quantile = torch.quantile(d.detach(), 1 - c, dim=-1, keepdim=True)
        value = (q * d * (d.detach() > quantile)).sum(-1)
    else:
        raise ValueError(risk)
    mask = y != ignore_index
    yy = torch.where(mask, y, 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=s.dtype)
    logp = torch.where(mask, s.gather(-1, yy).squeeze(-1), zero)
    ref_logp = torch.where(mask, r.gather(-1, yy).squeeze(-1), zero)
    return logp, ref_logp, torch.where(mask, kl, zero), torch.where(mask, value, zero)


def naive_sequence(values, mask, gamma):
    """R_k = v_{t_k} + gamma R_{k+1}, by the recursion itself, per row of (S, T)."""
    out = []
    for row, m in zip(values, mask):
        total = torch.zeros((), dtype=values.dtype)
        for t in reversed(range(len(row))):
            if m[t]:
                total = row[t] + gamma * total
        out.append(total)
    return torch.stack(out)


def naive_pair_loss(logits, ref_logits, labels, objective, risk, beta, alpha=0.5, gamma=1.0, eps=0.0):
    logp, ref_logp, kl, value = naive_token_stats(logits, ref_logits, labels, risk)
    mask = labels != -100
    delta = ((logp - ref_logp) * mask).sum(-1)
    seq_risk = naive_sequence(value, mask, gamma)
    b = labels.shape[0] // 2
    margin = delta[:b] - delta[b:]
    if objective == "dpo":
        u = beta * margin
    elif objective == "rsa1":
        u = beta * (margin - (seq_risk[b:] - seq_risk[:b]))
    else:
        u = beta * (margin - alpha * (seq_risk[b:] - seq_risk[:b].detach()))
    return (-(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)).mean()
