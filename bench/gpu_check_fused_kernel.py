"""GPU check of the fused lm-head kernel (schedule="kernel", issue 5): does it pay?

1. Agreement on CUDA of the token statistics and gradients (hidden, weight, bias):
   (b) the fused kernel and (a) the chunked token path, each against the float64 token
   path on the same inputs, at sizes that are multiples of no block, kl and erm.
2. Forward + backward of fused_linear_token_stats with risk kl, summed statistics as the
   loss: median time over a few runs after warm-up, and peak CUDA memory above the inputs,
   weights and their gradients, of
     (a) chunks: the chunked token path (schedule="tokens", row kernel = triton),
     (b) kernel: the fused kernel (schedule="kernel"),
     (c) logits: materialised logits h W^T + the triton row kernels (rk.token_stats).
   Ratios b/a and c/a in the same run. Sizes N x H x V and dtypes from --configs.

    python bench/gpu_check_fused_kernel.py                   # the default configs (needs CUDA)
    python bench/gpu_check_fused_kernel.py --configs 2048x4096x128000:bf16 --blocks 128,128,64
    TRITON_INTERPRET=1 python bench/gpu_check_fused_kernel.py --device cpu --tiny   # dry run, no GPU

Exit status: 0 when every agreement check passes, 1 when one fails, 2 without CUDA.
Configs are skipped (and said so) once --budget seconds have passed, so that a time-boxed
step still prints its table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rsa_kernels as rk  # noqa: E402
from rsa_kernels.backends import get_backend  # noqa: E402
from rsa_kernels.fused_linear import fused_kernel  # noqa: E402
from rsa_kernels.fused_linear.hybrid import hybrid_rows_token_stats  # noqa: E402
from rsa_kernels.fused_linear.linear import budget_rows  # noqa: E402
from rsa_kernels.risk import parse_risk  # noqa: E402
from gpu_bench import timed  # noqa: E402  (this folder is sys.path[0] when run as a script)

DEFAULT_CONFIGS = ("2048x1024x32000:bf16,2048x1024x32000:fp32,2048x1024x128000:bf16,"
                   "2048x1024x128000:fp32,8192x4096x128000:bf16,2048x4096x128000:bf16")
TINY_CONFIGS = "40x24x300:fp32,40x24x300:bf16"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("chunks", "kernel", "hybrid", "logits")  # hybrid: the kernel's forward, the chunks' backward


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=None, help=f"NxHxV:dtype,... (default {DEFAULT_CONFIGS})")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of chunks,kernel,logits")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per variant, after one warm-up")
    p.add_argument("--budget", type=float, default=70.0,
                   help="seconds after which remaining timing configs are skipped")
    p.add_argument("--blocks", default=None,
                   help="BLOCK_N,BLOCK_V,BLOCK_H for the kernel, every dtype (default fused_kernel.BLOCKS)")
    p.add_argument("--warps", type=int, default=None, help="num_warps of the kernels")
    p.add_argument("--tf32", action="store_true", help="tl.dot in TF32 for float32 inputs (default: IEEE)")
    p.add_argument("--no-agreement", action="store_true", help="skip the agreement check")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu only as a dry run under TRITON_INTERPRET=1, with --tiny")
    p.add_argument("--tiny", action="store_true", help=f"tiny sizes ({TINY_CONFIGS}), for a dry run")
    args = p.parse_args(argv)
    try:
        args.configs = [parse_config(c) for c in (args.configs or (TINY_CONFIGS if args.tiny else DEFAULT_CONFIGS))
                        .split(",") if c]
    except ValueError as err:
        p.error(f"--configs: {err}")
    args.variants = [v for v in args.variants.split(",") if v]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: choose from {','.join(VARIANTS)}")
    if args.blocks is not None:
        try:
            blocks = tuple(int(b) for b in args.blocks.split(","))
        except ValueError:
            blocks = ()
        if len(blocks) != 3 or any(b < 16 or b & (b - 1) for b in blocks):
            p.error("--blocks: three powers of two >= 16, e.g. 64,128,64")
        args.blocks = blocks
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def parse_config(text):
    size, _, dt = text.partition(":")
    parts = size.lower().split("x")
    if len(parts) != 3 or dt not in DTYPES:
        raise ValueError(f"{text!r} is not NxHxV:dtype with dtype in {sorted(DTYPES)}")
    n, h, v = (int(x) for x in parts)
    return n, h, v, dt


def configure(args):
    if args.blocks:
        fused_kernel.BLOCKS = {dt: args.blocks for dt in fused_kernel.BLOCKS}
    if args.warps:
        fused_kernel.NUM_WARPS = args.warps
    if args.tf32:
        fused_kernel.FLOAT32_PRECISION = "tf32"


def make(n, h, v, dtype, device, *, bias=False, masked=0.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    x = dict(hidden=rnd(n, h).to(dtype), weight=(rnd(v, h) / h ** 0.5).to(dtype),
             ref_hidden=None, ref_weight=None, bias=rnd(v).to(dtype) if bias else None,
             ref_bias=None, labels=torch.randint(0, v, (n,), device=device, generator=g))
    x["ref_hidden"] = (x["hidden"].float() + 0.1 * rnd(n, h)).to(dtype)
    x["ref_weight"] = (x["weight"].float() * 1.01).to(dtype)
    if bias:
        x["ref_bias"] = (x["bias"].float() + 0.1 * rnd(v)).to(dtype)
    if masked:
        x["labels"][torch.rand(n, device=device, generator=g) < masked] = -100
    return x


def step(x, variant, risk="kl", weights=None):
    """Stats of one variant and the loss sum(weights * (logp, kl, risk)) (sum of all by default)."""
    args = (x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"])
    kw = dict(bias=x["bias"], ref_bias=x["ref_bias"], risk=risk)
    if variant == "logits":
        z = x["hidden"] @ x["weight"].t()
        zr = (x["ref_hidden"] @ x["ref_weight"].t()).detach()
        if x["bias"] is not None:
            z, zr = z + x["bias"], zr + x["ref_bias"]
        out = rk.token_stats(z, zr, x["labels"], risk=risk, backend="triton")
    elif variant == "chunks":
        out = rk.fused_linear_token_stats(*args, **kw, schedule="tokens")
    elif variant == "kernel":
        out = rk.fused_linear_token_stats(*args, **kw, schedule="kernel")
    elif variant == "hybrid":
        h, rh = x["hidden"], x["ref_hidden"]
        out = hybrid_rows_token_stats(h, x["weight"], x["bias"], rh, x["ref_weight"], x["ref_bias"], x["labels"],
                                      risk=parse_risk(risk), ignore_index=-100, backend=get_backend("auto", h),
                                      rows=budget_rows(x["weight"].shape[0], h.dtype, None))
    else:  # the float64 oracle: the token path on float64 copies (the torch row kernel)
        d = {k: t if t is None or k == "labels" else t.detach().double().requires_grad_(t.requires_grad)
             for k, t in x.items()}
        out = rk.fused_linear_token_stats(d["hidden"], d["weight"], d["ref_hidden"], d["ref_weight"], d["labels"],
                                          bias=d["bias"], ref_bias=d["ref_bias"], risk=risk, backend="torch")
        x = d
    stats = torch.stack([t.float() if variant != "float64" else t for t in out], 1)
    w = weights.to(stats.dtype) if weights is not None else torch.ones(3, dtype=stats.dtype, device=stats.device)
    loss = (stats[:, [0, 2, 3]] * w).sum()
    return stats, loss, x


AGREEMENT_SIZE = (1000, 200, 5003)   # multiples of no block
TINY_AGREEMENT_SIZE = (40, 24, 300)


def agreement(device, size):
    """(rows of the report, all passed): kernel and chunks each against float64."""
    rows, ok = [], True
    for dt, risk, bias in (("fp32", "erm:1", True), ("bf16", "kl", False), ("fp32", "kl", False)):
        dtype = DTYPES[dt]
        x = make(*size, dtype, device, bias=bias, masked=0.2, seed=1)
        leaves = ["hidden", "weight"] + (["bias"] if bias else [])
        for k in leaves:
            x[k].requires_grad_(True)
        w = torch.randn(x["labels"].shape[0], 3, device=device, generator=torch.Generator(device).manual_seed(2))
        results = {}
        for variant in ("float64", "chunks", "kernel", "hybrid"):
            stats, loss, xs = step(x, variant, risk, w)
            grads = torch.autograd.grad(loss, [xs[k] for k in leaves])
            results[variant] = (stats.double(), [g.double() for g in grads])
        # float32: products in float32 (IEEE); half: logits from half inputs, G rounded to half
        tol_stats, tol_grad = (2e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
        # each path against float64, then the kernel against the chunks directly
        for variant, (want_stats, want_grads) in (("chunks", results["float64"]), ("kernel", results["float64"]),
                                                  ("hybrid", results["float64"]), ("k vs c", results["chunks"])):
            stats, grads = results["kernel" if variant == "k vs c" else variant]
            stat_err = ((stats - want_stats).abs() / (1 + want_stats.abs())).max().item()
            grad_err = [((g - e).norm() / e.norm()).item() for g, e in zip(grads, want_grads)]
            passed = stat_err <= tol_stats and max(grad_err) <= tol_grad
            ok &= passed
            rows.append(f"| {dt:4} | {risk:5} | {str(bias):5} | {variant:6} | {stat_err:9.2e} | "
                        + " ".join(f"{e:8.2e}" for e in grad_err).ljust(26) + f" | {'ok' if passed else 'FAIL'} |")
    return rows, ok


def measure(x, variant, device, rounds):
    """(median seconds of the forward alone, of forward + backward, extra peak MiB) of one variant.

    The forward alone tells whether fusing pays there even if the backward's atomics do not."""
    def run():
        for k in ("hidden", "weight"):
            x[k].grad = None
        step(x, variant)[1].backward()

    def forward_only():
        with torch.no_grad():
            step(x, variant)

    run()  # warm-up: compiles, and leaves the gradients allocated (part of the baseline)
    forward_only()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    total = timed(run, device, warmup=0, reps=rounds)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return timed(forward_only, device, warmup=0, reps=rounds), total, extra


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check_fused_kernel: needs a CUDA device (none here); for a dry run on the CPU: "
              "TRITON_INTERPRET=1 python bench/gpu_check_fused_kernel.py --device cpu --tiny")
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check_fused_kernel: --device cpu runs the kernels interpreted: set TRITON_INTERPRET=1")
        return 2
    configure(args)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (interpreter)"
    names = {v: k for k, v in DTYPES.items()}
    blocks = ({"all": fused_kernel.INTERPRET_BLOCKS} if fused_kernel.interpreting()
              else {names[d]: b for d, b in fused_kernel.BLOCKS.items()})
    print(f"# fused lm-head kernel vs chunked path: {name}, torch {torch.__version__}, kernel blocks (rows, "
          f"items, hidden) {', '.join(f'{k} {b}' for k, b in blocks.items())}, warps {fused_kernel.NUM_WARPS}, "
          f"float32 dot {fused_kernel.FLOAT32_PRECISION}", flush=True)
    ok = True
    if not args.no_agreement:
        size = TINY_AGREEMENT_SIZE if args.tiny else AGREEMENT_SIZE
        print("\n## Agreement with the float64 token path (N=%d, H=%d, V=%d, 20%% rows masked)\n" % size)
        print("| dtype | risk | bias | path | max stat err | grad rel err (h w b) | |")
        print("|------|-------|-------|--------|-----------|----------------------------|----|")
        rows, ok = agreement(args.device, size)
        print("\n".join(rows), flush=True)
        print(f"\nagreement: {'all passed' if ok else 'FAILED'} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print("\n## Forward + backward, risk kl, every row labelled; extra = peak CUDA memory above inputs and grads\n")
    print("| N x H x V | dtype | variant | fwd ms | fwd / chunks | fwd+bwd ms | extra MiB | time / chunks "
          "| memory / chunks |")
    print("|-----------|-------|---------|--------|--------------|------------|-----------|---------------"
          "|-----------------|", flush=True)
    for n, h, v, dt in args.configs:
        label = f"{n}x{h}x{v}"
        if time.perf_counter() - t0 > args.budget:
            print(f"| {label} | {dt} | skipped: past the --budget of {args.budget:.0f} s | | | | | | |", flush=True)
            continue
        x = make(n, h, v, DTYPES[dt], args.device)
        for k in ("hidden", "weight"):
            x[k].requires_grad_(True)
        base = None
        for variant in args.variants:
            try:
                fwd, sec, mib = measure(x, variant, args.device, args.rounds)
            except Exception as err:  # e.g. out of memory for materialised logits: report, go on
                print(f"| {label} | {dt} | {variant} | error: {repr(err)[:120]} | | | | | |", flush=True)
                continue
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            if variant == "chunks":
                base = (fwd, sec, mib)
            ratio = ((f"{fwd / base[0]:.2f}", f"{sec / base[1]:.2f}", f"{mib / base[2]:.3f}" if base[2] > 0 else "-")
                     if base else ("-", "-", "-"))
            print(f"| {label} | {dt} | {variant} | {fwd * 1e3:7.2f} | {ratio[0]:>12} | {sec * 1e3:10.2f} | "
                  f"{mib:9.1f} | {ratio[1]:>13} | {ratio[2]:>15} |", flush=True)
        del x
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
