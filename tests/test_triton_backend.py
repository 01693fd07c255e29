"""The triton backend against the torch backend and the float64 reference (SPEC section 1).

Without a GPU the kernels run under Triton's interpreter on CPU tensors: the fixture below
sets TRITON_INTERPRET=1 for these tests only (the backend loads its kernels per mode at
call time, so the rest of the suite, in the same process, is unaffected). With CUDA the
same tests run compiled on cuda tensors, at larger sizes too.
"""
from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

import rsa_kernels as rk  # noqa: E402
from rsa_kernels import reference  # noqa: E402
from rsa_kernels.backends import torch_rows, triton_quantile, triton_rows  # noqa: E402
from rsa_kernels.risk import parse_risk  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RISKS = ["kl", "erm:0.5", "erm:2", "cvar:0", "cvar:0.9", "ra_dpo_cvar:0.95"]
VOCABS = [1, 5, 127, 1000, 3000] + ([32000, 128256] if CUDA else [])
ROWS = 64 if CUDA else 8


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(n, v, *, dtype=torch.float32, scale=3.0, seed=0, masked=(1,)):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)
    zr = (z.float() + torch.randn(n, v, generator=g) * scale / 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    for i in masked:
        if i < n:
            labels[i] = -100
    weights = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return z.to(DEVICE), zr.to(DEVICE), labels.to(DEVICE), weights.to(DEVICE)


def _run(z, zr, labels, risk, weights, backend, inplace=False):
    """Stats and d(sum_i w_i . (logp, kl, risk)_i)/dz, through the public token_stats."""
    if backend == "reference":
        leaf = z.detach().double().requires_grad_()
        out = reference.token_stats(leaf, zr.double(), labels, risk=risk)
    else:
        leaf = z.detach().clone().requires_grad_()
        src = leaf.clone() if inplace else leaf  # inplace overwrites its input: not a leaf
        out = rk.token_stats(src, zr, labels, risk=risk, backend=backend, inplace_backward=inplace)
    stats = torch.stack([t.double() for t in out], 1)
    w = weights.to(stats.dtype)
    (stats[:, [0, 2, 3]] * w).sum().backward()
    return stats.detach(), leaf.grad.double()


def _close(actual, expected, tol, scale=1.0):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("risk", RISKS)
def test_float32_matches_reference_and_torch(v, risk):
    z, zr, labels, w = _inputs(ROWS, v, seed=v)
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")
    torch_stats, torch_grad = _run(z, zr, labels, risk, w, "torch")
    # cvar's atom weight is (F(tau) - ALPHA) / (1 - ALPHA): a float32 sum F over V items is off
    # by ~sqrt(V) ulps, which that difference magnifies; seen on an H200: 2.3e-5 at V=128256
    gtol = 1e-4 if risk.startswith("cvar") and v >= 32000 else 2e-5
    _close(stats, ref_stats, 2e-5, scale=10)
    _close(grad, ref_grad, gtol)
    _close(stats, torch_stats, 2e-5, scale=10)
    _close(grad, torch_grad, gtol)
    assert torch.all(grad[labels == -100] == 0) and torch.all(stats[labels == -100] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("risk", RISKS)
def test_half_inputs_compute_in_float32(dtype, risk):
    z, zr, labels, w = _inputs(ROWS, 1000, dtype=dtype, seed=3)
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")  # the same rounded inputs
    _close(stats, ref_stats, 2e-5, scale=10)
    assert z.grad is None and grad.dtype == torch.float64
    # the gradient is rounded once, to the input dtype; coarse inputs tie in D often, and the
    # quantile atom's share (F - ALPHA) / mass is float32-sensitive when that mass is small
    rows = _well_posed_rows(z, zr, labels, risk, eps=1e-4)
    _close(grad[rows], ref_grad[rows], 1e-2, scale=0.2)


@pytest.mark.parametrize("kind", ["integer", "bf16", "straddle"])
@pytest.mark.parametrize("risk", ["cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.5", "ra_dpo_cvar:0.95"])
def test_ties_as_torch(kind, risk):
    """Tie-heavy rows (tests/tie_rows.py): D = (zr - z) + (A - Ar) gives the triton kernels the
    ties of the torch backend and the reference (SPEC section 1), so cvar's split atom and
    ra_dpo_cvar's mask agree to float32's tolerances, with no row left out."""
    from tie_rows import tie_rows
    z, zr, labels = tie_rows(kind, 4, 300, seed=2)
    z, zr, labels = z.float().to(DEVICE), zr.float().to(DEVICE), labels.to(DEVICE)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    for other in ("torch", "reference"):
        want_stats, want_grad = _run(z, zr, labels, risk, w, other)
        _close(stats, want_stats, 2e-5, scale=10)
        _close(grad, want_grad, 2e-5)


def _well_posed_rows(z, zr, labels, risk, eps):
    """Rows whose cvar/ra_dpo_cvar gradient is a continuous function of float32 rounding.

    The gradient jumps where an item crosses the quantile (tau* or Q). When another D value
    lies within ``eps`` of it (equal or not) other than a copy of the same (z, zr) pair, or
    (cvar) the cumulative q-mass
    passes ALPHA within 1e-5 at some item, float32 and float64 (or two float32 formulas of
    D) may choose differently: both are right for their own arithmetic, so such rows are
    left out of gradient comparisons. Asserts most rows remain.
    """
    keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if not risk.startswith(("cvar", "ra_dpo_cvar")):
        return keep
    _, saved = torch_rows.forward(z.double(), zr.double(), labels, parse_risk(risk), -100)
    s = z.double() - torch.logsumexp(z.double(), -1, keepdim=True)
    r = zr.double() - torch.logsumexp(zr.double(), -1, keepdim=True)
    d = r - s
    t = saved[:, 2:3]
    # items within eps of the quantile that are not copies of one (z, zr) pair: their D may
    # tie in one arithmetic and not in another (seen with bf16 inputs on an H200)
    near = (d - t).abs() < eps
    pairs = torch.stack([z.double(), zr.double()], -1)
    keep = torch.tensor([len(torch.unique(pairs[i][near[i]], dim=0)) <= 1 for i in range(z.shape[0])],
                        device=z.device)
    alpha = parse_risk(risk).param
    if risk.startswith("cvar") and alpha > 0:  # tau* flips where the q-mass F passes ALPHA closely
        order = d.sort(-1).indices
        f = r.exp().gather(-1, order).cumsum(-1)
        keep &= ~((f - alpha).abs() < 1e-5).any(-1)
    assert keep.sum() >= z.shape[0] // 2, "too few well-posed rows: the test would prove little"
    return keep


def test_gradient_has_the_input_dtype():
    z, zr, labels, w = _inputs(4, 100, dtype=torch.bfloat16)
    risk = parse_risk("cvar:0.5")
    stats, saved = triton_rows.forward(z, zr, labels, risk, -100)
    grad = triton_rows.backward(z, zr, labels, saved, w.float(), risk, -100)
    assert grad.dtype == torch.bfloat16 and grad.shape == z.shape
    assert stats.dtype == saved.dtype == torch.float32


@pytest.mark.parametrize("risk", RISKS)
def test_minus_inf_logits(risk):
    z, zr, labels, w = _inputs(ROWS, 300, seed=5)
    zr[:, 10:60] = float("-inf")  # outside the reference's support: q = 0, D = -inf
    z[:, 10:30] = float("-inf")   # ... and outside the policy's as well
    z[:, 200:210] = float("-inf")  # p = 0 < q: kl and risk are +inf there, grads not compared
    z[0, 200:210] = 0.0
    labels[labels >= 200] = 0
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")
    _close(stats, ref_stats, 2e-5, scale=10)
    _close(grad[0], ref_grad[0], 2e-5)
    assert torch.isinf(stats[2:, 2]).all()


@pytest.mark.parametrize("risk", RISKS)
def test_extreme_logits(risk):
    g = torch.Generator().manual_seed(7)
    signs = lambda: torch.randint(0, 2, (ROWS, 500), generator=g).double() * 2 - 1  # noqa: E731
    z = (signs() * 1e4 + torch.randn(ROWS, 500, generator=g)).float().to(DEVICE)
    zr = (signs() * 1e4 + torch.randn(ROWS, 500, generator=g)).float().to(DEVICE)
    labels = torch.randint(0, 500, (ROWS,), generator=g).to(DEVICE)
    w = torch.randn(ROWS, 3, generator=g, dtype=torch.float64).to(DEVICE)
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")
    torch_stats, torch_grad = _run(z, zr, labels, risk, w, "torch")
    # float32 log-probabilities have ~1e-3 absolute error at 1e4, so q and p carry ~1e-3
    # relative error, and sums of q*D (D ~ 2e4) a few units: the torch backend, in the same
    # float32, is the close oracle; the float64 reference bounds the error of both
    # erm's w is proportional to exp(MU D): a 1e-3 error in D is a MU * 1e-3 relative error in w
    gtol = 2e-3 * max(1.0, parse_risk(risk).param if risk.startswith("erm") else 1.0)
    rows = _well_posed_rows(z, zr, labels, risk, eps=1e-2)  # a few float32 ulps of D ~ 2e4
    _close(stats, torch_stats, 1e-3, scale=10)
    _close(grad[rows], torch_grad[rows], gtol)
    _close(stats, ref_stats, 5e-3, scale=10)
    _close(grad[rows], ref_grad[rows], 1e-2)


@pytest.mark.parametrize("risk", ["cvar:0", "cvar:0.5", "cvar:0.9", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.5"])
def test_ties_in_d_give_the_same_atom_split(risk):
    z, zr, labels, w = _inputs(ROWS, 400, seed=11)
    z[0], zr[0] = z[0], z[0].clone()          # D = 0 everywhere: one atom holds all the mass
    z[2, 100:300] = z[2, 0:1]                 # 200 identical (z, zr) columns: a tied D value
    zr[2, 100:300] = zr[2, 0:1]
    z[3, 1::2], zr[3, 1::2] = z[3, 0::2], zr[3, 0::2]  # every value twice
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    torch_stats, torch_grad = _run(z, zr, labels, risk, w, "torch")
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")
    _close(stats, torch_stats, 2e-5, scale=10)
    _close(grad, torch_grad, 2e-5)
    _close(stats, ref_stats, 2e-5, scale=10)
    _close(grad, ref_grad, 2e-5)
    r = parse_risk(risk)
    _, saved = triton_rows.forward(z, zr, labels, r, -100)
    _, torch_saved = rk.backends.torch_rows.forward(z, zr, labels, r, -100)
    keep = labels != -100
    # tau (or Q) and the mass above it agree; c_atom = (F - ALPHA)+ / mass at tau suffers
    # cancellation in F - ALPHA, so it matches only to float32's cancellation error
    _close(saved[keep][:, :4].double(), torch_saved[keep][:, :4].double(), 1e-5)
    _close(saved[keep][:, 4].double(), torch_saved[keep][:, 4].double(), 1e-2)


@pytest.mark.parametrize("nbins", [8, 16])
@pytest.mark.parametrize("risk", ["cvar:0.9", "cvar:0", "cvar:0.5", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.5"])
def test_every_path_of_the_quantile_search(risk, nbins, monkeypatch):
    """Rows end in the first histogram, the second, or from the scratch copy; all exact.

    Whatever the row, the forward reads it at most 4 times: pass 1, two histogram launches,
    one collect (there is no other loop over the row)."""
    monkeypatch.setattr(triton_quantile, "NBINS", nbins)
    if nbins == 8:  # one open row per scratch batch
        monkeypatch.setattr(triton_quantile, "SCRATCH_BYTES", 1)
    finished = []
    finish = triton_quantile.finish_from_scratch
    monkeypatch.setattr(triton_quantile, "finish_from_scratch",
                        lambda rows, *a: (finished.append(rows.tolist()), finish(rows, *a)))
    z, zr, labels, w = _inputs(6, 3000, seed=13, masked=(5,))
    zr[0] = z[0]                                 # policy = reference (training's first step)
    z[1, :1500], zr[1, :1500] = z[1, 1500:], zr[1, 1500:]  # every value twice
    z[2, :2000], zr[2, :2000] = z[2, 0:1], zr[2, 0:1]      # one value 2000 times
    z[3] = (z[3] * 1e-6).round(decimals=7)          # a few thousand items within few ulps
    zr[3] = 0.0
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    torch_stats, torch_grad = _run(z, zr, labels, risk, w, "torch")
    _close(stats, torch_stats, 2e-5, scale=10)
    _close(grad, torch_grad, 2e-5)
    scratch = {r for rows in finished for r in rows}
    assert 0 not in scratch and 5 not in scratch  # one key after the histograms; masked
    assert 4 in scratch  # a spread-out row needs the scratch copy
    assert nbins != 8 or len(finished) == len(scratch) > 1


def _own_arithmetic(z, zr, saved, risk):
    """(quantile, risk, rows where F is not within 1e-5 of ALPHA) by sorting the kernel's own float32 D (from its saved A and Ar): the
    exact selection for that arithmetic, where values equal in exact arithmetic may split."""
    a, ar = saved[:, :1].float(), saved[:, 1:2].float()
    q = (zr.float() - ar).exp()
    d = torch.where(q != 0, (zr.float() - z.float()) + (a - ar), float("-inf")) + 0.0  # SPEC section 1's form
    qd = torch.where(q != 0, q.double() * d.double(), 0.0)
    r = parse_risk(risk)
    if r.kind == "cvar":
        tau, c_above, c_atom = torch_rows._cvar_threshold(d, q, r.param)
        atom = torch.where(d == tau[:, None], q.double(), 0.0).sum(-1) * c_atom
        value = torch.where(d > tau[:, None], qd, 0.0).sum(-1) * c_above + torch.where(atom > 0, atom * tau, 0.0)
        # tau* moves if q's last bits (exp differs between devices) move F across ALPHA
        f = q.double().gather(-1, d.sort(-1).indices).cumsum(-1)
        return tau, value, ~((f - r.param).abs() < 1e-5).any(-1) | (r.param == 0)  # ALPHA = 0: the least D
    quant = reference.interpolated_quantile(d, 1.0 - r.param)  # D alone decides: always exact
    return quant, torch.where(d > quant[:, None], qd, 0.0).sum(-1), torch.ones_like(quant, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["discrete", "near_ties", "heavy_tails", "wide", "no_support", "equal"])
@pytest.mark.parametrize("risk", ["cvar:0", "cvar:0.7", "ra_dpo_cvar:0.95", "ra_dpo_cvar:0.2"])
def test_quantile_is_exact_for_its_own_arithmetic(kind, risk):
    """Against the exact selection on the kernel's own float32 D: no tolerance on the quantile.
    (Against other backends, values tied in exact arithmetic but not as float32 zr - z can
    round apart, or together, by an ulp of A - Ar: a jump of one item's q*D in the risk,
    right for either arithmetic. Equal float32 zr - z tie everywhere: test_ties_as_torch.)"""
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind} {risk}".encode()))
    n, v = 8, 333
    z = torch.randn(n, v, generator=g) * 3
    zr = {"discrete": lambda: torch.randint(-3, 3, (n, v), generator=g).float(),
          "near_ties": lambda: z + torch.randn(n, v, generator=g) * 1e-6,
          "heavy_tails": lambda: z + torch.randn(n, v, generator=g) / torch.rand(n, v, generator=g).clamp_min(1e-3),
          "wide": lambda: z * 50 + torch.randn(n, v, generator=g),
          "no_support": lambda: torch.where(torch.rand(n, v, generator=g) < 0.4, float("-inf"), z + 1.0),
          "equal": lambda: z.clone()}[kind]()
    if kind == "discrete":
        z = torch.randint(-3, 3, (n, v), generator=g).float()
    z, zr = z.to(DEVICE), zr.to(DEVICE)
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    stats, saved = triton_rows.forward(z, zr, labels, parse_risk(risk), -100)
    quant, value, posed = _own_arithmetic(z, zr, saved, risk)
    if CUDA:  # tl.exp may flush a subnormal q to 0 where torch keeps it (docs/triton_kernels.md)
        q = (zr.float() - saved[:, 1:2]).exp()
        posed &= ~((q > 0) & (q < torch.finfo(torch.float32).tiny)).any(-1)
    assert posed.sum() >= 2
    assert torch.equal(saved[posed, 2], quant[posed].float())
    _close(stats[posed, 3].double(), value[posed], 1e-5, scale=10)


@pytest.mark.parametrize("risk", ["cvar:0.9", "cvar:0", "ra_dpo_cvar:0.95"])
def test_scratch_finish_ignores_the_collect_order(risk, monkeypatch):
    """On a GPU the collect pass fills the scratch in an arbitrary order (atomic slots); the
    finish sorts by (D, q), so any order of the same items gives bit-identical results."""
    calls = []
    finish = triton_quantile.finish_from_scratch
    monkeypatch.setattr(triton_quantile, "finish_from_scratch",
                        lambda *a: (calls.append([x.clone() if torch.is_tensor(x) else x for x in a]), finish(*a)))
    z, zr, labels, _ = _inputs(4, 2000, seed=37, masked=())
    z[:, 1000:1500], zr[:, 1000:1500] = z[:, 0:1], zr[:, 0:1]   # a tie, with equal q as well
    zr[:, 1500:1600] = zr[:, 1600:1700] + 0.5                     # equal D, different q
    z[:, 1500:1600] = z[:, 1600:1700] + 0.5
    z[:, 1700:1800] = 40 + torch.rand(4, 100, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    # ... and a dense lower tail (cvar:0 selects its least D): too many keys for the histograms
    stats, saved = triton_rows.forward(z, zr, labels, parse_risk(risk), -100)
    assert calls
    rows, d, q, ist, fst, _, _, *rest = calls[0]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        order = torch.arange(d.shape[1]).repeat(d.shape[0], 1)
        for i, c in enumerate(ist[rows, 3].tolist()):  # permute only the filled slots of each row
            order[i, :c] = torch.randperm(c, generator=g)
        order = order.to(d.device)
        dp, qp = d.gather(1, order), q.gather(1, order)
        st2, sv2 = stats.clone(), saved.clone()
        finish(rows, dp, qp, ist, fst, st2, sv2, *rest)
        assert torch.equal(st2, stats) and torch.equal(sv2, saved)
        # the finish sums in one order whatever the slots: items sorted by (D, q)
        filled = torch.arange(d.shape[1], device=d.device)[None, :] < ist[rows, 3][:, None]
        first = triton_quantile._item_order(d, q, filled).sort(dim=1).indices
        again = triton_quantile._item_order(dp, qp, filled).sort(dim=1).indices
        assert torch.equal(q.gather(1, first)[filled], qp.gather(1, again)[filled])


@pytest.mark.parametrize("risk", ["kl", "cvar:0.9", "ra_dpo_cvar:0.95"])
def test_inplace_backward_matches(risk):
    z, zr, labels, w = _inputs(ROWS, 1000, dtype=torch.bfloat16, seed=17)
    _, grad = _run(z, zr, labels, risk, w, "triton")
    _, grad_inplace = _run(z, zr, labels, risk, w, "triton", inplace=True)
    assert torch.equal(grad, grad_inplace)
    r = parse_risk(risk)
    zc = z.clone()
    _, saved = triton_rows.forward(zc, zr, labels, r, -100)
    out = triton_rows.backward(zc, zr, labels, saved, w.float(), r, -100, inplace=True)
    assert out.data_ptr() == zc.data_ptr()


def test_strided_rows():
    z, zr, labels, w = _inputs(ROWS, 700, seed=19)
    wide = torch.full((ROWS, 1024), 123.0, device=DEVICE)
    wide[:, :700] = z
    stats, grad = _run(wide[:, :700], zr, labels, "cvar:0.9", w, "triton")
    ref_stats, ref_grad = _run(z, zr, labels, "cvar:0.9", w, "triton")
    assert torch.equal(stats, ref_stats) and torch.equal(grad, ref_grad)


def test_nan_in_gives_nan_out():
    z, zr, labels, w = _inputs(4, 50, masked=())
    z[2, 7] = float("nan")
    for risk in RISKS:
        stats, _ = triton_rows.forward(z, zr, labels, parse_risk(risk), -100)
        assert torch.isnan(stats[2, [0, 2, 3]]).all() and not torch.isnan(stats[[0, 1, 3]]).any()


@pytest.mark.parametrize("risk", RISKS)
def test_nan_in_either_logits_gives_nan_out_as_the_reference(risk):
    """NaN in zr makes q NaN (a "q > 0" support test dropped it, giving kl = 0); NaN in z next
    to a p = 0 < q item stays NaN rather than becoming +inf. Masked NaN rows stay exactly 0."""
    z, zr, labels, w = _inputs(6, 300, seed=23, masked=(5,))
    z[1, 3] = float("nan")
    zr[2, 150] = float("nan")
    zr[3, labels[3]] = float("nan")
    z[4, 10] = float("nan")
    z[4, 20] = float("-inf")  # p = 0 < q: +inf, were the row not NaN
    z[5, 0] = zr[5, 1] = float("nan")
    stats, grad = _run(z, zr, labels, risk, w, "triton")  # the backward must not fail
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")
    assert torch.isnan(stats[1:5, 2:]).all() and torch.isnan(ref_stats[1:5, 2:]).all()
    assert torch.equal(torch.isnan(stats), torch.isnan(ref_stats))
    _close(stats[0], ref_stats[0], 2e-5, scale=10)
    _close(grad[0], ref_grad[0], 2e-5)
    assert torch.all(stats[5] == 0) and torch.all(grad[5] == 0)


@pytest.mark.parametrize("c,v", [(0.95, 50), (0.5, 20), (0.9, 1078)])
def test_ra_dpo_quantile_interpolated_from_minus_inf(c, v):
    """Exactly LO + 1 items with zr = -inf (q = 0, D = -inf): Q interpolates from -inf and is
    -inf (reference.interpolated_quantile; torch.quantile's value at weights >= 0.5), not
    -inf + inf = NaN, so the risk is kl, as in the reference and the torch backend."""
    risk = f"ra_dpo_cvar:{c}"
    lo = int((1 - c) * (v - 1))
    z, zr, labels, w = _inputs(4, v, seed=29, masked=())
    g = torch.Generator().manual_seed(31)
    for i in range(4):
        zr[i, torch.randperm(v, generator=g)[: lo + 1].to(DEVICE)] = float("-inf")
    labels = zr.argmax(-1)
    stats, grad = _run(z, zr, labels, risk, w, "triton")
    ref_stats, ref_grad = _run(z, zr, labels, risk, w, "reference")
    torch_stats, torch_grad = _run(z, zr, labels, risk, w, "torch")
    _, saved = triton_rows.forward(z, zr, labels, parse_risk(risk), -100)
    assert torch.isneginf(saved[:, 2]).all()
    assert torch.isfinite(stats).all() and torch.isfinite(grad).all()
    _close(stats[:, 3], stats[:, 2], 2e-5, scale=10)  # risk = kl
    _close(stats, ref_stats, 2e-5, scale=10)
    _close(grad, ref_grad, 2e-5)
    _close(stats, torch_stats, 2e-5, scale=10)
    _close(grad, torch_grad, 2e-5)


def test_unsupported_and_errors(monkeypatch):
    assert "float64" in triton_rows.unsupported(torch.zeros(2, 3, dtype=torch.float64))
    assert "262144" in triton_rows.unsupported(torch.zeros(1, 262145))
    z, zr, labels, _ = _inputs(2, 5, masked=())
    with pytest.raises(RuntimeError, match="float64"):
        rk.token_stats(z.double(), zr.double(), labels, backend="triton")
    if not CUDA:
        assert triton_rows.unsupported(z) is None
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "TRITON_INTERPRET" in triton_rows.unsupported(z)
        with pytest.raises(RuntimeError, match="CUDA"):
            rk.token_stats(z, zr, labels, backend="triton")


@pytest.mark.skipif(CUDA, reason="with a GPU the tests above compile and run every kernel")
def test_kernels_compile_for_hopper(monkeypatch):
    """Without a GPU, compile (not run) each kernel for sm_90: the interpreter is laxer than
    the compiler (globals, types carried through loops and branches), so this catches what
    the interpreted tests cannot."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget
    import triton

    monkeypatch.delenv("TRITON_INTERPRET")
    k = triton_rows._kernels()
    rows = {"y_ptr": "*i64", "stats_ptr": "*fp32", "saved_ptr": "*fp32", "aux_ptr": "*fp32"}
    ints = {"stride_z": "i32", "stride_zr": "i32", "V": "i32", "ignore_index": "i32"}
    variants = [
        (k.stats, {"z_ptr": "*bf16", "zr_ptr": "*bf16", **rows, **ints, "mu": "fp32",
                   "RISK": "constexpr", "RANGE": "constexpr", "BLOCK": "constexpr", "GROUP": "constexpr"},
         [{"RISK": r, "RANGE": r == 2, "BLOCK": triton_rows.BLOCK, "GROUP": triton_rows.GROUP} for r in (0, 1, 2)], {"enable_fp_fusion": True}),
        (k.backward, {"z_ptr": "*fp16", "zr_ptr": "*fp16", "y_ptr": "*i64", "saved_ptr": "*fp32",
                      "grads_ptr": "*fp32", "out_ptr": "*fp16", "stride_z": "i32", "stride_zr": "i32",
                      "stride_out": "i32", "V": "i32", "ignore_index": "i32", "mu": "fp32",
                      "RISK": "constexpr", "BLOCK": "constexpr"},
         [{"RISK": r, "BLOCK": triton_rows.BLOCK} for r in range(4)], {"enable_fp_fusion": True}),
        (k.histogram, {"z_ptr": "*bf16", "zr_ptr": "*bf16", **rows, "ist_ptr": "*i64", "fst_ptr": "*fp32",
                       **ints, "alpha": "fp32", "lo_rank": "i32", "hi_rank": "i32", "frac": "fp32",
                       **{c: "constexpr" for c in ("FIRST", "RA", "NB", "BLOCK")}},
         [{"FIRST": first, "RA": ra, "NB": triton_quantile.NBINS, "BLOCK": triton_quantile.HIST_BLOCK}
          for first in (True, False) for ra in (False, True)],
         {"enable_fp_fusion": False}),
        (k.collect, {"z_ptr": "*fp32", "zr_ptr": "*fp32", "rows_ptr": "*i64", "saved_ptr": "*fp32",
                     "ist_ptr": "*i64", "d_ptr": "*fp32", "q_ptr": "*fp32", "fill_ptr": "*i32", "stride_z": "i32", "stride_zr": "i32",
                     "V": "i32", "cap": "i32", "RA": "constexpr", "BLOCK": "constexpr"},
         [{"RA": ra, "BLOCK": triton_quantile.COLLECT_BLOCK} for ra in (False, True)], {"enable_fp_fusion": False}),
    ]
    for fn, signature, constant_sets, opts in variants:
        for constants in constant_sets:
            src = compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
            out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, **opts})
            assert "ptx" in out.asm


@pytest.mark.skipif(CUDA, reason="static analysis for machines without a GPU; gpu_bench.py measures")
def test_histogram_loop_has_no_barrier_or_shared_memory(monkeypatch):
    """The design property that made the quantile search cheaper: compiled for sm_90, the
    histogram's loop over the row keeps its sums in registers (no barrier, no shared memory),
    read from the SASS by bench/triton_static_cost.py."""
    pytest.importorskip("triton.compiler")
    import importlib.util
    import pathlib
    import tempfile
    path = pathlib.Path(__file__).parents[1] / "bench" / "triton_static_cost.py"
    spec = importlib.util.spec_from_file_location("triton_static_cost", path)
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    monkeypatch.delenv("TRITON_INTERPRET")
    hist = [v for v in cost.variants() if v[0].startswith("histogram") and f"NB={triton_quantile.NBINS})" in v[0]]
    assert len(hist) == 2
    with tempfile.TemporaryDirectory() as tmp:
        for variant in hist:
            cells = [c.strip() for c in cost.analyse(*variant, 16384, 128256, tmp).strip("|").split("|")]
            loop, bars, shared = int(cells[5]), int(cells[7]), int(cells[8])
            assert loop > 0 and bars == 0 and shared == 0, cells
