"""`rsa bench`: the loss kernels against the baselines; results.json, report.md, time.png, memory.png."""
from __future__ import annotations

import argparse

MODES = ("tiny", "quick", "full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/bench", help="output folder (default: out/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid (under 3 minutes on a 2-core CPU)")
    parser.add_argument("--grid", choices=MODES, default=None,
                        help="grid by name: tiny (the tests' smoke run), quick (= --quick) or full (default)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:K'")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to measure (default: all available for the device)")


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    import rsa_kernels
    from rsa.bench.collect import run_bench
    from rsa.bench.grid import backends_for
    from rsa.bench.plots import write_plots
    from rsa.bench.report import render

    if args.quick and args.grid not in (None, "quick"):
        raise ValueError(f"--quick and --grid {args.grid} contradict each other")
    mode = "quick" if args.quick else (args.grid or "full")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:K]', got {device!r}")
    usable = backends_for(device, rsa_kernels.available_backends())
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in usable]
        if bad:
            raise ValueError(f"--backends: {bad} not available for {device} here (available: {usable})")
    else:
        backends = usable
    out = Path(args.out)
    started = time.time()
    print(f"rsa bench: grid {mode} on {device}, backends {backends}, writing {out}/")
    results = run_bench(out, mode, device, backends)
    (out / "report.md").write_text(render(results))
    write_plots(results, out)
    failed = [m["id"] for m in results["measurements"] if m.get("errors")]
    print(f"\n{out}/results.json, report.md, time.png, memory.png written in {time.time() - started:.0f} s "
          f"({len(results['measurements'])} cases on {results['machine']['device_name']})")
    if failed:
        print(f"{len(failed)} case(s) not fully measured, listed at the end of report.md: {failed[:5]}...")
        return 1
    return 0
