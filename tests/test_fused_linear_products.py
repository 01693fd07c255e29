"""How many (tokens x hidden x vocabulary) matrix products one forward + backward of the
fused-linear loss costs with the default chunk sizes, at Llama-3's vocabulary.

Whole pairs in a chunk: 4 (both models' logits, then G W and G^T h once); token chunks
with recomputation: 6. The products are counted as they reach ATen (mm/addmm/bmm calls
with an operand of V rows or columns), summed as m k n and divided by labelled rows x H x V,
so chunking into several calls does not change the count.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rsa_kernels as rk
from rsa_kernels.fused_linear import linear

aten = torch.ops.aten
SEQUENCES, LENGTH, PROMPT, H = 4, 128, 16, 64     # 2 pairs of 128-token sequences
LLAMA3_VOCAB = 128256


class ProductCounter(TorchDispatchMode):
    """Sums m * k * n over the matrix products that involve the vocabulary dimension."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.flops, self.calls = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (aten.mm, aten.bmm):
            a, b = args[0], args[1]
        elif packet in (aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_):
            a, b = args[1], args[2]
        else:
            a = b = None
        if a is not None and self.vocab in (*a.shape[-2:], b.shape[-1]):
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _inputs(vocab):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQUENCES, LENGTH, H, generator=g).requires_grad_()
    weight = (torch.randn(vocab, H, generator=g) / 8).requires_grad_()
    ref_hidden, ref_weight = hidden.detach() + 0.01, weight.detach() * 1.01
    labels = torch.randint(0, vocab, (SEQUENCES, LENGTH), generator=g)
    labels[:, :PROMPT] = -100  # a prompt: never multiplied out
    return hidden, weight, ref_hidden, ref_weight, labels


def _products(vocab, **kw):
    """(products of one forward + backward, loss, gradients)."""
    hidden, weight, ref_hidden, ref_weight, labels = _inputs(vocab)
    counter = ProductCounter(vocab)
    with counter:
        loss, _ = rk.fused_linear_preference_loss(hidden, weight, ref_hidden, ref_weight, labels,
                                                  objective="rsa2", risk="cvar:0.9", **kw)
        loss.backward()
    unit = int((labels != -100).sum()) * H * vocab
    assert counter.flops % unit == 0, (counter.flops, unit)  # each product covers every labelled row once
    return counter.flops // unit, loss.detach(), (hidden.grad, weight.grad)


def test_defaults_fit_whole_pairs_four_products():
    # one pair's logits (2 x 112 labelled rows, policy + reference, float32) take 219 MiB:
    # more than MEMORY_BUDGET, within PAIR_BUDGET, so a chunk holds exactly that pair
    products, loss, grads = _products(LLAMA3_VOCAB)
    assert products == 4
    # a small budget forces token chunks with recomputation: 6 products, the same loss and gradients
    products_tokens, loss_tokens, grads_tokens = _products(LLAMA3_VOCAB, memory_budget=64 * 2**20)
    assert products_tokens == 6
    # (float32 sums of 112 tokens' statistics per sequence, in a different order)
    torch.testing.assert_close(loss_tokens, loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads_tokens, grads):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_default_pair_chunk_is_the_smallest_that_holds_the_largest_pair():
    f32 = torch.float32
    labelled = 2 * (LENGTH - PROMPT)
    per_row = linear.row_bytes(LLAMA3_VOCAB, f32)
    assert per_row == 2 * LLAMA3_VOCAB * 4
    assert linear.MEMORY_BUDGET < labelled * per_row <= linear.PAIR_BUDGET
    assert linear.pair_chunk_rows(labelled, LLAMA3_VOCAB, f32, None) == labelled
    # pairs that fit MEMORY_BUDGET share chunks of that size (at V=32000, 524 float32 rows)
    assert linear.pair_chunk_rows(512, 32000, f32, None) == linear.MEMORY_BUDGET // linear.row_bytes(32000, f32) == 524
    # a pair past PAIR_BUDGET: MEMORY_BUDGET's rows, so `auto` takes token chunks
    too_big = linear.PAIR_BUDGET // per_row + 1
    assert linear.pair_chunk_rows(too_big, LLAMA3_VOCAB, f32, None) == linear.MEMORY_BUDGET // per_row < too_big
    # an explicit budget always wins
    assert linear.pair_chunk_rows(labelled, LLAMA3_VOCAB, f32, 64 * 2**20) == 65
    assert linear.budget_rows(LLAMA3_VOCAB, f32, 64 * 2**20) == 65
