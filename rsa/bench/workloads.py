"""One benchmark case as a callable: inputs built once, ``forward()`` returns a scalar loss.

The loss's backward is the backward that gets measured. Every implementation of a case
gets the same inputs (same seed) and computes the same quantity, so their times and
memory compare like for like:

- token_stats: logits (N, V) -> sum(logp) + 0.1 sum(kl) + sum(risk), gradient to the logits;
- fused_linear: hidden (N, H) and lm head (V, H) of policy and reference, N tokens in 4
  sequences (2 pairs) -> the mean pair loss (objective rsa2, or dpo), gradient to the
  policy's hidden states and weight.
"""
from __future__ import annotations

import torch

import rsa_kernels as rk

from .baselines import compiled_pair_loss, compiled_token_stats, plain_pair_loss, plain_token_stats
from .grid import Case

SEQUENCES = 4          # fused-linear cases: 2 pairs, N / 4 tokens each
BETA = 0.1
BASELINE_STATS = {"plain": plain_token_stats, "compiled": compiled_token_stats}
BASELINE_PAIRS = {"plain": plain_pair_loss, "compiled": compiled_pair_loss}


class Workload:
    """Inputs of ``case`` and the forward of its implementation."""

    def __init__(self, case: Case, seed: int = 0):
        self.case = case
        dev, dt = torch.device(case.device), getattr(torch, case.dtype)
        # drawn on the device: a CPU generator would spend seconds per GPU-sized case
        g = torch.Generator(device=dev).manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=dev) * scale).to(dt)

        n, v, h = case.n, case.v, case.h
        if case.path == "token_stats":
            # a policy a little way from its reference, as during preference training
            self.zr = randn(n, v, scale=2.0)
            self.z = (self.zr.float() + randn(n, v, scale=0.5).float()).to(dt).requires_grad_(True)
            self.labels = torch.randint(0, v, (n,), generator=g, device=dev)
            self.params = [self.z]
        elif case.path == "fused_linear":
            t = max(1, n // SEQUENCES)
            self.ref_hidden = randn(SEQUENCES, t, h)
            self.hidden = (self.ref_hidden.float() + randn(SEQUENCES, t, h, scale=0.1).float()).to(dt)
            self.ref_weight = randn(v, h, scale=h ** -0.5 * 2.0)
            self.weight = (self.ref_weight.float() + randn(v, h, scale=h ** -0.5 * 0.2).float()).to(dt)
            self.hidden.requires_grad_(True)
            self.weight.requires_grad_(True)
            self.labels = torch.randint(0, v, (SEQUENCES, t), generator=g, device=dev)
            self.labels[:, : max(1, t // 8)] = -100  # a short prompt, as in preference data
            self.params = [self.hidden, self.weight]
        else:
            raise ValueError(f"case.path: unknown path {case.path!r}")
        self._fn = self._build()

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def grad_bytes(self) -> int:
        """What every implementation must return: one gradient per parameter."""
        return sum(p.numel() * p.element_size() for p in self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def forward(self) -> torch.Tensor:
        return self._fn()

    def _build(self):
        c = self.case
        if c.path == "token_stats":
            if c.impl in BASELINE_STATS:
                stats_fn = BASELINE_STATS[c.impl]

                def baseline():
                    logp, _, kl, value = stats_fn(self.z, self.zr, self.labels, risk=c.risk)
                    return logp.sum() + 0.1 * kl.sum() + value.sum()
                return baseline

            def kernel():
                st = rk.token_stats(self.z, self.zr, self.labels, risk=c.risk, backend=c.impl)
                return st.logp.sum() + 0.1 * st.kl.sum() + st.risk.sum()
            return kernel
        args = (self.hidden, self.weight, self.ref_hidden, self.ref_weight, self.labels)
        if c.impl in BASELINE_PAIRS:
            pair_fn = BASELINE_PAIRS[c.impl]
            return lambda: pair_fn(*args, risk=c.risk, objective=c.objective, beta=BETA)
        if c.impl == "liger":
            if c.objective != "dpo":
                raise ValueError("case.impl: Liger Kernel's fused linear loss is the dpo objective only")
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
            # compiled=False: its torch.compile'd chunk function takes minutes to build on CPU
            loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=True, compiled=c.device != "cpu")
            return lambda: _first(loss_fn(self.weight, self.hidden, self.labels, None, self.ref_hidden,
                                          self.ref_weight, None))

        def fused():
            loss, _ = rk.fused_linear_preference_loss(*args, objective=c.objective, risk=c.risk, beta=BETA,
                                                      backend=c.impl)
            return loss
        return fused


def _first(out):
    return out[0] if isinstance(out, tuple) else out
