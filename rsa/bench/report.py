"""report.md from results.json: times and peak memory as ratios against the baselines
(the tables themselves: tables.py), fitted exponents, the README section (readme.py)."""
from __future__ import annotations

from collections import defaultdict

from .fit import fit_exponents
from .grid import BASELINES
from .readme import readme_tables
from .step_report import render_section
from .tables import (MiB, SECTIONS, fmt_ratio, impl_order, memory_floor, peak, ratio_table, summary_sections,
                     total_time)

BASELINE_TEXT = (
    "Baselines, measured in the same run on the same inputs (rsa/bench/baselines.py): plain = the published "
    "Ra-DPO formulation in plain PyTorch (log_softmax, softmax, their products over full (N, V) tensors, "
    "torch.quantile; autograd), on the fused path after materialising both models' logits; compiled = the same "
    "under torch.compile (compilation in the warm-up, not timed); liger = LigerFusedLinearDPOLoss (dpo only).")


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
                parts = [f"{b} / this: time {fmt_ratio(total_time(r), total_time(m))}, memory "
                         f"{fmt_ratio(peak(r), peak(m), floor)}" for b, r in refs]
                out.append(f"- {path}{'/' + obj if obj else ''}, {impl}, {risk}, {size}: " + "; ".join(parts))
    return out


def _headline_rounds(results: dict) -> str:
    rounds = results.get("headline_rounds")
    if not rounds:
        return ""
    return f" ({rounds['baseline']} for the baselines, {rounds['kernel']} for the kernels at the headline point)"


def render(results: dict) -> str:
    mach = results["machine"]
    rows = results["measurements"]
    v = mach["versions"]
    if not rows:  # `rsa bench --train-only` with no kernel figures yet
        return "\n".join([f"# rsa bench: {mach['device_name']}", "",
                          f"Measured {results['date']}; torch {v.get('torch')}, trl {v.get('trl')}, liger-kernel "
                          f"{v.get('liger-kernel')}, transformers {v.get('transformers')}; commit "
                          f"{str(mach.get('git_commit'))[:10]}. No loss-kernel figures in this run.",
                          *render_section(results)]) + "\n"
    lines = [
        f"# rsa bench: {mach['device_name']}",
        "",
        f"Measured {results['date']} on **{mach['device_name']}** (device `{results['device']}`, "
        f"{mach['cpu_count']} CPU cores, {mach['torch_threads']} torch threads), grid `{results['mode']}`, "
        f"dtype {results['dtype']}; torch {v.get('torch')}, rsa-kernels {v.get('rsa-kernels')}, "
        f"liger-kernel {v.get('liger-kernel')}, triton {v.get('triton')}; commit {str(mach.get('git_commit'))[:10]}.",
        "",
        f"Time: median over {results['rounds']} timed rounds{_headline_rounds(results)} after "
        f"{results['warmup_rounds']} warm-up round(s) (bench/test_bench_grid.py: each round one step, its backward "
        "timed by pytest-benchmark, its forward in the round's setup), forward + backward. Peak memory: "
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
        *render_section(results),
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

