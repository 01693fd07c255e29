"""report.md from results.json: times and peak memory as ratios against the baselines.

Ratios read "x times better than the baseline": baseline time / this time, baseline
memory / this memory, so 2.0x means half the time (or memory) of the baseline.
"""
from __future__ import annotations

from collections import defaultdict

from .fit import fit_exponents
from .grid import BASELINES

MiB = 2 ** 20
SECTIONS = (  # (path, objective, title, baselines the ratios refer to)
    ("token_stats", "", "Token statistics from logits (N, V)", ("plain", "compiled")),
    ("fused_linear", "rsa2", "Fused linear, objective rsa2: hidden (N, H) and lm head (V, H)", ("plain", "compiled")),
    ("fused_linear", "dpo", "Fused linear, objective dpo (risk kl): against Liger Kernel", ("plain", "compiled", "liger")),
)
BASELINE_TEXT = (
    "Baselines, measured in the same run on the same inputs (rsa/bench/baselines.py): plain = the published "
    "Ra-DPO formulation in plain PyTorch (log_softmax, softmax, their products over full (N, V) tensors, "
    "torch.quantile; autograd), on the fused path after materialising both models' logits; compiled = the same "
    "under torch.compile (compilation in the warm-up, not timed); liger = LigerFusedLinearDPOLoss (dpo only).")


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


def _fmt_ratio(base, this, floor: float = 0.0) -> str:
    if base is None or this is None or base <= 0 or (this <= 0 and floor <= 0):
        return "n/a"
    if this < floor:  # only a lower bound, and none when the baseline is as small
        return f">{base / floor:.0f}x" if base >= 2 * floor else "n/a"
    return f"{base / this:.2f}x"


def _fmt_value(val: float, unit: str) -> str:
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
            text = f"<{floor / scale:.2g} {unit}" if x < floor else _fmt_value(x / scale, unit)
            if impl not in bases:
                refs = [(b, cell.get((risk, n, v, h, b))) for b in bases]
                ratios = [f"{_fmt_ratio(value(r), x, floor)} {b}" for b, r in refs if r and value(r) is not None]
                if ratios:
                    text += " (" + ", ".join(ratios) + ")"
            cols.append(text)
        lines.append(f"| {risk} | {n} | {v} |" + (f" {h} |" if fused else "") + "".join(f" {c} |" for c in cols))
    return lines


def exponent_table(rows: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for m in rows:
        groups[(m["path"], m["objective"], m["impl"], m["risk"])].append(m)
    lines = ["| path | objective | implementation | risk | time ~ N^a | V^b | H^c | peak memory ~ N^a | V^b | H^c |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (path, obj, impl, risk), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                              impl_order([kv[0][2]]), kv[0][3])):
        sizes = [{"n": m["n"], "v": m["v"], "h": m["h"] or 1} for m in ms]
        ft = fit_exponents(list(zip(sizes, [total_time(m) for m in ms])))
        floor = memory_floor(rows)
        fm = fit_exponents(list(zip(sizes, [None if (peak(m) or 0) < floor else peak(m) for m in ms])))
        if ft is None and fm is None:  # measured at one size only (the quick grid's centre)
            continue

        def e(f, d):
            return f"{f[d]:.2f}" if f and d in f else "-"
        lines.append(f"| {path} | {obj or '-'} | {impl} | {risk} | {e(ft, 'n')} | {e(ft, 'v')} | {e(ft, 'h')} "
                     f"| {e(fm, 'n')} | {e(fm, 'v')} | {e(fm, 'h')} |")
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


def headline(rows: list[dict]) -> list[str]:
    """At each section's summary point: every kernel's ratios to every baseline measured there."""
    out = []
    floor = memory_floor(rows)
    for path, obj, _title, bases, _point, pts in summary_sections(rows):
        by = {(m["impl"], m["risk"]): m for m in pts}
        for impl in impl_order({m["impl"] for m in pts}):
            if impl in BASELINES:
                continue
            for risk in sorted({m["risk"] for m in pts}):
                m = by.get((impl, risk))
                refs = [(b, by.get((b, risk))) for b in bases if by.get((b, risk))]
                if not m or not refs:
                    continue
                size = f"N={m['n']}, V={m['v']}" + (f", H={m['h']}" if m["h"] else "")
                parts = [f"{b} / this: time {_fmt_ratio(total_time(r), total_time(m))}, memory "
                         f"{_fmt_ratio(peak(r), peak(m), floor)}" for b, r in refs]
                out.append(f"- {path}{'/' + obj if obj else ''}, {impl}, {risk}, {size}: " + "; ".join(parts))
    return out


def memory_floor(rows: list[dict]) -> float:
    return 0.0 if any(m["device"].startswith("cuda") for m in rows) else MEMORY_FLOOR


def render(results: dict) -> str:
    from .readme import readme_tables  # (it builds on this module's tables)

    mach = results["machine"]
    rows = results["measurements"]
    v = mach["versions"]
    lines = [
        f"# rsa bench: {mach['device_name']}",
        "",
        f"Measured {results['date']} on **{mach['device_name']}** (device `{results['device']}`, "
        f"{mach['cpu_count']} CPU cores, {mach['torch_threads']} torch threads), grid `{results['mode']}`, "
        f"dtype {results['dtype']}; torch {v.get('torch')}, rsa-kernels {v.get('rsa-kernels')}, "
        f"liger-kernel {v.get('liger-kernel')}, triton {v.get('triton')}; commit {str(mach.get('git_commit'))[:10]}.",
        "",
        f"Time: median over {results['rounds']} timed rounds after {results['warmup_rounds']} warm-up round(s) "
        "(pytest-benchmark, bench/test_bench_grid.py), forward + backward. Peak memory: "
        + ("CUDA allocator peak" if results["device"].startswith("cuda") else "peak resident set (VmHWM) of a "
           "subprocess") + " during one forward + backward above what was held before it (the inputs), the "
        "gradients it returns included. "
        "Ratios are baseline / this (2.00x = half the baseline's time or memory), each naming its baseline. "
        + BASELINE_TEXT,
        "",
        "## Summary where both baselines were measured",
        "",
        *headline(rows),
        "",
        *readme_tables(results),
    ]
    for path, obj, title, bases in SECTIONS:
        sec = [m for m in rows if m["path"] == path and m["objective"] == obj]
        if not sec:
            continue
        lines += ["", f"## {title}", "", "Forward + backward time:", "",
                  *ratio_table(sec, total_time, "ms", 1e-3, bases), "",
                  "Peak memory above the inputs (gradients included):", "",
                  *ratio_table(sec, peak, "MiB", MiB, bases, memory_floor(rows))]
    lines += ["", "## How cost grows: fitted exponents", "",
              "Least squares of log(cost) on log N, log V (and log H) over the grid points of each row "
              "(forward + backward time; peak memory). '-' where a size was not varied, or the memory "
              "stayed below the measurable floor.", "",
              *exponent_table(rows)]
    lines += ["", "## Forward and backward separately", "",
              "| case | forward ms | backward ms | peak MiB | of which gradients MiB | inputs MiB |",
              "|---|---|---|---|---|---|"]
    for m in rows:
        f = f"{m['forward']['median_s'] * 1e3:.3g}" if m.get("forward") else "-"
        b = f"{m['backward']['median_s'] * 1e3:.3g}" if m.get("backward") else "-"
        p = f"{m['peak_bytes'] / MiB:.3g}" if m.get("peak_bytes") is not None else "-"
        g = f"{m['grad_bytes'] / MiB:.3g}" if m.get("grad_bytes") is not None else "-"
        i = f"{m['input_bytes'] / MiB:.3g}" if m.get("input_bytes") is not None else "-"
        lines.append(f"| {m['id']} | {f} | {b} | {p} | {g} | {i} |")
    errors = [(m["id"], e) for m in rows for e in m.get("errors", [])]
    if errors:
        lines += ["", "## Not measured", ""] + [f"- {cid}: {e}" for cid, e in errors]
    return "\n".join(lines) + "\n"

