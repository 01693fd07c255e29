"""Pass 1 of the forward: one read of z and zr per row.

Online (per lane, merged at the end) logsumexp of z (A) and zr (Ar); the kl sum
sum_v e^(zr_v - m)(zr_v - z_v), which needs no A or Ar because
D_v = (zr_v - z_v) + (A - Ar) and sum_v q_v = 1; for erm a third online logsumexp of
(1+MU) zr - MU z. For cvar and ra_dpo_cvar it also records the range, mean and spread of
zr - z, which place the first histogram's bins of the quantile search (histogram.py).
"""
import triton
import triton.language as tl

from ._common import _max, _min, _sum, helper

NEG_INF = tl.constexpr(float("-inf"))


@helper
def _merge(m, s, x):
    """Online logsumexp step per lane over its GROUP items x (GROUP, LANES): (m, s) holds
    sum e^(x - m); one rescale per group, not per item; -inf lanes stay exact."""
    m_new = tl.maximum(m, _max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - m_safe) + _sum(tl.exp(x - m_safe[None, :]), 0), m_safe


@helper
def _finish(m, s):
    big = _max(m, 0)
    big_safe = tl.where(big == float("-inf"), 0.0, big)
    return big_safe + tl.log(_sum(s * tl.exp(m - big_safe), 0))


@triton.jit
def stats_kernel(z_ptr, zr_ptr, y_ptr, stats_ptr, saved_ptr, aux_ptr,
                 stride_z, stride_zr, V, ignore_index, mu,
                 RISK: tl.constexpr, RANGE: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    zrow = z_ptr + row * stride_z
    rrow = zr_ptr + row * stride_zr
    # (GROUP, LANES) tiles, items contiguous along the lanes: each thread holds all GROUP
    # items of its lanes, so the per-group reductions below stay in registers and the online
    # rescale costs one exp per group instead of one per item; lanes merge after the loop
    LANES: tl.constexpr = BLOCK // GROUP
    offs = tl.arange(0, GROUP)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    if y != ignore_index:
        m_z = tl.full([LANES], NEG_INF, tl.float32)
        s_z = tl.full([LANES], 0.0, tl.float32)
        m_r = tl.full([LANES], NEG_INF, tl.float32)
        s_r = tl.full([LANES], 0.0, tl.float32)
        t_r = tl.full([LANES], 0.0, tl.float32)
        m_e = tl.full([LANES], NEG_INF, tl.float32)
        s_e = tl.full([LANES], 0.0, tl.float32)
        inf_zr = tl.full([LANES], NEG_INF, tl.float32)  # max zr where z = -inf < zr (D = +inf)
        x_min = tl.full([LANES], float("inf"), tl.float32)
        x_max = tl.full([LANES], NEG_INF, tl.float32)
        x_sum = tl.full([LANES], 0.0, tl.float32)
        x_sq = tl.full([LANES], 0.0, tl.float32)
        x_n = tl.full([LANES], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            inside = cols < V
            z = tl.load(zrow + cols, mask=inside, other=NEG_INF).to(tl.float32)
            zr = tl.load(rrow + cols, mask=inside, other=NEG_INF).to(tl.float32)
            m_z, s_z, _ = _merge(m_z, s_z, z)
            # reference logsumexp and the q-weighted sum of zr - z, rescaled together
            m_new = tl.maximum(m_r, _max(zr, 0))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            scale = tl.exp(m_r - m_safe)
            e = tl.exp(zr - m_safe[None, :])
            finite = (zr > NEG_INF) & (z > NEG_INF)
            x = tl.where(finite, zr - z, 0.0)
            s_r = s_r * scale + _sum(e, 0)
            t_r = t_r * scale + _sum(tl.where(finite, e * x, 0.0), 0)
            m_r = m_new
            inf_zr = tl.maximum(inf_zr, _max(tl.where((z == NEG_INF) & (zr > NEG_INF), zr, NEG_INF), 0))
            if RISK == 1:
                t = tl.where(finite, (1.0 + mu) * zr - mu * z, NEG_INF)
                m_e, s_e, _ = _merge(m_e, s_e, t)
            if RANGE:
                x_min = tl.minimum(x_min, _min(tl.where(finite, x, float("inf")), 0))
                x_max = tl.maximum(x_max, _max(tl.where(finite, x, NEG_INF), 0))
                x_sum += _sum(x, 0)
                x_sq += _sum(x * x, 0)
                x_n += _sum(finite.to(tl.float32), 0)
        a = _finish(m_z, s_z)
        big = _max(m_r, 0)
        big_safe = tl.where(big == NEG_INF, 0.0, big)
        w = tl.exp(m_r - big_safe)
        s_tot = _sum(s_r * w, 0)
        ar = big_safe + tl.log(s_tot)
        kl = _sum(t_r * w, 0) / s_tot + (a - ar)
        # an item with p = 0 < q makes kl (and every risk) +inf, the true value (SPEC 1);
        # NaN logits (kl NaN through A or Ar) stay NaN: NaN in gives NaN out
        inf_item = (tl.exp(_max(inf_zr, 0) - ar) > 0) & (kl == kl)
        kl = tl.where(inf_item, float("inf"), kl)
        norm = 0.0
        value = kl
        if RISK == 1:
            norm = _finish(m_e, s_e) - (1.0 + mu) * ar + mu * a
            norm = tl.where(inf_item, float("inf"), norm)
            value = norm / mu
        logp = tl.load(zrow + y).to(tl.float32) - a
        ref_logp = tl.load(rrow + y).to(tl.float32) - ar
        tl.store(stats_ptr + row * 4 + 0, logp)
        tl.store(stats_ptr + row * 4 + 1, ref_logp)
        tl.store(stats_ptr + row * 4 + 2, kl)
        tl.store(stats_ptr + row * 4 + 3, value)
        tl.store(saved_ptr + row * 5 + 0, a)
        tl.store(saved_ptr + row * 5 + 1, ar)
        tl.store(saved_ptr + row * 5 + 2, norm)
        if RANGE:
            # where D's bulk lies, to place the first histogram's bins (a hint, not a bound)
            n = tl.maximum(_sum(x_n, 0), 1.0)
            mean = _sum(x_sum, 0) / n
            spread = tl.sqrt(tl.maximum(_sum(x_sq, 0) / n - mean * mean, 0.0))
            lo = tl.maximum(_min(x_min, 0), mean - 4.0 * spread) + (a - ar)
            hi = tl.minimum(_max(x_max, 0), mean + 4.0 * spread) + (a - ar)
            tl.store(aux_ptr + row * 2 + 0, lo)
            tl.store(aux_ptr + row * 2 + 1, hi)
    else:
        for c in tl.static_range(4):
            tl.store(stats_ptr + row * 4 + c, 0.0)
        for c in tl.static_range(5):
            tl.store(saved_ptr + row * 5 + c, 0.0)
