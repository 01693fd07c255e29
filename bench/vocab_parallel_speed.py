"""Vocabulary-parallel statistics: the slice kernels of backend="auto" (cpu) against the torch
path on the same two ranks, and against one process on the whole vocabulary.

    torchrun --nproc_per_node 2 bench/vocab_parallel_speed.py            # N=1024, V=32000
    torchrun --nproc_per_node 2 bench/vocab_parallel_speed.py --reps 9 --json out.json

Each rank holds half the vocabulary of the same float32 (N, V) policy and reference logits
and runs on one thread, over gloo. Per risk, one step is token_stats forward and the
backward of a weighted sum of (logp, kl, risk) into a fresh gradient of the rank's slice:

  2 ranks, torch   process_group=WORLD, backend="torch" (the path before the slice kernels)
  2 ranks, auto    process_group=WORLD, backend="auto" (the C++ slice kernels; checked)
  1 process, cpu   rank 0 alone on the whole vocabulary with 2 threads, backend="cpu",
                   while rank 1 waits on the rendezvous store (blocked, no CPU)

Timed between barriers (2-rank steps: the slower rank's time). Two phases, each
comparison interleaved with its own baseline only, round by round (medians reported), so
that a disturbance hits both alike: auto against 1 process (--reps rounds; the goal: at
most 1.5x), then torch against auto (--torch-reps rounds; the goal: auto at least 3x
faster). Each timed step runs right after an untimed one of the same variant: a step right
after another variant ran 30 to 60 ms slower here (after the torch path freed its
gigabytes of temporaries, or after the single process's 2 threads). Prints a table on
rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import rsa_kernels as rk
from rsa_kernels.backends import get_slices

RISKS = ["kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95"]


def step(z, zr, labels, weights, risk, **kw) -> float:
    """Seconds of one forward and backward of token_stats on a fresh leaf."""
    leaf = z.detach().requires_grad_()
    t0 = time.perf_counter()
    st = rk.token_stats(leaf, zr, labels, risk=risk, **kw)
    (torch.stack([st.logp, st.kl, st.risk], 1) * weights).sum().backward()
    return time.perf_counter() - t0


def group_step(z, zr, labels, weights, risk, backend) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step(z, zr, labels, weights, risk, backend=backend, process_group=dist.group.WORLD)
    dist.barrier()
    return time.perf_counter() - t0


def single_step(store, key, z, zr, labels, weights, risk) -> float:
    """Rank 0 alone with 2 threads; rank 1 blocks on the store until it is done."""
    dist.barrier()
    took = 0.0
    if dist.get_rank() == 0:
        torch.set_num_threads(2)
        took = step(z, zr, labels, weights, risk, backend="cpu")
        torch.set_num_threads(1)
        store.set(key, "done")
    else:
        store.wait([key], timedelta(seconds=600))
    return took


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=7, help="rounds against 1 process")
    ap.add_argument("--torch-reps", type=int, default=3, help="rounds against the torch path (seconds each)")
    ap.add_argument("--risks", nargs="+", default=RISKS)
    ap.add_argument("--json", help="write the raw times here (rank 0)")
    args = ap.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit("run with torchrun --nproc_per_node 2")
    torch.set_num_threads(1)
    store = dist.distributed_c10d._get_default_store()
    n, v = args.n, args.v
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, v, generator=gen)
    zr = z + 0.5 * torch.randn(n, v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::16] = -100  # some masked rows, as prompts leave them
    weights = torch.randn(n, 3, generator=gen)
    half = v // 2
    cols = slice(0, half) if rank == 0 else slice(half, v)
    zs, zrs = z[:, cols].contiguous(), zr[:, cols].contiguous()
    if get_slices("auto", zs)[1] != "cpu":
        raise SystemExit("backend='auto' did not pick the cpu slice kernels: is the extension built?")
    steps = iter(range(10**9))  # the same store keys on both ranks
    variants = {
        "2 ranks, torch": lambda r: group_step(zs, zrs, labels, weights, r, "torch"),
        "2 ranks, auto": lambda r: group_step(zs, zrs, labels, weights, r, "auto"),
        "1 process, cpu": lambda r: single_step(store, f"vocab_parallel_speed {next(steps)}", z, zr, labels, weights, r),
    }
    # each comparison interleaved with its own baseline only, and each timed step right after
    # an untimed one of the same variant: a step runs measurably slower right after another
    # variant (after the torch path's freed gigabytes of temporaries, or after the 2-thread
    # single process), by 30 to 60 ms here
    phases = {"one process": (("2 ranks, auto", "1 process, cpu"), args.reps),
              "torch": (("2 ranks, torch", "2 ranks, auto"), args.torch_reps)}
    times = {}
    for phase, (names, reps) in phases.items():
        for _ in range(reps):
            for r in args.risks:
                for name in names:
                    variants[name](r)  # settles
                    times.setdefault((phase, name, r), []).append(variants[name](r))
    med = {k: statistics.median(t) for k, t in times.items()}
    if rank == 0:
        ms = lambda s: f"{s * 1e3:7.1f}"  # noqa: E731
        print(f"N={n} V={v} float32, forward + backward of token_stats, gloo, medians of {args.reps} (against 1 "
              f"process) and {args.torch_reps} (against torch) interleaved rounds, ms; torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        print("| risk | 2 ranks, auto | 1 process, cpu, 2 threads | auto / 1 process | 2 ranks, torch | "
              "2 ranks, auto | torch / auto |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in args.risks:
            a1, one = med[("one process", "2 ranks, auto", r)], med[("one process", "1 process, cpu", r)]
            tt, a2 = med[("torch", "2 ranks, torch", r)], med[("torch", "2 ranks, auto", r)]
            print(f"| `{r}` | {ms(a1)} | {ms(one)} | {a1 / one:5.2f} | {ms(tt)} | {ms(a2)} | {tt / a2:5.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"n": n, "v": v, "reps": args.reps, "torch_reps": args.torch_reps,
                           "seconds": {" | ".join(k): t for k, t in times.items()}}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
