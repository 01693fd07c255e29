"""Run the benchmark suite and the memory subprocess, and merge them into results.json.

Times: ``pytest bench/test_bench_grid.py --benchmark-json`` in a subprocess (the suite is
the source of the numbers). Peak memory on a CPU: ``python -m rsa.bench.peak`` in another,
so the resident-set figures are not inflated by pytest or by the timing runs; on CUDA the
suite records the allocator's peak itself.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .grid import (ENV_BACKENDS, ENV_COMPILED, ENV_DEVICE, ENV_LIGER, ENV_MODE, ENV_THREADS, QUICK_HEADLINE_ROUNDS,
                   centres, device_kind, headline, liger_available, make_grid)
from .measure import MALLOC_ENV, can_reset_rss_peak

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "bench" / "test_bench_grid.py"


def _version(dist: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(device: str) -> dict:
    import torch

    info = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total(), "git_commit": _git_commit(),
        "versions": {d: _version(d) for d in ("torch", "rsa-kernels", "numpy", "triton", "liger-kernel",
                                              "pytest-benchmark", "matplotlib", "trl", "transformers")},
    }
    if device_kind(device) == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["device_name"] = props.name
        info["cuda"] = {"version": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
                        "memory_bytes": props.total_memory}
    else:
        info["device_name"] = f"CPU: {info['cpu']} ({os.cpu_count()} cores)"
    return info


def _run(cmd, env, log_path: Path, log) -> int:
    log(f"$ {' '.join(cmd)}   (log: {log_path})")
    with open(log_path, "a") as f:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def run_times(out: Path, env: dict, log) -> list[dict]:
    """The suite's pytest-benchmark records (the raw JSON is kept as out/pytest-benchmark.json)."""
    if not SUITE.exists():
        raise FileNotFoundError(f"{SUITE} not found: `rsa bench` runs from a checkout of rsa-kernels "
                                "(pip install -e .), where bench/ lives")
    raw = out / "pytest-benchmark.json"
    raw.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--benchmark-json={raw}", "--benchmark-columns=median,min,rounds", "--benchmark-sort=name"]
    rc = _run(cmd, env, out / "pytest.log", log)
    if not raw.exists():
        raise RuntimeError(f"the benchmark suite wrote no results (exit {rc}); see {out / 'pytest.log'}")
    if rc != 0:
        log(f"warning: some benchmark cases failed (pytest exit {rc}); see {out / 'pytest.log'}")
    return json.loads(raw.read_text())["benchmarks"]


def cuda_memory(benchmarks: list[dict]) -> dict:
    """On CUDA the suite's tests record the allocator's peak themselves."""
    out = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "peak_bytes" in info:
            out[info["case_id"]] = {k: info[k] for k in ("peak_bytes", "input_bytes", "grad_bytes")}
    return out


def run_memory(out: Path, env: dict, device: str, case_ids: list[str], log) -> dict:
    """{case id: {"peak_bytes", "input_bytes", "grad_bytes"} or {"error"}} from the memory subprocess(es)."""
    path = out / "memory.json"
    cmd = [sys.executable, "-m", "rsa.bench.peak", str(path)]
    if device_kind(device) == "cuda" or can_reset_rss_peak():
        _run(cmd, {**env, **MALLOC_ENV}, out / "memory.log", log)
        return json.loads(path.read_text())["peak_bytes"] if path.exists() else {}
    merged = {}  # no way to reset the peak here: a fresh process per case
    for cid in case_ids:
        _run(cmd + [cid], {**env, **MALLOC_ENV}, out / "memory.log", log)
        if path.exists():
            merged.update(json.loads(path.read_text())["peak_bytes"])
    return merged


def _stats(data: list) -> dict | None:
    """The forward's times (timed in the rounds' setups) summarised as pytest-benchmark does."""
    if not data:
        return None
    return {"median_s": statistics.median(data), "min_s": min(data), "max_s": max(data), "rounds": len(data),
            "data_s": list(data)}


def _bench_stats(bench: dict) -> dict:
    s = bench["stats"]
    return {"median_s": s["median"], "min_s": s["min"], "max_s": s["max"], "rounds": s["rounds"],
            "data_s": s.get("data")}


def merge(cases, benchmarks: list[dict], memory: dict) -> list[dict]:
    by_id: dict = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "case_id" in info:  # the backward from pytest-benchmark, the forward from the rounds' setups
            by_id[info["case_id"]] = {"forward": _stats(info.get("forward_s")),
                                      "backward": _bench_stats(b)}
    rows = []
    for c in cases:
        t = by_id.get(c.id, {})
        mem = memory.get(c.id)
        row = {"id": c.id, **c.as_dict(), "forward": t.get("forward"), "backward": t.get("backward")}
        row["peak_bytes"] = mem.get("peak_bytes") if isinstance(mem, dict) else None
        for key in ("input_bytes", "grad_bytes"):
            row[key] = mem.get(key) if isinstance(mem, dict) else None
        errors = [f"{p}: not measured (see pytest.log)" for p in ("forward", "backward") if row[p] is None]
        if isinstance(mem, dict) and "error" in mem:
            errors.append(f"memory: {mem['error']}")
        elif mem is None:
            errors.append("memory: not measured (see memory.log)")
        if errors:
            row["errors"] = errors
        rows.append(row)
    return rows


def run_bench(out: Path, mode: str, device: str, backends: list[str], threads: int | None = None,
              log=print, command: str | None = None) -> dict:
    """Measure the grid of ``mode`` on ``device``; write and return results.json's content.

    ``threads``: torch threads of the measuring processes (default: torch's, all cores).
    ``command``: the command line, recorded so the report can say how to regenerate it."""
    out = Path(out).resolve()  # the subprocesses run in the checkout, not in our working directory
    out.mkdir(parents=True, exist_ok=True)
    for name in ("pytest.log", "memory.log"):
        (out / name).unlink(missing_ok=True)
    liger = liger_available()
    env = {**os.environ, ENV_MODE: mode, ENV_DEVICE: device, ENV_BACKENDS: ",".join(backends),
           ENV_LIGER: "1" if liger else "0"}
    if threads:
        env[ENV_THREADS] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    comp = os.environ.get(ENV_COMPILED)  # (the subprocesses read the same variable)
    cases, warmup, rounds = make_grid(mode, device, backends, liger=liger,
                                      compiled=None if comp is None else comp == "1")
    started = time.time()
    benchmarks = run_times(out, env, log)
    t_mid = time.time()
    if device_kind(device) == "cuda":
        memory = cuda_memory(benchmarks)
    else:
        memory = run_memory(out, env, device, [c.id for c in cases], log)
    results = {
        "machine": {**machine_info(device), **({"torch_threads": threads} if threads else {})}, "device": device, "mode": mode, "backends": backends,
        "command": command, "dtype": cases[0].dtype if cases else None, "centres": centres(mode, device), "warmup_rounds": warmup, "rounds": rounds,
        "headline_rounds": QUICK_HEADLINE_ROUNDS if mode == "quick" and headline(mode, device) else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": {"times": round(t_mid - started, 1), "memory": round(time.time() - t_mid, 1)},
        "measurements": merge(cases, benchmarks, memory),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
