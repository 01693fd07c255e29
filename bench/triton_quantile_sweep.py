"""Time the triton cvar / ra_dpo_cvar forward under several histogram launch shapes.

A measurement for tuning, not a test: each configuration must reproduce the default's
statistics exactly; prints one line per configuration (NBINS thresholds per histogram,
HIST_BLOCK items per step, warps), with the kl forward (pass 1 alone) as the floor. GPU only.
    python bench/triton_quantile_sweep.py [--n 4096] [--v 128256]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(args.n, args.v, device="cuda", generator=g) * 3).bfloat16()
    zr = (z.float() + torch.randn(args.n, args.v, device="cuda", generator=g) * 1.5).bfloat16()
    y = torch.randint(0, args.v, (args.n,), device="cuda", generator=g)
    for name in ("kl", "cvar:0.9", "ra_dpo_cvar:0.95"):
        risk = parse_risk(name)
        base = None
        for cfg in CONFIGS[:1] if name == "kl" else CONFIGS:
            configure(*cfg)
            t0 = time.perf_counter()
            stats, saved = tr.forward(z, zr, y, risk, -100)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            times = []
            for _ in range(3):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                tr.forward(z, zr, y, risk, -100)
                torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
            same = "" if base is None else f" max|d risk| vs first {(stats[:, 3] - base).abs().max().item():.2e}"
            base = stats[:, 3] if base is None else base
            print(f"{name} NB={cfg[0]} HIST_BLOCK={cfg[1]} warps={cfg[2]}: "
                  f"{sorted(times)[1] * 1e3:.1f} ms for N={args.n} (first call {first:.1f} s){same}", flush=True)
        configure(*CONFIGS[0])


if __name__ == "__main__":
    main()
