"""Tail metrics of a sample of costs (SPEC section 8) and bootstrap intervals over prompts.

cost_cvarA is the mean of the worst (1 - A) fraction of the costs: sort descending, k =
n (1 - A), sum the first floor(k) costs plus (k - floor(k)) times the next one, divide by k.
So the boundary sample counts fractionally and cost_cvarA is exact for any n, not rounded to
a whole number of samples.
"""
from __future__ import annotations

import numpy as np

CVAR_LEVELS = (0.90, 0.95, 0.99)
BOOTSTRAP_RESAMPLES = 1000


def mean(values) -> float:
    return float(np.asarray(values, float).mean())


def cvar(values, level: float = 0.95) -> float:
    """Mean of the worst (1 - level) fraction of the values (upper tail), atoms split exactly."""
    if not 0 <= level < 1:
        raise ValueError(f"level must be in [0, 1), got {level!r}")
    x = np.sort(np.asarray(values, float))[::-1]
    if len(x) == 0:
        raise ValueError("values: empty sample")
    k = (1 - level) * len(x)
    whole = int(np.floor(k))
    total = x[:whole].sum() + (k - whole) * (x[whole] if whole < len(x) else 0.0)
    return float(total / k)


def catastrophic(costs, threshold: float) -> np.ndarray:
    """Per response: cost >= threshold."""
    return np.asarray(costs, float) >= threshold


def catastrophic_rate(costs, threshold: float) -> float:
    return float(catastrophic(costs, threshold).mean())


def metric_names(reward: bool, threshold: bool, kl: bool) -> list[str]:
    """The metrics of a report, in table order; those whose input was not given are left out."""
    names = ["reward_mean"] if reward else []
    names += ["cost_mean"] + [cvar_name(a) for a in CVAR_LEVELS]
    names += ["catastrophic_rate"] if threshold else []
    names += ["kl_to_reference"] if kl else []
    return names


def cvar_name(level: float) -> str:
    return f"cost_cvar{round(level * 100)}"


def point_metrics(cost, reward=None, kl=None, threshold: float | None = None) -> dict:
    """Every metric of one model's responses (1-d arrays, one entry per response)."""
    out = {}
    if reward is not None:
        out["reward_mean"] = mean(reward)
    out["cost_mean"] = mean(cost)
    for level in CVAR_LEVELS:
        out[cvar_name(level)] = cvar(cost, level)
    if threshold is not None:
        out["catastrophic_rate"] = catastrophic_rate(cost, threshold)
    if kl is not None:
        out["kl_to_reference"] = mean(kl)
    return out


def bootstrap_ci(per_prompt: dict, threshold: float | None, seed: int,
                 resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> dict:
    """{metric: [lo, hi]}: percentile bootstrap over prompts.

    ``per_prompt`` maps "cost" (and optionally "reward", "kl") to (P, K) arrays: K responses
    for each of P prompts. A resample draws P prompts with replacement and keeps all K
    responses of each, so the responses of one prompt (which are correlated) move together.
    """
    cost = np.asarray(per_prompt["cost"], float)
    n_prompts = cost.shape[0]
    rng = np.random.default_rng(seed)
    draws = {}
    for _ in range(resamples):
        rows = rng.integers(0, n_prompts, n_prompts)
        pick = {k: (np.asarray(v, float)[rows].ravel() if v is not None else None) for k, v in per_prompt.items()}
        for name, value in point_metrics(pick["cost"], pick.get("reward"), pick.get("kl"), threshold).items():
            draws.setdefault(name, []).append(value)
    tail = (1 - level) / 2 * 100
    return {name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for name, v in draws.items()}
