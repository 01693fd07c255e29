"""token_stats forward + backward: the cpu kernels at each instruction-set level against the
plain and compiled baselines, interleaved round by round in one process.

    PYTHONPATH=. .venv/bin/python bench/cpu_levels.py --rounds 5     # N=1024, V=32000, float32

For each risk: one untimed warm-up of everything (torch.compile compiles there), then
``--rounds`` rounds of plain, compiled and the cpu kernels at every level this CPU runs
(rsa_kernels/extension.py; portable only with --portable), in turn, the gradient into a
fresh z.grad each step (on 4 KiB or 2 MiB pages as cpu_rows.HUGE_PAGES decides: printed).
Prints each median and the ratios baseline / level; --json writes them. --parts: instead,
each level's exp throughput (_C.exp_throughput of 2 N V cache-resident values) and the
forward kernel alone per risk, interleaved, medians in ms (what the vector width changes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rsa_kernels as rk
from rsa.bench.baselines import compiled_token_stats, plain_token_stats
from rsa_kernels import extension
from rsa_kernels.backends import cpu_rows, cpu_slices


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--risks", default="kl,erm:1,cvar:0.9,ra_dpo_cvar:0.95")
    ap.add_argument("--portable", action="store_true", help="time the portable level too")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--parts", action="store_true")
    args = ap.parse_args(argv)
    levels = [lv for lv in extension.runnable_levels() if lv != "portable" or args.portable]
    modules = {lv: extension.load(lv) for lv in levels}
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, args.v, generator=gen).requires_grad_()
    zr = z.detach() + 0.5 * torch.randn(args.n, args.v, generator=gen)
    labels = torch.randint(0, args.v, (args.n,), generator=gen)
    g = torch.randn(3, args.n, generator=gen)
    impls = ([] if args.no_baselines else ["plain", "compiled"]) + levels
    if args.parts:
        return parts(args, modules, z.detach(), zr, labels)

    def step(impl, risk):
        z.grad = None
        if impl == "plain":
            out = plain_token_stats(z, zr, labels, risk=risk)
        elif impl == "compiled":
            out = compiled_token_stats(z, zr, labels, risk=risk)
        else:
            cpu_rows._C = cpu_slices._C = modules[impl]
            out = rk.token_stats(z, zr, labels, risk=risk, backend="cpu")
        (g[0] * out[0] + g[1] * out[2] + g[2] * out[3]).sum().backward()

    print(f"N={args.n} V={args.v} float32, {torch.get_num_threads()} threads, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), gradient on {'2 MiB' if cpu_rows.HUGE_PAGES else '4 KiB'} "
          f"pages ({cpu_rows.HUGE_PAGES_REASON}); forward + backward, median of {args.rounds} interleaved rounds",
          flush=True)
    report = {}
    for risk in args.risks.split(","):
        for impl in impls:
            step(impl, risk)
        ms = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                t0 = time.perf_counter()
                step(impl, risk)
                ms[impl].append((time.perf_counter() - t0) * 1e3)
        med = {impl: statistics.median(v) for impl, v in ms.items()}
        report[risk] = {"median_ms": med, "ms": ms}
        cells = []
        for lv in levels:
            ratios = "" if args.no_baselines else (f" ({med['plain'] / med[lv]:.2f}x plain, "
                                                   f"{med['compiled'] / med[lv]:.2f}x compiled)")
            cells.append(f"{lv} {med[lv]:.1f} ms{ratios}")
        base = "" if args.no_baselines else f"plain {med['plain']:.0f} ms, compiled {med['compiled']:.0f} ms; "
        print(f"{risk:17s} {base}{'; '.join(cells)}", flush=True)
        if "avx2" in med and "avx512" in med:
            print(f"{'':17s} avx2 / avx512 = {med['avx2'] / med['avx512']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def parts(args, modules, z, zr, labels):
    from rsa_kernels.risk import parse_risk
    jobs = {"exp": lambda m: m.exp_throughput(2 * args.n * args.v)}
    for name in args.risks.split(","):
        r = parse_risk(name)
        jobs[f"{name} forward"] = lambda m, r=r: m.forward(z, zr, labels, r.code, float(r.param), -100)
    ms = {}
    for _ in range(args.rounds):
        for job, fn in jobs.items():
            for lv, m in modules.items():
                t0 = time.perf_counter()
                fn(m)
                ms.setdefault((job, lv), []).append((time.perf_counter() - t0) * 1e3)
    for job in jobs:
        print(f"{job:26s} " + "  ".join(f"{lv} {statistics.median(ms[(job, lv)]):7.1f}" for lv in modules), flush=True)


if __name__ == "__main__":
    main()
