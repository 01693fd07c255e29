"""GPU check of the fused linear loss (for the lead's device run; needs CUDA).

1. Agreement on CUDA: fused_linear_preference_loss (backend auto = triton) against
   preference_loss on materialised logits, float32 and bfloat16, both schedules.
2. Time and peak CUDA memory above inputs + gradients of fwd+bwd at the issue's size
   (N=2048, H=1024, V=32000, and V=128000) for the baselines "plain" (both models' logits
   materialised + the published Ra-DPO formulation, rsa/bench/baselines.py) and "compiled"
   (its torch.compile, compiled in the untimed first run), fused, and Liger (compiled).
Prints one JSON document.   usage: python bench/gpu_check_fused_linear.py
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rsa_kernels as rk  # noqa: E402
from rsa.bench.baselines import compiled_pair_loss, plain_pair_loss  # noqa: E402


def agreement(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(8, 64, 256, device="cuda", generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(5000, 256, device="cuda", generator=g) / 8).to(dtype).requires_grad_(True)
    rh, rw = (h.detach() + 0.05).to(dtype), (w.detach() * 1.01).to(dtype)
    lab = torch.randint(0, 5000, (8, 64), device="cuda", generator=g)
    lab[:, :10] = -100
    out = {}
    for risk in ("kl", "cvar:0.9", "erm:1"):
        want, _ = rk.preference_loss(h @ w.t(), rh @ rw.t(), lab, risk=risk, shift=True)
        wg = torch.autograd.grad(want, (h, w))
        for schedule in ("pairs", "tokens"):
            got, _ = rk.fused_linear_preference_loss(h, w, rh, rw, lab, risk=risk, shift=True, schedule=schedule)
            gg = torch.autograd.grad(got, (h, w))
            out[f"{dtype}/{risk}/{schedule}"] = {
                "loss_abs_diff": abs(got.item() - want.item()),
                "grad_rel_diff": [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(gg, wg)]}
    return out


def timing(variant, objective, risk, vocab, dtype=torch.float32, rounds=5):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(8, 256, 1024, device="cuda", generator=g).div(4).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, 1024, device="cuda", generator=g).div(16).to(dtype).requires_grad_(True)
    rh, rw = h.detach() * 1.01, w.detach() * 1.01
    lab = torch.randint(0, vocab, (8, 256), device="cuda", generator=g)
    if variant in ("plain", "compiled"):
        pair_loss = plain_pair_loss if variant == "plain" else compiled_pair_loss
        def step():
            return pair_loss(h, w, rh, rw, lab, risk=risk, objective=objective, beta=0.1)
    elif variant == "fused":
        def step():
            return rk.fused_linear_preference_loss(h, w, rh, rw, lab, objective=objective, risk=risk)[0]
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=True, use_ref_model=True)
        def step():
            out = fn(w, h, lab, None, rh, rw, None)
            return out[0] if isinstance(out, tuple) else out
    def run():
        h.grad = w.grad = None
        step().backward()
    run()  # warm-up: compiles for "compiled" and Liger, not timed
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # inputs, weights and their gradients (held from the first run)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize(); t0 = time.perf_counter(); run(); torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    extra = torch.cuda.max_memory_allocated() - base
    return {"median_s": sorted(times)[len(times) // 2], "extra_mib": extra / 2**20}


if __name__ == "__main__":
    report = {"backends": rk.available_backends(), "agreement": {}, "timing": {}}
    for dt in (torch.float32, torch.bfloat16):
        report["agreement"].update(agreement(dt))
    for vocab in (32000, 128000):
        for objective, risk, variants in (("rsa2", "cvar:0.9", ("plain", "compiled", "fused")),
                                           ("dpo", "kl", ("plain", "compiled", "fused", "liger"))):
            for v in variants:
                try:
                    report["timing"][f"V{vocab}/{objective}/{v}"] = timing(v, objective, risk, vocab)
                except Exception as err:  # report, keep going (e.g. out of memory for plain at large V)
                    report["timing"][f"V{vocab}/{objective}/{v}"] = repr(err)[:200]
                torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))
