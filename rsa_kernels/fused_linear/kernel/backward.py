"""The backward: recompute each logits tile, turn it into its gradient G, multiply G out.

Program p takes one (BLOCK_N rows x BLOCK_V items) tile, in groups of GROUP row blocks so
that programs running together share weight tiles and hidden rows in L2. It recomputes
z and zr (as forward.py), forms the gradient of the logits exactly as the row kernel's
backward (backends/triton/backward.py) with the risk's w rebuilt from the saved scalars:

    G = g_logp ([j = y] - p) + g_kl (p - q) + g_risk (p - w),  w = q (kl) or the erm softmax

and adds its products into float32 buffers with atomics: grad_hidden[rows] += G W[cols],
grad_weight[cols] += G^T h[rows], grad_bias[cols] += sum over rows of G. G is rounded to
the inputs' dtype before the products, as the chunked path's gradient chunk is.
"""
import triton
import triton.language as tl

from ._common import _dot, _sum, _tile


@triton.jit
def backward_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, rows_ptr, y_ptr, saved_ptr, grads_ptr,
                    gh_ptr, gw_ptr, gb_ptr,
                    M, V, H, HR,
                    stride_h, stride_hk, stride_w, stride_wk, stride_rh, stride_rhk, stride_rw, stride_rwk,
                    stride_gh, stride_gw, mu,
                    RISK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                    PRECISION: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # grouped order: GROUP row blocks x every vocabulary tile, row blocks fastest (no tl.cdiv:
    # a jit function of the standard library, which the interpreter cannot call, see _common)
    pid = tl.program_id(0)
    n_blocks = (M + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP * ((V + BLOCK_V - 1) // BLOCK_V)
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_blocks - first, GROUP)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size

    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs < M
    rows = tl.load(rows_ptr + offs, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < V

    z = _tile(h_ptr, stride_h, stride_hk, rows, row_ok, w_ptr, stride_w, stride_wk, b_ptr, cols, col_ok, H,
              HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    zr = _tile(rh_ptr, stride_rh, stride_rhk, rows, row_ok, rw_ptr, stride_rw, stride_rwk, rb_ptr, cols, col_ok,
               HR, HAS_REF_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)

    # saved scalars and upstream gradients, compacted to the unmasked rows by the host
    a = tl.load(saved_ptr + offs * 5 + 0, mask=row_ok, other=0.0)[:, None]
    ar = tl.load(saved_ptr + offs * 5 + 1, mask=row_ok, other=0.0)[:, None]
    norm = tl.load(saved_ptr + offs * 5 + 2, mask=row_ok, other=0.0)[:, None]
    g_logp = tl.load(grads_ptr + offs * 3 + 0, mask=row_ok, other=0.0)[:, None]
    g_kl = tl.load(grads_ptr + offs * 3 + 1, mask=row_ok, other=0.0)[:, None]
    g_risk = tl.load(grads_ptr + offs * 3 + 2, mask=row_ok, other=0.0)[:, None]

    p = tl.exp(z - a)
    r = zr - ar
    q = tl.exp(r)
    if RISK == 0:
        w = q
    else:
        # the forward summed exp((1+MU) zr - MU z) over zr > -inf: the same support here
        w = tl.where(zr > float("-inf"), tl.exp(r + mu * ((zr - z) + (a - ar)) - norm), 0.0)
    g = (g_kl - g_logp) * p - g_kl * q + g_risk * (p - w)
    g += tl.where(cols[None, :] == y[:, None], g_logp, 0.0)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)

    if NEED_B:
        tl.atomic_add(gb_ptr + cols, _sum(g, 0), mask=col_ok, sem="relaxed")
    if NEED_H or NEED_W:
        gc = g.to(h_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_H)
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + offs_k
            k_ok = kk < H
            if NEED_H:
                wt = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :] * stride_wk,
                             mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                dh = _dot(gc, wt, tl.full([BLOCK_N, BLOCK_H], 0.0, tl.float32), PRECISION)
                tl.atomic_add(gh_ptr + rows[:, None] * stride_gh + kk[None, :], dh,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_W:
                ht = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :] * stride_hk,
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                dw = _dot(tl.trans(gc), ht, tl.full([BLOCK_V, BLOCK_H], 0.0, tl.float32), PRECISION)
                tl.atomic_add(gw_ptr + cols[:, None] * stride_gw + kk[None, :], dw,
                              mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")
