"""How many (tokens x hidden x vocabulary) matrix products one forward + backward of the
fused-linear loss costs with the default memory budget, at Llama-3's vocabulary.

Whole pairs in a chunk: 4 (both models' logits, then G W and G^T h once); token chunks
with recomputation: 6. The products are counted as they reach ATen (mm/addmm/bmm calls
with an operand of V rows or columns), summed as m k n and divided by labelled rows x H x V,
so chunking into several calls does not change the count.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rsa_kernels as rk
from rsa_kernels.fused_linear.linear import default_memory_budget

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


def _pair_bytes(vocab):
    return 2 * (LENGTH - PROMPT) * 2 * vocab * 4  # one pair's rows, policy + reference, float32


def test_defaults_fit_whole_pairs_four_products():
    vocab = LLAMA3_VOCAB
    budget = default_memory_budget(torch.device("cpu"))
    if budget < _pair_bytes(vocab):
        pytest.skip(f"this machine's default budget ({budget >> 20} MiB, from its available memory) does not "
                    f"hold a pair ({_pair_bytes(vocab) >> 20} MiB): the token schedule is the right choice here")
    products, loss, grads = _products(vocab)
    assert products == 4
    # a small budget forces token chunks with recomputation: 6 products, the same loss and gradients
    products_tokens, loss_tokens, grads_tokens = _products(vocab, memory_budget=64 * 2**20)
    assert products_tokens == 6
    # (float32 sums of 112 tokens' statistics per sequence, in a different order)
    torch.testing.assert_close(loss_tokens, loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads_tokens, grads):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_default_budget_follows_available_memory():
    from rsa_kernels.fused_linear import linear

    budget = default_memory_budget(torch.device("cpu"))
    avail = linear.available_memory(torch.device("cpu"))
    assert linear.MEMORY_BUDGET <= budget <= linear.BUDGET_CAP["cpu"]
    if avail is not None:
        want = min(linear.BUDGET_CAP["cpu"], max(linear.MEMORY_BUDGET, avail * linear.BUDGET_FRACTION))
        assert abs(budget - want) <= 0.05 * want  # (available memory moves between the two readings)
    # an explicit budget still wins over the default
    assert linear.budget_rows(LLAMA3_VOCAB, torch.float32, 64 * 2**20, torch.device("cpu")) == 65
