"""One rank of the vocabulary-parallel tests: tests/test_vocab_parallel.py starts 3.

Run as a script with RANK, WORLD_SIZE, INIT_FILE and OUT in the environment (gloo over a
file rendezvous on 127.0.0.1, so parallel test runs never fight over a port); the checks
run in a 2-rank group (global ranks 1 and 2), then in the 3-rank world, for the slice
kernels of each backend (KINDS: torch, cpu where the extension is built, triton under
TRITON_INTERPRET=1 where triton is installed). Every rank builds the same full inputs from
the same seeds, computes the single-process result itself (the same backend on the whole
rows, as SPEC section 7 states it), and compares it with the vocabulary-parallel result of
its own slice. Each check is recorded (never
raised), so one failure cannot leave the other ranks waiting; the results go to
OUT/rank{RANK}.json for the test to assert on.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta

os.environ.setdefault("TRITON_INTERPRET", "1")  # read at call time: CPU tensors run the triton kernels interpreted

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import rsa_kernels as rk  # noqa: E402
from rsa_kernels.backends import available_backends, get_backend, get_slices, torch_rows  # noqa: E402
from rsa_kernels.risk import parse_risk  # noqa: E402
from rsa_kernels.vocab_parallel import VocabLayout, VocabParallelRows, forward_communication  # noqa: E402
from rsa_kernels.vocab_parallel.costs import AGREEMENT_BYTES  # noqa: E402

# the slice kernels under test: every backend usable here (the cpu one needs the extension)
KINDS = [k for k in os.environ.get("VP_KINDS", "torch,cpu,triton").split(",") if k in available_backends()]

RISKS = ["kl", "erm:0.5", "erm:3", "cvar:0", "cvar:0.5", "cvar:0.95", "ra_dpo_cvar:0.1", "ra_dpo_cvar:0.5",
         "ra_dpo_cvar:0.9"]
# uneven contiguous slices of V = 100 (and 101, where ra_dpo_cvar:0.5 needs no interpolation)
# and slices wide enough (>= 2048) for the cpu kernels' sample bracket of ra_dpo_cvar's quantile
WIDTHS = {2: {100: [37, 63], 101: [60, 41], 4490: [2200, 2290]},
          3: {100: [41, 17, 42], 101: [30, 30, 41], 6650: [2100, 2300, 2250]}}
WIDE = {2: 4490, 3: 6650}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}  # bf16: the gradient's own rounding


class Ctx:
    """One process group's run: this process's rank in it, and the records of its checks."""

    def __init__(self, group):
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.results = []
        self.kind = None  # the backend whose slice kernels the checks run

    @property
    def single(self) -> str:
        """The single-process oracle: the same backend on the whole rows (SPEC section 7).
        For triton (interpreted: slow) the torch backend, which computes the same numbers
        but where the triton backend's own convention differs (erm with an item the policy
        rules out while q underflows: rsa_kernels/backends/triton_rows.py), see oracle()."""
        return "torch" if self.kind in (None, "triton") else self.kind

    def oracle(self, risk: str, kind: str) -> str:
        return "triton" if self.kind == "triton" and risk.startswith("erm") and kind == "extreme" else self.single

    def widths(self, v):
        return WIDTHS[self.world][v]

    def cols(self, v):
        w = self.widths(v)
        start = sum(w[:self.rank])
        return slice(start, start + w[self.rank])

    def record(self, test, case, fn):
        print(f"{self.world} ranks, {self.kind}: {test} {case}", flush=True)  # where a hang happened
        t0 = time.perf_counter()
        try:
            info = fn() or {}
            self.results.append(dict(test=test, kind=self.kind, case=case, ok=True, **info))
        except Exception as err:  # noqa: BLE001 - recorded for the test to report
            self.results.append(dict(test=test, kind=self.kind, case=case, ok=False,
                                     error=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"))
        self.results[-1]["seconds"] = time.perf_counter() - t0


def rows(n, v, seed, dtype, kind, world):
    """(z, zr, labels) of n rows over v columns, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    widths = WIDTHS[world][v]
    starts = [sum(widths[:k]) for k in range(world)]
    if kind == "ties":  # few distinct logits: many equal D values within and across slices
        z = torch.randint(-2, 3, (n, v), generator=g).double()
        zr = torch.randint(-2, 3, (n, v), generator=g).double()
    else:
        scale = 40.0 if kind == "extreme" else 2.0
        z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
        zr = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
        # ties across slices: the last slice repeats columns of the first, in both models
        for j in range(3):
            z[:, starts[-1] + j], zr[:, starts[-1] + j] = z[:, j], zr[:, j]
    z[1], zr[1] = zr[1].clone(), zr[1].clone()  # policy = reference: every D is 0
    # -inf: items masked in both models, in the reference only (q = 0), and a row where the
    # policy alone rules out an item the reference keeps (p = 0 < q: kl = +inf)
    z[2, [0, starts[-1]]] = zr[2, [0, starts[-1]]] = float("-inf")
    zr[3, [1, starts[1], v - 1]] = float("-inf")
    if kind == "extreme":
        z[4, starts[1] + 1] = float("-inf")
    if kind == "samples":  # rows where the cpu kernels' strided samples of each slice mislead (ra_dpo_cvar's)
        for k, (start, w) in enumerate(zip(starts, widths)):
            sampled = torch.zeros(w, dtype=torch.bool)
            sampled[::w // 512] = True  # ra_dpo_cvar's 512 samples: every 4th column
            cols = torch.arange(start, start + w)
            z[9:11, cols] = zr[9:11, cols] = 0.0
            zr[9, cols[~sampled]] = -3.0  # u = -3 off the sample, 0 on it
            zr[10, cols[sampled]] = -3.0  # and the other way round
    y = torch.randint(0, v, (n,), generator=g)
    for k in range(world):  # labels in every slice, on both edges of each
        y[5 + 2 * k], y[6 + 2 * k] = starts[k], starts[k] + widths[k] - 1
    y[[i for i in (0, 12, 13, 20) if i < n]] = -100  # masked rows
    return z.to(dtype), zr.to(dtype), y


def weighted(stats, seed):
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in stats)


def close(a, b, dtype, what):
    try:
        torch.testing.assert_close(a, b, equal_nan=True, **TOL[dtype])
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def gather(ctx, t):
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(parts, t.detach().contiguous(), group=ctx.group)
    return parts


def same_on_every_rank(ctx, t, parts, what):
    for k, p in enumerate(parts):
        if not torch.equal(torch.nan_to_num(p), torch.nan_to_num(t)) or not torch.equal(p.isnan(), t.isnan()):
            raise AssertionError(f"{what} differs between rank {ctx.rank} and rank {k}")


def check_token_stats(ctx, risk, dtype, kind, v, seed, n=23):
    z, zr, y = rows(n, v, seed, dtype, kind, ctx.world)
    cols = ctx.cols(v)
    full = z.clone().requires_grad_()
    want = rk.token_stats(full, zr, y, risk=risk, backend=ctx.oracle(risk, kind))
    weighted(want, seed).backward()
    part = z[:, cols].clone().requires_grad_()
    # several row chunks (each with its own rounds) for the random inputs, one chunk otherwise
    got = rk.token_stats(part, zr[:, cols], y, risk=risk, process_group=ctx.group, backend=ctx.kind or "auto",
                         chunk_size=7 if kind == "random" else None)
    weighted(got, seed).backward()
    selects = parse_risk(risk).kind in ("cvar", "ra_dpo_cvar")
    if selects:  # the selections themselves: the saved per-row scalars (A, Ar, tau or Q, weights)
        layout = VocabLayout(ctx.group, ctx.rank, tuple(ctx.widths(v)))
        kernels, _ = get_slices(ctx.kind or "auto", z)
        _, saved = VocabParallelRows(layout, kernels).forward(z[:, cols], zr[:, cols], y, parse_risk(risk), -100)
    everywhere = gather(ctx, torch.stack(got))  # every collective before any check can fail
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        close(a, b, dtype, name)
    same_on_every_rank(ctx, torch.stack(got), everywhere, "the statistics")
    close(part.grad, full.grad[:, cols], dtype, "gradient of the slice")
    if selects:
        active = y != -100
        _, saved1 = get_backend(ctx.oracle(risk, kind), z).forward(z, zr, y, parse_risk(risk), -100)
        atom = parse_risk(risk).kind == "cvar" and dtype != torch.float64
        close(saved[active][:, :4 if atom else 5], saved1[active][:, :4 if atom else 5], dtype,
              "saved scalars (A, Ar, threshold, weights)")
        if atom:  # cvar's atom weight (F(tau) - ALPHA) / ((1 - ALPHA) q at tau) divides a difference
            # of rounded masses: one process's float32 one differs from its float64 one by up to
            # 1.3% on the "samples" rows; the kept candidates' mass below (Sr times exp(shift - Ar))
            # rounds otherwise than a sum of q, by 0.2% there
            torch.testing.assert_close(saved[active][:, 4], saved1[active][:, 4], rtol=2e-2, atol=1e-4)
    return {"max_abs_err": max(float((a - b).detach().abs().nan_to_num().max()) for a, b in zip(got, want))}


def check_preference_loss(ctx, objective, risk, dtype, shift, packed):
    v = 100
    g = torch.Generator().manual_seed(11)
    b, t = 3, 6
    logits = (torch.randn(2 * b, t, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    ref = (torch.randn(2 * b, t, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :2] = -100
    labels[1, 4:] = -100
    kw = dict(objective=objective, risk=risk, beta=0.3, shift=shift)
    if packed:  # the same tokens, flattened, with a sequence index per token
        kw.update(sequence_ids=torch.arange(2 * b).repeat_interleave(t), num_sequences=2 * b)
        logits, ref, labels = logits.reshape(-1, v), ref.reshape(-1, v), labels.reshape(-1)
    cols = ctx.cols(v)
    full = logits.clone().requires_grad_()
    loss1, m1 = rk.preference_loss(full, ref, labels, backend=ctx.single, **kw)
    loss1.backward()
    part = logits[..., cols].clone().requires_grad_()
    loss2, m2 = rk.preference_loss(part, ref[..., cols], labels, process_group=ctx.group, backend=ctx.kind, **kw)
    loss2.backward()
    close(loss2, loss1, dtype, "loss")
    for k in m1:
        close(m2[k], m1[k], dtype, k)
    close(part.grad, full.grad[..., cols], dtype, "gradient of the slice")


def linear_inputs(dtype, v=100, n=14, h=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in
         ((n, h), (v, h), (v,), (n, h), (v, h), (v,))]
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = t
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 9]] = -100
    return hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels


def _fused_compare(ctx, dtype, call_single, call_split, outputs):
    hidden, weight, bias, rh, rw, rb, labels = linear_inputs(dtype)
    cols = ctx.cols(100)
    leaves1 = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    leaves2 = [t.clone().requires_grad_() for t in (hidden, weight[cols], bias[cols])]
    out1 = call_single(*leaves1, rh, rw, rb, labels)
    out2 = call_split(*leaves2, rh, rw[cols], rb[cols], labels)
    outputs(out1).backward()
    outputs(out2).backward()
    return leaves1, leaves2, cols, out1, out2


def check_fused_token_stats(ctx, risk, dtype):
    kw = dict(risk=risk, chunk_size=4)

    def single(h, w, b, rh, rw, rb, y):
        return rk.fused_linear_token_stats(h, w, rh, rw, y, bias=b, ref_bias=rb, backend=ctx.single, **kw)

    def split(h, w, b, rh, rw, rb, y):
        return rk.fused_linear_token_stats(h, w, rh, rw, y, bias=b, ref_bias=rb, process_group=ctx.group,
                                           backend=ctx.kind, **kw)

    l1, l2, cols, o1, o2 = _fused_compare(ctx, dtype, single, split, lambda st: weighted(st, 3))
    for name, a, b in zip(rk.TokenStats._fields, o2, o1):
        close(a, b, dtype, name)
    close(l2[0].grad, l1[0].grad, dtype, "gradient of hidden")
    close(l2[1].grad, l1[1].grad[cols], dtype, "gradient of the weight rows")
    close(l2[2].grad, l1[2].grad[cols], dtype, "gradient of the bias slice")


def check_fused_preference_loss(ctx, risk, dtype, schedule, objective):
    kw = dict(risk=risk, objective=objective, beta=0.2, chunk_size=5, schedule=schedule)

    def single(h, w, b, rh, rw, rb, y):
        return rk.fused_linear_preference_loss(h, w, rh, rw, y.view(2, 7), bias=b, ref_bias=rb, backend=ctx.single,
                                               **kw)

    def split(h, w, b, rh, rw, rb, y):
        return rk.fused_linear_preference_loss(h, w, rh, rw, y.view(2, 7), bias=b, ref_bias=rb,
                                               process_group=ctx.group, backend=ctx.kind, **kw)

    l1, l2, cols, o1, o2 = _fused_compare(ctx, dtype, lambda *a: single(*_pairs(a)), lambda *a: split(*_pairs(a)),
                                          lambda out: out[0])
    close(o2[0], o1[0], dtype, "loss")
    for k in o1[1]:
        close(o2[1][k], o1[1][k], dtype, k)
    close(l2[0].grad, l1[0].grad, dtype, "gradient of hidden")
    close(l2[1].grad, l1[1].grad[cols], dtype, "gradient of the weight rows")
    close(l2[2].grad, l1[2].grad[cols], dtype, "gradient of the bias slice")


def _pairs(args):
    """(14, H) rows as 2 sequences of 7 tokens: one pair."""
    h, w, b, rh, rw, rb, y = args
    return h.view(2, 7, -1), w, b, rh.view(2, 7, -1), rw, rb, y


def expect_value_error(ctx, fn, contains):
    """fn must raise ValueError here (on every rank: the test checks all ranks' records)."""
    try:
        fn()
    except ValueError as err:
        if contains not in str(err):
            raise AssertionError(f"ValueError without {contains!r}: {err}") from None
        return {"message": str(err)}
    raise AssertionError("no ValueError")


def bad_inputs(ctx):
    """Each case: input wrong on one rank or on all; every rank must raise ValueError."""
    v, last = 100, ctx.world - 1
    z, zr, y = rows(12, v, 1, torch.float64, "random", ctx.world)
    cols = ctx.cols(v)
    zs, zrs = z[:, cols].clone(), zr[:, cols].clone()
    g = ctx.group

    def ts(z_=zs, zr_=zrs, y_=y, **kw):
        return lambda: rk.token_stats(z_, zr_, y_, process_group=g, **{"risk": "cvar:0.9", **kw})

    wider = torch.cat([zrs, zrs[:, :1]], 1) if ctx.rank == last else zrs

    def label4(value, where=True):  # row 4 has a label on every rank
        out = y.clone()
        if where:
            out[4] = value
        return out

    cases = {
        # the policy's slices add up to 100 columns, the reference's to 101
        "widths do not add up": (ts(zr_=wider), "ref_logits"),
        "label outside the global vocabulary": (ts(y_=label4(v)), "outside the global vocabulary"),
        "negative label": (ts(y_=label4(-3)), "labels"),
        "different row counts": (ts(z_=zs[:-1] if ctx.rank == 1 else zs, zr_=zrs[:-1] if ctx.rank == 1 else zrs,
                                    y_=y[:-1] if ctx.rank == 1 else y), "labels (shape)"),
        "different risk strings": (ts(risk="cvar:0.8" if ctx.rank == 0 else "cvar:0.9"), "risk"),
        "different labels": (ts(y_=label4((int(y[4]) + 1) % v, ctx.rank == 1)), "labels"),
        "different dtypes": (ts(z_=zs.float() if ctx.rank == 1 else zs, zr_=zrs.float() if ctx.rank == 1 else zrs),
                             "dtype"),
        "different chunk_size": (ts(chunk_size=3 + ctx.rank), "chunk_size"),
        "unknown risk on one rank": (ts(risk="cvar:2" if ctx.rank == last else "cvar:0.9"), "ALPHA"),
        "unknown backend": (ts(backend="cuda"), "backend"),
        "backend that cannot run these logits (triton, float64)": (ts(backend="triton"), "backend"),
        "backends resolving differently": (ts(backend="torch" if ctx.rank == last else "auto"), "backend"),
        "vocab_size past the slices": (ts(vocab_size=v + 1), "vocab_size"),
        "vocab_size on one rank only": (ts(vocab_size=v if ctx.rank == 0 else None), "vocab_size"),
        "label in the padding": (ts(y_=label4(v - 1), vocab_size=v - 1), "outside the global vocabulary"),
        "vocab_size without a group": (lambda: rk.token_stats(zs, zrs, y, vocab_size=v), "process_group"),
        "not a process group": (lambda: rk.token_stats(zs, zrs, y, process_group="world"), "process_group"),
    }
    lab = y.view(2, 6)
    cases["preference_loss: beta invalid on one rank"] = (
        lambda: rk.preference_loss(zs.view(2, 6, -1), zrs.view(2, 6, -1), lab, beta=-1.0 if ctx.rank == 0 else 0.1,
                                   process_group=g), "beta")
    cases["preference_loss: odd number of sequences"] = (
        lambda: rk.preference_loss(zs.view(3, 4, -1), zrs.view(3, 4, -1), y.view(3, 4), process_group=g), "even")
    hidden, weight, bias, rh, rw, rb, labels = linear_inputs(torch.float64)
    wr = rw[cols][:-1] if ctx.rank == 0 else rw[cols]
    cases["fused: reference lm-head rows differ from the policy's"] = (
        lambda: rk.fused_linear_token_stats(hidden, weight[cols], rh, wr, labels, process_group=g), "ref_weight")
    cases["fused: label outside the global vocabulary"] = (
        lambda: rk.fused_linear_preference_loss(hidden.view(2, 7, -1), weight[cols], rh.view(2, 7, -1), rw[cols],
                                                torch.where(labels == labels[1], 100, labels).view(2, 7),
                                                process_group=g), "outside the global vocabulary")
    hid = hidden.clone()
    if ctx.rank == last:  # an ungathered sequence-parallel slice would differ like this
        hid[3, 0] = torch.nextafter(hid[3, 0], torch.tensor(1.0, dtype=hid.dtype))
    cases["fused: hidden states differ across the ranks"] = (
        lambda: rk.fused_linear_token_stats(hid, weight[cols], rh, rw[cols], labels, process_group=g), "hidden")
    cases["fused: reference hidden states differ across the ranks"] = (
        lambda: rk.fused_linear_preference_loss(hidden.view(2, 7, -1), weight[cols], hid.view(2, 7, -1), rw[cols],
                                                labels.view(2, 7), process_group=g), "ref_hidden")
    cases["fused: schedule kernel"] = (
        lambda: rk.fused_linear_preference_loss(hidden.view(2, 7, -1), weight[cols], rh.view(2, 7, -1), rw[cols],
                                                labels.view(2, 7), schedule="kernel", process_group=g), "schedule")
    for name, (fn, contains) in cases.items():
        ctx.record("bad_input", name, lambda: expect_value_error(ctx, fn, contains))
    # the group is still in step afterwards
    ctx.record("bad_input", "a valid call after the errors", lambda: check_token_stats(ctx, "cvar:0.9", torch.float64,
                                                                                         "random", 100, 77))


class Counter:
    """Wraps torch.distributed's collectives: (op, numel, bytes) of every call, as sent."""

    def __init__(self):
        self.calls = []
        self._orig = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather", "all_gather_single"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _name=name, _orig=orig, **kwargs):
                if _name == "all_reduce":
                    t, op = args[0], kwargs.get("op", dist.ReduceOp.SUM)
                    op = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max", dist.ReduceOp.MIN: "min"}[op]
                elif _name == "all_gather_single":  # a reduction done by each rank (comm.py): its payload
                    t, op = args[1], "gathered"
                else:
                    t, op = args[1], "all_gather"
                self.calls.append((op, t.numel(), t.numel() * t.element_size()))
                return _orig(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def measure(ctx, risk, dtype, v=100):
    """Count token_stats' collectives and bytes; compare with costs.forward_communication."""
    z, zr, y = rows(23, v, 3, dtype, "random", ctx.world)
    cols = ctx.cols(v)
    n = int((y != -100).sum())
    part = z[:, cols].clone().requires_grad_()
    with Counter() as fwd:
        st = rk.token_stats(part, zr[:, cols], y, risk=risk, process_group=ctx.group, backend=ctx.kind)
    with Counter() as bwd:
        weighted(st, 1).backward()
    agreement, forward = fwd.calls[0], fwd.calls[1:]
    kernels, _ = get_slices(ctx.kind or "auto", z)
    cost = forward_communication(risk, dtype, v, collects=getattr(kernels, "COLLECTS", False))
    # a gathered round's op is the formula's (each rank reduces the gathered payloads itself)
    measured = [(want[0] if op == "gathered" else op, numel // n)
                for (op, numel, _), want in zip(forward, cost.collectives + ((None,),) * len(forward))]
    if agreement != ("all_gather", AGREEMENT_BYTES // 8, AGREEMENT_BYTES):
        raise AssertionError(f"agreement collective {agreement}")
    if measured != list(cost.collectives) or any(numel % n for _, numel, _ in forward):
        raise AssertionError(f"measured {measured}, formula {cost.collectives}")
    bytes_per_row = sum(b for _, _, b in forward) / n
    if bytes_per_row != cost.bytes_per_row or bwd.calls:
        raise AssertionError(f"{bytes_per_row} bytes per row (formula {cost.bytes_per_row}), backward {bwd.calls}")
    return {"rounds": len(forward), "bytes_per_row": bytes_per_row, "backward_collectives": len(bwd.calls)}


def measure_fused(ctx, risk):
    """The fused form adds one all-reduce of hidden's gradient in the backward."""
    hidden, weight, bias, rh, rw, rb, labels = linear_inputs(torch.float64)
    cols = ctx.cols(100)
    h = hidden.clone().requires_grad_()
    w = weight[cols].clone().requires_grad_()
    with Counter() as fwd:
        st = rk.fused_linear_token_stats(h, w, rh, rw[cols], labels, risk=risk, process_group=ctx.group,
                                         backend=ctx.kind)
    with Counter() as bwd:
        weighted(st, 1).backward()
    n = int((labels != -100).sum())
    kernels, _ = get_slices(ctx.kind or "auto", hidden)
    cost = forward_communication(risk, torch.float64, 100, collects=getattr(kernels, "COLLECTS", False))
    forward_bytes = sum(b for _, _, b in fwd.calls[1:]) / n
    if forward_bytes != cost.bytes_per_row or bwd.calls != [("sum", h.numel(), h.numel() * 8)]:
        raise AssertionError(f"forward {forward_bytes} B/row, backward {bwd.calls}")
    return {"backward": bwd.calls}


def check_padding(ctx, risk, dtype):
    """Megatron pads the vocabulary: with vocab_size, padding columns appended to the last
    slice (here -inf in one model and garbage in the other) change nothing, for every risk
    (ra_dpo_cvar's quantile included), and get a zero gradient."""
    v, pad = 100, 5
    z, zr, y = rows(23, v, 31, dtype, "random", ctx.world)
    full = z.clone().requires_grad_()
    want = rk.token_stats(full, zr, y, risk=risk, backend=ctx.single)
    weighted(want, 4).backward()
    cols = ctx.cols(v)
    zs, zrs = z[:, cols], zr[:, cols]
    if ctx.rank == ctx.world - 1:
        g = torch.Generator().manual_seed(9)
        zs = torch.cat([zs, torch.full((23, pad), float("-inf"), dtype=dtype)], 1)
        zrs = torch.cat([zrs, (torch.randn(23, pad, generator=g) * 50).to(dtype)], 1)
    part = zs.clone().requires_grad_()
    got = rk.token_stats(part, zrs, y, risk=risk, process_group=ctx.group, backend=ctx.kind, vocab_size=v)
    weighted(got, 4).backward()
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        close(a, b, dtype, name)
    close(part.grad[:, :cols.stop - cols.start], full.grad[:, cols], dtype, "gradient of the slice")
    if ctx.rank == ctx.world - 1 and bool(part.grad[:, -pad:].ne(0).any()):
        raise AssertionError("the padding columns got a gradient")


def check_padding_whole_slice(ctx, risk):
    """The last rank's columns are all padding (vocab_size ends where its slice begins): it
    takes part in every round with nothing, and its gradient is 0."""
    v = 100
    z, zr, y = rows(23, v, 41, torch.float64, "random", ctx.world)
    real = sum(ctx.widths(v)[:-1])
    y = torch.where(y >= real, y % real, y)
    full = z[:, :real].clone().requires_grad_()
    want = rk.token_stats(full, zr[:, :real], y, risk=risk, backend=ctx.single)
    weighted(want, 6).backward()
    cols = ctx.cols(v)
    part = z[:, cols].clone().requires_grad_()
    got = rk.token_stats(part, zr[:, cols], y, risk=risk, process_group=ctx.group, backend=ctx.kind,
                         vocab_size=real)
    weighted(got, 6).backward()
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        close(a, b, torch.float64, name)
    if ctx.rank == ctx.world - 1:
        if bool(part.grad.ne(0).any()):
            raise AssertionError("the padding slice got a gradient")
    else:
        close(part.grad, full.grad[:, cols], torch.float64, "gradient of the slice")


def check_fused_padding(ctx, risk):
    """The fused form with padding rows of the lm heads (random weights) and vocab_size."""
    hidden, weight, bias, rh, rw, rb, labels = linear_inputs(torch.float64)
    cols = ctx.cols(100)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = rk.fused_linear_token_stats(h1, w1, rh, rw, labels, bias=bias, ref_bias=rb, risk=risk,
                                       backend=ctx.single)
    weighted(want, 2).backward()
    w, b, wr, br = weight[cols], bias[cols], rw[cols], rb[cols]
    if ctx.rank == ctx.world - 1:
        g = torch.Generator().manual_seed(2)
        w, wr = (torch.cat([t, torch.randn(3, t.shape[1], generator=g, dtype=t.dtype)]) for t in (w, wr))
        b, br = (torch.cat([t, torch.randn(3, generator=g, dtype=t.dtype)]) for t in (b, br))
    h2, w2 = hidden.clone().requires_grad_(), w.clone().requires_grad_()
    got = rk.fused_linear_token_stats(h2, w2, rh, wr, labels, bias=b, ref_bias=br, risk=risk, chunk_size=4,
                                      process_group=ctx.group, backend=ctx.kind, vocab_size=100)
    weighted(got, 2).backward()
    for name, a, b_ in zip(rk.TokenStats._fields, got, want):
        close(a, b_, torch.float64, name)
    close(h2.grad, h1.grad, torch.float64, "gradient of hidden")
    close(w2.grad[:cols.stop - cols.start], w1.grad[cols], torch.float64, "gradient of the weight rows")
    if ctx.rank == ctx.world - 1 and bool(w2.grad[-3:].ne(0).any()):
        raise AssertionError("the padding rows got a gradient")


def check_interpolation_onto_next_value(ctx):
    """ra_dpo_cvar where torch.quantile's interpolation rounds onto the next value HI (LO and
    HI adjacent floats, weight 0.7): the sum above Q must leave HI out, as one process does."""
    n, v = 6, 100
    # z = 0 for one item, else -60 and the next 98 floats above it (its bits + k): A is 0
    # to float32, so D = -log(V) - z puts consecutive items 1 ulp apart
    z = (torch.tensor(-60.0).view(torch.int32) + torch.arange(v, dtype=torch.int32)).view(torch.float32)
    z = z.expand(n, v).clone()
    z[:, 0] = 0.0
    zr = torch.zeros(n, v)
    y = torch.arange(n) * 17 % v
    c = 1 - (40.7 / (v - 1))  # the level's position 40.7: LO = rank 40, HI = rank 41, weight 0.7
    risk = f"ra_dpo_cvar:{c!r}"
    full = z.clone().requires_grad_()
    want = rk.token_stats(full, zr, y, risk=risk, backend=ctx.single)
    weighted(want, 8).backward()
    _, saved = torch_rows.forward(z, zr, y, parse_risk(risk), -100)
    d = torch.sort((zr - saved[:, 1:2]) - (z - saved[:, 0:1]), -1).values
    if not bool((saved[:, 2] == d[:, 41]).all() & (d[:, 41] > d[:, 40]).all()):
        raise AssertionError("the input does not round the quantile onto the next value")
    cols = ctx.cols(v)
    part = z[:, cols].clone().requires_grad_()
    got = rk.token_stats(part, zr[:, cols], y, risk=risk, process_group=ctx.group, backend=ctx.kind)
    weighted(got, 8).backward()
    for name, a, b in zip(rk.TokenStats._fields, got, want):
        close(a, b, torch.float32, name)
    close(part.grad, full.grad[:, cols], torch.float32, "gradient of the slice")


def check_agreement_on_the_inputs_device(ctx):
    """With an NCCL group the agreement vector goes to the inputs' device, never to
    torch.cuda.current_device(): here the group reports NCCL and the current device is
    cuda:1 (a script that never called set_device), the inputs are on the CPU."""
    z, zr, y = rows(23, 100, 5, torch.float32, "random", ctx.world)
    cols = ctx.cols(100)
    seen = []
    orig = dist.all_gather, dist.get_backend, torch.cuda.current_device

    def gather_(parts, t, **kw):
        seen.append(t.device)
        return orig[0](parts, t, **kw)
    dist.all_gather, dist.get_backend, torch.cuda.current_device = gather_, (lambda group=None: "nccl"), (lambda: 1)
    try:
        got = rk.token_stats(z[:, cols], zr[:, cols], y, risk="kl", process_group=ctx.group, backend=ctx.kind)
    finally:
        dist.all_gather, dist.get_backend, torch.cuda.current_device = orig
    if seen != [torch.device("cpu")]:
        raise AssertionError(f"agreement vector on {seen}, the inputs on cpu")
    close(got.kl, rk.token_stats(z, zr, y, risk="kl", backend=ctx.single).kl, torch.float32, "kl")


def run_kind(ctx: Ctx, full: bool) -> None:
    """The checks of one backend's slice kernels (ctx.kind).

    full: the whole matrix (the 2-rank group); otherwise (3 ranks) the cases where a middle
    slice matters: ties across three slices, extremes, every risk in both dtypes once, one
    of each of the other forms. The triton kernels (interpreted: slow, float32 only) run
    run_triton's shorter list.
    """
    if ctx.kind == "triton":
        return run_triton(ctx, full)
    seed = 0
    for dtype in (torch.float64, torch.float32):
        some = ("ties", "extreme") if dtype == torch.float64 else ("random",)
        for kind in ("random", "ties", "extreme") if full else some:
            for risk in RISKS:
                seed += 1
                ctx.record("token_stats", f"{risk} {dtype} {kind}",
                           lambda: check_token_stats(ctx, risk, dtype, kind, 100, seed))
        ctx.record("token_stats", f"ra_dpo_cvar:0.5 {dtype} V=101 (no interpolation)",
                   lambda: check_token_stats(ctx, "ra_dpo_cvar:0.5", dtype, "random", 101, 99))
        # the cpu kernels' kept candidates and bracketed search: their hits, and the rows they
        # miss searched again
        for risk in ("ra_dpo_cvar:0.1", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.9", "cvar:0.5", "cvar:0.9") if full \
                else ("ra_dpo_cvar:0.5", "cvar:0.9"):
            ctx.record("token_stats", f"{risk} {dtype} samples",
                       lambda: check_token_stats(ctx, risk, dtype, "samples", WIDE[ctx.world], 98))
    if full:  # half-precision input accumulates in float32, as in one process
        for risk in ("erm:1", "cvar:0.9", "ra_dpo_cvar:0.5"):
            ctx.record("token_stats", f"{risk} torch.bfloat16 random",
                       lambda: check_token_stats(ctx, risk, torch.bfloat16, "random", 100, 123))
    ctx.record("token_stats", "ra_dpo_cvar interpolated onto the next value",
               lambda: check_interpolation_onto_next_value(ctx))
    losses = [("rsa2", "cvar:0.9", torch.float64, False, False), ("rsa1", "erm:1", torch.float64, True, False),
              ("dpo", "kl", torch.float64, False, True), ("rsa2", "ra_dpo_cvar:0.3", torch.float64, True, True),
              ("rsa2", "cvar:0.5", torch.float32, True, False)]
    for objective, risk, dtype, shift, packed in losses if full else losses[3:4]:
        ctx.record("preference_loss", f"{objective} {risk} {dtype} shift={shift} packed={packed}",
                   lambda: check_preference_loss(ctx, objective, risk, dtype, shift, packed))
    for risk in ("kl", "erm:1", "cvar:0.7", "ra_dpo_cvar:0.4") if full else ("cvar:0.7",):
        ctx.record("fused_token_stats", f"{risk} float64",
                   lambda: check_fused_token_stats(ctx, risk, torch.float64))
    if full:
        ctx.record("fused_token_stats", "cvar:0.7 float32",
                   lambda: check_fused_token_stats(ctx, "cvar:0.7", torch.float32))
    for schedule in ("pairs", "tokens") if full else ("pairs",):
        for risk in ("cvar:0.9", "ra_dpo_cvar:0.3") if full else ("ra_dpo_cvar:0.3",):
            ctx.record("fused_preference_loss", f"rsa2 {risk} {schedule}",
                       lambda: check_fused_preference_loss(ctx, risk, torch.float64, schedule, "rsa2"))
    if full:
        ctx.record("fused_preference_loss", "rsa1 erm:2 auto float32",
                   lambda: check_fused_preference_loss(ctx, "erm:2", torch.float32, "auto", "rsa1"))
    for risk in RISKS if full else ("ra_dpo_cvar:0.5", "cvar:0.9"):
        ctx.record("padding", f"{risk} float64", lambda: check_padding(ctx, risk, torch.float64))
    for risk in ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.3") if full else ("ra_dpo_cvar:0.3",):
        ctx.record("padding", f"{risk}: the last slice all padding",
                   lambda: check_padding_whole_slice(ctx, risk))
    ctx.record("padding", "fused ra_dpo_cvar:0.3", lambda: check_fused_padding(ctx, "ra_dpo_cvar:0.3"))
    for dtype in (torch.float64, torch.float32):
        for risk in ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.3"):
            ctx.record("communication", f"{risk} {dtype}", lambda: measure(ctx, risk, dtype))
    ctx.record("communication", "fused cvar:0.9 float64", lambda: measure_fused(ctx, "cvar:0.9"))
    ctx.record("agreement", "on the inputs' device", lambda: check_agreement_on_the_inputs_device(ctx))


def run_triton(ctx: Ctx, full: bool) -> None:
    """The triton slice kernels, interpreted on CPU tensors: float32, 12 rows, every risk
    on random input, ties and extremes for the selections, one of each other form (the
    3-rank group: ties and the communication)."""
    f32 = torch.float32
    if full:
        for seed, risk in enumerate(RISKS):
            ctx.record("token_stats", f"{risk} {f32} random",
                       lambda: check_token_stats(ctx, risk, f32, "random", 100, 200 + seed, n=12))
        for kind, risks in (("ties", ("cvar:0.5", "ra_dpo_cvar:0.5")), ("extreme", ("erm:3", "cvar:0.95"))):
            for risk in risks:
                ctx.record("token_stats", f"{risk} {f32} {kind}",
                           lambda: check_token_stats(ctx, risk, f32, kind, 100, 17, n=12))
        ctx.record("token_stats", "ra_dpo_cvar:0.5 torch.bfloat16 random",
                   lambda: check_token_stats(ctx, "ra_dpo_cvar:0.5", torch.bfloat16, "random", 100, 123, n=12))
        ctx.record("token_stats", "ra_dpo_cvar interpolated onto the next value",
                   lambda: check_interpolation_onto_next_value(ctx))
        ctx.record("preference_loss", "rsa2 ra_dpo_cvar:0.3 float32 shift=True packed=True",
                   lambda: check_preference_loss(ctx, "rsa2", "ra_dpo_cvar:0.3", f32, True, True))
        ctx.record("fused_token_stats", "cvar:0.7 float32", lambda: check_fused_token_stats(ctx, "cvar:0.7", f32))
        ctx.record("fused_preference_loss", "rsa2 ra_dpo_cvar:0.3 pairs float32",
                   lambda: check_fused_preference_loss(ctx, "ra_dpo_cvar:0.3", f32, "pairs", "rsa2"))
        ctx.record("padding", "ra_dpo_cvar:0.5 float32", lambda: check_padding(ctx, "ra_dpo_cvar:0.5", f32))
        ctx.record("agreement", "on the inputs' device", lambda: check_agreement_on_the_inputs_device(ctx))
    else:
        for risk in ("cvar:0.5", "ra_dpo_cvar:0.5"):
            ctx.record("token_stats", f"{risk} {f32} ties",
                       lambda: check_token_stats(ctx, risk, f32, "ties", 100, 5, n=12))
    for risk in ("kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.3") if full else ("ra_dpo_cvar:0.3",):
        ctx.record("communication", f"{risk} {f32}", lambda: measure(ctx, risk, f32))


def run_group(ctx: Ctx, full: bool) -> None:
    """Every check, in the same order on every rank of ``ctx.group``: each backend's slice
    kernels, then the bad inputs (backend "auto")."""
    for kind in KINDS:
        ctx.kind = kind
        run_kind(ctx, full)
    ctx.kind = None
    bad_inputs(ctx)


def main():
    """WORLD_SIZE = 3: the 2-rank group is ranks 1 and 2 (its ranks differ from the global
    ones), then the 3-rank group is the world; three processes, one torch import each."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # the world group only waits (rank 0 for the pair's checks): a long timeout; the groups
    # the checks run in give up on a collective after COLLECTIVE_TIMEOUT
    dist.init_process_group("gloo", init_method=f"file://{os.environ['INIT_FILE']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    torch.set_num_threads(1)
    timeout = timedelta(seconds=int(os.environ.get("COLLECTIVE_TIMEOUT", "60")))
    pair = dist.new_group([world - 2, world - 1], timeout=timeout)  # every rank takes part in creating both
    everyone = dist.new_group(list(range(world)), timeout=timeout)
    out = {}
    if rank >= world - 2:
        ctx = Ctx(pair)
        run_group(ctx, full=True)
        out[2] = ctx.results
    dist.barrier()
    ctx = Ctx(everyone)
    run_group(ctx, full=world == 2)
    out[world] = ctx.results
    with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
