"""Time the triton cvar / ra_dpo_cvar forward under several histogram launch shapes.

A measurement for tuning, not a test: each configuration must reproduce the default's
statistics exactly; prints one line per configuration (NBINS thresholds per histogram,
HIST_BLOCK items per step, warps), with the kl forward (pass 1 alone) as the floor. GPU only.
    python bench/triton_quantile_sweep.py [--n 4096] [--v 128256]
    TRITON_INTERPRET=1 python bench/triton_quantile_sweep.py --device cpu --tiny   # a dry run
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rsa_kernels.backends import triton_quantile as tq, triton_rows as tr  # noqa: E402
from rsa_kernels.risk import parse_risk  # noqa: E402

CONFIGS = [(16, 256, 8), (8, 256, 8), (16, 512, 8), (16, 128, 4), (8, 512, 8), (32, 128, 8), (16, 256, 4)]


def configure(nb, hb, warps):
    tq.NBINS, tq.HIST_BLOCK, tq.HIST_WARPS = nb, hb, warps


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu only as a dry run under TRITON_INTERPRET=1, with --tiny")
    ap.add_argument("--tiny", action="store_true", help="N=4, V=300, two configurations: a dry run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.v = 4, 300
    configs = CONFIGS[:2] if args.tiny else CONFIGS
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    z = (torch.randn(args.n, args.v, device=dev, generator=g) * 3).bfloat16()
    zr = (z.float() + torch.randn(args.n, args.v, device=dev, generator=g) * 1.5).bfloat16()
    y = torch.randint(0, args.v, (args.n,), device=dev, generator=g)
    for name in ("kl", "cvar:0.9", "ra_dpo_cvar:0.95"):
        risk = parse_risk(name)
        base = None
        for cfg in configs[:1] if name == "kl" else configs:
            configure(*cfg)
            t0 = time.perf_counter()
            stats, saved = tr.forward(z, zr, y, risk, -100)
            sync(dev)
            first = time.perf_counter() - t0
            times = []
            for _ in range(3):
                sync(dev)
                t0 = time.perf_counter()
                tr.forward(z, zr, y, risk, -100)
                sync(dev)
                times.append(time.perf_counter() - t0)
            same = "" if base is None else f" max|d risk| vs first {(stats[:, 3] - base).abs().max().item():.2e}"
            base = stats[:, 3] if base is None else base
            print(f"{name} NB={cfg[0]} HIST_BLOCK={cfg[1]} warps={cfg[2]}: "
                  f"{sorted(times)[1] * 1e3:.1f} ms for N={args.n} (first call {first:.1f} s){same}", flush=True)
        configure(*CONFIGS[0])


if __name__ == "__main__":
    main()
