"""SPEC section 3: pair objectives on per-sequence sums, and the TDPO/Ra-DPO metrics.

Rows 0..B-1 are the chosen sequences, B..2B-1 the rejected ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_logits(delta, seq_risk, objective: str, beta: float, alpha: float):
    """u of SPEC section 3, one per pair."""
    b = delta.shape[0] // 2
    margin = delta[:b] - delta[b:]
    if objective == "dpo":
        return beta * margin
    risk_w, risk_l = seq_risk[:b], seq_risk[b:]
    if objective == "rsa1":
        return beta * (margin - (risk_l - risk_w))
    if objective == "rsa2":
        return beta * (margin - alpha * (risk_l - risk_w.detach()))
    raise ValueError(f"objective: unknown objective {objective!r}")


def pair_loss(u, label_smoothing: float):
    return -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)


def pair_metrics(beta: float, delta, seq_risk, seq_kl, seq_logp) -> dict[str, torch.Tensor]:
    """Detached scalar means over pairs, named as TRL and TDPO log them."""
    b = delta.shape[0] // 2
    with torch.no_grad():
        rewards = beta * (delta + seq_risk)
        chosen, rejected = rewards[:b], rewards[b:]
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracy": (chosen > rejected).to(rewards.dtype).mean(),
            "rewards/margin": (chosen - rejected).mean(),
            "kl/chosen": seq_kl[:b].mean(),
            "kl/rejected": seq_kl[b:].mean(),
            "risk/chosen": seq_risk[:b].mean(),
            "risk/rejected": seq_risk[b:].mean(),
            "logps/chosen": seq_logp[:b].mean(),
            "logps/rejected": seq_logp[b:].mean(),
        }
