"""The fused lm-head kernel (schedule="kernel") against the token-chunk path on materialised logits.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (the fixture sets
TRITON_INTERPRET=1 for these tests only; fused_kernel loads its kernels per mode at call
time, as the triton row backend does), at tiny sizes: sizes that are multiples of no block
(the interpreter's blocks are 16 rows x 32 items x 16 hidden units) and several forward
splits of the vocabulary. With CUDA the same tests run compiled on cuda tensors. A last
test compiles the kernels for sm_90 without a GPU, which catches what the interpreter
lets through.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import rsa_kernels as rk  # noqa: E402
from rsa_kernels.fused_linear import fused_kernel  # noqa: E402
from rsa_kernels.fused_linear.fused_kernel import fused_kernel_token_stats  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# the interpreter evaluates masked-off lanes too (e.g. -inf - -inf in padding columns);
# numpy warns about those values, which tl.where then discards
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(n=7, h=24, v=130, *, ref_h=20, bias=True, dtype=torch.float32, seed=0, masked=(2, 5), lead=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    labels = torch.randint(0, v, (n,), generator=g)
    for i in masked:
        if i < n:
            labels[i] = -100
    x = dict(hidden=rnd(n, h), weight=rnd(v, h) / 2, ref_hidden=rnd(n, ref_h), ref_weight=rnd(v, ref_h) / 2,
             bias=rnd(v) if bias else None, ref_bias=rnd(v) if bias else None, labels=labels)
    x = {k: t if t is None else t.to(DEVICE) for k, t in x.items()}
    for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"):
        if x[k] is not None:
            x[k] = x[k].to(dtype)
    if lead is not None:
        x["hidden"] = x["hidden"].view(*lead, h)
        x["ref_hidden"] = x["ref_hidden"].view(*lead, ref_h)
        x["labels"] = x["labels"].view(lead)
    upstream = torch.randn(n, 3, generator=g, dtype=torch.float64).to(DEVICE)
    return x, upstream


def run(x, upstream, path, dtype=None, grads=("hidden", "weight", "bias")):
    """Stats (N, 4) and the gradients of sum(upstream * (logp, kl, risk)), float64 for comparing."""
    t = {k: v if v is None or k == "labels" else v.detach().to(dtype or v.dtype) for k, v in x.items()}
    leaves = [k for k in grads if t[k] is not None]
    for k in leaves:
        t[k].requires_grad_(True)
    args = (t["hidden"], t["weight"], t["ref_hidden"], t["ref_weight"], t["labels"])
    kw = dict(bias=t["bias"], ref_bias=t["ref_bias"], risk=path[1])
    if path[0] == "kernel":
        out = fused_kernel_token_stats(*args, **kw)
    else:  # the token-chunk path; chunk 4 rows so that several chunks are needed
        out = rk.fused_linear_token_stats(*args, **kw, backend="torch", chunk_size=4)
    stats = torch.stack([s.reshape(-1).double() for s in out], 1)
    loss = (stats[:, [0, 2, 3]] * upstream).sum()
    return stats.detach(), [g.double() for g in torch.autograd.grad(loss, [t[k] for k in leaves])]


def assert_close(a, b, tol, atol=None):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol if atol is None else atol, equal_nan=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("risk", ["kl", "erm:0.7"])
def test_float32_matches_token_chunks_and_float64(risk, bias):
    x, up = make_inputs(bias=bias, seed=bias + 2 * (risk == "kl"))
    stats, grads = run(x, up, ("kernel", risk))
    want, want_grads = run(x, up, ("tokens", risk))
    exact, exact_grads = run(x, up, ("tokens", risk), dtype=torch.float64)
    assert_close(stats, want, 2e-5, atol=1e-4)
    assert_close(stats, exact, 2e-5, atol=1e-4)
    for g, w, e in zip(grads, want_grads, exact_grads):
        assert_close(g, w, 2e-5, atol=5e-5)
        assert_close(g, e, 2e-5, atol=5e-5)
    masked = x["labels"] == -100
    assert torch.all(stats[masked] == 0) and torch.all(grads[0][masked] == 0)


def test_several_row_blocks_small_vocabulary_and_leading_shape():
    # 33 rows: three row blocks (the last of one row); V = 50: two tiles, so two splits
    x, up = make_inputs(n=33, h=17, v=50, ref_h=17, masked=(0, 16, 32), lead=(3, 11), seed=4)
    stats, grads = run(x, up, ("kernel", "erm:2"))
    exact, exact_grads = run(x, up, ("tokens", "erm:2"), dtype=torch.float64)
    assert_close(stats, exact, 2e-5, atol=1e-4)
    for g, e in zip(grads, exact_grads):
        assert_close(g.reshape(e.shape), e, 2e-5, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_float32_accumulation(dtype):
    """The oracle is the float64 path on the same (rounded) inputs: the kernel's logits are
    float32 products of them, its gradient tile is rounded to the input dtype before the
    products (as the chunked path's), so gradients agree to the dtype's precision."""
    x, up = make_inputs(dtype=dtype, seed=7)
    stats, grads = run(x, up, ("kernel", "kl"))
    exact, exact_grads = run(x, up, ("tokens", "kl"), dtype=torch.float64)
    assert_close(stats, exact, 1e-4, atol=1e-3)
    for g, e in zip(grads, exact_grads):
        assert_close(g, e, 2e-2, atol=2e-2 * e.abs().max().item())


def test_gradients_only_where_asked():
    """A frozen trunk: hidden without grad, only the weight (no bias): the kernel skips the rest."""
    x, up = make_inputs(bias=False, seed=9)
    _, (gw,) = run(x, up, ("kernel", "kl"), grads=("weight",))
    _, (want,) = run(x, up, ("tokens", "kl"), dtype=torch.float64, grads=("weight",))
    assert_close(gw, want, 2e-5, atol=5e-5)
    out = fused_kernel_token_stats(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"])
    assert not out.kl.requires_grad


def test_minus_inf_logits_and_fully_masked():
    x, up = make_inputs(seed=11)
    # reference bias -inf: items with q = 0, in different tiles and splits; the policy's -inf
    # items lie inside them, so every statistic stays finite and has a gradient
    x["ref_bias"][[0, 40, 70, 129]] = float("-inf")
    x["bias"][[40, 129]] = float("-inf")
    labels = x["labels"].clone()
    labels[torch.isin(labels, torch.tensor([0, 40, 70, 129], device=DEVICE))] = 41  # finite logp, ref_logp
    x["labels"] = labels
    stats, grads = run(x, up, ("kernel", "erm:0.5"), grads=("hidden", "weight"))
    exact, exact_grads = run(x, up, ("tokens", "erm:0.5"), dtype=torch.float64, grads=("hidden", "weight"))
    assert torch.isfinite(stats).all()
    assert_close(stats, exact, 2e-5, atol=1e-4)
    for g, e in zip(grads, exact_grads):
        assert_close(g, e, 2e-5, atol=5e-5)
    # an item with p = 0 < q: kl and erm are +inf (the true value)
    x["bias"][[7]] = float("-inf")
    with torch.no_grad():
        out = fused_kernel_token_stats(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"],
                                       bias=x["bias"], ref_bias=x["ref_bias"], risk="erm:0.5")
    active = x["labels"] != -100
    assert torch.isinf(out.kl[active]).all() and torch.isinf(out.risk[active]).all()
    # no labelled row: zeros, zero gradients, no launch
    x["labels"] = torch.full_like(x["labels"], -100)
    stats, grads = run(x, up, ("kernel", "kl"))
    assert torch.all(stats == 0) and all(torch.all(g == 0) for g in grads)


def test_public_schedule_keyword():
    x, _ = make_inputs(n=8, masked=(1,), seed=13)
    args = (x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"])
    kw = dict(bias=x["bias"], ref_bias=x["ref_bias"])
    via_schedule = rk.fused_linear_token_stats(*args, **kw, risk="kl", schedule="kernel")
    direct = fused_kernel_token_stats(*args, **kw, risk="kl")
    for a, b in zip(via_schedule, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the pair loss over the kernel's statistics equals the token schedule's, gradients too
    leaves = [x["hidden"].requires_grad_(), x["weight"].requires_grad_()]
    lab = x["labels"].view(4, 2)
    loss_args = dict(objective="rsa2", risk="erm:1", beta=0.5, shift=True)
    shaped = (x["hidden"].view(4, 2, -1), x["weight"], x["ref_hidden"].view(4, 2, -1), x["ref_weight"], lab)
    got, got_m = rk.fused_linear_preference_loss(*shaped, **kw, **loss_args, schedule="kernel")
    want, want_m = rk.fused_linear_preference_loss(*shaped, **kw, **loss_args, schedule="tokens", backend="torch")
    assert_close(got, want, 2e-5)
    for k in want_m:
        assert_close(got_m[k], want_m[k], 2e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(a, b, 2e-5, atol=5e-5)


def test_bad_inputs(monkeypatch):
    x, _ = make_inputs(n=4, masked=(), seed=15)
    args = (x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["labels"])
    for risk in ("cvar:0.9", "ra_dpo_cvar:0.5"):
        with pytest.raises(ValueError, match="^risk: .*'kl' and 'erm:MU' only"):
            fused_kernel_token_stats(*args, risk=risk)
    with pytest.raises(ValueError, match="^risk"):  # the pair loss's default risk is cvar:0.9
        rk.fused_linear_preference_loss(*(a.view(2, 2, *a.shape[1:]) if i in (0, 2) else
                                          a.view(2, 2) if i == 4 else a for i, a in enumerate(args)),
                                        schedule="kernel")
    with pytest.raises(ValueError, match="^risk: unknown"):
        fused_kernel_token_stats(*args, risk="entropic")
    with pytest.raises(ValueError, match="^backend"):
        fused_kernel_token_stats(*args, backend="torch")
    with pytest.raises(ValueError, match="^hidden: .*float64"):
        fused_kernel_token_stats(*(a.double() if a.is_floating_point() else a for a in args))
    with pytest.raises(ValueError, match="^weight has shape"):
        fused_kernel_token_stats(x["hidden"], x["weight"][:, :5], *args[2:])
    with pytest.raises(ValueError, match="^ref_hidden has shape"):
        fused_kernel_token_stats(x["hidden"], x["weight"], x["ref_hidden"][:3], *args[3:])
    with pytest.raises(ValueError, match="^labels"):
        fused_kernel_token_stats(*args[:4], x["labels"][:3])
    with pytest.raises(ValueError, match="^chunk_size"):
        fused_kernel_token_stats(*args, chunk_size=0)
    with pytest.raises(ValueError, match="^schedule"):
        rk.fused_linear_token_stats(*args, schedule="pairs")
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            fused_kernel_token_stats(*args)


@pytest.mark.skipif(CUDA, reason="with a GPU the tests above run the compiled kernels")
def test_kernels_compile_for_hopper(monkeypatch):
    """Compile (not run) the kernels for sm_90: the interpreter is laxer than the compiler
    (types carried through loops, tl.dot's shapes and operand layouts, atomics)."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget
    import triton

    monkeypatch.delenv("TRITON_INTERPRET")
    k = fused_kernel._kernels()
    strides = {s: "i32" for s in ("stride_h", "stride_hk", "stride_w", "stride_wk",
                                  "stride_rh", "stride_rhk", "stride_rw", "stride_rwk")}
    sizes = {"M": "i32", "V": "i32", "H": "i32", "HR": "i32"}

    def inputs(ty):
        return {**{p: f"*{ty}" for p in ("h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr")},
                "rows_ptr": "*i64", "y_ptr": "*i64"}

    def flags(*names):
        return {c: "constexpr" for c in names}

    fwd_flags = ("RISK", "HAS_BIAS", "HAS_REF_BIAS", "PRECISION", "BLOCK_N", "BLOCK_V", "BLOCK_H")
    bwd_flags = ("RISK", "HAS_BIAS", "HAS_REF_BIAS", "NEED_H", "NEED_W", "NEED_B", "PRECISION", "GROUP",
                 "BLOCK_N", "BLOCK_V", "BLOCK_H")
    variants = []
    for ty, dtype, risk, bias in (("bf16", torch.bfloat16, 0, True), ("fp32", torch.float32, 1, False)):
        bn, bv, bh = fused_kernel.BLOCKS[dtype]
        blocks = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "PRECISION": fused_kernel.FLOAT32_PRECISION}
        variants.append((k.forward, {**inputs(ty), "part_ptr": "*fp32", **sizes, "TILES": "i32", **strides,
                                     "mu": "fp32", **flags(*fwd_flags)},
                         {"RISK": risk, "HAS_BIAS": bias, "HAS_REF_BIAS": bias, **blocks}))
        variants.append((k.backward, {**inputs(ty), **{p: "*fp32" for p in ("saved_ptr", "grads_ptr", "gh_ptr",
                                                                             "gw_ptr", "gb_ptr")},
                                      **sizes, **strides, "stride_gh": "i32", "stride_gw": "i32", "mu": "fp32",
                                      **flags(*bwd_flags)},
                         {"RISK": risk, "HAS_BIAS": bias, "HAS_REF_BIAS": bias, "NEED_H": True, "NEED_W": True,
                          "NEED_B": bias, "GROUP": fused_kernel.GROUP, **blocks}))
    for fn, signature, constants in variants:
        src = compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": fused_kernel.NUM_WARPS})
        assert "ptx" in out.asm


@pytest.mark.parametrize("risk", ["kl", "erm:0.7"])
def test_kernel_forward_with_token_backward_matches_token_chunks(risk):
    """hybrid.py (a measurement variant): the kernel's statistics and saved scalars drive the
    token schedule's backward; values and gradients are the token path's."""
    from rsa_kernels.backends import get_backend
    from rsa_kernels.fused_linear.hybrid import hybrid_rows_token_stats
    from rsa_kernels.risk import parse_risk

    x, up = make_inputs(n=9, masked=(1, 4), seed=11)
    want, want_grads = run(x, up, ("tokens", risk))
    t = {k: v if v is None or k == "labels" else v.detach().clone() for k, v in x.items()}
    leaves = [t[k].requires_grad_(True) for k in ("hidden", "weight", "bias")]
    out = hybrid_rows_token_stats(t["hidden"], t["weight"], t["bias"], t["ref_hidden"], t["ref_weight"],
                                  t["ref_bias"], t["labels"], risk=parse_risk(risk), ignore_index=-100,
                                  backend=get_backend("torch", t["hidden"]), rows=4)
    stats = torch.stack([s.double() for s in out], 1)
    grads = torch.autograd.grad((stats[:, [0, 2, 3]] * up).sum(), leaves)
    assert_close(stats, want, 2e-5, atol=1e-4)
    for g, w in zip(grads, want_grads):
        assert_close(g.double(), w, 2e-5, atol=5e-5)
    with pytest.raises(ValueError, match="risk"):
        hybrid_rows_token_stats(t["hidden"], t["weight"], t["bias"], t["ref_hidden"], t["ref_weight"],
                                t["ref_bias"], t["labels"], risk=parse_risk("cvar:0.9"), ignore_index=-100,
                                backend=get_backend("torch", t["hidden"]), rows=4)
