"""Measurements of one workload: timed forward / backward steps, and peak memory of a step.

Times come from bench/test_bench_grid.py (``timed_step``: pytest-benchmark times the
backward, the round's setup times its forward). Peak memory is measured apart, by
``python -m rsa.bench.peak``:

- CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) during one forward
  and backward, minus what was allocated before it (the inputs);
- CPU: the process's peak resident set (VmHWM) during the step minus its resident set
  before it. Linux resets VmHWM when "5" is written to /proc/self/clear_refs, so one
  subprocess measures its cases one after another; glibc is told (MALLOC_MMAP_THRESHOLD_)
  to give every large block straight back to the system, so memory freed by one case is
  not silently reused by the next. Where clear_refs is not available, each case runs in
  a fresh subprocess and ru_maxrss is read.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import torch

# environment of CPU memory subprocesses: large blocks mmapped, returned to the OS on free
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(work, forward_s: list):
    """(setup, target) for benchmark.pedantic: one forward + backward per round. The forward
    runs in the untimed setup, timed here with perf_counter and appended to ``forward_s``;
    pytest-benchmark times the backward. One step per round serves both figures."""
    dev = work.case.device

    def setup():
        work.zero_grad()  # (the previous round's gradient is freed outside both timers)
        sync(dev)
        start = time.perf_counter()
        loss = work.forward()
        sync(dev)
        forward_s.append(time.perf_counter() - start)
        return (loss,), {}

    def target(loss):
        loss.backward()
        sync(dev)
    return setup, target


def memory_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def can_reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in memory_status()
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def peak_step_bytes(work, resettable: bool = True) -> int:
    """Peak extra memory (bytes) of one forward + backward of ``work`` over what it held before."""
    dev = work.case.device
    work.zero_grad()  # (no gc.collect(): 0.4 s a call once dynamo is imported, and tensors free by refcount)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        work.forward().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if resettable:
        base = memory_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        work.forward().backward()
        return max(0, memory_status()["VmHWM"] - base)  # the step may free a little of what was there
    base = ru_maxrss_bytes()  # a fresh process: the peak so far is the baseline
    work.forward().backward()
    return max(0, ru_maxrss_bytes() - base)
