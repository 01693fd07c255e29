"""One rank of tests/test_vocab_parallel_ties.py: ties of D and slices with no vocabulary.

Run as vocab_parallel_worker.py is (RANK, WORLD_SIZE, INIT_FILE, OUT; 3 processes: a 2-rank
group of global ranks 1 and 2, then the 3-rank world). Two families of checks, each recorded
(never raised) for the test to assert on:

  ties     tie-heavy rows (integer logits, bf16-quantised logits, a block of equal zr - z
           from different (z, zr) pairs straddling the quantile, ties spread over every
           slice) for cvar and ra_dpo_cvar: the statistics and each slice's gradient of
           every slice kernel equal the `torch` backend's on the whole rows (SPEC section 1:
           D = (zr - z) + (A - Ar) everywhere, so the same ties on every backend and layout),
           float64 to 1e-12;
  padding  a rank whose slice is all padding (vocab_size) and a rank of width 0, every risk,
           float32 and bfloat16: the collectives stay in step (a hang would time out) and
           the results equal one process's on the real columns.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import rsa_kernels as rk  # noqa: E402
from tie_rows import tie_rows  # noqa: E402
from vocab_parallel_worker import (KINDS, Ctx, close, expect_value_error, gather, linear_inputs,  # noqa: E402
                                   same_on_every_rank, weighted)

# float64 to 1e-12 (issue 30); float32 and bf16 as the other vocabulary-parallel tests
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}
# wide slices (>= 2048 columns each): the cpu kernels' sample brackets and kept candidates run
WIDTHS = {2: {100: [37, 63], 4490: [2200, 2290]}, 3: {100: [41, 17, 42], 6650: [2100, 2300, 2250]}}
TIE_RISKS = ("cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.95")


def check_ties(ctx: Ctx, risk: str, kind: str, dtype, v: int, seed: int, n: int = 10):
    z, zr, y = tie_rows(kind, n, v, seed)
    z, zr = z.to(dtype), zr.to(dtype)
    w = WIDTHS[ctx.world][v]
    cols = slice(sum(w[:ctx.rank]), sum(w[:ctx.rank + 1]))
    full = z.clone().requires_grad_()
    want = rk.token_stats(full, zr, y, risk=risk, backend="torch")  # the oracle: the torch backend
    weighted(want, seed).backward()
    part = z[:, cols].clone().requires_grad_()
    got = rk.token_stats(part, zr[:, cols], y, risk=risk, process_group=ctx.group, backend=ctx.kind)
    weighted(got, seed).backward()
    everywhere = gather(ctx, torch.stack(got))
    tol = TOL[dtype]
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"{name}: {m}")
    same_on_every_rank(ctx, torch.stack(got), everywhere, "the statistics")
    torch.testing.assert_close(part.grad, full.grad[:, cols], **tol, msg=lambda m: f"gradient of the slice: {m}")


def check_padding(ctx: Ctx, risk: str, dtype, layout: str, n: int = 12):
    """layout "tail": the last rank's slice is all padding (vocab_size ends where it begins);
    "empty": one rank (the middle of 3, the last of 2) has width 0, the others split V = 100."""
    v = 100
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    zr = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[[0, 5]] = -100
    if layout == "tail":  # the real columns over all but the last rank, which holds 7 padding columns
        widths = [37, 63] if ctx.world == 2 else [41, 59]
        widths = widths + [7] if ctx.world == 3 else [v, 7]
    else:
        widths = [v, 0] if ctx.world == 2 else [41, 0, 59]
    start = sum(widths[:ctx.rank])
    mine = min(widths[ctx.rank], max(0, v - start))
    zs, zrs = z[:, start:start + mine], zr[:, start:start + mine]
    pad = widths[ctx.rank] - mine
    if pad:  # padding: garbage logits in both models, never read
        zs = torch.cat([zs, torch.full((n, pad), 30.0, dtype=dtype)], 1)
        zrs = torch.cat([zrs, torch.full((n, pad), -5.0, dtype=dtype)], 1)
    full = z.clone().requires_grad_()
    want = rk.token_stats(full, zr, y, risk=risk, backend="torch")
    weighted(want, 3).backward()
    part = zs.clone().requires_grad_()
    got = rk.token_stats(part, zrs, y, risk=risk, process_group=ctx.group, backend=ctx.kind,
                         vocab_size=v if layout == "tail" else None)
    weighted(got, 3).backward()
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        close(a, b, dtype, name)
    close(part.grad[:, :mine], full.grad[:, start:start + mine], dtype, "gradient of the slice")
    if pad and bool(part.grad[:, mine:].ne(0).any()):
        raise AssertionError("the padding columns got a gradient")


def check_fused_empty(ctx: Ctx, risk: str, dtype):
    """The fused form where one rank holds no lm-head rows at all (its weight is (0, H))."""
    hidden, weight, bias, rh, rw, rb, labels = linear_inputs(dtype)
    widths = [100, 0] if ctx.world == 2 else [41, 0, 59]
    start = sum(widths[:ctx.rank])
    cols = slice(start, start + widths[ctx.rank])
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = rk.fused_linear_token_stats(h1, w1, rh, rw, labels, bias=bias, ref_bias=rb, risk=risk, backend="torch")
    weighted(want, 2).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()
    got = rk.fused_linear_token_stats(h2, w2, rh, rw[cols], labels, bias=bias[cols], ref_bias=rb[cols], risk=risk,
                                      chunk_size=4, process_group=ctx.group, backend=ctx.kind)
    weighted(got, 2).backward()
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        close(a, b, dtype, name)
    close(h2.grad, h1.grad, dtype, "gradient of hidden")
    close(w2.grad, w1.grad[cols], dtype, "gradient of the weight rows")


class Only(Ctx):
    """Ctx whose record() runs only the cases containing VP_ONLY (every rank alike), if set."""

    def record(self, test, case, fn):
        only = os.environ.get("VP_ONLY")
        if not only or only in f"{self.kind} {test} {case}":
            super().record(test, case, fn)


def run_group(ctx: Ctx, full: bool) -> None:
    """The same checks in the same order on every rank of ctx.group."""
    for kind in KINDS:
        ctx.kind = kind
        if kind == "triton":  # interpreted: float32, small rows only
            for risk in ("cvar:0.5", "ra_dpo_cvar:0.5"):
                ctx.record("ties", f"{risk} torch.float32 integer V=100",
                           lambda: check_ties(ctx, risk, "integer", torch.float32, 100, 3, n=6))
            ctx.record("padding", "cvar:0.9 torch.float32 tail",
                       lambda: check_padding(ctx, "cvar:0.9", torch.float32, "tail", n=6))
            continue
        seed = 0
        for dtype in (torch.float64, torch.float32):
            for tie in ("integer", "bf16", "straddle"):
                for v in (100, max(WIDTHS[ctx.world])):
                    for risk in TIE_RISKS if full or v != 100 else TIE_RISKS[::2]:
                        seed += 1
                        ctx.record("ties", f"{risk} {dtype} {tie} V={v}",
                                   lambda: check_ties(ctx, risk, tie, dtype, v, seed))
        for risk in ("cvar:0.5", "ra_dpo_cvar:0.5"):  # bf16 input itself (accumulated in float32)
            ctx.record("ties", f"{risk} torch.bfloat16 integer V={max(WIDTHS[ctx.world])}",
                       lambda: check_ties(ctx, risk, "integer", torch.bfloat16, max(WIDTHS[ctx.world]), 50))
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("tail", "empty"):
                for risk in ("kl", "erm:1", "cvar:0.9", "cvar:0.3", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.3"):
                    ctx.record("padding", f"{risk} {dtype} {layout}",
                               lambda: check_padding(ctx, risk, dtype, layout))
        for risk in ("cvar:0.9", "ra_dpo_cvar:0.5"):
            ctx.record("padding", f"fused {risk} torch.float32 empty",
                       lambda: check_fused_empty(ctx, risk, torch.float32))
        empty = torch.zeros(4, 0)  # every slice of width 0: refused on every rank, no hang
        ctx.record("padding", "no column on any rank", lambda: expect_value_error(
            ctx, lambda: rk.token_stats(empty, empty, torch.full((4,), -100), process_group=ctx.group,
                                        backend=ctx.kind), "hold no column"))


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{os.environ['INIT_FILE']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    torch.set_num_threads(1)
    timeout = timedelta(seconds=int(os.environ.get("COLLECTIVE_TIMEOUT", "60")))
    pair = dist.new_group([world - 2, world - 1], timeout=timeout)
    everyone = dist.new_group(list(range(world)), timeout=timeout)
    out = {}
    if rank >= world - 2:
        ctx = Only(pair)
        run_group(ctx, full=True)
        out[2] = ctx.results
    dist.barrier()
    ctx = Only(everyone)
    run_group(ctx, full=False)
    out[world] = ctx.results
    with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
