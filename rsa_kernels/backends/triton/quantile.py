"""Passes 2.. of the forward for cvar and ra_dpo_cvar: an exact quantile of D per row.

cvar:ALPHA needs tau* = the smallest D (over q > 0) whose q-mass F(D) = sum q [D_u <= D]
reaches ALPHA; ra_dpo_cvar:C needs the order statistics of rank LO and HI = LO + 1 of all V
values of D (-inf where q = 0). Both are found the same way, on the integer keys of D
(_common._key, exact and monotone), with a bracket [klo, khi] of keys that always holds
the target:

- a histogram pass splits the bracket into NB bins at thresholds kt[0..NB-1] and sums, per
  threshold, the count and q-mass below it and q*D above it (for ra_dpo_cvar also the
  q-mass above and the largest key below); the bin holding the target becomes the new
  bracket, and what lies below/above it is folded into running totals, exactly;
- the first pass that starts with at most NC items in the bracket also stores them (key,
  q) in a per-program scratch buffer; later histograms read those NC items instead of
  the row (D is recovered from its key exactly);
- a bracket of a single key is the answer: tau* or the rank-HI value, with its mass and
  everything below/above it already summed. Ties need nothing special.

Thresholds: the first histogram places its bins by value over the bulk of D (pass 1's
hint) and keeps -inf and +inf in bins of their own; the second by value over the bracket;
later row histograms by key, which always shrinks the bracket NB-fold, so at most
2 + ceil(32 / log2 NB) row histograms are needed. Over the scratch: SAMPLED_IT rounds with
thresholds at sampled items (each round ends or removes items, ~NS-fold in expectation),
then key bins again, so MAX_IT >= 2 * (2 + ceil(32 / log2 NB)) + SAMPLED_IT always ends. Typical rows read the row twice or three
times here (the pass that collects is one of them), see docs/triton_kernels.md.
"""
import triton
import triton.language as tl

from ._common import KEY_NINF, KEY_PINF, _cumsum, _deviation, _key, _max, _min, _sum, _val, helper


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
def _accumulate(k, q, d, inb, kt, cnt_lt, mass_lt, qd_ge, mass_ge, maxk_lt, kmin, kmax, n_in, mass_in,
                RA: tl.constexpr):
    """Add one block of bracket items (inb) to the per-threshold sums."""
    qd = tl.where(q != 0, q * d, 0.0)
    lt = (k[:, None] < kt[None, :]) & inb[:, None]
    ge = (k[:, None] >= kt[None, :]) & inb[:, None]
    cnt_lt += _sum(lt.to(tl.int32), 0)
    qd_ge += _sum(tl.where(ge, qd[:, None], 0.0), 0)
    if RA:
        mass_ge += _sum(tl.where(ge, q[:, None], 0.0), 0)
        maxk_lt = tl.maximum(maxk_lt, _max(tl.where(lt, k[:, None], -1), 0))
    else:
        mass_lt += _sum(tl.where(lt, q[:, None], 0.0), 0)
    kmin = tl.minimum(kmin, _min(tl.where(inb, k, 1 << 33), 0))
    kmax = tl.maximum(kmax, _max(tl.where(inb, k, -1), 0))
    n_in += _sum(inb.to(tl.int32), 0)
    mass_in += _sum(tl.where(inb, q, 0.0), 0)
    return cnt_lt, mass_lt, qd_ge, mass_ge, maxk_lt, kmin, kmax, n_in, mass_in


@triton.jit
def quantile_kernel(z_ptr, zr_ptr, y_ptr, stats_ptr, saved_ptr, aux_ptr, kbuf_ptr, qbuf_ptr,
                    row0, stride_z, stride_zr, V, ignore_index,
                    alpha, lo_rank, hi_rank, frac,
                    RA: tl.constexpr, NB: tl.constexpr, NC: tl.constexpr, NS: tl.constexpr, SAMPLED_IT: tl.constexpr,
                    BLOCK: tl.constexpr, MAX_IT: tl.constexpr, VALUE_IT: tl.constexpr):
    pid = tl.program_id(0)
    row = row0 + pid.to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    if y != ignore_index:
        zrow = z_ptr + row * stride_z
        rrow = zr_ptr + row * stride_zr
        kbuf = kbuf_ptr + pid.to(tl.int64) * NC
        qbuf = qbuf_ptr + pid.to(tl.int64) * NC
        a = tl.load(saved_ptr + row * 5 + 0)
        ar = tl.load(saved_ptr + row * 5 + 1)
        hint_lo = tl.load(aux_ptr + row * 2 + 0)
        hint_hi = tl.load(aux_ptr + row * 2 + 1)
        offs = tl.arange(0, BLOCK)
        jb = tl.arange(0, NB)
        jf = jb.to(tl.float32)

        klo = tl.full([], KEY_NINF, tl.int64)
        khi = tl.full([], KEY_PINF, tl.int64)
        count = V  # items in the bracket (an upper bound until the first histogram)
        n_cand = 0  # items in the scratch buffer, once collected
        collected = 0
        below_cnt = 0
        below_mass = 0.0
        below_maxk = tl.full([], -1, tl.int64)  # largest key below the bracket (ra_dpo_cvar)
        above_qd = 0.0
        above_mass = 0.0
        hist_it = 0
        scratch_it = 0
        # a NaN row (pass 1 made kl NaN) has no quantile to find: skip the search, risk = NaN
        kl = tl.load(stats_ptr + row * 4 + 2)
        done = tl.where(kl == kl, 0, 1)
        # results: risk, and the saved scalars (tau, c_above, c_atom) or (Q, S, 0);
        # they stay NaN if the loop ran out (it cannot: see the docstring)
        r_value = float("nan")
        r_0 = float("nan")
        r_1 = float("nan")
        r_2 = 0.0
        for _it in range(MAX_IT):
            if done == 0:
                # thresholds: by value where the bracket is finite (first two), else by key
                first_hist = hist_it == 0
                v_lo = tl.where(first_hist, hint_lo, _val(klo))
                v_hi = tl.where(first_hist, hint_hi, _val(khi))
                width = v_hi - v_lo
                by_value = (hist_it < VALUE_IT) & (width >= 0) & (width < float("inf"))
                t_first = v_lo + width * ((jf - 2.0) / (NB - 4))
                t_next = v_lo + width * (jf / NB)
                kv = _key(tl.where(first_hist, t_first, t_next))
                kv = tl.minimum(tl.maximum(kv, klo), khi + 1)
                kkey = klo + ((khi - klo + 1) * jb) // NB
                kt = tl.where(by_value, kv, kkey)
                # the first histogram keeps -inf and +inf in bins of their own
                kt = tl.where(first_hist & (jb == 1), KEY_NINF + 1, kt)
                kt = tl.where(first_hist & (jb == NB - 1), KEY_PINF, kt)
                kt = tl.where(jb == 0, klo, kt)
                if (collected == 1) & (scratch_it < SAMPLED_IT):
                    # over the (compacted) scratch: thresholds at NS sampled items and just
                    # above each, so every sampled value has a bin of its own: the bracket
                    # either becomes one key or loses items, ~NS-fold in expectation
                    si = tl.arange(0, NS)
                    sk = tl.load(kbuf + (si * n_cand) // NS, mask=si < n_cand, other=klo)
                    ti = tl.arange(0, NS)
                    before = (sk[None, :] < sk[:, None]) | ((sk[None, :] == sk[:, None]) & (ti[None, :] < si[:, None]))
                    rank = _sum(before.to(tl.int32), 1)  # a permutation of 0..NS-1
                    m = (jb - 1) // 2
                    over = m >= NS
                    sample = _sum(tl.where(rank[None, :] == tl.minimum(m, NS - 1)[:, None], sk[None, :], 0), 1)
                    kt = sample + tl.where(over, 1, (jb - 1) % 2)
                    kt = tl.where(jb == 0, klo, tl.minimum(tl.maximum(kt, klo), khi + 1))

                cnt_lt = tl.full([NB], 0, tl.int32)
                mass_lt = tl.full([NB], 0.0, tl.float32)
                qd_ge = tl.full([NB], 0.0, tl.float32)
                mass_ge = tl.full([NB], 0.0, tl.float32)
                maxk_lt = tl.full([NB], -1, tl.int64)
                kmin = tl.full([], 1 << 33, tl.int64)
                kmax = tl.full([], -1, tl.int64)
                n_in = 0
                mass_in = 0.0
                if collected == 0:
                    collect = count <= NC
                    for start in range(0, V, BLOCK):
                        cols = start + offs
                        inside = cols < V
                        z = tl.load(zrow + cols, mask=inside, other=0.0).to(tl.float32)
                        zr = tl.load(rrow + cols, mask=inside, other=0.0).to(tl.float32)
                        q, d = _deviation(z, zr, a, ar)
                        k = _key(d)
                        inb = inside & (k >= klo) & (k <= khi)
                        if not RA:
                            inb = inb & (q != 0)
                        if collect:
                            pos = n_in + _cumsum(inb.to(tl.int32), 0) - 1
                            tl.store(kbuf + pos, k, mask=inb)
                            tl.store(qbuf + pos, q, mask=inb)
                        cnt_lt, mass_lt, qd_ge, mass_ge, maxk_lt, kmin, kmax, n_in, mass_in = _accumulate(
                            k, q, d, inb, kt, cnt_lt, mass_lt, qd_ge, mass_ge, maxk_lt, kmin, kmax,
                            n_in, mass_in, RA)
                    if collect:
                        collected = 1
                        tl.debug_barrier()  # the stores above are read back by other threads
                else:
                    for start in range(0, n_cand, BLOCK):
                        slots = start + offs
                        valid = slots < n_cand
                        k = tl.load(kbuf + slots, mask=valid, other=-1)
                        q = tl.load(qbuf + slots, mask=valid, other=0.0)
                        d = _val(k)
                        inb = valid & (k >= klo) & (k <= khi)
                        # compact the scratch to the bracket's items: stores land at or
                        # before the slots just read, once every thread has read them
                        tl.debug_barrier()
                        pos = n_in + _cumsum(inb.to(tl.int32), 0) - 1
                        tl.store(kbuf + pos, k, mask=inb)
                        tl.store(qbuf + pos, q, mask=inb)
                        cnt_lt, mass_lt, qd_ge, mass_ge, maxk_lt, kmin, kmax, n_in, mass_in = _accumulate(
                            k, q, d, inb, kt, cnt_lt, mass_lt, qd_ge, mass_ge, maxk_lt, kmin, kmax,
                            n_in, mass_in, RA)
                    tl.debug_barrier()
                # the scratch holds exactly the bracket's items from here on
                scratch_it += tl.where(collected == 1, 1, 0)
                n_cand = tl.where(collected == 1, n_in, n_cand)
                # the bin b holding the target (bins are prefixes of the thresholds)
                nonempty = cnt_lt < n_in  # some bracket item lies at or above kt[j]
                if RA:
                    cond = below_cnt + cnt_lt <= hi_rank
                else:
                    # tau* >= kt[j] iff every item below kt[j] has F < alpha; when no item
                    # reaches alpha (rounding), torch takes the largest: the last nonempty bin
                    cond = ((below_mass + mass_lt) < alpha) | ((below_cnt + cnt_lt) == 0)
                b = _max(tl.where(cond & nonempty, jb, 0), 0)
                nxt = b + 1
                has_next = nxt < NB
                cnt_b = _pick(cnt_lt, jb, b)
                cnt_next = tl.where(has_next, _pick(cnt_lt, jb, nxt), n_in)
                new_lo = tl.maximum(_pick(kt, jb, b), kmin)
                new_hi = tl.minimum(tl.where(has_next, _pick(kt, jb, nxt) - 1, khi), kmax)
                bin_qd = _pick(qd_ge, jb, b) - tl.where(has_next, _pick(qd_ge, jb, nxt), 0.0)
                bin_mass_ge = _pick(mass_ge, jb, b) - tl.where(has_next, _pick(mass_ge, jb, nxt), 0.0)
                bin_mass_lt = tl.where(has_next, _pick(mass_lt, jb, nxt), mass_in) - _pick(mass_lt, jb, b)
                below_cnt += cnt_b
                below_mass += _pick(mass_lt, jb, b)
                below_maxk = tl.where(cnt_b > 0, _pick(maxk_lt, jb, b), below_maxk)
                above_qd += tl.where(has_next, _pick(qd_ge, jb, nxt), 0.0)
                above_mass += tl.where(has_next, _pick(mass_ge, jb, nxt), 0.0)
                count = cnt_next - cnt_b
                klo = new_lo
                khi = new_hi
                hist_it += 1
                if klo == khi:
                    # one value left in the bracket: the target, all of its ties included
                    v = _val(klo)
                    if RA:
                        lo_key = tl.where(lo_rank >= below_cnt, klo, below_maxk)
                        r_0 = _interp(_val(lo_key), v, frac)
                        take = v > r_0
                        r_value = above_qd + tl.where(take, bin_qd, 0.0)
                        r_1 = above_mass + tl.where(take, bin_mass_ge, 0.0)
                    else:
                        # torch_rows: c_atom = (F(tau) - alpha)+ / ((1 - alpha) mass at tau)
                        r_0 = v
                        atom = bin_mass_lt
                        f_le = below_mass + atom
                        r_1 = 1.0 / (1.0 - alpha)
                        r_2 = tl.maximum(f_le - alpha, 0.0) / ((1.0 - alpha) * atom)
                        atom_w = atom * r_2
                        r_value = above_qd * r_1 + tl.where(atom_w > 0, atom_w * v, 0.0)
                    done = 1
        if RA:
            # as in torch, D > NaN is false everywhere: an undefined quantile selects nothing
            r_value = tl.where(r_0 == r_0, r_value, 0.0)
            r_1 = tl.where(r_0 == r_0, r_1, 0.0)
        tl.store(saved_ptr + row * 5 + 2, r_0)
        tl.store(saved_ptr + row * 5 + 3, r_1)
        tl.store(saved_ptr + row * 5 + 4, r_2)
        # NaN in gives NaN out
        r_value = tl.where(kl == kl, r_value, kl)
        tl.store(stats_ptr + row * 4 + 3, r_value)
