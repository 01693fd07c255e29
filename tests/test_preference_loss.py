"""preference_loss: sequences, objectives, layouts and input validation (SPEC sections 2-5)."""
import math

import pytest
import torch
import torch.nn.functional as F

import rsa_kernels as rk
from naive import naive_pair_loss, naive_sequence, naive_token_stats

RISKS = ["kl", "erm:1", "cvar:0.8", "ra_dpo_cvar:0.9"]


def batch(b=3, t=6, v=23, seed=0, masked=0.25, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * b, t, v, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    zr = torch.randn(2 * b, t, v, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, v, (2 * b, t), generator=g)
    y[torch.rand(2 * b, t, generator=g) < masked] = -100
    return z, zr, y


@pytest.mark.parametrize("objective", ["dpo", "rsa1", "rsa2"])
@pytest.mark.parametrize("risk", RISKS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_loss_and_grad_match_naive(objective, risk, gamma):
    z, zr, y = batch(seed=hash((objective, risk, gamma)) % 1000)
    kw = dict(objective=objective, risk=risk, beta=0.3, alpha=0.7, gamma=gamma, label_smoothing=0.1)
    loss, metrics = rk.preference_loss(z, zr, y, backend="torch", **kw)
    want = naive_pair_loss(z, zr, y, objective, risk, beta=0.3, alpha=0.7, gamma=gamma, eps=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(want, z)[0], rtol=1e-9, atol=1e-12)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                            "kl/chosen", "kl/rejected", "risk/chosen", "risk/rejected",
                            "logps/chosen", "logps/rejected"}
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())


def test_dpo_is_plain_dpo():
    z, zr, y = batch(seed=1)
    loss, m = rk.preference_loss(z, zr, y, objective="dpo", risk="kl", beta=0.2, backend="torch")
    mask = y != -100
    yy = torch.where(mask, y, 0)
    lp = (torch.log_softmax(z, -1).gather(-1, yy[..., None])[..., 0] * mask).sum(-1)
    rp = (torch.log_softmax(zr, -1).gather(-1, yy[..., None])[..., 0] * mask).sum(-1)
    want = -F.logsigmoid(0.2 * ((lp[:3] - rp[:3]) - (lp[3:] - rp[3:]))).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(m["logps/chosen"], lp[:3].mean().detach())


def test_rsa_with_kl_is_tdpo():
    """TDPO1: u = beta (Dw - Dl) - beta (SeqKL_l - SeqKL_w); TDPO2 with sg on SeqKL_w, weight alpha."""
    z, zr, y = batch(seed=2)
    mask = y != -100
    q = torch.softmax(zr, -1)
    seq_kl = ((q * (torch.log_softmax(zr, -1) - torch.log_softmax(z, -1))).sum(-1) * mask).sum(-1)
    yy = torch.where(mask, y, 0)
    ratio = ((torch.log_softmax(z, -1) - torch.log_softmax(zr, -1)).gather(-1, yy[..., None])[..., 0] * mask).sum(-1)
    beta, alpha = 0.5, 0.3
    tdpo1 = -F.logsigmoid(beta * (ratio[:3] - ratio[3:]) - beta * (seq_kl[3:] - seq_kl[:3])).mean()
    tdpo2 = -F.logsigmoid(beta * (ratio[:3] - ratio[3:]) - alpha * beta * (seq_kl[3:] - seq_kl[:3].detach())).mean()
    for objective, want in (("rsa1", tdpo1), ("rsa2", tdpo2)):
        loss, m = rk.preference_loss(z, zr, y, objective=objective, risk="kl", beta=beta, alpha=alpha, backend="torch")
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(want, z, retain_graph=True)[0])
        torch.testing.assert_close(m["kl/rejected"], seq_kl[3:].mean().detach())


def test_metrics_follow_tdpo_convention():
    z, zr, y = batch(seed=3)
    loss, m = rk.preference_loss(z, zr, y, objective="rsa2", risk="cvar:0.5", beta=0.1, backend="torch")
    logp, ref_logp, kl, risk = naive_token_stats(z, zr, y, "cvar:0.5")
    mask = y != -100
    delta = ((logp - ref_logp) * mask).sum(-1)
    seq_risk = naive_sequence(risk, mask, 1.0)
    rc, rr = 0.1 * (delta[:3] + seq_risk[:3]), 0.1 * (delta[3:] + seq_risk[3:])
    torch.testing.assert_close(m["rewards/chosen"], rc.mean().detach())
    torch.testing.assert_close(m["rewards/margin"], (rc - rr).mean().detach())
    torch.testing.assert_close(m["rewards/accuracy"], (rc > rr).double().mean())
    torch.testing.assert_close(m["risk/rejected"], seq_risk[3:].mean().detach())


def test_discounted_recursion():
    z, zr, y = batch(seed=4, masked=0.4)
    st = rk.token_stats(z, zr, y, risk="erm:1", backend="torch")
    from rsa_kernels.sequence import discount_weights, sequence_sums
    mask = y != -100
    got = sequence_sums(st.risk, discount_weights(mask, 0.7, dtype=torch.float64))
    torch.testing.assert_close(got, naive_sequence(st.risk, mask, 0.7))


def packed(z, zr, y, drop_padding=True):
    """The padded batch as packed tokens: each sequence's positions in order, sequences interleaved."""
    s, t, v = z.shape
    ids = torch.arange(s).repeat_interleave(t)
    zf, zrf, yf = z.reshape(-1, v), zr.reshape(-1, v), y.reshape(-1)
    keep = torch.ones_like(yf, dtype=torch.bool)
    if drop_padding:  # drop trailing padding of each sequence as a packer would
        keep = ~((torch.arange(t) >= t - 1).repeat(s) & (yf == -100))
    pos = torch.arange(t).repeat(s)[keep]
    perm = torch.argsort(pos, stable=True)  # interleave the sequences, each in its own order
    return zf[keep][perm], zrf[keep][perm], yf[keep][perm], ids[keep][perm]


@pytest.mark.parametrize("risk", RISKS)
@pytest.mark.parametrize("shift", [False, True])
def test_packed_equals_padded(risk, shift):
    z, zr, y = batch(seed=5)
    kw = dict(objective="rsa1", risk=risk, beta=0.4, gamma=0.8, shift=shift, backend="torch")
    loss, m = rk.preference_loss(z, zr, y, **kw)
    grad = torch.autograd.grad(loss, z)[0]
    zp, zrp, yp, ids = packed(z, zr, y, drop_padding=not shift)
    loss_p, m_p = rk.preference_loss(zp, zrp, yp, sequence_ids=ids, **kw)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    for k in m:
        torch.testing.assert_close(m_p[k], m[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss_p, z)[0], grad, rtol=1e-12, atol=1e-12)


def test_shift_equals_shifting_by_hand():
    z, zr, y = batch(seed=6)
    loss, _ = rk.preference_loss(z, zr, y, shift=True, backend="torch")
    by_hand, _ = rk.preference_loss(z[:, :-1], zr[:, :-1], y[:, 1:], backend="torch")
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(by_hand, z)[0])


def test_all_masked_batch_is_finite():
    z, zr, y = batch(seed=7)
    y[:] = -100
    for objective in ("dpo", "rsa1", "rsa2"):
        loss, m = rk.preference_loss(z, zr, y, objective=objective, backend="torch")
        torch.testing.assert_close(loss, torch.tensor(math.log(2), dtype=loss.dtype))
        assert all(torch.isfinite(v) for v in m.values())
        assert (torch.autograd.grad(loss, z)[0] == 0).all()


def test_label_smoothing_formula():
    z, zr, y = batch(seed=8)
    l0, _ = rk.preference_loss(z, zr, y, objective="dpo", beta=0.3, backend="torch")
    l1, _ = rk.preference_loss(z, zr, y, objective="dpo", beta=0.3, label_smoothing=0.5, backend="torch")
    assert l1 > 0 and torch.isfinite(l1) and not torch.isclose(l0, l1)
    flipped = torch.cat([y[3:], y[:3]])
    lf, _ = rk.preference_loss(torch.cat([z[3:], z[:3]]), torch.cat([zr[3:], zr[:3]]), flipped,
                               objective="dpo", beta=0.3, label_smoothing=0.5, backend="torch")
    torch.testing.assert_close(l1, lf)  # eps = 0.5 is symmetric in chosen and rejected


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_loss(dtype, tol):
    z, zr, y = batch(seed=9, v=300, dtype=torch.float32)
    ref, _ = rk.preference_loss(z, zr, y, backend="torch")
    lo, _ = rk.preference_loss(z.detach().to(dtype).requires_grad_(), zr.to(dtype), y, backend="torch")
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo, ref, rtol=tol, atol=tol)


BAD = [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"),
    (dict(risk="erm:0"), "MU"), (dict(risk="erm:-1"), "MU"), (dict(risk="cvar:1"), "ALPHA"),
    (dict(risk="cvar:-0.1"), "ALPHA"), (dict(risk="ra_dpo_cvar:0"), "C"), (dict(risk="ra_dpo_cvar:1"), "C"),
    (dict(risk="var:0.5"), "risk"), (dict(risk="cvar"), "risk"), (dict(objective="ipo"), "objective"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(alpha=-1.0), "alpha"),
]


@pytest.mark.parametrize("kwargs,word", BAD)
def test_bad_arguments_raise(kwargs, word):
    z, zr, y = batch(seed=10)
    with pytest.raises(ValueError, match=word):
        rk.preference_loss(z, zr, y, backend="torch", **kwargs)


def test_bad_tensors_raise():
    z, zr, y = batch(seed=11)
    with pytest.raises(ValueError, match="ref_logits"):
        rk.preference_loss(z, zr[..., :-1], y)
    with pytest.raises(ValueError, match="labels"):
        rk.preference_loss(z, zr, y[:, :-1])
    bad = y.clone(); bad[0, 0] = 23
    with pytest.raises(ValueError, match="labels"):
        rk.preference_loss(z, zr, bad)
    bad[0, 0] = -5
    with pytest.raises(ValueError, match="labels"):
        rk.token_stats(z, zr, bad)
    with pytest.raises(ValueError, match="even"):
        rk.preference_loss(z[:5], zr[:5], y[:5])
    with pytest.raises(ValueError, match="labels"):
        rk.preference_loss(z, zr, y.float())
    with pytest.raises(ValueError, match="logits"):
        rk.token_stats(y, y, y[..., 0])
    with pytest.raises(ValueError, match="sequence_ids"):
        rk.preference_loss(z[0], zr[0], y[0], sequence_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        rk.token_stats(z, zr, y, backend="cuda-magic")


def test_available_backends_lists_torch():
    names = rk.available_backends()
    assert "torch" in names and set(names) <= {"torch", "cpu", "triton"}
