// SPEC section 1 for one token row, in the accumulation type C (float or double).
//
// Forward passes over a row of V (z and zr stay in L2 after the first one: 2 x 128 KiB at
// V = 32000 float32; the first pass is the only one that reads memory):
//   1. max z, max zr                                   (no exp)
//   2. A, Ar and kl together, erm's logsumexp online    (2 exp / item; erm 3)
//   3. cvar / ra_dpo_cvar: q = exp(zr - Ar) and D to scratch (1 exp / item), then
//      cvar: weighted selection of tau* (select.h), then one sweep of sums
//      ra_dpo_cvar: the two order statistics of Q (select.h), then one sweep of sums
// Backward is one pass: p, q (and w) recomputed from the saved scalars, the gradient written.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "select.h"
#include "simd.h"

namespace rsa::RSA_ISA {  // simd.h: one namespace per instruction-set level

enum RiskCode : int { KL = 0, ERM = 1, CVAR = 2, RA_DPO_CVAR = 3 };  // rsa_kernels.risk

template <typename C> constexpr C NEG_INF = -std::numeric_limits<C>::infinity();

// The shift of a logsumexp: its max, or 0 when that is infinite (as torch.logsumexp does).
template <typename C> inline C lse_shift(C m) { return std::isinf(m) ? C(0) : m; }

// max z and max zr in one sweep over both rows: the forward's only pass that reads memory
template <typename C> inline void row_max2(const C* z, const C* zr, int64_t v, C& mz, C& mr) {
  constexpr int W = width<C>();
  Vec<C> a0 = splat(NEG_INF<C>), a1 = a0, b0 = a0, b1 = a0;
  int64_t i = 0;
  for (; i + 2 * W <= v; i += 2 * W) {
    a0 = vmax<C>(a0, load(z + i));
    a1 = vmax<C>(a1, load(z + i + W));
    b0 = vmax<C>(b0, load(zr + i));
    b1 = vmax<C>(b1, load(zr + i + W));
  }
  for (; i + W <= v; i += W) {
    a0 = vmax<C>(a0, load(z + i));
    b0 = vmax<C>(b0, load(zr + i));
  }
  if (i < v) {
    a0 = vmax<C>(a0, load_part(z + i, v - i, NEG_INF<C>));
    b0 = vmax<C>(b0, load_part(zr + i, v - i, NEG_INF<C>));
  }
  mz = hmax<C>(vmax<C>(a0, a1));
  mr = hmax<C>(vmax<C>(b0, b1));
}

// A per-lane logsumexp accumulated online: the shift m follows the running max lazily (it is
// raised only when a value exceeds it by more than 8, so exp(x - m) <= e^8 and rescaling is
// rare), and stays finite so that +inf gives inf and never inf - inf.
template <typename C> struct OnlineLse {
  Vec<C> m = splat(-std::numeric_limits<C>::max()), sum = splat<C>(0);
  // Adds x, given e = exp(x - m) for the current m (computed by the caller together with
  // its other exps; 0 where x = -inf); e is recomputed here only when the shift moves.
  void add(Vec<C> x, Vec<C> e) {
    auto up = x > m + C(8);  // NaN: false, and exp(NaN - m) makes the sum NaN
    if (any<C>(up)) {
      const Vec<C> big = splat(std::numeric_limits<C>::max());
      Vec<C> nm = up ? (x < big ? x : big) : m;
      sum *= fexp<C>(m - nm);
      m = nm;
      e = fexp<C>(x - m);
    }
    sum += e;
  }
  C value() const {  // lanes combined in a fixed order
    const C top = hmax<C>(m);
    C lanes_m[width<C>()], lanes_s[width<C>()];
    std::memcpy(lanes_m, &m, sizeof m);
    std::memcpy(lanes_s, &sum, sizeof sum);
    C total = 0;
    for (int k = 0; k < width<C>(); ++k) total += lanes_s[k] * fexp1<C>(lanes_m[k] - top);
    return top + std::log(total);
  }
};

template <typename C> struct RowOut {
  C logp, ref_logp, kl, risk;
  C saved[5];
};

// Scratch for forward_row: D, q, and the two selection buffers (with room for a vector
// past their end), per thread; only cvar / ra_dpo_cvar use it.
constexpr int64_t forward_scratch(int64_t v) { return 4 * v + 64; }

// next_z / next_zr: the row this thread computes next (or null). Pass 2 runs from cache and
// leaves the memory bus idle, so it prefetches that row into L2 meanwhile: the next row's
// first pass then reads L2 instead of DRAM, and reading memory overlaps the exps.
template <typename C>
RowOut<C> forward_row(const C* z, const C* zr, int64_t v, int64_t y, int code, double param, C* scratch,
                      const C* next_z = nullptr, const C* next_zr = nullptr) {
  RowOut<C> out{};
  C a, ar;
  row_max2(z, zr, v, a, ar);
  a = lse_shift(a);
  ar = lse_shift(ar);
  // One sweep with two exps per item: S = sum exp(z - a), Sr = sum exp(zr - ar), and with
  // e = exp(zr - ar) and u = (zr - ar) - (z - a) (= D + Ar - A), U = sum e u over the support.
  // Then A = a + log S, Ar = ar + log Sr and kl = E_q[D] = U / Sr - log Sr + log S: no third
  // exp for q. erm also needs logsumexp(t), t = r + MU D = (zr - ar) + MU u - (1+MU) log Sr
  // + MU log S, whose max is not known in advance: it is accumulated online.
  const Vec<C> va = splat(a), var = splat(ar), ninf = splat(NEG_INF<C>), zero = splat<C>(0);
  const C mu = C(param);
  const Vec<C> vmu = splat(mu);
  Vec<C> sz = zero, sr = zero, su = zero;
  OnlineLse<C> lse_t;
  constexpr int W = width<C>();
  constexpr int64_t LINE = 64 / sizeof(C);  // values per cache line
  static_assert(LINE % W == 0, "a vector never straddles two lines here");
  // one loop per kind (erm or not) decided at compile time: kl's loop stays free of erm's code
  auto sweep = [&](auto erm_tag) {
    constexpr bool IS_ERM = decltype(erm_tag)::value;
    auto pass = [&](Vec<C> zv, Vec<C> rv) {
      Vec<C> xz = zv - va, xr = rv - var;
      Vec<C> u = xr - xz, ez, er;
      if constexpr (IS_ERM) {
        // t's exp with the other two (one range check); masked once the support is known
        Vec<C> t = xr + vmu * u, et;
        fexp3<C>(xz, xr, t - lse_t.m, ez, er, et);
        auto supp = er != zero;
        lse_t.add(supp ? t : ninf, supp ? et : zero);
      } else {
        fexp2<C>(xz, xr, ez, er);
      }
      sz += ez;
      sr += er;
      auto supp = er != zero;  // a NaN e (NaN in zr) counts, so that it reaches kl
      su += supp ? er * u : zero;
    };
    int64_t i = 0;
    if (next_z && next_zr) {
      for (; i + W <= v; i += W) {
        if (i % LINE == 0) {
          __builtin_prefetch(next_z + i, 0, 2);
          __builtin_prefetch(next_zr + i, 0, 2);
        }
        pass(load(z + i), load(zr + i));
      }
    } else {
      for (; i + W <= v; i += W) pass(load(z + i), load(zr + i));
    }
    if (i < v) pass(load_part(z + i, v - i, NEG_INF<C>), load_part(zr + i, v - i, NEG_INF<C>));
  };
  if (code == ERM)
    sweep(std::true_type{});
  else
    sweep(std::false_type{});
  const C l = std::log(hsum<C>(sz)), sum_r = hsum<C>(sr), lr = std::log(sum_r);
  const C A = a + l, Ar = ar + lr;
  out.saved[0] = A;
  out.saved[1] = Ar;
  out.logp = z[y] - A;
  out.ref_logp = zr[y] - Ar;
  const C kl = (hsum<C>(su) / sum_r - lr) + l;
  out.kl = kl;

  if (code == KL) {
    out.risk = kl;
    return out;
  }
  if (code == ERM) {
    const C L = (lse_t.value() - (C(1) + mu) * lr) + mu * l;
    out.saved[2] = L;
    out.risk = L / mu;
    return out;
  }
  if (std::isnan(kl)) {
    // a NaN deviation on the support: selection is meaningless, and the answer is NaN
    out.risk = kl;
    out.saved[2] = out.saved[3] = out.saved[4] = kl;
    return out;
  }

  // cvar, ra_dpo_cvar: D and q per item, computed exactly as backward_row does, so that the
  // D > tau / D == tau decisions agree bit for bit.
  C* dbuf = scratch;      // D
  C* qbuf = scratch + v;  // q
  // D in SPEC section 1's one form, (zr - z) + (A - Ar): equal logit differences tie here as
  // on every backend and slice kernel
  const Vec<C> vAr = splat(Ar), vc = splat(A - Ar);
  auto body = [&](Vec<C> zv, Vec<C> rv, C* dst_d, C* dst_q, int64_t lanes) {
    Vec<C> q = fexp<C>(rv - vAr);
    auto supp = q != zero;
    store_part(dst_d, supp ? (rv - zv) + vc : ninf, lanes);  // D = -inf off the reference's support
    store_part(dst_q, q, lanes);
  };
  int64_t i = 0;
  for (; i + W <= v; i += W) body(load(z + i), load(zr + i), dbuf + i, qbuf + i, W);
  if (i < v) body(load_part(z + i, v - i, C(0)), load_part(zr + i, v - i, NEG_INF<C>), dbuf + i, qbuf + i, v - i);

  if (code == CVAR) {
    const C alpha = C(param);
    const C tau = bracketed_weighted_quantile(dbuf, qbuf, v, alpha, scratch + 2 * v, scratch + 3 * v + 32, v + 32);
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
    const C Q = bracketed_interpolated_quantile(dbuf, v, 1.0 - param, scratch + 2 * v, 2 * v + 64);
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
  const Vec<C> vc = splat(saved[0] - saved[1]);  // A - Ar: D = (zr - z) + (A - Ar), as forward_row
  const Vec<C> c_p = splat(g_kl - g_logp), c_q = splat(g_kl), c_r = splat(g_risk);
  const C mu = C(param);
  const Vec<C> s2 = splat(saved[2]), s3 = splat(saved[3]), s4 = splat(saved[4]);
  // ra_dpo_cvar's w does not sum to 1: its p term is scaled by S = sum(w)
  const Vec<C> total = code == RA_DPO_CVAR ? s3 : splat<C>(1);
  auto body = [&](Vec<C> zv, Vec<C> rv) {
    Vec<C> s = zv - vA, r = rv - vAr;
    Vec<C> p, q, w;
    if (code == KL) {
      fexp2<C>(s, r, p, q);
      w = q;
    } else {
      // as in forward_row: the support is q != 0, and D = -inf off it. q's support is known
      // only after its exp, so D is formed first, then corrected
      Vec<C> d = (rv - zv) + vc;
      if (code == ERM) {
        Vec<C> t;
        fexp3<C>(s, r, r + mu * d - s2, p, q, t);
        w = q != zero ? t : zero;
      } else {
        fexp2<C>(s, r, p, q);
        d = q != zero ? d : ninf;
        if (code == CVAR) {
          w = d > s2 ? q * s3 : (d == s2 ? q * s4 : zero);
        } else {
          w = d > s2 ? q : zero;
        }
      }
    }
    return c_p * p - c_q * q + c_r * (p * total - w);
  };
  int64_t i = 0;
  for (; i + W <= v; i += W) store(out + i, body(load(z + i), load(zr + i)));
  if (i < v) store_part(out + i, body(load_part(z + i, v - i, C(0)), load_part(zr + i, v - i, NEG_INF<C>)), v - i);
  out[y] += g_logp;
}

}  // namespace rsa::RSA_ISA
