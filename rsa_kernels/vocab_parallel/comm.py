"""The collectives of the vocabulary-parallel path, in one place.

Every collective goes through torch.distributed here (looked up at call time, so a test or
a benchmark can wrap torch.distributed.all_reduce / all_gather_single to count calls and
bytes). Float payloads travel as float64: a maximum is exact in it, and the sums of float32
partials lose nothing.

On gloo, a round whose gathered payload is small (GATHER_BYTES) is one all-gather and the
reduction done here, in rank order (the same bits on every rank): gloo's all-reduce costs
1 to 3 ms per call whatever the size below a few MiB, its all-gather 0.4 to 0.7 ms (2 CPU
processes, 8 KiB to 256 KiB per rank; docs/distributed.md). NCCL's all-reduce stays.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
GATHER_BYTES = 8 << 20  # the most a gathered round receives per rank (all ranks' payloads together)


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
        self.world = dist.get_world_size(group)
        self.gloo = "gloo" in str(dist.get_backend(group)).lower()

    def reduce(self, values: torch.Tensor, op: str, inplace: bool = False, wire_dtype=None) -> torch.Tensor:
        """The element-wise ``op`` ("sum", "max", "min") of ``values`` over the group's ranks
        (``inplace``: into ``values`` itself where it is already what travels; ``wire_dtype``:
        float32 where that loses nothing, as for counts)."""
        if wire_dtype is None:
            wire_dtype = torch.float64 if values.is_floating_point() else torch.int64
        if inplace and values.dtype == wire_dtype and values.is_contiguous():
            wire = values
        else:
            wire = values.to(wire_dtype, copy=True).contiguous()
        if self.gloo and wire.numel() * wire.element_size() * self.world <= GATHER_BYTES:
            return self._gathered(wire, op).to(values.dtype)
        dist.all_reduce(wire, op=_OPS[op], group=self.group)
        return wire if wire is values else wire.to(values.dtype)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """(P, *values.shape): every rank's ``values`` (int64 or float64), in rank order."""
        parts = torch.empty(self.world * values.numel(), dtype=values.dtype, device=values.device)
        dist.all_gather_single(parts, values.contiguous().reshape(-1), group=self.group)
        return parts.view((self.world,) + tuple(values.shape))

    def _gathered(self, wire: torch.Tensor, op: str) -> torch.Tensor:
        """all_reduce's result from one all-gather: the ranks' payloads reduced in rank order."""
        parts = _received(self.world * wire.numel(), wire.dtype, wire.device)
        dist.all_gather_single(parts, wire.reshape(-1), group=self.group)
        parts = parts.view((self.world,) + tuple(wire.shape))
        out = parts[0].clone()
        for part in parts[1:]:
            if op == "sum":
                out += part
            else:  # NaN wins, as in a maximum or minimum of values that hold one
                torch.maximum(out, part, out=out) if op == "max" else torch.minimum(out, part, out=out)
        return out

    def sum(self, values, inplace: bool = False, wire_dtype=None):
        return self.reduce(values, "sum", inplace, wire_dtype)

    def max(self, values):
        return self.reduce(values, "max")

    def min(self, values):
        return self.reduce(values, "min")


_kept = threading.local()


def _received(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The gathered rounds' receive buffer, kept from call to call (per thread, dtype and
    device): a fresh one faults its pages in on every round, measured 1 ms a round here."""
    store = _kept.__dict__.setdefault("buffers", {})
    buf = store.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = store[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def all_gather_rows(row: torch.Tensor, group) -> torch.Tensor:
    """(K,) on every rank -> (P, K), rank order: the one collective of the input check."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, row.contiguous(), group=group)
    return torch.stack(parts)
