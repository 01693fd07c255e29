"""`rsa bench`: the loss kernels against the plain-PyTorch and torch.compile baselines; results.json, report.md, time.png, memory.png."""
from __future__ import annotations

import argparse

MODES = ("tiny", "quick", "full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/bench", help="output folder (default: out/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid, plus every risk at N=1024, V=32000 on a CPU (under 3 minutes on 2 idle cores)")
    parser.add_argument("--grid", choices=MODES, default=None,
                        help="grid by name: tiny (the tests' smoke run), quick (= --quick) or full (default)")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:K'")
    parser.add_argument("--threads", default="auto",
                        help="torch threads of the measuring processes: a number, or 'auto' (default): all "
                             "cores, but 1 when the load average already exceeds the cores (a shared machine, "
                             "where OpenMP threads waiting on each other would be measured, not the kernels)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite report.md and the plots from OUT/results.json")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to measure (default: all available for the device)")


def choose_threads(value: str, device: str) -> int:
    import os

    import torch

    if value != "auto":
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"--threads must be 'auto' or a positive integer, got {value!r}")
        return threads
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        busy = False
    if busy and not device.startswith("cuda"):
        print(f"rsa bench: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: measuring with 1 "
              "thread (pass --threads to override)")
        return 1
    return cores


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    import rsa_kernels
    from rsa.bench.collect import run_bench
    from rsa.bench.grid import backends_for
    from rsa.bench.plots import write_plots  # matplotlib itself is imported only when plotting
    from rsa.bench.report import render

    if args.render_only:
        import json

        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        (out / "report.md").write_text(render(results))
        write_plots(results, out)
        print(f"{out}/report.md, time.png, memory.png rewritten from {out}/results.json")
        return 0
    import importlib.util

    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:  # the suite under bench/ is the source of the numbers
        from rsa.errors import UserError
        raise UserError(f"rsa bench needs {' and '.join(missing)} (pip install pytest pytest-benchmark, "
                         "or the test extra)")
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
    threads = choose_threads(args.threads, device)
    out = Path(args.out)
    started = time.time()
    print(f"rsa bench: grid {mode} on {device}, backends {backends}, "
          f"{threads} torch thread(s), writing {out}/")
    grid = "--quick" if mode == "quick" else f"--grid {mode}"
    command = (f"rsa bench {grid} --device {args.device} --threads {args.threads}"
               + (f" --backends {args.backends}" if args.backends else "") + f" --out {args.out}")
    results = run_bench(out, mode, device, backends, threads=threads, command=command)
    (out / "report.md").write_text(render(results))
    try:
        write_plots(results, out)
    except ImportError as err:  # a bare GPU image may lack matplotlib: keep the numbers
        print(f"warning: no plots ({err}); install matplotlib (the train extra)")
        return 1
    failed = [m["id"] for m in results["measurements"] if m.get("errors")]
    print(f"\n{out}/results.json, report.md, time.png, memory.png written in {time.time() - started:.0f} s "
          f"({len(results['measurements'])} cases on {results['machine']['device_name']})")
    if failed:
        print(f"{len(failed)} case(s) not fully measured, listed at the end of report.md: {failed[:5]}...")
        return 1
    return 0
