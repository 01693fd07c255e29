"""Frontiers and the comparison of two of them at matched helpfulness (or matched KL).

A frontier is one method's models along one knob (the safety step's beta / lambda, or the
merge weight); in one seed each model is a point (x, y), x the reward (or the KL to the SFT
model) and y a tail metric (cost CVaR95, catastrophic rate). The frontier's curve is the
piecewise-linear interpolation through its points in order of x, whatever order the knob
puts them in (a frontier need not be monotone); points with the same x are averaged into one.

Two curves are compared only over the x both reach, [max of the lows, min of the highs]: the
difference a - b is piecewise linear there, so its exact mean over that interval (the
trapezoid rule on the union of both curves' nodes) and its extremes (at the nodes) are
computed without a grid. Curves that do not reach a common x are not compared at all:
nothing is extrapolated. A single point is a curve defined at one x only.
"""
from __future__ import annotations

import numpy as np

from . import stats
from .protocol import COMPARISONS

# The per-seed result of comparing curve a with curve b over their common x.
A_LOWER, B_LOWER, EQUAL, CROSSING = "a lower", "b lower", "equal", "crossing"


def curve(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """The nodes (x ascending, unique; y averaged over equal x) of the curve through the points."""
    x, y = np.asarray(xs, float).ravel(), np.asarray(ys, float).ravel()
    if x.size == 0:
        raise ValueError("xs: a frontier needs at least one point")
    if x.shape != y.shape:
        raise ValueError(f"ys: {y.size} values for {x.size} xs")
    for name, v in (("xs", x), ("ys", y)):
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name}: values must be finite, got {v.tolist()}")
    ux, inverse = np.unique(x, return_inverse=True)
    uy = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return ux, uy


def compare(a, b) -> dict | None:
    """Curve a against curve b (each given as (xs, ys)) over the x both reach; None if none.

    Returns {"range": [lo, hi], "mean_diff": mean of a - b over [lo, hi] (its value there when
    lo == hi), "min_diff", "max_diff", "dominance"}, dominance being "a lower" (a is nowhere
    above b and somewhere below), "b lower", "equal" or "crossing" (each is lower somewhere).
    """
    ax, ay = curve(*a)
    bx, by = curve(*b)
    lo, hi = max(ax[0], bx[0]), min(ax[-1], bx[-1])
    if lo > hi:
        return None
    inside = lambda x: x[(x >= lo) & (x <= hi)]
    nodes = np.unique(np.concatenate([[lo, hi], inside(ax), inside(bx)]))
    d = np.interp(nodes, ax, ay) - np.interp(nodes, bx, by)
    if hi > lo:
        mean = float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(nodes)) / (hi - lo))
    else:
        mean = float(d[0])
    lowest, highest = float(d.min()), float(d.max())
    if lowest == highest == 0:
        dominance = EQUAL
    elif highest <= 0:
        dominance = A_LOWER
    elif lowest >= 0:
        dominance = B_LOWER
    else:
        dominance = CROSSING
    return {"range": [float(lo), float(hi)], "mean_diff": mean, "min_diff": lowest, "max_diff": highest,
            "dominance": dominance}


def over_seeds(per_seed: list[dict | None], a: str = "rsa", b: str = "sacpo") -> dict:
    """Summarise one comparison (a - b) over seeds: the mean, spread and 95% t interval of the
    per-seed mean difference over the seeds where the curves overlap, and in how many seeds a is
    lower.

    ``outcome``: "no overlap" (in no seed); "<a> lower" when the interval lies below 0, "<b>
    lower" when it lies above 0; "inconclusive" otherwise, or when fewer than two seeds overlap
    (no interval).
    """
    rows = [r for r in per_seed if r is not None]
    diffs = np.array([r["mean_diff"] for r in rows], float)
    ci = stats.t_interval(diffs)
    out = {
        "seeds": len(per_seed), "overlapping_seeds": len(rows),
        "diff_mean": float(diffs.mean()) if rows else None,
        # ddof=0, as for every spread of the demo: one seed gives 0, not NaN
        "diff_std": float(diffs.std()) if rows else None,
        "ci95": ci,
        f"{a}_lower_seeds": int(np.sum(diffs < 0)), f"{b}_lower_seeds": int(np.sum(diffs > 0)),
        f"{a}_lower_everywhere_seeds": sum(r["dominance"] == A_LOWER for r in rows),
        f"{b}_lower_everywhere_seeds": sum(r["dominance"] == B_LOWER for r in rows),
        "crossing_seeds": sum(r["dominance"] == CROSSING for r in rows),
        "per_seed": [r if r is None else {**r, "dominance": _name(r["dominance"], a, b)} for r in per_seed],
    }
    out["outcome"] = outcome(ci, len(rows), a, b)
    return out


def outcome(ci: list[float] | None, overlapping: int, a: str = "rsa", b: str = "sacpo") -> str:
    """The outcome of a difference a - b with 95% interval ``ci`` over ``overlapping`` seeds."""
    if overlapping == 0:
        return "no overlap"
    if ci is not None and ci[1] < 0:
        return f"{a} lower"
    if ci is not None and ci[0] > 0:
        return f"{b} lower"
    return "inconclusive"


def _name(dominance: str, a: str, b: str) -> str:
    return {A_LOWER: f"{a} lower", B_LOWER: f"{b} lower"}.get(dominance, dominance)


# ---------------------------------------------------------------------------- the demo's frontiers

KNOB = {"H->S": "beta_over_lambda", "DPO->S": "beta_over_lambda", "P": "merge_weight"}   # family -> its knob
METHODS = ("sacpo", "rsa")
POINT_METRICS = ("reward_mean", "cost_cvar95", "catastrophic_rate", "kl_to_sft")
NONNEGATIVE = {"cost_cvar95", "catastrophic_rate", "kl_to_sft", "cost_mean"}   # intervals clipped at 0
AXES = {"reward": "reward_mean", "kl": "kl_to_sft"}         # matched at equal reward / equal KL to SFT
TAIL_METRICS = ("cost_cvar95", "catastrophic_rate")


def seed_interval(values, metric: str) -> list[float] | None:
    """The 95% t interval of a metric's mean over seeds, clipped at 0 where the metric cannot be negative."""
    return stats.clipped(stats.t_interval(values), 0.0 if metric in NONNEGATIVE else None)


def frontiers(rows: list[dict]) -> dict:
    """report.json's "frontier": {FAMILY: [{"method", KNOB, "lr_scale" (the safety step's
    learning-rate multiple, 1 but for issue 32's stronger step), metric means over seeds, "std":
    {metric: spread over seeds}, "ci95": {metric: 95% t interval of the mean}, "seeds":
    [per-seed values]}]} in knob order, sacpo first; a family lists the methods it has.

    ``rows``: one per model and seed, with "seed", "method", "family", "setting" and the metrics.
    """
    out = {}
    for family, knob in KNOB.items():
        entries = []
        for method in METHODS:
            # a knob value at another learning rate (issue 32's stronger step) is a point of its own
            points = {}
            for r in rows:
                if r["family"] == family and r["method"] == method:
                    points.setdefault((r["setting"], r.get("lr_scale", 1.0)), []).append(r)
            for (setting, scale), mine in points.items():
                per_seed = sorted(mine, key=lambda r: r["seed"])
                entry = {"method": method, knob: setting, "lr_scale": scale}
                entry.update({m: float(np.mean([r[m] for r in per_seed])) for m in POINT_METRICS})
                entry["std"] = {m: float(np.std([r[m] for r in per_seed])) for m in POINT_METRICS}
                entry["ci95"] = {m: seed_interval([r[m] for r in per_seed], m) for m in POINT_METRICS}
                entry["seeds"] = [{"seed": r["seed"], **{m: r[m] for m in POINT_METRICS}} for r in per_seed]
                entries.append(entry)
        if entries:
            out[family] = entries
    return out


def curve_rows(rows: list[dict], family: str, method: str, seed: int, ends: dict | None = None) -> list[dict]:
    """One method's frontier models in one seed, and the models its curve runs through at its
    ends (``ends``: protocol.frontier_ends, keyed by (method, family))."""
    keys = set((ends or {}).get((method, family), ()))
    return [r for r in rows if r["seed"] == seed
            and ((r["family"] == family and r["method"] == method) or r["key"] in keys)]


def points(rows: list[dict], family: str, method: str, seed: int, x: str, y: str, ends: dict | None = None):
    """(xs, ys) of one method's frontier in one seed (its ends included, see curve_rows)."""
    mine = curve_rows(rows, family, method, seed, ends)
    return [r[x] for r in mine], [r[y] for r in mine]


def matched(rows: list[dict], seeds: int, kl_ends: dict | None = None) -> dict:
    """report.json's "matched": {"reward" | "kl": {FAMILY: {METRIC: over_seeds(...)}}}: per seed,
    RSA's curve minus SACPO's (protocol.COMPARISONS: for DPO->S, SACPO's H->S curve), over the
    reward (or KL to SFT) both reach. On the KL axis each curve also runs through its ends
    (``kl_ends``: protocol.frontier_ends): at equal drift, the drift of a step that has not run
    yet (its start) is part of what a method offers; the reward axis keeps issue 19's curves."""
    out = {}
    for axis, x in AXES.items():
        ends = kl_ends if axis == "kl" else None
        out[axis] = {}
        for family, (rsa, sacpo) in COMPARISONS.items():
            out[axis][family] = {}
            for y in TAIL_METRICS:
                per_seed = []
                for seed in range(seeds):
                    a = points(rows, rsa[1], rsa[0], seed, x, y, ends)
                    b = points(rows, sacpo[1], sacpo[0], seed, x, y, ends)
                    per_seed.append(compare(a, b) if a[0] and b[0] else None)
                out[axis][family][y] = over_seeds(per_seed, "rsa", "sacpo")
    return out
