"""The collectives of the vocabulary-parallel path, in one place.

Every collective goes through torch.distributed here (looked up at call time, so a test or
a benchmark can wrap torch.distributed.all_reduce to count calls and bytes). Float payloads
travel as float64: a maximum is exact in it, and the sums of float32 partials lose nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def meta_device(group) -> torch.device:
    """Where the small metadata tensor lives: NCCL only moves CUDA tensors."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Comm:
    """Per-row all-reduces over one process group."""

    def __init__(self, group):
        self.group = group

    def reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        """The element-wise ``op`` ("sum", "max", "min") of ``values`` over the group's ranks."""
        wire = values.to(torch.float64 if values.is_floating_point() else torch.int64, copy=True).contiguous()
        dist.all_reduce(wire, op=_OPS[op], group=self.group)
        return wire.to(values.dtype)

    def sum(self, values):
        return self.reduce(values, "sum")

    def max(self, values):
        return self.reduce(values, "max")

    def min(self, values):
        return self.reduce(values, "min")


def all_gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """(K,) on every rank -> (P, K), rank order: the one collective of the input check."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, row.contiguous(), group=group)
    return torch.stack(parts)
