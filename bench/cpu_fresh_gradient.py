"""kl forward + backward of the cpu kernel with its fresh gradient on 4 KiB or 2 MiB pages.

    PYTHONPATH=. .venv/bin/python bench/cpu_fresh_gradient.py            # ~40 s; N=1024, V=32000
    PYTHONPATH=. .venv/bin/python bench/cpu_fresh_gradient.py --processes 4 --steps 5   # fresh processes

The backward returns a new (N, V) gradient whose first-touch page faults cost more than its
arithmetic (docs/cpu_backend.md). This times `rk.token_stats(..., risk="kl", backend="cpu")`
forward + backward (gradient into a fresh z.grad, as autograd does), with the gradient
from torch.empty (4 KiB pages: cpu_rows.HUGE_PAGES = False, i.e. RSA_CPU_HUGE_PAGES=0) and
from _C.fresh_like (2 MiB pages, the default), next to the plain formulation's step, in
three patterns a training loop or a benchmark can produce:
  interleaved   plain, 4 KiB, 2 MiB in turn (other work's 4 KiB allocations between steps)
  back to back  several steps of one kind in a row (as rsa bench times a case's rounds)
  cold          3 s idle before each step (time for the VM to hand freed memory back)
Prints each step's milliseconds and the medians. With --processes K: instead, K pairs of fresh
processes (4 KiB and 2 MiB pages, RSA_CPU_HUGE_PAGES=0 / 1, their order alternating), each
timing --steps kl steps from its start, as a new training run or `rsa bench` would.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import rsa_kernels as rk
from rsa.bench.baselines import plain_token_stats
from rsa_kernels.backends import cpu_rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--processes", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", choices=("4KiB", "2MiB"), help=argparse.SUPPRESS)  # one child process's kind
    args = ap.parse_args(argv)
    if args.processes:
        return fresh_processes(args)
    g = torch.Generator().manual_seed(0)
    zr = torch.randn(args.n, args.v, generator=g) * 2
    z = (zr + 0.5 * torch.randn(args.n, args.v, generator=g)).requires_grad_()
    labels = torch.randint(0, args.v, (args.n,), generator=g)

    def step(kind):
        z.grad = None
        if kind == "plain":
            logp, _, kl, risk = plain_token_stats(z, zr, labels, risk="kl")
        else:
            cpu_rows.HUGE_PAGES = kind == "2MiB"
            logp, _, kl, risk = rk.token_stats(z, zr, labels, risk="kl", backend="cpu")
        (logp.sum() + 0.1 * kl.sum() + risk.sum()).backward()

    def timed(kind):
        t0 = time.perf_counter()
        step(kind)
        return (time.perf_counter() - t0) * 1e3

    def show(label, kind, ms):
        print(f"  {label:13s} {kind:6s} median {statistics.median(ms):6.1f} ms  {[round(t) for t in ms]}", flush=True)

    if args.only:  # a child of fresh_processes: its steps from a fresh start
        print(" ".join(f"{timed(args.only):.0f}" for _ in range(args.steps)), flush=True)
        return None
    kinds = ("plain", "4KiB", "2MiB")
    for k in kinds:
        step(k)
    print(f"N={args.n} V={args.v} float32, {torch.get_num_threads()} threads; kl forward + backward, ms")
    res = {k: [] for k in kinds}
    for _ in range(args.reps):
        for k in kinds:
            res[k].append(timed(k))
    for k in kinds:
        show("interleaved", k, res[k])
    for k in ("4KiB", "2MiB", "4KiB", "2MiB"):
        show("back to back", k, [timed(k) for _ in range(6)])
    for k in ("4KiB", "2MiB", "4KiB", "2MiB"):
        ms = []
        for _ in range(3):
            time.sleep(3)
            ms.append(timed(k))
        show("cold", k, ms)


def fresh_processes(args):
    print(f"N={args.n} V={args.v} float32; kl forward + backward in fresh processes, ms per step from the start")
    res = {"4KiB": [], "2MiB": []}
    for i in range(args.processes):
        for kind in (("4KiB", "2MiB") if i % 2 == 0 else ("2MiB", "4KiB")):
            env = dict(os.environ, RSA_CPU_HUGE_PAGES="1" if kind == "2MiB" else "0")
            out = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--v", str(args.v), "--steps",
                                  str(args.steps), "--only", kind], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            ms = [float(t) for t in out]
            res[kind].append(ms)
            print(f"  {kind}  {ms}", flush=True)
    for kind, runs in res.items():
        first = [r[0] for r in runs]
        rest = [t for r in runs for t in r[1:]]
        print(f"{kind}: first step median {statistics.median(first):.0f} ms, later steps median "
              f"{statistics.median(rest):.0f} ms (max {max(rest):.0f})")


if __name__ == "__main__":
    main()
