"""The cpu backend (rsa_kernels._C) against the float64 reference: values and gradients."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

import rsa_kernels
from rsa_kernels import backends, reference
from rsa_kernels.backends import torch_rows
from rsa_kernels.risk import parse_risk
from rsa_kernels.token_stats import token_stats

try:
    from rsa_kernels.backends import cpu_rows
except ImportError as err:  # only when the extension was not built
    pytest.skip(f"rsa_kernels._C is not built: {err}", allow_module_level=True)

from cpu_levels import LEVELS, use_level  # noqa: E402


@pytest.fixture(params=LEVELS, autouse=True)
def level(request, monkeypatch):
    """Every test runs at each instruction-set level this CPU runs (portable, avx2, avx512)."""
    return use_level(request.param, monkeypatch)

RISKS = ["kl", "erm:0.5", "erm:2", "cvar:0", "cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.95"]
IGNORE = -100


def make_rows(n, v, dtype=torch.float64, scale=3.0, seed=0, masked=(1,)):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    zr = z + torch.randn(n, v, generator=gen, dtype=torch.float64) * scale / 2
    labels = torch.randint(0, v, (n,), generator=gen)
    for i in masked:
        if i < n:
            labels[i] = IGNORE
    return z.to(dtype), zr.to(dtype), labels


def upstream(n, seed=1):
    return torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def expected(z, zr, labels, risk):
    """Reference values and gradient in float64, from the (rounded) inputs."""
    z64 = z.detach().double().requires_grad_()
    logp, ref_logp, kl, value = reference.token_stats(z64, zr.double(), labels, risk=risk, ignore_index=IGNORE)
    g = upstream(z.shape[0])
    (grad,) = torch.autograd.grad((g[0] * logp + g[1] * kl + g[2] * value).sum(), z64)
    return torch.stack([logp, ref_logp, kl, value], 1).detach(), grad


def cpu_result(z, zr, labels, risk, inplace=False):
    z = z.detach().clone().requires_grad_()
    st = token_stats(z, zr, labels, risk=risk, ignore_index=IGNORE, backend="cpu", inplace_backward=inplace)
    g = upstream(z.shape[0]).to(st.logp.dtype)
    (grad,) = torch.autograd.grad((g[0] * st.logp + g[1] * st.kl + g[2] * st.risk).sum(), z)
    return torch.stack(list(st), 1).detach(), grad, z


def assert_close(got, want, rtol, atol):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("v", [1, 7, 1000, 4097])
@pytest.mark.parametrize("risk", RISKS)
def test_float64_matches_reference(risk, v):
    z, zr, labels = make_rows(6, v)
    want, want_grad = expected(z, zr, labels, risk)
    got, grad, _ = cpu_result(z, zr, labels, risk)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(got[1] == 0) and torch.all(grad[1] == 0)  # the masked row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("risk", RISKS)
def test_low_precision_computed_in_float32(risk, dtype):
    z, zr, labels = make_rows(5, 1000, dtype=dtype)
    want, want_grad = expected(z, zr, labels, risk)
    got, grad, _ = cpu_result(z, zr, labels, risk)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    assert_close(got, want, rtol=1e-4, atol=2e-4)
    # float32 sums: the CVaR atom's share (F(tau) - alpha) / (1 - alpha) carries their rounding;
    # bf16 / fp16: the gradient is rounded to the input dtype at the end
    tol = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    atol = tol * want_grad.abs().max().item()
    if dtype == torch.float32 or risk.startswith(("kl", "erm")):
        assert_close(grad, want_grad, rtol=tol, atol=atol)
    else:
        # bf16/fp16 logits repeat values, so many items have D equal in exact arithmetic; which
        # of them rounding puts at, above or below the quantile differs between float32 and
        # float64, and with it their gradient. Against the torch backend, which computes the
        # same float32 D, the decisions agree.
        r = parse_risk(risk)
        _, saved = torch_rows.forward(z, zr, labels, r, IGNORE)
        g = upstream(z.shape[0]).T.float().contiguous()
        assert_close(grad, torch_rows.backward(z, zr, labels, saved, g, r, IGNORE).double(), rtol=tol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("risk", RISKS)
def test_extreme_and_masked_vocabulary(risk, dtype):
    """+-1e4 logits, and -inf items: masked in both models, or outside the reference's support."""
    z, zr, labels = make_rows(6, 300, scale=1.0, seed=3)
    z[0], zr[0] = z[0] * 1e4, zr[0] * 1e4  # most q and p underflow to 0
    z[2, :40] = zr[2, :40] = float("-inf")
    zr[3, 10:200] = float("-inf")  # q = 0 there: those items never count
    labels[2] = 50
    z, zr = z.to(dtype), zr.to(dtype)
    want, want_grad = expected(z, zr, labels, risk)
    got, grad, _ = cpu_result(z, zr, labels, risk)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert_close(got, want, rtol=tol, atol=tol)
    assert_close(grad, want_grad, rtol=tol, atol=tol)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("risk", RISKS)
def test_policy_zero_where_reference_positive_is_infinite(risk):
    z, zr, labels = make_rows(3, 50, masked=())
    z[0, 7] = float("-inf")  # p = 0 < q: KL(q || p) is +inf, and so is every risk
    got, _, _ = cpu_result(z, zr, labels, risk)
    want, _ = expected(z, zr, labels, risk)
    assert got[0, 2] == float("inf") and got[0, 3] == want[0, 3]
    assert_close(got[1:], want[1:], rtol=1e-10, atol=1e-10)


def tied_rows(n, v, dtype, seed=5):
    """Logits from a few small integers: items sharing a (z, zr) pair have the same D bits,
    so the CVaR quantile atom holds many items and the ra_dpo_cvar quantile is a tie."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 3, (n, v), generator=gen).to(dtype)
    zr = torch.randint(0, 3, (n, v), generator=gen).to(dtype) * 1.5
    return z, zr, torch.randint(0, v, (n,), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("risk", ["cvar:0.3", "cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.95", "erm:1"])
def test_ties_in_deviation(risk, dtype):
    z, zr, labels = tied_rows(8, 777, dtype)
    want, want_grad = expected(z, zr, labels, risk)
    got, grad, _ = cpu_result(z, zr, labels, risk)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(got, want, rtol=tol, atol=tol)
    assert_close(grad, want_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("risk", ["kl", "erm:2", "cvar:0.9", "ra_dpo_cvar:0.95"])
def test_inplace_backward(risk, dtype):
    z, zr, labels = make_rows(5, 1001, dtype=dtype)
    _, want_grad, _ = cpu_result(z, zr, labels, risk)
    _, grad, leaf = cpu_result(z, zr, labels, risk, inplace=True)
    assert torch.equal(grad, want_grad)
    assert grad.data_ptr() == leaf.data_ptr()  # written into the logits' own storage


@pytest.mark.parametrize("risk", RISKS)
def test_row_strided_input(risk):
    z, zr, labels = make_rows(6, 1003)
    r = parse_risk(risk)
    wide = torch.full((6, 1010), 7.0, dtype=torch.float64)
    wide_r = torch.full((6, 1020), -3.0, dtype=torch.float64)
    zs, zrs = wide[:, 5:1008], wide_r[:, :1003]
    zs.copy_(z)
    zrs.copy_(zr)
    assert zs.stride(0) != 1003 and zrs.stride(0) != 1003
    stats, saved = cpu_rows.forward(z, zr, labels, r, IGNORE)
    stats_s, saved_s = cpu_rows.forward(zs, zrs, labels, r, IGNORE)
    assert torch.equal(stats, stats_s) and torch.equal(saved, saved_s)
    g = upstream(6).T.contiguous()
    grad = cpu_rows.backward(z, zr, labels, saved, g, r, IGNORE)
    assert torch.equal(grad, cpu_rows.backward(zs, zrs, labels, saved_s, g, r, IGNORE))
    # in place into a strided view: the gradient lands in the view, the padding is untouched
    cpu_rows.backward(zs, zrs, labels, saved_s, g, r, IGNORE, inplace=True)
    assert torch.equal(zs, grad) and torch.all(wide[:, :5] == 7.0) and torch.all(wide[:, 1008:] == 7.0)


@pytest.mark.parametrize("risk", RISKS)
def test_one_and_two_threads_bitwise_equal(risk):
    z, zr, labels = make_rows(9, 4097, dtype=torch.float32, masked=(0, 4))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpu_result(z, zr, labels, risk)[:2])
    finally:
        torch.set_num_threads(before)
    (s1, g1), (s2, g2) = results
    assert torch.equal(s1, s2) and torch.equal(g1, g2)


@pytest.mark.parametrize("risk", RISKS)
def test_saved_scalars_interchangeable_with_torch_backend(risk):
    """Same saved-scalar meanings: each backend's backward accepts the other's forward."""
    z, zr, labels = make_rows(5, 999)
    r = parse_risk(risk)
    g = upstream(5).T.contiguous()
    stats_c, saved_c = cpu_rows.forward(z, zr, labels, r, IGNORE)
    stats_t, saved_t = torch_rows.forward(z, zr, labels, r, IGNORE)
    torch.testing.assert_close(stats_c, stats_t, rtol=1e-10, atol=1e-10)
    grad_c = cpu_rows.backward(z, zr, labels, saved_t, g, r, IGNORE)
    grad_t = torch_rows.backward(z, zr, labels, saved_c, g, r, IGNORE)
    torch.testing.assert_close(grad_c, grad_t, rtol=1e-9, atol=1e-12)


def test_unsupported_and_auto():
    assert cpu_rows.unsupported(torch.zeros(2, 3)) is None
    assert "cpu" in cpu_rows.unsupported(torch.zeros(2, 3, device="meta"))
    assert "float" in cpu_rows.unsupported(torch.zeros(2, 3, dtype=torch.int32))
    assert backends.get_backend("auto", torch.zeros(2, 3)) is cpu_rows
    assert "cpu" in rsa_kernels.available_backends()
    with pytest.raises(RuntimeError, match="cpu"):
        backends.get_backend("cpu", torch.zeros(2, 3, device="meta"))


def test_unbuilt_extension_falls_back_with_one_warning(monkeypatch):
    """Where _C cannot be imported, "auto" warns once and the torch backend gives the result."""
    monkeypatch.setitem(sys.modules, "rsa_kernels._C", None)  # import of _C now raises ImportError
    monkeypatch.delitem(sys.modules, "rsa_kernels.backends.cpu_rows")
    monkeypatch.delattr(rsa_kernels, "_C", raising=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_warned_cpu", False)
    z, zr, labels = make_rows(4, 50)
    with pytest.warns(RuntimeWarning, match="cpu backend unavailable"):
        first = token_stats(z, zr, labels, risk="cvar:0.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = token_stats(z, zr, labels, risk="cvar:0.5")
    want, _ = expected(z, zr, labels, "cvar:0.5")
    assert_close(torch.stack(list(first), 1), want, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.stack(list(first), 1), torch.stack(list(second), 1))
    assert "cpu" not in rsa_kernels.available_backends()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("risk", RISKS)
def test_nan_in_either_logits_gives_nan_out(risk, dtype):
    """NaN in z, or in zr (q = NaN, which a "q > 0" support test used to drop), gives NaN kl
    and risk on that row only, as the reference does; a masked NaN row stays exactly 0."""
    z, zr, labels = make_rows(6, 1001, masked=(5,))
    z[1, 3] = float("nan")
    zr[2, 500] = float("nan")
    zr[3, 999] = float("nan")  # in the vector tail
    z[4, 10] = zr[4, 11] = float("nan")
    z[5, 0] = zr[5, 1] = float("nan")  # masked
    z, zr = z.to(dtype), zr.to(dtype)
    want, want_grad = expected(z, zr, labels, risk)
    got, grad, _ = cpu_result(z, zr, labels, risk)  # the backward must not fail
    assert torch.isnan(got[1:5, 2:]).all() and torch.isnan(want[1:5, 2:]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))  # logp / ref_logp as the arithmetic gives
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert_close(got[0], want[0], rtol=tol, atol=tol)
    gtol = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 8e-3}[dtype]  # grad rounded to dtype
    assert_close(grad[0], want_grad[0], rtol=gtol, atol=gtol * want_grad[0].abs().max().item())
    assert torch.all(got[5] == 0) and torch.all(grad[5] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c,v,nan_in_torch", [(0.95, 50, True), (0.5, 20, False), (0.9, 1078, False)])
def test_ra_dpo_quantile_interpolated_from_minus_inf(c, v, nan_in_torch, dtype):
    """Exactly LO + 1 items with zr = -inf (q = 0, D = -inf): Q interpolates from -inf and is
    -inf (the limit; torch.quantile's own value at interpolation weights >= 0.5), so the risk
    is kl. It was NaN, which selected nothing and gave 0."""
    pos = (1 - c) * (v - 1)
    lo = int(pos)
    assert (pos - lo < 0.5) == nan_in_torch and pos - lo > 0.01
    z, zr, labels = make_rows(4, v, masked=())
    gen = torch.Generator().manual_seed(7)
    for i in range(4):
        zr[i, torch.randperm(v, generator=gen)[: lo + 1]] = float("-inf")
    labels[:] = zr.argmax(-1)
    z, zr = z.to(dtype), zr.to(dtype)
    zd, zrd = z.double(), zr.double()
    d = reference.deviation(zd, zrd, zd.logsumexp(-1), zrd.logsumexp(-1))
    torch_q = torch.quantile(d, 1 - c, dim=-1)
    assert (torch.isnan(torch_q) if nan_in_torch else torch.isneginf(torch_q)).all()
    want, want_grad = expected(z, zr, labels, f"ra_dpo_cvar:{c}")
    got, grad, _ = cpu_result(z, zr, labels, f"ra_dpo_cvar:{c}")
    _, saved = cpu_rows.forward(z, zr, labels, parse_risk(f"ra_dpo_cvar:{c}"), IGNORE)
    assert torch.isneginf(saved[:, 2]).all()  # Q
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close(got, want, rtol=tol, atol=tol)
    assert_close(got[:, 3], got[:, 2].double(), rtol=tol, atol=tol)  # risk = kl
    assert_close(grad, want_grad, rtol=tol, atol=tol)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()


def bracket_rows(v, dtype, seed=11):
    """Rows on which the sampled bracket of the selections (csrc/select.h) is exercised, and
    rows on which it must fail and fall back: a concentrated reference (the sample misses
    the items that hold the mass), ties, half the vocabulary off the support, a sorted row."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(6, v, generator=gen, dtype=torch.float64) * 2
    zr = z + torch.randn(6, v, generator=gen, dtype=torch.float64)
    zr[0, 5::997] += 25.0  # a few items (off the sample's stride) hold almost all of q
    z[1] = torch.randint(0, 3, (v,), generator=gen).double()
    zr[1] = torch.randint(0, 3, (v,), generator=gen).double() * 1.5
    zr[2, torch.randperm(v, generator=gen)[: v // 2]] = float("-inf")
    zr[3] = torch.linspace(-5, 5, v, dtype=torch.float64)  # D increasing along the row
    z[3] = -zr[3]
    z[4] *= 1e3
    zr[4] *= 1e3
    labels = torch.randint(0, v, (6,), generator=gen)
    labels[2] = int(zr[2].argmax())
    return z.to(dtype), zr.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("risk", ["cvar:0", "cvar:0.5", "cvar:0.9", "cvar:0.99", "ra_dpo_cvar:0.05",
                                  "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.95"])
def test_bracketed_selection(risk, dtype):
    """Rows long enough for the bracketed selection, on which a wrong bracket would show."""
    z, zr, labels = bracket_rows(9001, dtype)
    want, want_grad = expected(z, zr, labels, risk)
    got, grad, _ = cpu_result(z, zr, labels, risk)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert_close(got, want, rtol=tol, atol=tol)
    assert_close(grad, want_grad, rtol=tol, atol=tol)
    # the selected threshold itself is the torch backend's (a full sort), up to the rounding
    # of D (A and Ar are computed differently); a neighbouring order statistic would be off
    # by a whole gap between sorted D values
    r = parse_risk(risk)
    _, saved_c = cpu_rows.forward(z, zr, labels, r, IGNORE)
    _, saved_t = torch_rows.forward(z, zr, labels, r, IGNORE)
    torch.testing.assert_close(saved_c[:, 2], saved_t[:, 2], rtol=tol / 10, atol=tol / 10)


def _rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_gradient_on_huge_pages(monkeypatch, dtype):
    """The fresh gradient of a large backward (csrc/fresh.h): the same bits as on torch.empty,
    a tensor of its own, 2 MiB-aligned on Linux, and unmapped again when freed."""
    z, zr, labels = make_rows(128, 40000, dtype=dtype)  # >= 8 MiB in either dtype: the 2 MiB-page path
    risk = parse_risk("erm:0.5")
    stats, saved = cpu_rows.forward(z, zr, labels, risk, IGNORE)
    g = upstream(128).T.contiguous().float()
    monkeypatch.setattr(cpu_rows, "HUGE_PAGES", True)  # what RSA_CPU_HUGE_PAGES=1 forces
    got = cpu_rows.backward(z, zr, labels, saved, g, risk, IGNORE)
    monkeypatch.setattr(cpu_rows, "HUGE_PAGES", False)
    want = cpu_rows.backward(z, zr, labels, saved, g, risk, IGNORE)
    assert got.dtype == dtype and got.shape == z.shape and got.is_contiguous()
    assert torch.equal(got, want)
    assert got.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()
    if sys.platform.startswith("linux"):
        assert got.data_ptr() % (2 << 20) == 0
        small = cpu_rows._C.fresh_like(torch.empty(3, 5, dtype=dtype))  # below 8 MiB: at::empty
        assert small.shape == (3, 5) and small.dtype == dtype
        del got, want
        before = _rss_bytes()
        for _ in range(20):  # 20 x 64 MiB written and freed: nothing may stay mapped
            t = cpu_rows._C.fresh_like(torch.empty(1024, 16384))
            t.fill_(1.0)
            del t
        assert _rss_bytes() - before < 32 * 2**20


@pytest.mark.parametrize("enabled,defrag,features,want", [
    ("always [madvise] never", "always defer defer+madvise madvise [never]", None, True),
    ("always [madvise] never", "always [defer] defer+madvise madvise never", "0110000", True),
    ("always [madvise] never", "always defer defer+madvise [madvise] never", None, False),  # compacts in the fault
    ("always [madvise] never", "always defer [defer+madvise] madvise never", None, False),
    ("always [madvise] never", "[always] defer defer+madvise madvise never", None, False),
    ("always [madvise] never", "always defer defer+madvise madvise [never]", "0110010", False),  # free page reporting
    ("[always] madvise never", "always defer defer+madvise madvise [never]", None, False),  # torch.empty has them
    ("always madvise [never]", "always defer defer+madvise madvise [never]", None, False),
    (None, None, None, False),  # no THP at all
])
def test_huge_pages_only_where_they_cannot_stall(tmp_path, enabled, defrag, features, want):
    """The 2 MiB-page gradient's run-time rule (docs/cpu_backend.md, "The fresh gradient"), on
    made-up sysfs trees."""
    thp, balloon = tmp_path / "thp", tmp_path / "balloon"
    thp.mkdir()
    if enabled is not None:
        (thp / "enabled").write_text(enabled + "\n")
        (thp / "defrag").write_text(defrag + "\n")
    if features is not None:
        (balloon / "virtio0").mkdir(parents=True)
        (balloon / "virtio0" / "features").write_text(features + "0" * 57 + "\n")
    got, why = cpu_rows.huge_pages_here(str(thp), str(balloon))
    assert got is want and why


def test_huge_pages_setting_from_the_environment(monkeypatch):
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv("RSA_CPU_HUGE_PAGES", value)
        assert cpu_rows._huge_pages_setting() == (want, f"RSA_CPU_HUGE_PAGES={value}")
    monkeypatch.setenv("RSA_CPU_HUGE_PAGES", "auto")
    assert cpu_rows._huge_pages_setting() == cpu_rows.huge_pages_here()
    monkeypatch.setenv("RSA_CPU_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="RSA_CPU_HUGE_PAGES"):
        cpu_rows._huge_pages_setting()
