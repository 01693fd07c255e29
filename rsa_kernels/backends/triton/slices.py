"""Slice kernels of the vocabulary-parallel path (rsa_kernels/backends/triton_slices.py):
one program per row of a chunk (``rows_ptr`` holds the rows' indices), float32 math.

partials_kernel: the slice's maxima (one read), then its exp-sums under those shifts, U
    and the largest zr the policy rules out (a second read; erm a third for its log-sum).
search_kernel: one level of the radix search over the keys of D (_common._key): the
    histogram of the next 8-bit digit of the items under the prefix, the sums above it, and
    at the close (LEVEL == LEVELS) the q-mass at it. Each level reads the row again: on a
    GPU that costs less than keeping candidates. The 256 bins are summed as a (BLOCK, 256)
    one-hot product per block (Triton has no per-thread scatter), in float64.
tail_kernel: sum q D and q over D > a per-row threshold.
The backward is backward.py's kernel, with the label column mapped to the slice.
"""
import triton
import triton.language as tl

from ._common import _block, _deviation, _key, _max, _min, _sum, helper

NEG_INF = tl.constexpr(float("-inf"))
BINS = tl.constexpr(256)
NO_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@helper
def _slice_row(z_ptr, zr_ptr, rows_ptr, stride_z, stride_zr):
    """This program's index in the chunk and its row of z and zr."""
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    return i, z_ptr + row * stride_z, zr_ptr + row * stride_zr


@helper
def _items(zrow, rrow, cols, V, a, ar):
    """Which of the columns lie in the row, and their q and D (the backward's arithmetic)."""
    z, zr, inside = _block(zrow, rrow, cols, V)
    q, d = _deviation(z, zr, a, ar)
    return inside, q, d


@helper
def _shifted(zrow, rrow, cols, V, a, ar):
    """A block's z, zr - ar and z - a (-inf past the row), and the items U and T keep: the
    reference's support under ar, without the policy's -inf items (decided later, with M)."""
    inside = cols < V
    z = tl.load(zrow + cols, mask=inside, other=NEG_INF).to(tl.float32)
    zr = tl.load(rrow + cols, mask=inside, other=NEG_INF).to(tl.float32)
    xr = zr - ar
    return z, zr, z - a, xr, (tl.exp(xr) != 0) & (z != NEG_INF)


@triton.jit
def partials_kernel(z_ptr, zr_ptr, rows_ptr, local_ptr, out_ptr, stride_z, stride_zr, V, mu,
                    ERM: tl.constexpr, BLOCK: tl.constexpr):
    i, zrow, rrow = _slice_row(z_ptr, zr_ptr, rows_ptr, stride_z, stride_zr)
    offs = tl.arange(0, BLOCK)
    m_z = tl.full([BLOCK], NEG_INF, tl.float32)
    m_r = tl.full([BLOCK], NEG_INF, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        inside = cols < V
        m_z = tl.maximum(m_z, tl.load(zrow + cols, mask=inside, other=NEG_INF).to(tl.float32))
        m_r = tl.maximum(m_r, tl.load(rrow + cols, mask=inside, other=NEG_INF).to(tl.float32))
    mz = _max(m_z, 0)
    mr = _max(m_r, 0)
    a = tl.where((mz == NEG_INF) | (mz == float("inf")), 0.0, mz)
    ar = tl.where((mr == NEG_INF) | (mr == float("inf")), 0.0, mr)
    s_z = tl.zeros([BLOCK], tl.float32)
    s_r = tl.zeros([BLOCK], tl.float32)
    s_u = tl.zeros([BLOCK], tl.float32)
    m_inf = tl.full([BLOCK], NEG_INF, tl.float32)
    m_t = tl.full([BLOCK], NEG_INF, tl.float32)
    for start in range(0, V, BLOCK):
        z, zr, xz, xr, keep = _shifted(zrow, rrow, start + offs, V, a, ar)
        er = tl.exp(xr)
        u = xr - xz
        s_z += tl.exp(xz)
        s_r += er
        s_u += tl.where(keep, er * u, 0.0)
        m_inf = tl.maximum(m_inf, tl.where(z == NEG_INF, zr, NEG_INF))
        if ERM:
            m_t = tl.maximum(m_t, tl.where(keep, xr + mu * u, NEG_INF))
    t_lse = NEG_INF
    if ERM:
        top = _max(m_t, 0)
        shift = tl.where((top == NEG_INF) | (top == float("inf")), 0.0, top)
        s_t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            z, zr, xz, xr, keep = _shifted(zrow, rrow, start + offs, V, a, ar)
            s_t += tl.where(keep, tl.exp(xr + mu * (xr - xz) - shift), 0.0)
        t_lse = shift + tl.log(_sum(s_t, 0))
    local = tl.load(local_ptr + i).to(tl.int64)
    own = local >= 0
    col = tl.where(own, local, 0)
    z_y = tl.where(own, tl.load(zrow + col).to(tl.float32), 0.0)
    zr_y = tl.where(own, tl.load(rrow + col).to(tl.float32), 0.0)
    o = out_ptr + i * 9
    tl.store(o + 0, mz)
    tl.store(o + 1, mr)
    tl.store(o + 2, _sum(s_z, 0))
    tl.store(o + 3, _sum(s_r, 0))
    tl.store(o + 4, _sum(s_u, 0))
    tl.store(o + 5, t_lse)
    tl.store(o + 6, z_y)
    tl.store(o + 7, zr_y)
    tl.store(o + 8, _max(m_inf, 0))


@triton.jit
def search_kernel(z_ptr, zr_ptr, rows_ptr, a_ptr, ar_ptr, prefix_ptr, hist_ptr, sums_ptr, min_ptr,
                  stride_z, stride_zr, V,
                  LEVEL: tl.constexpr, LEVELS: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    i, zrow, rrow = _slice_row(z_ptr, zr_ptr, rows_ptr, stride_z, stride_zr)
    a = tl.load(a_ptr + i)
    ar = tl.load(ar_ptr + i)
    prefix = tl.load(prefix_ptr + i)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, BINS)
    hist = tl.zeros([BINS], tl.float64)
    above_qd = tl.zeros([BLOCK], tl.float32)
    above_q = tl.zeros([BLOCK], tl.float32)
    at_q = tl.zeros([BLOCK], tl.float64)
    min_above = tl.full([BLOCK], NO_KEY, tl.int64)
    for start in range(0, V, BLOCK):
        inside, q, d = _items(zrow, rrow, start + offs, V, a, ar)
        key = _key(d)
        key = tl.where(d != d, 0xFFFFFFFF, key)  # NaN last
        eligible = inside
        if WEIGHTED:  # cvar weighs the support by q; ra_dpo_cvar counts every item
            eligible = eligible & (q > 0)
        if LEVEL == 0:
            kept = eligible
            above = eligible & (key < 0)  # none
        else:
            dg = (key >> (32 - 8 * LEVEL)) & 255
            pick = (prefix >> (32 - 8 * LEVEL)) & 255
            if LEVEL > 1:  # the items under the prefix's top LEVEL - 1 digits
                eligible = eligible & ((key >> (40 - 8 * LEVEL)) == (prefix >> (40 - 8 * LEVEL)))
            kept = eligible & (dg == pick)
            above = eligible & (dg > pick)
        if LEVEL < LEVELS:
            nxt = (key >> (24 - 8 * LEVEL)) & 255
            if WEIGHTED:
                w = q.to(tl.float64)
            else:
                w = tl.full([BLOCK], 1.0, tl.float64)
            w = tl.where(kept, w, 0.0)
            hist += _sum(tl.where(nxt[:, None] == bins[None, :], w[:, None], 0.0), 0)
        else:
            at_q += tl.where(kept, q, 0.0).to(tl.float64)
        above_qd += tl.where(above & (q != 0), q * d, 0.0)
        above_q += tl.where(above, q, 0.0)
        min_above = tl.minimum(min_above, tl.where(above, key, NO_KEY))
    if LEVEL < LEVELS:
        tl.store(hist_ptr + i * BINS + bins, hist)
    s = sums_ptr + i * 3
    tl.store(s + 0, tl.load(s + 0) + _sum(above_qd, 0).to(tl.float64))
    tl.store(s + 1, tl.load(s + 1) + _sum(above_q, 0).to(tl.float64))
    tl.store(s + 2, tl.load(s + 2) + _sum(at_q, 0))
    tl.store(min_ptr + i, tl.minimum(tl.load(min_ptr + i), _min(min_above, 0)))


@triton.jit
def tail_kernel(z_ptr, zr_ptr, rows_ptr, a_ptr, ar_ptr, thr_ptr, out_ptr, stride_z, stride_zr, V,
                BLOCK: tl.constexpr):
    i, zrow, rrow = _slice_row(z_ptr, zr_ptr, rows_ptr, stride_z, stride_zr)
    a = tl.load(a_ptr + i)
    ar = tl.load(ar_ptr + i)
    thr = tl.load(thr_ptr + i)
    offs = tl.arange(0, BLOCK)
    qd = tl.zeros([BLOCK], tl.float32)
    qs = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        inside, q, d = _items(zrow, rrow, start + offs, V, a, ar)
        above = inside & (d > thr)
        qd += tl.where(above & (q != 0), q * d, 0.0)
        qs += tl.where(above, q, 0.0)
    tl.store(out_ptr + i * 2 + 0, _sum(qd, 0).to(tl.float64))
    tl.store(out_ptr + i * 2 + 1, _sum(qs, 0).to(tl.float64))
