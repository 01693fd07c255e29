"""`rsa bench`: the loss kernels against the plain-PyTorch and torch.compile baselines; results.json, report.md,
time.png, memory.png. With --train (or --train-only) also one whole training step against TRL's DPOTrainer: step.png."""
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
    parser.add_argument("--train", action="store_true",
                        help="also measure one whole training step: TRL's DPOTrainer, TRL with Liger's loss, "
                             "RSADPOTrainer (dpo, rsa2), `rsa train` and the plain formulation, at V=32000 and "
                             "128256 (quick: V=32000, a smaller model); see docs/bench.md")
    parser.add_argument("--train-only", action="store_true",
                        help="measure only the training step, keeping the loss kernels' figures already in "
                             "OUT/results.json in the report")


def choose_threads(value: str, device: str) -> int:
    import os

    if value != "auto":
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"--threads must be 'auto' or a positive integer, got {value!r}")
        return threads
    import torch

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


def _check_plain_arguments(args) -> None:
    """The checks that need no torch, before it is imported: a mistake answers at once."""
    if args.quick and args.grid not in (None, "quick"):
        raise ValueError(f"--quick and --grid {args.grid} contradict each other")
    if args.device != "auto" and args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda[:K]', got {args.device!r}")
    if args.threads != "auto":
        choose_threads(args.threads, "cpu")


def run(args) -> int:
    import json
    import time
    from pathlib import Path

    _check_plain_arguments(args)
    import torch

    import rsa_kernels
    from rsa.bench.collect import run_bench
    from rsa.bench.grid import backends_for

    if args.render_only:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        _write_report(results, out)
        print(f"{out}/report.md and the plots rewritten from {out}/results.json")
        return 0
    import importlib.util

    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if args.train_only:
        missing = []  # the training step does not run the pytest-benchmark suite
    if args.train or args.train_only:
        missing += [m for m in ("trl",) if importlib.util.find_spec(m) is None]
    if missing:  # the suite under bench/ is the source of the numbers
        from rsa.errors import UserError
        raise UserError(f"rsa bench needs {' and '.join(missing)} (pip install pytest pytest-benchmark "
                        "trl, or the test and trl extras)")
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
    grid = "--quick" if mode == "quick" else f"--grid {mode}"
    command = (f"rsa bench {grid} --device {args.device} --threads {args.threads}"
               + (f" --backends {args.backends}" if args.backends else "") + f" --out {args.out}")
    if args.train_only:
        results = _previous_or_new(out, device, mode, threads, command)
    else:
        print(f"rsa bench: grid {mode} on {device}, backends {backends}, "
              f"{threads} torch thread(s), writing {out}/")
        results = run_bench(out, mode, device, backends, threads=threads, command=command)
    train_failed = False
    if args.train or args.train_only:
        from rsa.bench.step_collect import run_train_step

        flag = "--train-only" if args.train_only else "--train"
        results["train_step"] = run_train_step(out, mode, device, threads, command=f"{command} {flag}")
        (out / "results.json").write_text(json.dumps(results, indent=1))
        train_failed = any("error" in r for r in results["train_step"]["runs"])
    if not _write_report(results, out):
        return 1
    failed = [m["id"] for m in results["measurements"] if m.get("errors")]
    print(f"\n{out}/results.json, report.md and the plots written in {time.time() - started:.0f} s "
          f"({len(results['measurements'])} cases on {results['machine']['device_name']})")
    if failed:
        print(f"{len(failed)} case(s) not fully measured, listed at the end of report.md: {failed[:5]}...")
    if train_failed:
        print("some training-step runs failed: see the report's training-step section and step.log")
    return 1 if failed or train_failed else 0


def _previous_or_new(out, device: str, mode: str, threads: int, command: str) -> dict:
    """OUT/results.json's kernel figures (kept in the report), or a new record with none."""
    import json
    import time

    from rsa.bench.collect import machine_info

    path = out / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    return {"machine": {**machine_info(device), "torch_threads": threads}, "device": device, "mode": mode,
            "command": command, "dtype": None, "measurements": [], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _write_report(results: dict, out) -> bool:
    from rsa.bench.plots import write_plots  # matplotlib itself is imported only when plotting
    from rsa.bench.report import render
    from rsa.bench.step_report import write_plot

    (out / "report.md").write_text(render(results))
    try:
        if results["measurements"]:
            write_plots(results, out)
        write_plot(results, out / "step.png")
    except ImportError as err:  # a bare GPU image may lack matplotlib: keep the numbers
        print(f"warning: no plots ({err}); install matplotlib (the train extra)")
        return False
    return True
