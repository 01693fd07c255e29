"""Peak resident memory of one forward + backward of token_stats, in a fresh process.

    python bench/peak_memory.py --impl plain|compiled|torch|cpu|triton --risk cvar:0.9 --n 1024 --v 32000

plain / compiled: the speed baselines of rsa/bench/baselines.py (the published Ra-DPO
formulation, and its torch.compile; the warm-up step compiles).

Prints one JSON object. The baseline is the resident set after the inputs are allocated
(and one warm-up step has run and been freed); ``peak_above_baseline_mib`` is the high-water
mark above it during the measured step, which includes the gradient the step must return
(``grad_mib``); ``extra_mib`` = the peak above inputs and gradient, i.e. what the
implementation itself needs. Run one process per measurement: the high-water mark is per
process. Linux only (reads /proc/self/status; resets the mark through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import sys


def fix_malloc_thresholds():
    """glibc raises its mmap threshold after large frees, so memory freed by the warm-up
    would stay resident and hide the measured step's allocations; fixed thresholds return
    every large block to the OS on free. (Before torch is imported.)"""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
    except (OSError, AttributeError):
        pass


fix_malloc_thresholds()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rsa_kernels  # noqa: E402
from rsa.bench.baselines import compiled_token_stats, plain_token_stats  # noqa: E402

BASELINES = {"plain": plain_token_stats, "compiled": compiled_token_stats}

MIB = 2**20
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step(impl: str, z, zr, labels, risk: str, g):
    """One forward + backward; returns nothing so that only the gradient stays alive."""
    if impl in BASELINES:
        out = BASELINES[impl](z, zr, labels, risk=risk)
    else:
        out = rsa_kernels.token_stats(z, zr, labels, risk=risk, backend=impl)
    loss = (g[0] * out[0] + g[1] * out[2] + g[2] * out[3]).sum()
    loss.backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=["plain", "compiled", "torch", "cpu", "triton"])
    ap.add_argument("--risk", default="kl")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, args.v, generator=gen).to(dtype).requires_grad_()
    zr = (z.detach().float() + 0.5 * torch.randn(args.n, args.v, generator=gen)).to(dtype)
    labels = torch.randint(0, args.v, (args.n,), generator=gen)
    g = torch.randn(3, args.n, generator=gen)
    inputs_mib = (z.numel() * z.element_size() + zr.numel() * zr.element_size()) / MIB
    grad_mib = z.numel() * z.element_size() / MIB

    step(args.impl, z, zr, labels, args.risk, g)  # warm-up: thread pools, lazy loading
    z.grad = None
    reset_ok = reset_peak()
    base_kib = status_kib("VmRSS") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(args.impl, z, zr, labels, args.risk, g)
    peak_kib = status_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    above = (peak_kib - base_kib) / 1024
    print(json.dumps({
        "impl": args.impl, "risk": args.risk, "n": args.n, "v": args.v, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "inputs_mib": round(inputs_mib, 1), "grad_mib": round(grad_mib, 1),
        "baseline_mib": round(base_kib / 1024, 1), "peak_above_baseline_mib": round(above, 1),
        "extra_mib": round(above - grad_mib, 1), "peak_reset": reset_ok,
    }))


if __name__ == "__main__":
    main()
