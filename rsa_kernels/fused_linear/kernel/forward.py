"""The forward: logits tiles of both models, folded into per-row online statistics.

Program (n, s) takes BLOCK_N unmasked rows (their indices in rows_ptr) and the vocabulary
tiles [s * TILES, (s + 1) * TILES) of BLOCK_V items. Per tile it forms z = h W^T + b and
zr = hr Wr^T + br with tl.dot over the hidden units (float32 accumulator), and folds them
into per-row running values exactly as pass 1 of the row kernel does
(backends/triton/stats.py), per row instead of per lane:

    0 m_z, 1 s_z   online logsumexp of z                  (-> A)
    2 m_r, 3 s_r   online logsumexp of zr                 (-> Ar)
    4 t_r          sum e^(zr - m_r) (zr - z) over finite items (-> kl, using sum q = 1)
    5 m_e, 6 s_e   online logsumexp of (1+MU) zr - MU z over finite items (erm)
    7 inf_zr       max zr over items with z = -inf < zr (an item with p = 0 < q: kl = +inf)
    8 z_y, 9 zr_y  the logits at the label (0 in splits that do not hold it)

and writes these 10 per (split, row) to part_ptr; the host merges the splits (a few
elementwise ops over rows x splits, fused_kernel._merge). Logits never reach memory.
"""
import triton
import triton.language as tl

from ._common import _max, _sum, _tile, helper

NEG_INF = tl.constexpr(float("-inf"))


@helper
def _rescale(m, x):
    """New running max of rows m and tile x, its finite stand-in, and exp(m - m_safe)."""
    m_new = tl.maximum(m, _max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_safe, tl.exp(m - m_safe)


@triton.jit
def forward_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, rows_ptr, y_ptr, part_ptr,
                   M, V, H, HR, TILES,
                   stride_h, stride_hk, stride_w, stride_wk, stride_rh, stride_rhk, stride_rw, stride_rwk,
                   mu,
                   RISK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs < M
    rows = tl.load(rows_ptr + offs, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)

    m_z = tl.full([BLOCK_N], NEG_INF, tl.float32)
    s_z = tl.full([BLOCK_N], 0.0, tl.float32)
    m_r = tl.full([BLOCK_N], NEG_INF, tl.float32)
    s_r = tl.full([BLOCK_N], 0.0, tl.float32)
    t_r = tl.full([BLOCK_N], 0.0, tl.float32)
    m_e = tl.full([BLOCK_N], NEG_INF, tl.float32)
    s_e = tl.full([BLOCK_N], 0.0, tl.float32)
    inf_zr = tl.full([BLOCK_N], NEG_INF, tl.float32)
    z_y = tl.full([BLOCK_N], 0.0, tl.float32)
    zr_y = tl.full([BLOCK_N], 0.0, tl.float32)

    t_end = tl.minimum((split + 1) * TILES, ((V + BLOCK_V - 1) // BLOCK_V))
    for t in range(split * TILES, t_end):
        cols = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        z = _tile(h_ptr, stride_h, stride_hk, rows, row_ok, w_ptr, stride_w, stride_wk, b_ptr, cols, col_ok, H,
                  HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        zr = _tile(rh_ptr, stride_rh, stride_rhk, rows, row_ok, rw_ptr, stride_rw, stride_rwk, rb_ptr, cols, col_ok,
                   HR, HAS_REF_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        # policy logsumexp
        m_z, m_safe, scale = _rescale(m_z, z)
        s_z = s_z * scale + _sum(tl.exp(z - m_safe[:, None]), 1)
        # reference logsumexp and the q-weighted sum of zr - z, rescaled together
        m_r, m_safe, scale = _rescale(m_r, zr)
        e = tl.exp(zr - m_safe[:, None])
        finite = (zr > NEG_INF) & (z > NEG_INF)
        s_r = s_r * scale + _sum(e, 1)
        t_r = t_r * scale + _sum(tl.where(finite, e * (zr - z), 0.0), 1)
        inf_zr = tl.maximum(inf_zr, _max(tl.where((z == NEG_INF) & (zr > NEG_INF), zr, NEG_INF), 1))
        if RISK == 1:
            x = tl.where(finite, (1.0 + mu) * zr - mu * z, NEG_INF)
            m_e, m_safe, scale = _rescale(m_e, x)
            s_e = s_e * scale + _sum(tl.exp(x - m_safe[:, None]), 1)
        # the label's logits: a masked sum keeps -inf and NaN at y as they are
        hit = cols[None, :] == y[:, None]
        z_y += _sum(tl.where(hit, z, 0.0), 1)
        zr_y += _sum(tl.where(hit, zr, 0.0), 1)

    out = part_ptr + (split * M + offs.to(tl.int64)) * 10
    tl.store(out + 0, m_z, mask=row_ok)
    tl.store(out + 1, s_z, mask=row_ok)
    tl.store(out + 2, m_r, mask=row_ok)
    tl.store(out + 3, s_r, mask=row_ok)
    tl.store(out + 4, t_r, mask=row_ok)
    tl.store(out + 5, m_e, mask=row_ok)
    tl.store(out + 6, s_e, mask=row_ok)
    tl.store(out + 7, inf_zr, mask=row_ok)
    tl.store(out + 8, z_y, mask=row_ok)
    tl.store(out + 9, zr_y, mask=row_ok)
