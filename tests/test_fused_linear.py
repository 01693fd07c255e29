"""fused_linear_*: the same values and gradients as the logits path on materialised logits.

The oracle is rk.preference_loss / rk.token_stats applied to hidden @ weight.T + bias with
autograd through the product (itself tested against the naive formulas elsewhere), in
float64. LigerFusedLinearDPOLoss is the external check of the `dpo` objective.
"""
import math

import pytest
import torch

import rsa_kernels as rk
from rsa_kernels.fused_linear import choose_schedule
from rsa_kernels.loss import make_layout

RISKS = ["kl", "erm:0.7", "cvar:0.6", "ra_dpo_cvar:0.3"]
OBJECTIVES = ["dpo", "rsa1", "rsa2"]
CPU_BACKENDS = [b for b in rk.available_backends() if b != "triton"]
B, T, H, V = 2, 6, 5, 9


def make_inputs(seed, *, packed=False, bias=True, dtype=torch.float64, ref_h=None, pairs=B, length=T):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ref_h = ref_h or H
    if packed:
        # sequences of different lengths, stored out of index order, each in token order
        lengths = [length - 1 - (i % 3) for i in range(2 * pairs)]
        order = torch.randperm(2 * pairs, generator=g).tolist()
        ids = torch.cat([torch.full((lengths[s],), s) for s in order])
        lead = (ids.numel(),)
    else:
        ids, lead = None, (2 * pairs, length)
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.25] = -100        # scattered masks
    x = dict(hidden=rnd(*lead, H), weight=rnd(V, H), ref_hidden=rnd(*lead, ref_h), ref_weight=rnd(V, ref_h),
             labels=labels, bias=rnd(V) if bias else None, ref_bias=rnd(V) if bias else None)
    for k in ("hidden", "weight", "bias"):
        if x[k] is not None:
            x[k].requires_grad_(True)
    return x, ids


def logits_of(x):
    z = x["hidden"] @ x["weight"].t()
    zr = x["ref_hidden"] @ x["ref_weight"].t()
    if x["bias"] is not None:
        z, zr = z + x["bias"], zr + x["ref_bias"]
    return z, zr


def grads_of(value, x):
    params = [x[k] for k in ("hidden", "weight", "bias") if x[k] is not None]
    return torch.autograd.grad(value, params)


def fused_loss(x, ids=None, **kw):
    return rk.fused_linear_preference_loss(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"],
                                           bias=x["bias"], ref_bias=x["ref_bias"], sequence_ids=ids, **kw)


def assert_same_loss(x, ids, tol=1e-10, **kw):
    chunking = {k: kw.pop(k) for k in ("schedule", "chunk_size", "memory_budget") if k in kw}
    z, zr = logits_of(x)
    want, want_m = rk.preference_loss(z, zr, x["labels"], sequence_ids=ids, **kw)
    got, got_m = fused_loss(x, ids, **chunking, **kw)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert set(got_m) == set(want_m)
    for k in want_m:
        torch.testing.assert_close(got_m[k], want_m[k], rtol=tol, atol=tol, msg=k)
    for a, b in zip(grads_of(got, x), grads_of(want, x)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("schedule", ["pairs", "tokens"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("risk", RISKS)
def test_preference_loss_matches_logits_path(risk, objective, schedule):
    x, ids = make_inputs(10 * RISKS.index(risk) + OBJECTIVES.index(objective))
    for chunk_size in (1, 5, 7, None):  # 5 and 7 divide neither N = 24 nor a pair's rows
        assert_same_loss(x, ids, objective=objective, risk=risk, backend="torch", schedule=schedule,
                         chunk_size=chunk_size, gamma=0.8, beta=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("schedule", ["pairs", "tokens", "auto"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layouts_shift_and_bias(schedule, packed, shift, bias):
    x, ids = make_inputs(3 + packed + 2 * shift, packed=packed, bias=bias, pairs=3)
    for chunk_size in (4, 11, None):
        assert_same_loss(x, ids, objective="rsa2", risk="cvar:0.7", alpha=0.7, gamma=0.9, shift=shift,
                         backend="torch", schedule=schedule, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("schedule", ["pairs", "tokens"])
def test_every_cpu_backend(backend, schedule):
    x, ids = make_inputs(11, packed=True)
    for risk in RISKS:
        assert_same_loss(x, ids, objective="rsa1", risk=risk, backend=backend, schedule=schedule, chunk_size=6)


def test_empty_pairs_and_empty_batch():
    x, ids = make_inputs(5)
    x["labels"][1] = -100                 # chosen sequence of pair 1 has no response token
    x["labels"][1 + B] = -100             # nor has its rejected partner
    for schedule in ("pairs", "tokens"):
        assert_same_loss(x, ids, objective="rsa2", risk="erm:1", backend="torch", schedule=schedule, chunk_size=3)
    x["labels"][:] = -100
    for schedule in ("pairs", "tokens"):
        loss, _ = fused_loss(x, objective="rsa2", backend="torch", schedule=schedule)
        assert loss.item() == pytest.approx(math.log(2))
        assert all(bool((g == 0).all()) for g in grads_of(loss, x))


def test_reference_with_its_own_hidden_size_gets_no_gradient():
    x, ids = make_inputs(7, ref_h=3)
    x["ref_hidden"].requires_grad_(True)
    x["ref_weight"].requires_grad_(True)
    for schedule in ("pairs", "tokens"):
        assert_same_loss(x, ids, objective="rsa1", risk="kl", backend="torch", schedule=schedule)
        loss, _ = fused_loss(x, objective="rsa1", risk="kl", backend="torch", schedule=schedule)
        loss.backward()
        assert x["ref_hidden"].grad is None and x["ref_weight"].grad is None
        assert x["hidden"].grad is not None


@pytest.mark.parametrize("risk", RISKS)
def test_token_stats_match_logits_path(risk):
    x, _ = make_inputs(13, packed=True)
    z, zr = logits_of(x)
    want = rk.token_stats(z, zr, x["labels"], risk=risk, backend="torch")
    up = [torch.randn(x["labels"].shape, dtype=torch.float64) for _ in range(3)]
    total = lambda s: sum((u * t).sum() for u, t in zip(up, (s.logp, s.kl, s.risk)))  # noqa: E731
    want_g = grads_of(total(want), x)
    for chunk_size in (1, 5, None):
        got = rk.fused_linear_token_stats(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"],
                                          bias=x["bias"], ref_bias=x["ref_bias"], risk=risk, backend="torch",
                                          chunk_size=chunk_size)
        for a, b in zip(got, want):
            assert a.shape == x["labels"].shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads_of(total(got), x), want_g):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_partial_requires_grad_no_grad_and_upstream_scale():
    x, ids = make_inputs(17)
    x["hidden"].requires_grad_(False)     # a frozen trunk: only the head is trained
    z, zr = logits_of(x)
    want, _ = rk.preference_loss(z, zr, x["labels"], backend="torch")
    want_g = torch.autograd.grad(3.0 * want, (x["weight"], x["bias"]))
    for schedule in ("pairs", "tokens"):
        got, _ = fused_loss(x, backend="torch", schedule=schedule)
        for a, b in zip(torch.autograd.grad(3.0 * got, (x["weight"], x["bias"])), want_g):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                value, _ = fused_loss(x, backend="torch", schedule=schedule)
            assert not value.requires_grad
            torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=1e-12)


def test_auto_schedule_follows_the_budget():
    x, _ = make_inputs(19, pairs=3)
    layout = make_layout(x["labels"], ignore_index=-100, shift=False)
    largest = int(((x["labels"] != -100).sum(1).view(2, -1).sum(0)).max())
    assert choose_schedule(layout, largest, "auto") == "pairs"
    assert choose_schedule(layout, largest - 1, "auto") == "tokens"
    assert choose_schedule(layout, 1, "pairs") == "pairs"
    per_row = 2 * V * 8  # two float64 logit rows
    for budget in (per_row * (largest - 1), per_row * largest, 10**9):
        assert_same_loss(x, None, objective="rsa2", risk="cvar:0.9", backend="torch", memory_budget=budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    x, ids = make_inputs(23, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    z, zr = logits_of(x)
    want, _ = rk.preference_loss(z, zr, x["labels"], backend="torch", risk="erm:0.5")
    want_g = grads_of(want, x)
    for schedule in ("pairs", "tokens"):
        got, _ = fused_loss(x, backend="torch", risk="erm:0.5", schedule=schedule, chunk_size=5)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for a, b in zip(grads_of(got, x), want_g):
            assert a.dtype == dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def _bad(x, name, **changes):
    y = dict(x, **changes)
    kw = {k: changes.pop(k) for k in ("chunk_size", "schedule") if k in changes}
    for k in kw:
        y.pop(k)
    with pytest.raises(ValueError, match=name):
        rk.fused_linear_preference_loss(y["hidden"], y["weight"], y["ref_hidden"], y["ref_weight"], y["labels"],
                                        bias=y["bias"], ref_bias=y["ref_bias"], backend="torch", **kw)
    if not kw:
        with pytest.raises(ValueError, match=name):
            rk.fused_linear_token_stats(y["hidden"], y["weight"], y["ref_hidden"], y["ref_weight"], y["labels"],
                                        bias=y["bias"], ref_bias=y["ref_bias"], backend="torch")


def test_bad_inputs_name_the_argument():
    x, _ = make_inputs(29)
    d = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    _bad(x, "weight", weight=d(V, H + 1))
    _bad(x, "weight", weight=d(V * H))
    _bad(x, "ref_weight", ref_weight=d(V + 1, H))
    _bad(x, "ref_weight", ref_weight=d(V, H + 2))
    _bad(x, "ref_hidden", ref_hidden=d(2 * B, T + 1, H))
    _bad(x, "bias", bias=d(V + 1))
    _bad(x, "ref_bias", ref_bias=d(V, 1))
    _bad(x, "weight", weight=torch.zeros(V, H))                      # float32 weight, float64 hidden
    _bad(x, "hidden", hidden=torch.zeros(2 * B, T, H, dtype=torch.long))
    _bad(x, "labels", labels=x["labels"][:, :-1])
    _bad(x, "labels", labels=torch.full((2 * B, T), V))
    _bad(x, "chunk_size", chunk_size=0)
    _bad(x, "schedule", schedule="rows")
    odd = {k: (v[:3] if k in ("hidden", "ref_hidden", "labels") else v) for k, v in x.items()}
    with pytest.raises(ValueError, match="labels"):
        fused_loss(odd, backend="torch")


def test_dpo_equals_liger_fused_linear_dpo():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    x, _ = make_inputs(31, dtype=torch.float32, pairs=3, length=8)
    x["labels"][:, :3] = -100             # a prompt
    beta = 0.2
    for chunk in (1, 2):                  # Liger's chunk_size counts pairs
        ref = liger.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=chunk)
        out = ref(x["weight"], x["hidden"], x["labels"], x["bias"], x["ref_hidden"], x["ref_weight"], x["ref_bias"])
        want, aux = out if isinstance(out, tuple) else (out, None)
        want_g = grads_of(want, x)
        for schedule in ("pairs", "tokens"):
            got, m = fused_loss(x, objective="dpo", risk="kl", beta=beta, backend="torch", schedule=schedule)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-6)
            if aux is not None:  # Liger's per-sequence summed logps of chosen and rejected
                torch.testing.assert_close(m["logps/chosen"], aux[0].mean(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(m["logps/rejected"], aux[1].mean(), rtol=1e-5, atol=1e-5)
            for a, b in zip(grads_of(got, x), want_g):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
