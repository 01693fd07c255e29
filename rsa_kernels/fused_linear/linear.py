"""The lm-head pieces shared by both schedules: a chunk's logits, and its gradient products.

Only rows with a label (not ignore_index) are ever multiplied out: masked positions have
statistics 0 and no gradient by definition, so prompt tokens cost nothing.
"""
from __future__ import annotations

import os

import torch

from ..reference import accumulation_dtype

# The default budget for the live logit chunks (policy and reference) when neither
# chunk_size nor memory_budget is given: a sixteenth of the memory available on the
# device, at least MEMORY_BUDGET and at most BUDGET_CAP. Whole pairs in a chunk save two of
# the six (tokens x hidden x vocabulary) products, and a pair of 2 x 128 tokens at Llama-3's
# vocabulary (128256) already needs 251 MiB of float32 logits: a fixed 128 MiB sent it to
# the token schedule. The fraction leaves room for the rest of a training step; the cap
# keeps one call from taking gigabytes where a few hundred MiB already hold typical pairs.
MEMORY_BUDGET = 128 * 2**20
BUDGET_FRACTION = 1 / 16
BUDGET_CAP = {"cuda": 2 * 2**30, "cpu": 2**30}


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on ``device``, or None where unknown.

    CUDA: the driver's free memory plus what torch's caching allocator holds unused.
    CPU: MemAvailable of /proc/meminfo (Linux), else the free physical pages."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(device: torch.device) -> int:
    """The logit-chunk budget used when memory_budget is None (see BUDGET_FRACTION above)."""
    device = torch.device(device)
    avail = available_memory(device)
    if avail is None:
        return MEMORY_BUDGET
    cap = BUDGET_CAP.get(device.type, MEMORY_BUDGET)
    return int(min(cap, max(MEMORY_BUDGET, avail * BUDGET_FRACTION)))


def budget_rows(vocab: int, dtype: torch.dtype, memory_budget: int | None, device=None) -> int:
    """Rows of (policy + reference) logits that fit the budget; the row kernel bounds its own temporaries.

    memory_budget None: default_memory_budget(device), or MEMORY_BUDGET without a device."""
    if memory_budget is None:
        memory_budget = MEMORY_BUDGET if device is None else default_memory_budget(device)
    per_row = 2 * vocab * torch.finfo(dtype).bits // 8
    return max(1, memory_budget // per_row)


def kernel_rows(rows: int) -> int:
    """The chunk_size handed to the row kernel for a chunk of ``rows`` logit rows.

    The torch row kernel keeps about 8-12 (rows x V) temporaries of the accumulation dtype
    alive; an eighth of the chunk keeps them near the size of the logit chunks themselves.
    Backends that stream row by row (cpu, triton) ignore it.
    """
    return max(1, rows // 8)


def chunk_logits(hidden, rows, weight, bias, dtype=None):
    """hidden[rows] @ weight.T + bias as a fresh contiguous (len(rows), V) tensor."""
    h = hidden.index_select(0, rows)
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    return (z if dtype is None or z.dtype == dtype else z.to(dtype)), h


def _mm_accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with out in the accumulation dtype (float32 for half types)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # one rounding less: the product lands in float32 directly
            out.add_(torch.mm(a, b, out_dtype=out.dtype))
            return
        except (TypeError, RuntimeError):
            pass
    out.addmm_(a.to(out.dtype), b.to(out.dtype))


class LinearGrads:
    """Gradients of hidden (rows written once), weight and bias (summed over chunks)."""

    def __init__(self, hidden, weight, bias, needs):
        acc = accumulation_dtype(weight.dtype)
        self.hidden = torch.zeros_like(hidden) if needs[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs[2] and bias is not None else None

    @property
    def wanted(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, rows, h, grad_z, weight) -> None:
        """Fold in the logits' gradient grad_z of hidden rows ``rows`` (values ``h``)."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, (grad_z @ weight).to(self.hidden.dtype))
        if self.weight is not None:
            _mm_accumulate(self.weight, grad_z.t(), h)
        if self.bias is not None:
            self.bias += grad_z.sum(0, dtype=self.bias.dtype)

    def result(self, weight, bias, scale=None):
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, times ``scale`` if given."""
        out = []
        for g, like in ((self.hidden, None), (self.weight, weight), (self.bias, bias)):
            if g is not None:
                if scale is not None:
                    g = g * scale.to(g.dtype)
                if like is not None:
                    g = g.to(like.dtype)
            out.append(g)
        return tuple(out)
