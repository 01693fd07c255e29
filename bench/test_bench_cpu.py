"""Forward + backward of token_stats: the plain and compiled baselines vs the torch and cpu backends.

    .venv/bin/python -m pytest bench/test_bench_cpu.py -s        # N=1024, V=32000, float32

Time with pytest-benchmark (median of RSA_BENCH_ROUNDS rounds, default 3), peak memory
with bench/peak_memory.py in a subprocess per measurement, and at the end one table of the
ratios measured in this run (also written to .benchmarks/cpu_summary.json). Not collected by
`make test` (testpaths = tests). RSA_BENCH_N / RSA_BENCH_V shrink the problem for a
smoke run. Baselines (rsa/bench/baselines.py): "plain", the published Ra-DPO formulation in
plain PyTorch, and "compiled", its torch.compile (compiled in an untimed warm-up round). The
goal of issue 16: cpu >= 8x faster than plain and >= 2.5x faster than compiled for every
risk, with extra memory under 2% of plain's. rsa_kernels.reference is never timed here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rsa_kernels
from rsa.bench.baselines import compiled_token_stats, plain_token_stats

N = int(os.environ.get("RSA_BENCH_N", 1024))
V = int(os.environ.get("RSA_BENCH_V", 32000))
ROUNDS = int(os.environ.get("RSA_BENCH_ROUNDS", 3))
BASELINES = {"plain": plain_token_stats, "compiled": compiled_token_stats}
IMPLS = ["plain", "compiled", "torch", "cpu"]
RISKS = ["kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95"]
ROOT = Path(__file__).resolve().parent.parent
RESULTS: dict = {}


def _need(impl):
    if impl not in BASELINES and impl not in rsa_kernels.available_backends():
        pytest.skip(f"backend {impl!r} is not available here (rsa_kernels._C not built?)")


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, V, generator=gen).requires_grad_()
    zr = z.detach() + 0.5 * torch.randn(N, V, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(3, N, generator=gen)
    return z, zr, labels, g


def fwd_bwd(impl, risk, z, zr, labels, g):
    z.grad = None
    if impl in BASELINES:  # log_softmax, softmax, products, sort/quantile: full (N, V) tensors
        out = BASELINES[impl](z, zr, labels, risk=risk)
    else:
        out = rsa_kernels.token_stats(z, zr, labels, risk=risk, backend=impl)
    (g[0] * out[0] + g[1] * out[2] + g[2] * out[3]).sum().backward()


@pytest.mark.parametrize("risk", RISKS)
@pytest.mark.parametrize("impl", IMPLS)
def test_time(benchmark, impl, risk, inputs):
    _need(impl)
    benchmark.group = f"token_stats fwd+bwd {risk} N={N} V={V}"
    # one warm-up round: thread pools, and torch.compile's compilation for "compiled"
    benchmark.pedantic(fwd_bwd, args=(impl, risk, *inputs), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        RESULTS[("time_s", impl, risk)] = benchmark.stats.stats.median


@pytest.mark.parametrize("risk", RISKS)
@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory(impl, risk):
    _need(impl)
    cmd = [sys.executable, str(ROOT / "bench" / "peak_memory.py"), "--impl", impl, "--risk", risk,
           "--n", str(N), "--v", str(V)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    RESULTS[("extra_mib", impl, risk)] = row["extra_mib"]
    RESULTS[("grad_mib", impl, risk)] = row["grad_mib"]


def test_summary():
    """The ratios of this run (printed with -s); reports, never fails on a goal."""
    rows = []
    for risk in RISKS:
        t = {i: RESULTS.get(("time_s", i, risk)) for i in IMPLS}
        m = {i: RESULTS.get(("extra_mib", i, risk)) for i in IMPLS}
        ratio = (lambda a, b: round(a / b, 2) if a and b else None)
        rows.append({
            "risk": risk, **{f"time_s_{i}": t[i] for i in IMPLS}, **{f"extra_mib_{i}": m[i] for i in IMPLS},
            "speedup_cpu_vs_plain": ratio(t["plain"], t["cpu"]),
            "speedup_cpu_vs_compiled": ratio(t["compiled"], t["cpu"]),
            "speedup_torch_vs_plain": ratio(t["plain"], t["torch"]),
            "speedup_torch_vs_compiled": ratio(t["compiled"], t["torch"]),
            "mem_cpu_over_plain": (round(max(m["cpu"], 0.0) / m["plain"], 4)
                                   if m["cpu"] is not None and m["plain"] else None),
        })
    summary = {"n": N, "v": V, "dtype": "float32", "threads": torch.get_num_threads(), "rounds": ROUNDS, "rows": rows}
    out = ROOT / ".benchmarks"
    out.mkdir(exist_ok=True)
    (out / "cpu_summary.json").write_text(json.dumps(summary, indent=1))
    print("\n" + json.dumps(summary, indent=1))
