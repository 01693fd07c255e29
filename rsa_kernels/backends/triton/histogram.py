"""Passes 2 and 3 of the forward for cvar and ra_dpo_cvar: narrow a bracket around the quantile.

cvar:ALPHA needs tau* = the smallest D (over q != 0) whose q-mass F(D) = sum q [D_u <= D]
reaches ALPHA; ra_dpo_cvar:C needs the order statistics of ranks LO and HI = LO + 1 of all
V values of D (-inf where q = 0). Each row keeps a bracket of sortable keys [klo, khi]
(_common._key) that holds the target (for ra_dpo_cvar both ranks), and exact running totals
of what lies below it (count, q-mass) and above it (sum of q*D, q-mass), in the state tensors:

    ist (N, 4) int64:    klo, khi, below_cnt, count (items in the bracket; 0 = nothing left)
    fst (N, 3) float32:  below_mass, above_qd, above_mass

One launch is one read of the row: it splits the bracket into NB bins at NB thresholds,
sums per bin the count, q-mass and q*D of its items, and keeps the bin that holds the
target (ra_dpo_cvar: the bins from rank LO's to rank HI's, usually one). A bracket
of a single key is the answer, with its mass (the quantile atom, all ties included): the
row's risk and saved scalars are written and its count set to 0. Rows still open after
the second launch are finished from a scratch copy of their bracket (collect.py, then
triton_quantile.py), so no row is ever read more than 4 times in the forward.

Speed: the sums are kept per lane, as (NB, BLOCK) tiles reduced once after the loop: no
cross-thread reduction inside the loop (the previous design reduced 7 times per block and
was compute-bound). Compiled for sm_90 each item costs 2 comparisons and 3 predicated adds
per bin (bench/triton_static_cost.py): O(NB), not O(1), since Triton has no per-thread
dynamic indexing for a true scatter into bins.

Thresholds: FIRST launch, by value over the bulk of D (pass 1's hint), with -inf and +inf
in bins of their own; second launch, one bin per key when the bracket holds at most NB keys
(which always ends the search), else by value over the bracket. Comparisons are on the float
D (one instruction) against thresholds that are exact keys, so they agree with key order:
d >= val(k) <=> key(d) >= k for every non-NaN d (-0 is made +0 in _deviation).
"""
import triton
import triton.language as tl

from ._common import KEY_NINF, KEY_PINF, _block, _deviation, _key, _max, _min, _sum, _val, helper


@helper
def _pick(vec, idx, j):
    """vec[j] for a scalar j (a masked sum: vectors cannot be indexed dynamically)."""
    return _sum(tl.where(idx == j, vec, 0), 0)


@helper
def _interp(a, b, frac):
    """reference.interpolated_quantile's formula, the same float32 operations; from a = -inf
    it is -inf (as torch.quantile), where the formula would give -inf + inf = NaN."""
    return tl.where(frac == 0.0, a, tl.where((a == b) | (a == float("-inf")), a, a + frac * (b - a)))


@helper
def _in_bracket(d, q, inside, klo, khi, RA: tl.constexpr):
    """Items whose key lies in [klo, khi]; cvar counts only the support q != 0.

    The upper end is tested as "not >= val(khi + 1)": val(khi) itself can be -0.0, which
    a float "<=" would let +0.0 through."""
    hi_val = _val(tl.minimum(khi + 1, KEY_PINF))
    below_top = tl.where(khi >= KEY_PINF, d == d, d < hi_val)
    inb = inside & (d >= _val(klo)) & below_top
    if not RA:
        inb = inb & (q != 0)
    return inb


@helper
def _thresholds(klo, khi, hint_lo, hint_hi, jb, FIRST: tl.constexpr, NB: tl.constexpr):
    """NB non-decreasing keys in [klo, min(khi + 1, KEY_PINF)], the first = klo."""
    jf = jb.to(tl.float32)
    nkeys = khi - klo + 1
    if FIRST:
        v_lo = hint_lo
        v_hi = hint_hi
        t = v_lo + (v_hi - v_lo) * ((jf - 2.0) / (NB - 4))
    else:
        v_lo = _val(klo)
        v_hi = _val(khi)
        t = v_lo + (v_hi - v_lo) * (jf / NB)
    width = v_hi - v_lo
    by_value = (width >= 0) & (width < float("inf"))
    kval = _key(t)
    kkey = klo + (nkeys * jb) // NB
    kt = tl.where(by_value, kval, kkey)
    if FIRST:
        # -inf and +inf (p = 0 < q) get bins of their own
        kt = tl.where(jb == 1, KEY_NINF + 1, kt)
        kt = tl.where(jb == NB - 1, KEY_PINF, kt)
    else:
        kt = tl.where(nkeys <= NB, klo + jb, kt)  # one key per bin: the search ends here
    kt = tl.minimum(tl.maximum(kt, klo), tl.minimum(khi + 1, KEY_PINF))
    return tl.where(jb == 0, klo, kt)


@triton.jit
def histogram_kernel(z_ptr, zr_ptr, y_ptr, stats_ptr, saved_ptr, aux_ptr, ist_ptr, fst_ptr,
                     stride_z, stride_zr, V, ignore_index, alpha, lo_rank, hi_rank, frac,
                     FIRST: tl.constexpr, RA: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    kl = tl.load(stats_ptr + row * 4 + 2)
    if FIRST:
        klo = tl.full([], KEY_NINF, tl.int64)
        khi = tl.full([], KEY_PINF, tl.int64)
        below_cnt = tl.full([], 0, tl.int64)
        # masked rows have nothing to find; a NaN row (pass 1 made kl NaN) has no quantile
        count = tl.where((y != ignore_index) & (kl == kl), V, 0).to(tl.int64)
        below_mass = tl.full([], 0.0, tl.float32)
        above_qd = tl.full([], 0.0, tl.float32)
        above_mass = tl.full([], 0.0, tl.float32)
        if (y != ignore_index) & (kl != kl):
            # saved scalars as an undefined quantile leaves them; NaN in gives NaN out
            tl.store(saved_ptr + row * 5 + 2, float("nan"))
            if RA:
                tl.store(saved_ptr + row * 5 + 3, 0.0)
            else:
                tl.store(saved_ptr + row * 5 + 3, float("nan"))
            tl.store(saved_ptr + row * 5 + 4, 0.0)
            tl.store(stats_ptr + row * 4 + 3, kl)
    else:
        klo = tl.load(ist_ptr + row * 4 + 0)
        khi = tl.load(ist_ptr + row * 4 + 1)
        below_cnt = tl.load(ist_ptr + row * 4 + 2)
        count = tl.load(ist_ptr + row * 4 + 3)
        below_mass = tl.load(fst_ptr + row * 3 + 0)
        above_qd = tl.load(fst_ptr + row * 3 + 1)
        above_mass = tl.load(fst_ptr + row * 3 + 2)
    if count > 0:
        zrow = z_ptr + row * stride_z
        rrow = zr_ptr + row * stride_zr
        a = tl.load(saved_ptr + row * 5 + 0)
        ar = tl.load(saved_ptr + row * 5 + 1)
        jb = tl.arange(0, NB)
        hint_lo = tl.load(aux_ptr + row * 2 + 0)
        hint_hi = tl.load(aux_ptr + row * 2 + 1)
        kt = _thresholds(klo, khi, hint_lo, hint_hi, jb, FIRST, NB)
        # bin j holds the keys [kt[j], kt[j+1]); the last bin is closed by the bracket itself
        # (NaN: "d >= NaN" is false for every item)
        tv = _val(kt)
        tv_next = tl.where(jb == NB - 1, float("nan"), _val(_thresholds(klo, khi, hint_lo, hint_hi, jb + 1,
                                                                       FIRST, NB)))
        offs = tl.arange(0, BLOCK)
        # per-lane, per-bin sums, reduced once after the loop
        # (bins, items) tiles: items along the contiguous axis, so that each thread holds
        # every bin of its own items and broadcasting D over bins moves no data
        cnt_b = tl.full([NB, BLOCK], 0.0, tl.float32)   # exact: counts < 2^24
        mass_b = tl.full([NB, BLOCK], 0.0, tl.float32)
        qd_b = tl.full([NB, BLOCK], 0.0, tl.float32)
        d_min = tl.full([BLOCK], float("inf"), tl.float32)
        d_max = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            z, zr, inside = _block(zrow, rrow, cols, V)
            q, d = _deviation(z, zr, a, ar)
            inb = _in_bracket(d, q, inside, klo, khi, RA)
            # outside the bracket D becomes NaN, so that both comparisons below are false
            d_in = tl.where(inb, d, float("nan"))
            q_in = tl.where(inb, q, 0.0)
            qd = tl.where(inb & (q != 0), q * d, 0.0)
            # predicated adds (a select of the sum, not a product with a 0/1 mask): one
            # instruction per sum and bin, and 0 * inf (q*D of a p = 0 < q item) never arises
            in_bin = (d_in[None, :] >= tv[:, None]) != (d_in[None, :] >= tv_next[:, None])
            cnt_b = tl.where(in_bin, cnt_b + 1.0, cnt_b)
            mass_b = tl.where(in_bin, mass_b + q_in[None, :], mass_b)
            qd_b = tl.where(in_bin, qd_b + qd[None, :], qd_b)
            d_min = tl.minimum(d_min, tl.where(inb, d, float("inf")))
            d_max = tl.maximum(d_max, tl.where(inb, d, float("-inf")))
        cnt = _sum(cnt_b, 1).to(tl.int64)
        mass = _sum(mass_b, 1)
        qdsum = _sum(qd_b, 1)
        # per threshold j, the count and q-mass of the bracket items below it
        before = jb[None, :] < jb[:, None]
        cnt_lt = _sum(tl.where(before, cnt[None, :], 0), 1)
        mass_lt = _sum(tl.where(before, mass[None, :], 0.0), 1)
        # the bins b..b_top holding the target: the last nonempty bin it lies at or above
        if RA:
            # rank LO's bin and rank HI's (LO + 1: the same bin or a later one), so that both
            # order statistics stay in the bracket and nothing below it is ever needed
            b = _max(tl.where((below_cnt + cnt_lt <= lo_rank) & (cnt > 0), jb, 0), 0)
            b_top = _max(tl.where((below_cnt + cnt_lt <= hi_rank) & (cnt > 0), jb, 0), 0)
        else:
            # tau* >= kt[j] iff every item below kt[j] has F < alpha; when no item reaches
            # alpha (rounding), torch takes the largest: the last nonempty bin
            cond = ((below_mass + mass_lt) < alpha) | ((below_cnt + cnt_lt) == 0)
            b = _max(tl.where(cond & (cnt > 0), jb, 0), 0)
            b_top = b
        lower = jb < b
        upper = jb > b_top
        kept = (jb >= b) & (jb <= b_top)
        below_cnt += _sum(tl.where(lower, cnt, 0), 0)
        below_mass += _sum(tl.where(lower, mass, 0.0), 0)
        above_qd += _sum(tl.where(upper, qdsum, 0.0), 0)
        above_mass += _sum(tl.where(upper, mass, 0.0), 0)
        count = _sum(tl.where(kept, cnt, 0), 0)
        bin_mass = _sum(tl.where(kept, mass, 0.0), 0)
        bin_qd = _sum(tl.where(kept, qdsum, 0.0), 0)
        has_next = b_top + 1 < NB
        klo = tl.maximum(_pick(kt, jb, b), _key(_min(d_min, 0)))
        khi = tl.minimum(tl.where(has_next, _pick(kt, jb, b_top + 1) - 1, khi), _key(_max(d_max, 0)))
        if klo == khi:
            # one value left in the bracket: the target, all of its ties included
            v = _val(klo)
            if RA:
                quant = _interp(v, v, frac)  # both ranks: v, or NaN
                take = v > quant
                value = above_qd + tl.where(take, bin_qd, 0.0)
                s_above = above_mass + tl.where(take, bin_mass, 0.0)
                # as in torch, D > NaN is false everywhere: an undefined quantile selects nothing
                value = tl.where(quant == quant, value, 0.0)
                s_above = tl.where(quant == quant, s_above, 0.0)
                tl.store(saved_ptr + row * 5 + 2, quant)
                tl.store(saved_ptr + row * 5 + 3, s_above)
                tl.store(saved_ptr + row * 5 + 4, 0.0)
            else:
                # torch_rows: c_atom = (F(tau) - alpha)+ / ((1 - alpha) mass at tau)
                c_above = 1.0 / (1.0 - alpha)
                c_atom = tl.maximum(below_mass + bin_mass - alpha, 0.0) / ((1.0 - alpha) * bin_mass)
                atom_w = bin_mass * c_atom
                value = above_qd * c_above + tl.where(atom_w > 0, atom_w * v, 0.0)
                tl.store(saved_ptr + row * 5 + 2, v)
                tl.store(saved_ptr + row * 5 + 3, c_above)
                tl.store(saved_ptr + row * 5 + 4, c_atom)
            tl.store(stats_ptr + row * 4 + 3, value)
            count = count * 0
    tl.store(ist_ptr + row * 4 + 0, klo)
    tl.store(ist_ptr + row * 4 + 1, khi)
    tl.store(ist_ptr + row * 4 + 2, below_cnt)
    tl.store(ist_ptr + row * 4 + 3, count)
    tl.store(fst_ptr + row * 3 + 0, below_mass)
    tl.store(fst_ptr + row * 3 + 1, above_qd)
    tl.store(fst_ptr + row * 3 + 2, above_mass)
