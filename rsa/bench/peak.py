"""`python -m rsa.bench.peak OUT.json [CASE_ID ...]`: peak memory of the grid's cases.

The grid comes from the environment (rsa.bench.grid.ENV_*), as in the pytest-benchmark
run; with case ids given, only those. Writes {case id: {"peak_bytes", "input_bytes", "grad_bytes"} or {"error"}}.
Each implementation runs one untimed step before its first measured case, so one-time
set-up (thread pools, compiled kernels, lazy imports) is not counted as the step's memory.
"""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out, only = argv[0], set(argv[1:])
    import torch

    from .grid import BASELINES, grid_from_env
    from .measure import can_reset_rss_peak, peak_step_bytes
    from .workloads import Workload

    cases, _, _ = grid_from_env()
    if only:
        cases = [c for c in cases if c.id in only]
    resettable = cases[0].device.startswith("cuda") or can_reset_rss_peak() if cases else True
    warmed, result = set(), {}
    for case in cases:
        try:
            work = Workload(case)
            if case.group not in warmed:
                work.forward().backward()
                warmed.add(case.group)
            # on a CPU the larger of two steps: a resident-set reading has once (1 case in 87,
            # not reproducible) come out as if the step's temporaries had not been counted. A
            # baseline is read once: such a reading would only understate the baseline, and
            # its steps are the slow ones (up to 3 s at the headline point)
            twice = resettable and not case.device.startswith("cuda") and case.impl not in BASELINES
            repeats = 2 if twice else 1
            peak = max(peak_step_bytes(work, resettable) for _ in range(repeats))
            result[case.id] = {"peak_bytes": peak, "input_bytes": work.input_bytes(), "grad_bytes": work.grad_bytes()}
            del work
        except Exception as err:  # one failing case (e.g. out of memory) must not lose the rest
            result[case.id] = {"error": f"{type(err).__name__}: {err}"[:500]}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"resettable": resettable, "peak_bytes": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
