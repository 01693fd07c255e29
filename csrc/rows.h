// SPEC section 1 for one token row, in the accumulation type C (float or double).
//
// Forward passes over a row of V (z and zr stay in L2 after the first one: 2 x 128 KiB at
// V = 32000 float32; the first pass is the only one that reads memory):
//   1. max z, max zr                               (no exp)
//   2. A = logsumexp z, Ar = logsumexp zr           (2 exp / item)
//   3. q = exp(zr - Ar), D, kl = sum q D            (1 exp / item); erm writes t = r + mu D
//      to scratch, cvar / ra_dpo_cvar write D and q to scratch
//   4. erm: L = logsumexp t over scratch           (1 exp / item)
//      cvar: weighted quickselect of tau* on the q > 0 items, then one sweep of sums
//      ra_dpo_cvar: nth_element for Q, then one sweep of sums
// Backward is one pass: p, q (and w) recomputed from the saved scalars, the gradient written.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "select.h"
#include "simd.h"

namespace rsa {

enum RiskCode : int { KL = 0, ERM = 1, CVAR = 2, RA_DPO_CVAR = 3 };  // rsa_kernels.risk

template <typename C> constexpr C NEG_INF = -std::numeric_limits<C>::infinity();

// The shift of a logsumexp: its max, or 0 when that is infinite (as torch.logsumexp does).
template <typename C> inline C lse_shift(C m) { return std::isinf(m) ? C(0) : m; }

// Applies f(offset, vector, lanes) to x[0, V) a vector at a time; the tail is filled with fill.
template <typename C, typename F> inline void sweep(const C* x, int64_t v, C fill, F f) {
  constexpr int W = width<C>();
  int64_t i = 0;
  for (; i + W <= v; i += W) f(i, load(x + i), int64_t(W));
  if (i < v) f(i, load_part(x + i, v - i, fill), v - i);
}

template <typename C> inline C row_max(const C* x, int64_t v) {
  constexpr int W = width<C>();
  // four accumulators: max has a 1-op body, so break the loop-carried dependency
  Vec<C> m0 = splat(NEG_INF<C>), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * W <= v; i += 4 * W) {
    m0 = vmax<C>(m0, load(x + i));
    m1 = vmax<C>(m1, load(x + i + W));
    m2 = vmax<C>(m2, load(x + i + 2 * W));
    m3 = vmax<C>(m3, load(x + i + 3 * W));
  }
  for (; i + W <= v; i += W) m0 = vmax<C>(m0, load(x + i));
  if (i < v) m0 = vmax<C>(m0, load_part(x + i, v - i, NEG_INF<C>));
  return hmax<C>(vmax<C>(vmax<C>(m0, m1), vmax<C>(m2, m3)));
}

// log sum exp(x - shift) + shift
template <typename C> inline C row_lse(const C* x, int64_t v, C shift) {
  Vec<C> acc = splat<C>(0), sh = splat(shift);
  sweep<C>(x, v, NEG_INF<C>, [&](int64_t, Vec<C> xv, int64_t) { acc += fexp<C>(xv - sh); });
  return std::log(hsum<C>(acc)) + shift;
}

template <typename C> struct RowOut {
  C logp, ref_logp, kl, risk;
  C saved[5];
};

// Scratch: 4 * V values of C per thread.
template <typename C>
RowOut<C> forward_row(const C* z, const C* zr, int64_t v, int64_t y, int code, double param, C* scratch) {
  RowOut<C> out{};
  const C a = lse_shift(row_max(z, v));
  const C ar = lse_shift(row_max(zr, v));
  const C A = row_lse(z, v, a), Ar = row_lse(zr, v, ar);
  out.saved[0] = A;
  out.saved[1] = Ar;
  out.logp = z[y] - A;
  out.ref_logp = zr[y] - Ar;

  C* dbuf = scratch;         // D (erm: t)
  C* qbuf = scratch + v;     // q
  const Vec<C> vA = splat(A), vAr = splat(Ar), ninf = splat(NEG_INF<C>), zero = splat<C>(0);
  const C mu = C(param);
  Vec<C> kl_acc = zero, t_max = ninf;
  constexpr int W = width<C>();
  int64_t i = 0;
  auto body = [&](Vec<C> zv, Vec<C> rv, C* dst_d, C* dst_q, int64_t lanes) {
    Vec<C> s = zv - vA, r = rv - vAr;
    Vec<C> q = fexp<C>(r);
    // the support is q != 0, not q > 0: a NaN q (NaN in zr) must reach kl, not be dropped
    auto supp = q != zero;
    Vec<C> d = supp ? r - s : ninf;  // D = -inf off the reference's support
    kl_acc += supp ? q * d : zero;
    if (code == ERM) {
      Vec<C> t = supp ? r + mu * d : ninf;
      t_max = vmax<C>(t_max, t);
      store_part(dst_d, t, lanes);
    } else if (code != KL) {
      store_part(dst_d, d, lanes);
      store_part(dst_q, q, lanes);
    }
  };
  for (; i + W <= v; i += W) body(load(z + i), load(zr + i), dbuf + i, qbuf + i, W);
  if (i < v) body(load_part(z + i, v - i, C(0)), load_part(zr + i, v - i, NEG_INF<C>), dbuf + i, qbuf + i, v - i);
  const C kl = hsum<C>(kl_acc);
  out.kl = kl;

  if (code == KL) {
    out.risk = kl;
  } else if (code == ERM) {
    const C shift = lse_shift(hmax<C>(t_max));
    const C L = row_lse(dbuf, v, shift);
    out.saved[2] = L;
    out.risk = L / mu;
  } else if (std::isnan(kl)) {
    // a NaN deviation on the support: selection is meaningless, and the answer is NaN
    out.risk = kl;
    out.saved[2] = out.saved[3] = out.saved[4] = kl;
  } else if (code == CVAR) {
    const C alpha = C(param);
    // compact the support (q > 0) into the second half of the scratch for selection
    C* dc = scratch + 2 * v;
    C* qc = scratch + 3 * v;
    int64_t n = 0;
    C dmax = NEG_INF<C>;
    for (int64_t j = 0; j < v; ++j) {
      if (qbuf[j] > 0) {
        dc[n] = dbuf[j];
        qc[n] = qbuf[j];
        dmax = dbuf[j] > dmax ? dbuf[j] : dmax;
        ++n;
      }
    }
    const C tau = n ? weighted_quantile(dc, qc, n, alpha, dmax) : NEG_INF<C>;
    // F(tau), the atom's q-mass and the excess over tau, in one vector sweep
    Vec<C> le = zero, above = zero, at = zero;
    const Vec<C> vt = splat(tau);
    i = 0;
    auto sums = [&](Vec<C> d, Vec<C> q) {
      le += d <= vt ? q : zero;
      above += d > vt ? q * (d - vt) : zero;
      at += d == vt ? q : zero;
    };
    for (; i + W <= v; i += W) sums(load(dbuf + i), load(qbuf + i));
    if (i < v) sums(load_part(dbuf + i, v - i, NEG_INF<C>), load_part(qbuf + i, v - i, C(0)));
    const C f_le = hsum<C>(le), at_mass = hsum<C>(at);
    const C c_above = C(1) / (C(1) - alpha);
    // the atom's share (F(tau) - alpha) / (1 - alpha), spread over its q-mass F(tau) - F(tau-);
    // that mass is summed directly (never as a difference of two rounded sums, which can
    // vanish for a tiny q at tau), and the weight clamped to the range rounding may leave
    C excess = f_le - alpha;
    excess = excess > 0 ? excess : C(0);
    C c_atom = at_mass > 0 ? excess / ((C(1) - alpha) * at_mass) : C(0);
    c_atom = c_atom < c_above ? c_atom : c_above;
    // the value as the reference writes it, tau + E_q[(D - tau)+] / (1 - alpha): no
    // cancellation in F(tau) - alpha, which float32 sums would amplify by 1 / (1 - alpha)
    out.risk = tau + hsum<C>(above) * c_above;
    out.saved[2] = tau;
    out.saved[3] = c_above;
    out.saved[4] = c_atom;
  } else {  // RA_DPO_CVAR
    C* dc = scratch + 2 * v;
    for (int64_t j = 0; j < v; ++j) dc[j] = dbuf[j];
    const C Q = interpolated_quantile(dc, v, 1.0 - param);
    Vec<C> above = zero, mass = zero;
    const Vec<C> vq = splat(Q);
    i = 0;
    auto sums = [&](Vec<C> d, Vec<C> q) {
      auto m = d > vq;
      above += m ? q * d : zero;
      mass += m ? q : zero;
    };
    for (; i + W <= v; i += W) sums(load(dbuf + i), load(qbuf + i));
    if (i < v) sums(load_part(dbuf + i, v - i, NEG_INF<C>), load_part(qbuf + i, v - i, C(0)));
    out.risk = hsum<C>(above);
    out.saved[2] = Q;
    out.saved[3] = hsum<C>(mass);
  }
  return out;
}

// grad = g_logp ([j = y] - p) + g_kl (p - q) + g_risk (p sum(w) - w), written to out
// (which may alias z: each item is read before it is written).
template <typename C>
void backward_row(const C* z, const C* zr, C* out, int64_t v, int64_t y, const C* saved,
                  C g_logp, C g_kl, C g_risk, int code, double param) {
  constexpr int W = width<C>();
  const Vec<C> vA = splat(saved[0]), vAr = splat(saved[1]), ninf = splat(NEG_INF<C>), zero = splat<C>(0);
  const Vec<C> c_p = splat(g_kl - g_logp), c_q = splat(g_kl), c_r = splat(g_risk);
  const C mu = C(param);
  const Vec<C> s2 = splat(saved[2]), s3 = splat(saved[3]), s4 = splat(saved[4]);
  // ra_dpo_cvar's w does not sum to 1: its p term is scaled by S = sum(w)
  const Vec<C> total = code == RA_DPO_CVAR ? s3 : splat<C>(1);
  auto body = [&](Vec<C> zv, Vec<C> rv) {
    Vec<C> s = zv - vA, r = rv - vAr;
    Vec<C> p = fexp<C>(s), q = fexp<C>(r);
    Vec<C> w;
    if (code == KL) {
      w = q;
    } else {
      auto supp = q != zero;  // as in forward_row
      Vec<C> d = supp ? r - s : ninf;
      if (code == ERM) {
        w = supp ? fexp<C>(r + mu * d - s2) : zero;
      } else if (code == CVAR) {
        w = d > s2 ? q * s3 : (d == s2 ? q * s4 : zero);
      } else {
        w = d > s2 ? q : zero;
      }
    }
    return c_p * p - c_q * q + c_r * (p * total - w);
  };
  int64_t i = 0;
  for (; i + W <= v; i += W) store(out + i, body(load(z + i), load(zr + i)));
  if (i < v) store_part(out + i, body(load_part(z + i, v - i, C(0)), load_part(zr + i, v - i, NEG_INF<C>)), v - i);
  out[y] += g_logp;
}

}  // namespace rsa
