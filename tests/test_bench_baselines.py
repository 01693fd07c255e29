"""The benchmarks' speed baselines compute the SPEC's statistics: a baseline that computed
something cheaper would make every ratio against it meaningless. Checked against the
oracle, rsa_kernels.reference, in float64 (values and gradients) and float32."""
import pytest
import torch

import rsa_kernels as rk
from rsa.bench import baselines
from rsa.bench.baselines import compiled_token_stats, plain_pair_loss, plain_token_stats, row_quantile
from rsa_kernels import reference

RISKS = ["kl", "erm:1", "erm:0.3", "cvar:0", "cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.3"]


def _inputs(n, v, dtype, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    zr = (z.detach().double() + torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100  # masked rows: statistics 0, no gradient
    w = torch.randn(4, n, generator=g, dtype=torch.float64)
    return z, zr, y, w


def _value_and_grad(fn, z, zr, y, w, risk):
    out = fn(z, zr, y, risk=risk)
    (grad,) = torch.autograd.grad(sum((wi.to(t.dtype) * t).sum() for wi, t in zip(w, out)), z)
    return out, grad


@pytest.mark.parametrize("risk", RISKS)
@pytest.mark.parametrize("v", [7, 301, 1000])
def test_plain_matches_the_reference_float64(risk, v):
    z, zr, y, w = _inputs(37, v, torch.float64)
    got, g_got = _value_and_grad(plain_token_stats, z, zr, y, w, risk)
    want, g_want = _value_and_grad(reference.token_stats, z, zr, y, w, risk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert (got[3][::5] == 0).all() and (g_got[::5] == 0).all()


@pytest.mark.parametrize("risk", ["kl", "erm:1", "cvar:0.9", "ra_dpo_cvar:0.95"])
def test_plain_matches_the_reference_float32_and_wide_logits(risk):
    # float32 as benchmarked; logits spread wide (scale 8) but with no reference mass underflowing
    z, zr, y, w = _inputs(64, 4099, torch.float32, scale=8.0, seed=1)
    got, g_got = _value_and_grad(plain_token_stats, z, zr, y, w, risk)
    want, g_want = _value_and_grad(reference.token_stats, z, zr, y, w, risk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_row_quantile_in_blocks_equals_torch_quantile(monkeypatch):
    x = torch.randn(10, 9, dtype=torch.float64)
    whole = torch.quantile(x, 0.05, dim=-1)
    monkeypatch.setattr(baselines, "QUANTILE_MAX_ELEMENTS", 20)  # 2 rows per torch.quantile call
    torch.testing.assert_close(row_quantile(x, 0.05), whole, rtol=0, atol=0)
    # and the ra_dpo_cvar baseline through those blocks still equals the reference
    z, zr, y, w = _inputs(11, 9, torch.float64)
    got, g_got = _value_and_grad(plain_token_stats, z, zr, y, w, "ra_dpo_cvar:0.95")
    want, g_want = _value_and_grad(reference.token_stats, z, zr, y, w, "ra_dpo_cvar:0.95")
    torch.testing.assert_close(got[3], want[3])
    torch.testing.assert_close(g_got, g_want)


def test_compiled_is_the_plain_formulation():
    # one compilation (the sorting risk, the intricate one); rsa bench's tiny run compiles kl
    z, zr, y, w = _inputs(16, 300, torch.float32)
    got, g_got = _value_and_grad(compiled_token_stats, z, zr, y, w, "cvar:0.9")
    want, g_want = _value_and_grad(reference.token_stats, z, zr, y, w, "cvar:0.9")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective,risk", [("rsa2", "cvar:0.9"), ("dpo", "kl"), ("rsa1", "erm:1")])
def test_plain_pair_loss_is_the_loss_of_materialised_logits(objective, risk):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 8, generator=g, dtype=torch.float64).requires_grad_()
    rh, rw = h.detach() + 0.1, w.detach() * 1.1
    y = torch.randint(0, 50, (4, 6), generator=g)
    y[:, :2] = -100
    got = plain_pair_loss(h, w, rh, rw, y, risk=risk, objective=objective, beta=0.1)
    want, _ = rk.preference_loss(h @ w.t(), rh @ rw.t(), y, objective=objective, risk=risk, beta=0.1,
                                 backend="torch")
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b)
