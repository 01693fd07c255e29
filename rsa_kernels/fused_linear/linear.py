"""The lm-head pieces shared by both schedules: a chunk's logits, and its gradient products.

Only rows with a label (not ignore_index) are ever multiplied out: masked positions have
statistics 0 and no gradient by definition, so prompt tokens cost nothing.
"""
from __future__ import annotations

import torch

from ..reference import accumulation_dtype

# Default chunk sizes when neither chunk_size nor memory_budget is given. Token chunks (and
# several small pairs together) take MEMORY_BUDGET bytes of live logits, policy and reference
# together. A pair chunk saves two of the six (tokens x hidden x vocabulary) products, so when
# the largest pair does not fit MEMORY_BUDGET but fits PAIR_BUDGET, a chunk holds exactly that
# pair's rows: the smallest chunk that keeps whole pairs, never a fraction of free memory. A
# pair of 2 x 128 tokens at Llama-3's vocabulary (128256) takes 219-251 MiB of float32 logits,
# 2 x 256 tokens 501 MiB: both fit, and peak memory stays well below that of Liger Kernel's
# fused linear DPO loss, which holds one pair's logits several times over (0.41-0.43 of it
# in docs/fused_linear.md's benchmark).
MEMORY_BUDGET = 128 * 2**20
PAIR_BUDGET = 512 * 2**20


def row_bytes(vocab: int, dtype: torch.dtype) -> int:
    """Bytes of one row of policy plus reference logits."""
    return 2 * vocab * torch.finfo(dtype).bits // 8


def budget_rows(vocab: int, dtype: torch.dtype, memory_budget: int | None) -> int:
    """Rows of (policy + reference) logits that fit the budget (None: MEMORY_BUDGET); the row
    kernel bounds its own temporaries."""
    return max(1, (MEMORY_BUDGET if memory_budget is None else memory_budget) // row_bytes(vocab, dtype))


def pair_chunk_rows(largest_pair: int, vocab: int, dtype: torch.dtype, memory_budget: int | None) -> int:
    """Rows per chunk of the pair loss: ``budget_rows``, or, with the default budget, exactly the
    largest pair's ``largest_pair`` unmasked rows when they exceed it but fit PAIR_BUDGET."""
    rows = budget_rows(vocab, dtype, memory_budget)
    if memory_budget is None and rows < largest_pair and largest_pair * row_bytes(vocab, dtype) <= PAIR_BUDGET:
        return largest_pair
    return rows


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
