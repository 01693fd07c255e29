"""Exponents of cost against size: least squares of log(cost) on log N, log V (and log H).

Each size that takes only one value in a group's points is left out of the fit (it has
no exponent there). Costs that are not positive (a memory delta of 0 at tiny sizes) are
left out rather than clipped.
"""
from __future__ import annotations

import math

import numpy as np

DIMS = ("n", "v", "h")


def fit_exponents(points: list[tuple[dict, float]]) -> dict | None:
    """{"n": a, "v": b[, "h": c], "r2": ...} for cost ~ N^a V^b H^c, or None if too few points.

    ``points``: (sizes {"n", "v", "h"}, cost) pairs.
    """
    pts = [(s, c) for s, c in points if c is not None and c > 0 and math.isfinite(c)]
    dims = [d for d in DIMS if len({s[d] for s, _ in pts}) > 1]
    if not dims or len(pts) < len(dims) + 1:
        return None
    x = np.array([[1.0] + [math.log(s[d]) for d in dims] for s, _ in pts])
    y = np.array([math.log(c) for _, c in pts])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    total = float(((y - y.mean()) ** 2).sum())
    out = {d: float(a) for d, a in zip(dims, coef[1:])}
    out["r2"] = 1.0 - float((resid ** 2).sum()) / total if total > 0 else 1.0
    return out
