"""The report's tables: time and peak memory per implementation, as ratios against the baselines.

Ratios read "x times better than the baseline": baseline time / this time, baseline
memory / this memory, so 2.0x means half the time (or memory) of the baseline. Shared by
report.md (report.py), its section for the README (readme.py) and the plots (plots.py).
"""
from __future__ import annotations

from .grid import BASELINES

MiB = 2 ** 20
SECTIONS = (  # (path, objective, title, baselines the ratios refer to)
    ("token_stats", "", "Token statistics from logits (N, V)", ("plain", "compiled")),
    ("fused_linear", "rsa2", "Fused linear, objective rsa2: hidden (N, H) and lm head (V, H)", ("plain", "compiled")),
    ("fused_linear", "dpo", "Fused linear, objective dpo (risk kl): against Liger Kernel", ("plain", "compiled", "liger")),
)


def total_time(m: dict):
    if m.get("forward") and m.get("backward"):
        return m["forward"]["median_s"] + m["backward"]["median_s"]
    return None


def peak(m: dict):
    """The step's peak above its inputs, the gradients it returns included.

    Not less the gradients: the plain path allocates the weight's gradient after its own
    peak has passed, so subtracting it would understate the baseline (and fit a negative
    exponent in H). results.json keeps grad_bytes for anyone who wants the difference."""
    return m.get("peak_bytes")


def impl_order(impls) -> list[str]:
    kernels = [i for i in ("triton", "cpu", "torch") if i in impls]
    return kernels + [b for b in BASELINES if b in impls] + sorted(set(impls) - set(kernels) - set(BASELINES))


# Resident-set figures move in 4 KiB pages: below this floor a peak reads as "about nothing",
# and a ratio against it only as a lower bound
MEMORY_FLOOR = 64 * 1024


def fmt_ratio(base, this, floor: float = 0.0) -> str:
    if base is None or this is None or base <= 0 or (this <= 0 and floor <= 0):
        return "n/a"
    if this < floor:  # only a lower bound, and none when the baseline is as small
        return f">{base / floor:.0f}x" if base >= 2 * floor else "n/a"
    return f"{base / this:.2f}x"


def fmt_value(val: float, unit: str) -> str:
    """3 significant digits, without exponents: seconds past 1000 ms, whole MiB past 1000."""
    if val >= 1000:
        return f"{val / 1000:.3g} s" if unit == "ms" else f"{val:.0f} {unit}"
    return f"{val:.3g} {unit}"


def _size(m: dict) -> str:
    return f"{m['n']} | {m['v']}" + (f" | {m['h']}" if m["h"] else "")


def ratio_table(rows: list[dict], value, unit: str, scale: float, baselines, floor: float = 0.0) -> list[str]:
    """Rows: (risk, sizes); a column per implementation: value (ratio vs each baseline)."""
    impls = impl_order({m["impl"] for m in rows})
    bases = [b for b in baselines if b in impls]
    cell = {(m["risk"], m["n"], m["v"], m["h"], m["impl"]): m for m in rows}
    keys = sorted({(m["risk"], m["n"], m["v"], m["h"]) for m in rows}, key=lambda k: (k[0], k[1] * k[2] * max(k[3], 1), k))
    fused = any(m["h"] for m in rows)
    head = "| risk | N | V |" + (" H |" if fused else "") + "".join(f" {i} |" for i in impls)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for risk, n, v, h in keys:
        cols = []
        for impl in impls:
            m = cell.get((risk, n, v, h, impl))
            x = value(m) if m else None
            if x is None:
                cols.append("failed" if m else "")
                continue
            text = f"<{floor / scale:.2g} {unit}" if x < floor else fmt_value(x / scale, unit)
            if impl not in bases:
                refs = [(b, cell.get((risk, n, v, h, b))) for b in bases]
                ratios = [f"{fmt_ratio(value(r), x, floor)} {b}" for b, r in refs if r and value(r) is not None]
                if ratios:
                    text += " (" + ", ".join(ratios) + ")"
            cols.append(text)
        lines.append(f"| {risk} | {n} | {v} |" + (f" {h} |" if fused else "") + "".join(f" {c} |" for c in cols))
    return lines


def summary_point(sec: list[dict]) -> tuple:
    """(N, V, H) a section is summarised at: where the compiled baseline was measured (the
    headline point, or the centre), else the largest point."""
    comp = [m for m in sec if m["impl"] == "compiled"]
    big = max(comp or sec, key=lambda m: (m["n"] * m["v"] * max(m["h"], 1), m["v"]))
    return big["n"], big["v"], big["h"]


def summary_sections(rows: list[dict]):
    """(path, objective, title, baselines, (N, V, H), the measurements there) of each measured section."""
    for path, obj, title, bases in SECTIONS:
        sec = [m for m in rows if m["path"] == path and m["objective"] == obj]
        if sec:
            point = summary_point(sec)
            yield path, obj, title, bases, point, [m for m in sec if (m["n"], m["v"], m["h"]) == point]


def memory_floor(rows: list[dict]) -> float:
    return 0.0 if any(m["device"].startswith("cuda") for m in rows) else MEMORY_FLOOR
