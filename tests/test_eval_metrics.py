"""rsa.eval.metrics against independent NumPy formulas (SPEC section 8), and the sampling draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rsa.eval import metrics, sampling


def cvar_by_quantile_integral(x, level):
    """(1 / (1 - level)) * integral from level to 1 of the empirical quantile function, exactly:
    the i-th smallest value holds the u-interval [(i - 1) / n, i / n]."""
    x = np.sort(np.asarray(x, float))
    n = len(x)
    lo, hi = np.arange(n) / n, np.arange(1, n + 1) / n
    overlap = np.clip(np.minimum(hi, 1.0) - np.maximum(lo, level), 0, None)
    return float((x * overlap).sum() / (1 - level))


@pytest.mark.parametrize("n", [1, 7, 20, 101, 1000])
@pytest.mark.parametrize("level", [0.0, 0.9, 0.95, 0.99])
def test_cvar_matches_the_quantile_integral(n, level):
    rng = np.random.default_rng(n)
    x = np.round(rng.standard_cauchy(n), 1)   # heavy tail, ties
    assert metrics.cvar(x, level) == pytest.approx(cvar_by_quantile_integral(x, level), rel=1e-12, abs=1e-12)


def test_cvar_known_values_and_bad_level():
    assert metrics.cvar(np.arange(100.0), 0.95) == pytest.approx(97.0)
    assert metrics.cvar([0.0] * 29 + [100.0], 0.95) == pytest.approx(100 / 1.5)   # k = 1.5: atom split
    assert metrics.cvar([5.0, 1.0], 0.0) == pytest.approx(3.0)                     # level 0: the mean
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="level"):
            metrics.cvar([1.0], bad)


def test_point_metrics_match_numpy_and_omit_what_was_not_given():
    rng = np.random.default_rng(0)
    cost, reward, kl = rng.exponential(size=50), rng.normal(size=50), rng.random(50)
    m = metrics.point_metrics(cost, reward, kl, threshold=1.5)
    assert m["cost_mean"] == pytest.approx(np.sum(cost) / 50)
    assert m["reward_mean"] == pytest.approx(np.sum(reward) / 50)
    assert m["kl_to_reference"] == pytest.approx(np.sum(kl) / 50)
    assert m["catastrophic_rate"] == pytest.approx(sum(c >= 1.5 for c in cost) / 50)
    for a in (90, 95, 99):
        assert m[f"cost_cvar{a}"] == pytest.approx(cvar_by_quantile_integral(cost, a / 100))
    assert set(metrics.point_metrics(cost)) == {"cost_mean", "cost_cvar90", "cost_cvar95", "cost_cvar99"}
    assert metrics.catastrophic_rate([1.0, 2.0, 3.0], 2.0) == pytest.approx(2 / 3)   # >= counts


def test_bootstrap_resamples_whole_prompts():
    """Recomputed with the same draws but other formulas: per-prompt means for the means, the
    quantile integral for the CVaRs."""
    rng = np.random.default_rng(1)
    P, K = 9, 5
    per_prompt = {"cost": rng.exponential(size=(P, K)) * rng.integers(1, 10, (P, 1)), "reward": rng.normal(size=(P, K))}
    ci = metrics.bootstrap_ci(per_prompt, threshold=3.0, seed=7, resamples=200)
    draws = np.random.default_rng(7)
    got = {k: [] for k in ("cost_mean", "reward_mean", "cost_cvar95", "catastrophic_rate")}
    for _ in range(200):
        rows = draws.integers(0, P, P)
        got["cost_mean"].append(per_prompt["cost"].mean(1)[rows].mean())
        got["reward_mean"].append(per_prompt["reward"].mean(1)[rows].mean())
        got["cost_cvar95"].append(cvar_by_quantile_integral(per_prompt["cost"][rows].ravel(), 0.95))
        got["catastrophic_rate"].append((per_prompt["cost"] >= 3.0).mean(1)[rows].mean())
    for name, values in got.items():
        assert ci[name] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)]), name
    assert set(ci) == {"reward_mean", "cost_mean", "cost_cvar90", "cost_cvar95", "cost_cvar99", "catastrophic_rate"}
    # Identical prompts: nothing to resample, the interval is the point.
    same = metrics.bootstrap_ci({"cost": np.tile([1.0, 4.0], (6, 1))}, None, seed=0, resamples=50)
    assert same["cost_mean"] == pytest.approx([2.5, 2.5])


def test_per_row_draws_follow_the_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 20000
    draws = sampling.per_row_draw([sampling.row_seed(0, i, 0) for i in range(n)])(probs.expand(n, 5))
    freq = torch.bincount(draws, minlength=5).double() / n
    sd = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert torch.all((freq - probs.double()).abs() <= 5 * sd + 1e-12), freq
    assert freq[1] == 0


def test_row_seeds_differ_and_draws_repeat():
    seeds = {sampling.row_seed(s, p, k) for s in range(3) for p in range(20) for k in range(20)}
    assert len(seeds) == 1200
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), -1)
    row = [sampling.row_seed(0, i, 1) for i in range(4)]
    first = sampling.per_row_draw(row)
    again = sampling.per_row_draw(row)
    assert torch.equal(first(probs), again(probs)) and torch.equal(first(probs), again(probs))


def test_temperature_and_top_p_against_numpy():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    for temperature, top_p in ((0.7, 1.0), (1.0, 0.8), (1.5, 0.5), (1.0, 1e-6)):
        got = sampling.next_token_probs(logits, temperature, top_p).double().numpy()
        for row, want_row in zip(got, logits.numpy()):
            p = np.exp(want_row / temperature - (want_row / temperature).max())
            p /= p.sum()
            order = np.argsort(-p)
            keep = np.zeros_like(p, bool)
            mass = 0.0
            for i in order:           # the most likely tokens until their mass reaches top_p
                keep[i] = True
                mass += p[i]
                if mass >= top_p:
                    break
            want = np.where(keep, p, 0) / p[keep].sum()
            np.testing.assert_allclose(row, want, atol=1e-6)
