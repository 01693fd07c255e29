"""What one round of the vocabulary-parallel protocol costs on gloo: all_reduce against
all_gather_single of the same payload (1024 rows of 2 to 258 values), float64 and float32.

    torchrun --nproc_per_node 2 bench/gloo_rounds.py

Medians of 60 calls after 5, each rank one thread, receive buffers reused (a fresh one
faults its pages in on every call). rsa_kernels/vocab_parallel/comm.py gathers rounds on
gloo because of what this prints (docs/distributed.md).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


def median_ms(fn, reps: int = 60) -> float:
    for _ in range(5):
        fn()
    dist.barrier()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    for cols in (2, 4, 8, 16, 64, 256, 258):
        for dtype in (torch.float64, torch.float32):
            x = torch.ones(1024 * cols, dtype=dtype)
            out = torch.empty(world * x.numel(), dtype=dtype)
            reduce_ms = median_ms(lambda: dist.all_reduce(x))
            gather_ms = median_ms(lambda: dist.all_gather_single(out, x))
            if dist.get_rank() == 0:
                print(f"1024 x {cols:3d} {str(dtype):14s} all_reduce {reduce_ms:6.3f} ms   all_gather {gather_ms:6.3f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
