"""Benchmark of the triton backend against the naive PyTorch formulation (rsa_kernels.reference).

For each risk: forward and backward time of triton_rows (median of CUDA-event timings after
warm-up), the bytes one read of z and zr moves per second against a device-to-device copy
measured in the same run, and the speed-up over the naive autograd formulation measured in
the same run (at a smaller N when it does not fit, said so in the table).

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

from rsa_kernels import reference  # noqa: E402
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


def naive_step(z, zr, labels, risk):
    """The naive formulation: full (N, V) tensors and autograd; forward, then backward."""
    leaf = z.detach().requires_grad_()
    logp, _, kl, value = reference.token_stats(leaf, zr, labels, risk=risk)
    (logp.sum() + kl.sum() + value.sum()).backward()
    return leaf.grad


def naive_forward(z, zr, labels, risk):
    leaf = z.detach().requires_grad_()
    return reference.token_stats(leaf, zr, labels, risk=risk)


def measure_naive(n, v, dtype, device, risk, reps):
    """(forward s, forward+backward s, rows measured), shrinking N on out-of-memory."""
    rows = n
    while rows >= 1:
        try:
            z, zr, labels = inputs(rows, v, dtype, device, seed=1)
            fwd = timed(lambda: naive_forward(z, zr, labels, risk), device, warmup=1, reps=reps)
            both = timed(lambda: naive_step(z, zr, labels, risk), device, warmup=1, reps=reps)
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
    ap.add_argument("--naive-n", type=int, default=4096,
                    help="rows for the naive formulation (its time is scaled to N): it needs tens of GB")
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
             "| naive fwd ms | naive fwd+bwd ms | naive rows | speed-up fwd | speed-up fwd+bwd | max |risk - torch| |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.risks.split(","):
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
        nf, nb, rows = measure_naive(min(args.n, args.naive_n), args.v, dtype, device, risk, max(1, args.reps // 2))
        scale = args.n / rows if rows else float("nan")  # naive time per row, times N
        row = (f"| {name} | {fwd * 1e3:.2f} | {one_read / fwd / 1e9:.0f} | {100 * one_read / fwd / copy_bw:.0f} "
               f"| {bwd * 1e3:.2f} | {1.5 * one_read / bwd / 1e9:.0f} | {100 * 1.5 * one_read / bwd / copy_bw:.0f} "
               f"| {nf * 1e3:.1f} | {nb * 1e3:.1f} | {rows} | {nf * scale / fwd:.1f} | {nb * scale / (fwd + bwd):.1f} "
               f"| {err:.2e} |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", "GB/s count the bytes of one read of z and zr (forward) and of reading both and writing",
              "the gradient (backward); cvar and ra_dpo_cvar forwards read the rows more than once",
              "(docs/triton_kernels.md), so their figure is the fraction of a single-read roofline.",
              "naive rows < N: the naive formulation was timed on fewer rows (--naive-n, or fewer still",
              "where it ran out of memory); its time is scaled by N / rows for the speed-up."]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
