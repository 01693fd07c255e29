"""The cpu kernels' vectorised exp (csrc/simd.h) against torch.exp in float64.

Its float32 form has a fast path (every lane in [-87, 88]) and a general one (clamps, split
scaling for subnormal results); both must be accurate to 1 ulp everywhere and agree bit for
bit where both apply, and keep exp's IEEE edge values, since "q != 0" decides the
reference's support. (An exhaustive run over all 2^32 floats gave at most 0.891 ulp; see
docs/cpu_backend.md. Here: a dense sample of the whole range, quick enough for CI.)
"""
from __future__ import annotations

import pytest
import torch

try:
    from rsa_kernels import _C
    from rsa_kernels.backends import cpu_rows  # noqa: F401  (refuses a CPU without AVX2)
except ImportError as err:
    pytest.skip(f"rsa_kernels._C is not built: {err}", allow_module_level=True)

from cpu_levels import LEVELS, use_level  # noqa: E402


@pytest.fixture(params=LEVELS, autouse=True)
def level(request, monkeypatch):
    """Each instruction-set level's exp (its own build of csrc/simd.h) is checked."""
    monkeypatch.setitem(globals(), "_C", use_level(request.param, monkeypatch))


def ulp_error(got: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|got - exp(x)| in units of the last place of the correctly rounded float32 result."""
    want = torch.exp(x.double())
    rounded = want.float()
    _, e = torch.frexp(rounded)
    ulp = torch.ldexp(torch.ones_like(want), torch.clamp(e.long() - 24, min=-149))
    return (got.double() - want).abs() / ulp


def ulp_limit() -> float:
    """1 ulp with FMA (avx2, avx512); the portable level has none, so the polynomial's steps
    round twice (1.133 ulp seen on the sample below)."""
    return 1.0 if _C.LEVEL != "portable" else 1.2


def every_kth_float(step: int) -> torch.Tensor:
    """Bit patterns 0, step, 2 step, ... over all 2^32 (both signs, NaN and inf included)."""
    bits = torch.arange(0, 2**32, step, dtype=torch.int64)
    return (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)


def test_float32_within_one_ulp_over_the_whole_range():
    x = every_kth_float(1021)  # an odd step reaches every low-bit pattern: 4.2M values
    got = _C.exp(x)
    finite = torch.isfinite(x) & (torch.exp(x.double()).float() != 0) & torch.isfinite(torch.exp(x.double()).float())
    err = ulp_error(got[finite], x[finite])
    limit = ulp_limit()
    assert err.max().item() <= limit, f"max {err.max().item():.3f} ulp at x = {x[finite][err.argmax()].item()!r}"
    # where the rounded result is 0 or inf, the kernel's is exactly that
    edge = ~finite & ~torch.isnan(x)
    assert torch.equal(got[edge], torch.exp(x[edge].double()).float())
    assert torch.isnan(got[torch.isnan(x)]).all()


def test_float32_dense_where_the_kernels_live():
    # s = z - A and r = zr - Ar are <= 0, mostly in [-30, 0]; the fast path's borders too
    x = torch.cat([torch.linspace(-30, 0, 2_000_001), torch.linspace(-88, -86, 200_001),
                   torch.linspace(87.5, 88.8, 100_001), torch.linspace(-104.5, -102.5, 100_001)])
    got, rounded = _C.exp(x), torch.exp(x.double()).float()
    regular = (rounded != 0) & torch.isfinite(rounded)
    assert ulp_error(got[regular], x[regular]).max().item() <= ulp_limit()
    assert torch.equal(got[~regular], rounded[~regular])  # 0 below, inf above


def test_float32_edges():
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -87.0, -87.0001, 88.0, 88.0001,
                      88.72283, 88.7229, 89.0, -103.2789, -103.9720, -103.98, -104.0, -1e30, 1e30,
                      1.1754944e-38, -1.4e-45])
    want = torch.exp(x.double()).float()
    got = _C.exp(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    regular = (want != 0) & torch.isfinite(want)
    assert (ulp_error(got[regular], x[regular]) <= 1.0).all()
    assert torch.equal(got[~regular & ~torch.isnan(want)], want[~regular & ~torch.isnan(want)])
    assert got[0] == 1 and got[1] == 1 and got[2] == float("inf") and got[3] == 0
    assert (got[-4:] == torch.tensor([0.0, float("inf"), 1.0, 1.0])).all()  # exp(-+1e30), exp(+-tiny)
    assert got[13] > 0  # a subnormal result is kept, not flushed (support decisions depend on it)


def test_fast_and_general_paths_give_the_same_bits():
    """A vector with one lane outside [-87, 88] takes the general path; its other lanes must
    come out as they do on the fast path (so a value's exp never depends on its neighbours)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8 * 4096, generator=gen) * 170 - 85  # all in the fast range
    fast = _C.exp(x)
    mixed = x.clone()
    mixed[::8] = -100.0  # one lane per vector forces the general path
    general = _C.exp(mixed)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[::8] = False
    assert torch.equal(fast[keep], general[keep])


def test_float64_accuracy():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(1_000_000, generator=gen, dtype=torch.float64) * 1400 - 700,
                   torch.tensor([0.0, float("inf"), float("-inf"), -745.2, -746.0, 709.7, 710.0], dtype=torch.float64)])
    got, want = _C.exp(x), torch.exp(x)
    torch.testing.assert_close(got, want, rtol=4e-16, atol=0)
    assert torch.isnan(_C.exp(torch.tensor([float("nan")], dtype=torch.float64))).all()
