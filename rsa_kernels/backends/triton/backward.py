"""The backward: one read of z and zr and one write of the gradient per row.

grad_j = g_logp ([j = y] - p_j) + g_kl (p_j - q_j) + g_risk (p_j sum(w) - w_j), with the
risk's adversarial distribution w rebuilt from the saved per-row scalars (risk.py). The
gradient may be written over z itself (inplace): each block is read before it is written.
"""
import triton
import triton.language as tl

from ._common import _block, _deviation


@triton.jit
def backward_kernel(z_ptr, zr_ptr, y_ptr, saved_ptr, grads_ptr, out_ptr,
                    stride_z, stride_zr, stride_out, V, ignore_index, mu,
                    RISK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    zrow = z_ptr + row * stride_z
    rrow = zr_ptr + row * stride_zr
    orow = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK)
    if y != ignore_index:
        a = tl.load(saved_ptr + row * 5 + 0)
        ar = tl.load(saved_ptr + row * 5 + 1)
        s2 = tl.load(saved_ptr + row * 5 + 2)
        s3 = tl.load(saved_ptr + row * 5 + 3)
        s4 = tl.load(saved_ptr + row * 5 + 4)
        g_logp = tl.load(grads_ptr + row * 3 + 0)
        g_kl = tl.load(grads_ptr + row * 3 + 1)
        g_risk = tl.load(grads_ptr + row * 3 + 2)
        for start in range(0, V, BLOCK):
            cols = start + offs
            z, zr, inside = _block(zrow, rrow, cols, V)
            q, d = _deviation(z, zr, a, ar)
            p = tl.exp(z - a)
            total = 1.0
            if RISK == 0:
                w = q
            elif RISK == 1:
                # the forward summed exp((1+MU) zr - MU z) over zr > -inf (stats.py)
                r = zr - ar
                w = tl.where(zr > float("-inf"), tl.exp(r + mu * ((zr - z) + (a - ar)) - s2), 0.0)
            elif RISK == 2:
                w = tl.where(d > s2, q * s3, tl.where(d == s2, q * s4, 0.0))
            else:
                w = tl.where(d > s2, q, 0.0)
                total = s3
            grad = (g_kl - g_logp) * p - g_kl * q + g_risk * (p * total - w)
            grad += tl.where(cols == y, g_logp, 0.0)
            tl.store(orow + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)
    else:
        for start in range(0, V, BLOCK):
            cols = start + offs
            tl.store(orow + cols, tl.full([BLOCK], 0.0, tl.float32).to(out_ptr.dtype.element_ty), mask=cols < V)
