"""torch backend and reference against the naive formulas of tests/naive.py (SPEC section 1)."""
import math

import pytest
import torch

import rsa_kernels as rk
from rsa_kernels import reference
from naive import naive_token_stats
from rsa_kernels.backends import available_backends
from tie_rows import KINDS as TIE_KINDS, tie_rows

RISKS = ["kl", "erm:0.5", "erm:2", "cvar:0", "cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.5"]


def inputs(shape, v, seed, dtype=torch.float64, scale=2.0, masked=0.2):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    zr = (torch.randn(*shape, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, shape, generator=g)
    y[torch.rand(shape, generator=g) < masked] = -100
    return z.requires_grad_(), zr, y


def weighted_sum(stats, seed):
    """A random linear functional of (logp, ref_logp, kl, risk): exercises every upstream grad."""
    g = torch.Generator().manual_seed(seed + 1)
    return sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in stats)


@pytest.mark.parametrize("risk", RISKS)
@pytest.mark.parametrize("shape,v", [((7,), 33), ((2, 5), 64), ((3, 4), 101)])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_float64_values_and_grads_match_naive(risk, shape, v, impl):
    z, zr, y = inputs(shape, v, seed=hash((risk, shape, v)) % 10_000)
    if impl == "torch":
        got = rk.token_stats(z, zr, y, risk=risk, backend="torch", chunk_size=3)
    else:
        got = reference.token_stats(z, zr, y, risk=risk)
    want = naive_token_stats(z, zr, y, risk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    ga = torch.autograd.grad(weighted_sum(got, 0), z)[0]
    gb = torch.autograd.grad(weighted_sum(want, 0), z)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("risk", RISKS)
def test_gradcheck(risk):
    z, zr, y = inputs((4,), 9, seed=3, masked=0.0)
    z = z.detach().requires_grad_()

    def f(z):
        st = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        return st.logp, st.kl, st.risk

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_float32_matches_naive():
    z, zr, y = inputs((16,), 500, seed=5, dtype=torch.float32)
    for risk in RISKS:
        got = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        want = naive_token_stats(z.double(), zr.double(), y, risk)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
        ga = torch.autograd.grad(weighted_sum(got, 1), z)[0]
        gb = torch.autograd.grad(weighted_sum(want, 1), z)[0]
        torch.testing.assert_close(ga.double(), gb.double(), rtol=1e-5, atol=1e-5)


def test_properties():
    z, zr, y = inputs((64,), 200, seed=7, masked=0.0)
    st = lambda r: rk.token_stats(z, zr, y, risk=r, backend="torch")
    kl = st("kl").kl
    assert (kl >= 0).all()
    erm = [st(f"erm:{mu}").risk for mu in (0.1, 0.5, 1, 4)]
    cvar = [st(f"cvar:{a}").risk for a in (0.1, 0.5, 0.9, 0.99)]
    assert (erm[0] >= kl - 1e-12).all() and (cvar[0] >= kl - 1e-12).all()
    for lo, hi in zip(erm, erm[1:]):
        assert (hi >= lo - 1e-12).all()
    for lo, hi in zip(cvar, cvar[1:]):
        assert (hi >= lo - 1e-12).all()
    d = torch.log_softmax(zr, -1) - torch.log_softmax(z, -1)
    assert (cvar[-1] <= d.max(-1).values + 1e-12).all()


def test_limits_equal_kl():
    z, zr, y = inputs((32,), 100, seed=8, masked=0.0)
    kl = rk.token_stats(z, zr, y, risk="kl", backend="torch").risk
    torch.testing.assert_close(rk.token_stats(z, zr, y, risk="cvar:0", backend="torch").risk, kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rk.token_stats(z, zr, y, risk="erm:1e-7", backend="torch").risk, kl, rtol=1e-5, atol=1e-6)


def test_cvar_ties_split_the_atom():
    # items repeating the same (z, zr) pair have bitwise equal D in any implementation:
    # tau* is then a tied atom of many items, whose weight is shared in proportion to q
    g = torch.Generator().manual_seed(11)
    pick = torch.randint(0, 4, (5, 60), generator=g)
    zr = torch.randn(5, 4, generator=g, dtype=torch.float64).gather(1, pick)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64).gather(1, pick).requires_grad_()
    y = torch.randint(0, 60, (5,), generator=g)
    for risk in ("cvar:0.3", "cvar:0.7", "cvar:0.95", "ra_dpo_cvar:0.4"):
        got = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        want = reference.token_stats(z, zr, y, risk=risk)
        torch.testing.assert_close(got.risk, want[3], rtol=1e-10, atol=1e-12)
        ga = torch.autograd.grad(got.risk.sum(), z)[0]
        gb = torch.autograd.grad(want[3].sum(), z)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
        if risk.startswith("cvar"):  # the adversarial w sums to 1: the gradient sums to 0
            torch.testing.assert_close(ga.sum(-1), torch.zeros(5, dtype=ga.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", TIE_KINDS)
@pytest.mark.parametrize("risk", ["cvar:0.3", "cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.95"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_are_the_same_on_every_backend(kind, risk, dtype):
    """Equal zr - z from different (z, zr) pairs tie in D = (zr - z) + (A - Ar) on every
    backend (SPEC section 1), whatever each one's A and Ar round to: cvar's split atom and
    ra_dpo_cvar's mask D > Q, values and gradients, agree with the reference (float64: to
    1e-12). Before issue 30 the backends formed (zr - Ar) - (z - A), which splits such ties
    by an ulp of A: cpu and torch differed from the reference by up to 1e-2 here."""
    z, zr, y = tie_rows(kind, 6, 1500, seed=len(risk) + TIE_KINDS.index(kind))
    z, zr = z.to(dtype), zr.to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    leaf = z.clone().requires_grad_()
    want = reference.token_stats(leaf, zr, y, risk=risk)
    want_grad = torch.autograd.grad(weighted_sum(want, 3), leaf)[0]
    for backend in [b for b in ("torch", "cpu") if b in available_backends()]:
        leaf = z.clone().requires_grad_()
        got = rk.token_stats(leaf, zr, y, risk=risk, backend=backend)
        grad = torch.autograd.grad(weighted_sum(got, 3), leaf)[0]
        for name, a, b in zip(rk.TokenStats._fields, got, want):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{backend} {name}: {m}")
        torch.testing.assert_close(grad, want_grad, **tol, msg=lambda m: f"{backend} gradient: {m}")


def test_masked_rows_are_zero_with_zero_grad():
    z, zr, y = inputs((10,), 40, seed=9, masked=0.0)
    y[::2] = -100
    for risk in RISKS:
        st = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        for t in st:
            assert (t[::2] == 0).all()
        grad = torch.autograd.grad(weighted_sum(st, 2), z)[0]
        assert (grad[::2] == 0).all() and (grad[1::2] != 0).any()


def test_custom_ignore_index():
    z, zr, y = inputs((6,), 20, seed=10, masked=0.0)
    y[1] = 7
    a = rk.token_stats(z, zr, y, risk="kl", ignore_index=7, backend="torch")
    assert a.kl[1] == 0 and (a.kl[0] > 0)


@pytest.mark.parametrize("risk", RISKS)
def test_chunking_does_not_change_results(risk):
    z, zr, y = inputs((13,), 50, seed=12)
    full = rk.token_stats(z, zr, y, risk=risk, backend="torch")
    gfull = torch.autograd.grad(weighted_sum(full, 3), z)[0]
    for chunk in (1, 4, 5):
        part = rk.token_stats(z, zr, y, risk=risk, backend="torch", chunk_size=chunk)
        for a, b in zip(part, full):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
        torch.testing.assert_close(torch.autograd.grad(weighted_sum(part, 3), z)[0], gfull, rtol=0, atol=1e-13)


def test_inplace_backward_writes_into_logits():
    z, zr, y = inputs((8,), 30, seed=13, masked=0.0)
    want = torch.autograd.grad(rk.token_stats(z, zr, y, risk="cvar:0.8", backend="torch").risk.sum(), z)[0]
    leaf = z.detach().clone().requires_grad_()
    work = leaf * 1.0  # a non-leaf whose storage the backward may reuse
    st = rk.token_stats(work, zr, y, risk="cvar:0.8", backend="torch", inplace_backward=True)
    st.risk.sum().backward()
    torch.testing.assert_close(leaf.grad, want)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_agrees_with_float32(dtype, tol):
    z32, zr32, y = inputs((32,), 300, seed=14, dtype=torch.float32)
    z16 = z32.detach().to(dtype).requires_grad_()
    zr16 = zr32.to(dtype)
    for risk in RISKS:
        lo = rk.token_stats(z16, zr16, y, risk=risk, backend="torch")
        hi = rk.token_stats(z16.detach().float().requires_grad_(), zr16.float(), y, risk=risk, backend="torch")
        assert lo.risk.dtype == torch.float32
        # same rounded inputs: only the float32 accumulation may differ
        for a, b in zip(lo, hi):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # against the unrounded float32 inputs: the input rounding, at a stated tolerance
        ref32 = rk.token_stats(z32, zr32, y, risk=risk, backend="torch")
        torch.testing.assert_close(lo.kl, ref32.kl, rtol=tol, atol=tol)
        grad = torch.autograd.grad(lo.risk.sum(), z16)[0]
        assert grad.dtype == dtype and torch.isfinite(grad).all()


def test_minus_inf_and_extreme_logits():
    z, zr, y = inputs((8,), 40, seed=15, masked=0.0)
    z, zr = z.detach().clone(), zr.clone()
    zr[:, :5] = float("-inf")       # items the reference never emits: contribute nothing
    z[:, :8] = float("-inf")        # overlap with the above, and 3 items with p = 0 < q
    y[:] = 20
    z[4:] = z[4:].sign() * 1e4
    zr[4:, 5:] = zr[4:, 5:].sign() * 1e4
    z.requires_grad_()
    for risk in RISKS:
        st = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        ref = reference.token_stats(z, zr, y, risk=risk)
        for a, b in zip(st, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, equal_nan=False)
    # p = 0 < q makes kl and risk +inf: the true value
    assert torch.isinf(rk.token_stats(z, zr, y, risk="kl", backend="torch").kl[:4]).all()
    # drop the p = 0 < q items: everything finite again, gradients too
    z2 = z.detach().clone()
    z2[:, 5:8] = 0.0
    z2.requires_grad_()
    for risk in RISKS:
        st = rk.token_stats(z2, zr, y, risk=risk, backend="torch")
        assert all(torch.isfinite(t).all() for t in st), risk
        grad = torch.autograd.grad(st.risk.sum() + st.logp.sum(), z2)[0]
        assert torch.isfinite(grad).all(), risk
        ref = reference.token_stats(z2, zr, y, risk=risk)
        torch.testing.assert_close(grad, torch.autograd.grad(ref[3].sum() + ref[0].sum(), z2)[0], rtol=1e-9, atol=1e-9)


def test_nan_in_gives_nan_out():
    z, zr, y = inputs((4,), 10, seed=16, masked=0.0)
    z = z.detach().clone()
    z[1, 3] = float("nan")
    for risk in RISKS:
        st = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        assert torch.isnan(st.risk[1]) and torch.isfinite(st.risk[0])


def test_quantile_matches_torch_quantile():
    x = torch.randn(5, 37, dtype=torch.float64)
    for level in (0.0, 0.05, 0.5, 0.93, 1.0):
        torch.testing.assert_close(reference.interpolated_quantile(x, level), torch.quantile(x, level, dim=-1))


def test_vocab_of_one():
    z, zr, y = inputs((3,), 1, seed=17, masked=0.0)
    for risk in RISKS:
        st = rk.token_stats(z, zr, y, risk=risk, backend="torch")
        assert (st.logp == 0).all() and (st.kl == 0).all() and (st.risk == 0).all()


def test_accumulation_dtype():
    z, zr, y = inputs((3,), 5, seed=18, dtype=torch.float32)
    assert rk.token_stats(z, zr, y, backend="torch").logp.dtype == torch.float32
    z, zr, y = inputs((3,), 5, seed=18)
    assert rk.token_stats(z, zr, y, backend="torch").logp.dtype == torch.float64


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_nan_in_either_logits_gives_nan_out(impl):
    """A NaN in z or in zr (where it makes q NaN: "q > 0" used to drop it) gives NaN kl and
    risk on its row, leaves the other rows as they were, and a masked NaN row stays 0."""
    z, zr, y = inputs((5,), 12, seed=19, masked=0.0)
    z = z.detach().clone()
    y[4] = -100
    bad_z, bad_zr = z.clone(), zr.clone()
    bad_z[1, 3] = float("nan")
    bad_zr[2, 5] = float("nan")
    bad_zr[3, y[3]] = float("nan")  # at the label as well
    bad_z[4, 0] = bad_zr[4, 1] = float("nan")

    def run(z, zr, risk):
        z = z.clone().requires_grad_()
        if impl == "torch":
            st = rk.token_stats(z, zr, y, risk=risk, backend="torch", chunk_size=2)
        else:
            st = reference.token_stats(z, zr, y, risk=risk)
        (grad,) = torch.autograd.grad(weighted_sum(st, 0), z)  # must not raise
        return torch.stack(list(st), 1).detach(), grad

    for risk in RISKS:
        got, grad = run(bad_z, bad_zr, risk)
        want, want_grad = run(z, zr, risk)
        assert torch.isnan(got[1:4, 2:]).all(), risk        # kl and risk of rows 1, 2, 3
        assert torch.isnan(got[1, 0]) and torch.isfinite(got[1, 1]), risk  # logp via A
        assert torch.isnan(got[2:4, 1]).all() and torch.isfinite(got[2:4, 0]).all(), risk
        assert torch.equal(got[0], want[0]) and torch.equal(got[4], torch.zeros(4, dtype=got.dtype)), risk
        assert torch.equal(grad[0], want_grad[0]), risk
        if impl == "torch":  # the reference's autograd gives a masked NaN row a NaN gradient
            assert torch.equal(grad[4], torch.zeros_like(grad[4])), risk


def ra_dpo_rows_from_minus_inf(c, v, rows=3, seed=20):
    """Rows where exactly LO + 1 items have zr = -inf (q = 0, D = -inf), LO = floor((1 - C)(V - 1)):
    the (1 - C)-quantile of D interpolates from -inf to the smallest finite D."""
    pos = (1 - c) * (v - 1)
    lo = int(pos)
    assert pos - lo > 0.01 and lo + 1 < v
    z, zr, y = inputs((rows,), v, seed=seed, masked=0.0)
    z, zr = z.detach().clone(), zr.clone()
    g = torch.Generator().manual_seed(seed)
    for i in range(rows):
        zr[i, torch.randperm(v, generator=g)[: lo + 1]] = float("-inf")
    y[:] = zr.argmax(-1)
    return z, zr, y


def limit_quantile(x, level):
    """torch.quantile(x, level, dim=-1), except where its lerp meets an infinite endpoint and
    gives NaN (from -inf with a weight < 0.5, to +inf with a weight >= 0.5): there the limit of
    the interpolation, -inf or +inf, which is what torch gives for the other weights."""
    want = torch.quantile(x, level, dim=-1)
    xs = x.sort(-1).values
    pos = level * (x.shape[-1] - 1)
    a, b = xs[..., int(pos)], xs[..., min(int(pos) + 1, x.shape[-1] - 1)]
    limit = torch.where(torch.isneginf(a), a, b)
    return torch.where(torch.isnan(want) & (torch.isneginf(a) | torch.isposinf(b)), limit, want)


@pytest.mark.parametrize("c,v", [(0.95, 50), (0.5, 20), (0.9, 108)])
def test_ra_dpo_quantile_from_minus_inf_is_minus_inf(c, v):
    """Q interpolates from -inf: it is -inf (torch.quantile's value for interpolation weights
    >= 0.5; its lerp gives NaN below 0.5, which would select nothing), so D > Q selects the
    whole support and the risk is kl, with kl's gradient. Weights here: 0.45, 0.5, 0.7."""
    z, zr, y = ra_dpo_rows_from_minus_inf(c, v)
    r = torch.log_softmax(zr, -1)
    d = reference.deviation(z, zr, z.logsumexp(-1), zr.logsumexp(-1))
    level = 1 - c
    torch_q = torch.quantile(d, level, dim=-1)
    frac = level * (v - 1) - int(level * (v - 1))
    assert torch.isneginf(torch_q).all() if frac >= 0.5 else torch.isnan(torch_q).all()
    quantile = reference.interpolated_quantile(d, level)
    assert torch.isneginf(quantile).all() and torch.equal(quantile, limit_quantile(d, level))
    # the Ra-DPO formula written out with that quantile, independently of the backends
    q = r.exp()
    want = torch.where(d > quantile[:, None], q * d, 0.0).sum(-1)
    z = z.requires_grad_()
    ref = rk.TokenStats(*reference.token_stats(z, zr, y, risk=f"ra_dpo_cvar:{c}"))
    st = rk.token_stats(z, zr, y, risk=f"ra_dpo_cvar:{c}", backend="torch")
    for got in (ref, st):
        torch.testing.assert_close(got.risk, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.risk, got.kl, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(got.risk).all() and (got.risk > 0).all()
    g_ref = torch.autograd.grad(ref.risk.sum(), z)[0]
    g_torch = torch.autograd.grad(st.risk.sum(), z)[0]
    g_kl = torch.autograd.grad(reference.token_stats(z, zr, y)[2].sum(), z)[0]
    torch.testing.assert_close(g_ref, g_kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_torch, g_kl, rtol=1e-10, atol=1e-12)


def test_quantile_with_infinities_matches_torch_quantile():
    inf = float("inf")
    x = torch.tensor([[-inf, 0.0, 1.0, 2.0], [-inf, -inf, 1.0, 3.0], [-inf, -inf, -inf, 5.0],
                      [-inf, 0.5, 0.5, inf]], dtype=torch.float64)
    for level in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0):
        got = reference.interpolated_quantile(x, level)
        torch.testing.assert_close(got, limit_quantile(x, level), equal_nan=False)
        exact = ~torch.isnan(torch.quantile(x, level, dim=-1))
        assert torch.equal(got[exact], torch.quantile(x, level, dim=-1)[exact])
