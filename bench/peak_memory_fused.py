"""One forward + backward of a preference loss from hidden states, and its peak memory.

Variants: "plain" (both models' logits materialised, then the plain formulation of the
published Ra-DPO code: rsa/bench/baselines.py), "compiled" (the same under torch.compile;
compiled by a warm-up step at the measured size), "fused" (this package's
fused_linear_preference_loss, schedule chosen from its budget), "fused_tokens" (the same,
token chunks forced), "liger" (LigerFusedLinearDPOLoss, `dpo` only).

Run as a script it measures, in this fresh process, the peak resident memory above the
inputs, weights and their gradients: the kernel's high-water mark (VmHWM) is reset after
the inputs exist and after a small warm-up run of the same variant, and the gradient
bytes are subtracted since every variant must hold them. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from peak_memory import reset_peak, status_kib  # the same /proc readings as the logits script (and repo on sys.path)


def make_step(variant, objective, risk, *, sequences=8, length=256, hidden_size=1024, vocab=32000,
              dtype=torch.float32, seed=0, beta=0.1):
    """(step, params): step() runs forward + backward once, leaving gradients in params."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(sequences, length, hidden_size, generator=g, dtype=dtype) / 4).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=dtype) / 16).requires_grad_(True)
    ref_hidden = hidden.detach() + 0.05 * torch.randn(hidden.shape, generator=g, dtype=dtype)
    ref_weight = weight.detach() + 0.01 * torch.randn(weight.shape, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (sequences, length), generator=g)  # every token counts
    params = (hidden, weight)

    if variant in ("plain", "compiled"):
        from rsa.bench.baselines import compiled_pair_loss, plain_pair_loss

        pair_loss = plain_pair_loss if variant == "plain" else compiled_pair_loss

        def step():
            pair_loss(hidden, weight, ref_hidden, ref_weight, labels, risk=risk, objective=objective,
                      beta=beta).backward()
    elif variant in ("fused", "fused_tokens"):
        import rsa_kernels as rk

        schedule = "tokens" if variant == "fused_tokens" else "auto"

        def step():
            loss, _ = rk.fused_linear_preference_loss(hidden, weight, ref_hidden, ref_weight, labels,
                                                      objective=objective, risk=risk, beta=beta,
                                                      schedule=schedule)
            loss.backward()
    elif variant == "liger":
        if objective != "dpo":
            raise ValueError("liger: only the dpo objective has a Liger counterpart")
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True)

        def step():
            out = fn(weight, hidden, labels, None, ref_hidden, ref_weight, None)
            (out[0] if isinstance(out, tuple) else out).backward()
    else:
        raise ValueError(f"variant: unknown {variant!r}")

    def run():
        for p in params:
            p.grad = None
        step()
    return run, params


def measure(variant, objective, risk, **sizes) -> dict:
    small, _ = make_step(variant, objective, risk, sequences=2, length=16, hidden_size=32, vocab=256)
    small()  # warm-up: thread pools, lazy imports, first-call allocations
    step, params = make_step(variant, objective, risk, **sizes)
    if variant == "compiled":
        step()  # the compilation for this shape is warm-up, not the step's memory
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    base = status_kib("VmRSS") * 1024
    if not reset_peak():
        raise RuntimeError("cannot reset the peak resident set size (needs Linux >= 4.0)")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM") * 1024
    return {"variant": variant, "objective": objective, "risk": risk, "extra_bytes": peak - base - grad_bytes,
            "seconds": seconds, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["plain", "compiled", "fused", "fused_tokens", "liger"])
    ap.add_argument("--objective", default="rsa2")
    ap.add_argument("--risk", default="cvar:0.9")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    print(json.dumps(measure(a.variant, a.objective, a.risk, sequences=a.sequences, length=a.length,
                             hidden_size=a.hidden_size, vocab=a.vocab)))
