"""The report's section for the README and docs: tables ready to paste, from one run.

The README's and docs/bench.md's speed tables are copied from here, so every figure in
them comes from one `rsa bench` run, next to the baselines measured in that run, with the
command that produced it. Regenerate with the command printed above the tables.
"""
from __future__ import annotations

from .tables import MiB, memory_floor, peak, ratio_table, summary_sections, total_time


def readme_tables(results: dict) -> list[str]:
    rows = results["measurements"]
    mach = results["machine"]
    command = results.get("command") or f"rsa bench --grid {results['mode']}"
    lines = ["## Tables for the README and docs (paste as they are)", "",
             f"`{command}` on {mach['device_name']}, {mach['torch_threads']} torch thread(s), "
             f"{results['dtype']}, {results['date']}, commit {str(mach.get('git_commit'))[:10]}. Forward + backward; "
             "each cell: the median time (or peak memory above the inputs, gradients included), and in brackets "
             "baseline / this for each baseline named (2.00x = half the baseline's).", ""]
    floor = memory_floor(rows)
    for _path, _obj, title, bases, point, pts in summary_sections(rows):
        size = f"N={point[0]}, V={point[1]}" + (f", H={point[2]}" if point[2] else "")
        lines += [f"### {title}, {size}", "", "Time:", "", *ratio_table(pts, total_time, "ms", 1e-3, bases), "",
                  "Peak memory:", "", *ratio_table(pts, peak, "MiB", MiB, bases, floor), ""]
    return lines
