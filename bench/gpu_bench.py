"""Benchmark of the triton backend against the plain and compiled PyTorch baselines.

For each risk: forward and backward time of triton_rows (median of CUDA-event timings after
warm-up), the bytes one read of z and zr moves per second against a device-to-device copy
measured in the same run, and the speed-up over the baselines measured in the same run
(rsa/bench/baselines.py): "plain", the published Ra-DPO formulation with autograd, and
"compiled", its torch.compile (compiled in the warm-up, not timed); at a smaller N when
they do not fit, said so in the table. rsa_kernels.reference is not timed.

    python bench/gpu_bench.py                     # N=16384, V=128256, bf16, every risk (GPU)
    TRITON_INTERPRET=1 python bench/gpu_bench.py --device cpu --tiny   # dry run, no GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rsa.bench.baselines import compiled_token_stats, plain_token_stats  # noqa: E402
from rsa_kernels.backends import torch_rows, triton_rows  # noqa: E402
from rsa_kernels.risk import parse_risk  # noqa: E402

RISKS = ["kl", "erm:1", "cvar:0", "cvar:0.9", "ra_dpo_cvar:0.95"]


def timed(fn, device, warmup=2, reps=5):
    """Median seconds of fn() over reps, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes):
    """Bytes read plus written per second by a device-to-device copy of nbytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, warmup=2, reps=10)
    del src, dst
    return 2 * nbytes / t


def inputs(n, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, v, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)
    zr = (z.float() + torch.randn(n, v, generator=g, device=device) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::7] = -100
    return z, zr, labels


BASELINES = {"plain": plain_token_stats, "compiled": compiled_token_stats}


def baseline_forward(fn, z, zr, labels, risk):
    leaf = z.detach().requires_grad_()
    return fn(leaf, zr, labels, risk=risk)


def measure_baseline(name, n, v, dtype, device, risk, reps):
    """(forward s, forward+backward s, rows measured) of baseline ``name``, shrinking N on out-of-memory.

    The warm-up call (warmup=1) compiles for "compiled", so compilation is not timed."""
    fn = BASELINES[name]
    rows = n
    while rows >= 1:
        try:
            z, zr, labels = inputs(rows, v, dtype, device, seed=1)

            def step():
                leaf = z.detach().requires_grad_()
                logp, _, kl, value = fn(leaf, zr, labels, risk=risk)
                (logp.sum() + kl.sum() + value.sum()).backward()

            fwd = timed(lambda: baseline_forward(fn, z, zr, labels, risk), device, warmup=1, reps=reps)
            both = timed(step, device, warmup=1, reps=reps)
            return fwd, both, rows
        except torch.cuda.OutOfMemoryError:
            rows //= 4
        finally:
            z = zr = labels = None
            if device == "cuda":
                torch.cuda.empty_cache()
    return float("nan"), float("nan"), 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--risks", default=",".join(RISKS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline-n", type=int, default=4096,
                    help="rows for the baselines (their time is scaled to N): plain needs tens of GB")
    ap.add_argument("--compiled-risks", default=None,
                    help="risks timed with the compiled baseline too (default: every risk; each compiles once)")
    ap.add_argument("--tiny", action="store_true", help="N=8, V=300, 1 rep: a dry run")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for bench.md")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.v, args.reps = 8, 300, 1
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    elt = torch.finfo(dtype).bits // 8
    one_read = 2 * args.n * args.v * elt  # z and zr once
    copy_bw = copy_bandwidth(device, max(one_read, 1 << 20))
    lines = [f"# triton backend, N={args.n} V={args.v} {args.dtype} on "
             f"{torch.cuda.get_device_name(0) if device == 'cuda' else device}",
             f"torch {torch.__version__}; copy bandwidth (read+write) {copy_bw / 1e9:.0f} GB/s",
             "",
             "| risk | fwd ms | fwd GB/s (1 read) | % copy | bwd ms | bwd GB/s (read 2, write 1) | % copy "
             "| plain fwd+bwd ms | compiled fwd+bwd ms | baseline rows | fwd vs plain | fwd+bwd vs plain "
             "| fwd+bwd vs compiled | max |risk - torch| |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    risks = args.risks.split(",")
    compiled_risks = risks if args.compiled_risks is None else args.compiled_risks.split(",")
    for name in risks:
        risk = parse_risk(name)
        z, zr, labels = inputs(args.n, args.v, dtype, device)
        stats, saved = triton_rows.forward(z, zr, labels, risk, -100)
        grads = torch.ones(args.n, 3, device=device)
        fwd = timed(lambda: triton_rows.forward(z, zr, labels, risk, -100), device, reps=args.reps)
        bwd = timed(lambda: triton_rows.backward(z, zr, labels, saved, grads, risk, -100), device, reps=args.reps)
        # agreement with the torch backend on the first rows (the tests check the rest)
        k = min(args.n, 64)
        ref_stats, _ = torch_rows.forward(z[:k], zr[:k], labels[:k], risk, -100)
        err = (stats[:k, 3] - ref_stats[:, 3]).abs().max().item()
        del stats, saved
        z = zr = labels = None
        if device == "cuda":
            torch.cuda.empty_cache()
        reps = max(1, args.reps // 2)
        pf, pb, rows = measure_baseline("plain", min(args.n, args.baseline_n), args.v, dtype, device, risk, reps)
        cb = float("nan")
        if name in compiled_risks and rows:  # at the rows plain fitted, so both scale alike
            _, cb, crows = measure_baseline("compiled", rows, args.v, dtype, device, risk, reps)
            cb = cb * rows / crows if crows else float("nan")
        scale = args.n / rows if rows else float("nan")  # baseline time per row, times N
        row = (f"| {name} | {fwd * 1e3:.2f} | {one_read / fwd / 1e9:.0f} | {100 * one_read / fwd / copy_bw:.0f} "
               f"| {bwd * 1e3:.2f} | {1.5 * one_read / bwd / 1e9:.0f} | {100 * 1.5 * one_read / bwd / copy_bw:.0f} "
               f"| {pb * 1e3:.1f} | {cb * 1e3:.1f} | {rows} | {pf * scale / fwd:.1f} | {pb * scale / (fwd + bwd):.1f} "
               f"| {cb * scale / (fwd + bwd):.1f} | {err:.2e} |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", "GB/s count the bytes of one read of z and zr (forward) and of reading both and writing",
              "the gradient (backward); cvar and ra_dpo_cvar forwards read the rows more than once",
              "(docs/triton_kernels.md), so their figure is the fraction of a single-read roofline.",
              "baseline rows < N: the baselines were timed on fewer rows (--baseline-n, or fewer still",
              "where they ran out of memory); their time is scaled by N / rows for the speed-ups.",
              "plain = the published Ra-DPO formulation (rsa/bench/baselines.py), compiled = its torch.compile",
              "(nan: not compiled for that risk, see --compiled-risks)."]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
