"""The collectives of the vocabulary-parallel path, in one place.

Every collective goes through torch.distributed here (looked up at call time, so a test or
a benchmark can wrap torch.distributed.all_reduce to count calls and bytes). Float payloads
travel as float64: a maximum is exact in it, and the sums of float32 partials lose nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def meta_device(group, inputs: torch.device) -> torch.device:
    """Where the agreement vector lives: the inputs' device for NCCL, which moves only CUDA
    tensors (never torch.cuda.current_device(): a script that did not call set_device would
    send every rank's vector to cuda:0), the CPU otherwise."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device(inputs)
    return torch.device("cpu")


class Comm:
    """Per-row all-reduces over one process group."""

    def __init__(self, group):
        self.group = group

    def reduce(self, values: torch.Tensor, op: str, inplace: bool = False) -> torch.Tensor:
        """The element-wise ``op`` ("sum", "max", "min") of ``values`` over the group's ranks
        (``inplace``: into ``values`` itself where it is already what travels)."""
        wire_dtype = torch.float64 if values.is_floating_point() else torch.int64
        if inplace and values.dtype == wire_dtype and values.is_contiguous():
            wire = values
        else:
            wire = values.to(wire_dtype, copy=True).contiguous()
        dist.all_reduce(wire, op=_OPS[op], group=self.group)
        return wire if wire is values else wire.to(values.dtype)

    def sum(self, values, inplace: bool = False):
        return self.reduce(values, "sum", inplace)

    def max(self, values):
        return self.reduce(values, "max")

    def min(self, values):
        return self.reduce(values, "min")


def all_gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """(K,) on every rank -> (P, K), rank order: the one collective of the input check."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, row.contiguous(), group=group)
    return torch.stack(parts)
