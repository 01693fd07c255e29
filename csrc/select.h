// Order statistics of one row's deviations D, in expected linear time (no full sort).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "simd.h"

namespace rsa::RSA_ISA {  // simd.h: one namespace per instruction-set level

// Sort d[lo, hi) ascending, moving q along (small ranges only).
template <typename C> inline void insertion_sort(C* d, C* q, int64_t lo, int64_t hi) {
  for (int64_t i = lo + 1; i < hi; ++i) {
    C dv = d[i], qv = q[i];
    int64_t j = i;
    for (; j > lo && d[j - 1] > dv; --j) {
      d[j] = d[j - 1];
      q[j] = q[j - 1];
    }
    d[j] = dv;
    q[j] = qv;
  }
}

template <typename C> inline C median3(C a, C b, C c) {
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

// tau* = the smallest d[i] whose q-mass F(d[i]) = sum_j q[j] [d[j] <= d[i]] reaches alpha,
// or the largest d if rounding leaves every F below alpha (torch_rows._cvar_threshold's
// fallback). The n pairs (d, q > 0, no NaN) are permuted; below0 is the q-mass of items
// known to lie below all of them (bracketed_weighted_quantile). Quickselect with a three-way
// partition: ties in d form one block, so the atom at tau* is never split.
template <typename C> C weighted_quantile(C* d, C* q, int64_t n, C alpha, C dmax, C below0 = 0) {
  int64_t lo = 0, hi = n;
  C below = below0;  // q-mass of the items known to lie below d[lo, hi)
  while (hi - lo > 24) {
    C pivot = median3(d[lo], d[lo + (hi - lo) / 2], d[hi - 1]);
    // [lo, lt) < pivot, [lt, i) == pivot, (gt, hi) > pivot
    int64_t lt = lo, i = lo, gt = hi - 1;
    C m_lt = 0, m_eq = 0;
    while (i <= gt) {
      C dv = d[i];
      if (dv < pivot) {
        m_lt += q[i];
        std::swap(d[i], d[lt]);
        std::swap(q[i], q[lt]);
        ++lt;
        ++i;
      } else if (dv > pivot) {
        std::swap(d[i], d[gt]);
        std::swap(q[i], q[gt]);
        --gt;
      } else {
        m_eq += q[i];
        ++i;
      }
    }
    if (lt > lo && below + m_lt >= alpha) {
      hi = lt;
    } else if (below + m_lt + m_eq >= alpha) {
      return pivot;
    } else {
      below += m_lt + m_eq;
      lo = gt + 1;
      if (lo >= hi) return dmax;
    }
  }
  insertion_sort(d, q, lo, hi);
  for (int64_t i = lo; i < hi; ++i) {
    below += q[i];
    if (below >= alpha) return d[i];
  }
  return hi > lo ? d[hi - 1] : dmax;
}

// torch.quantile's ranks for `level` over n values: the lower rank, whether a second (the
// next) rank is interpolated with, and the weight.
struct QuantileRanks {
  int64_t lo, hi;
  double frac;
};

inline QuantileRanks quantile_ranks(int64_t n, double level) {
  double pos = level * double(n - 1);
  int64_t lo = int64_t(pos);
  if (lo > n - 1) lo = n - 1;
  return {lo, std::min(lo + 1, n - 1), pos - double(lo)};
}

// a + frac (b - a) with torch.quantile's arithmetic: the position in double, the
// interpolation in C with separate roundings (the file is built without FMA contraction).
template <typename C> C interpolate(C a, C b, double frac) {
  if (frac == 0.0) return a;
  // from -inf the formula gives -inf + inf = NaN; torch.quantile (and the reference) say -inf
  if (a == b || a == -std::numeric_limits<C>::infinity()) return a;
  C diff = b - a;
  C step = C(frac) * diff;
  return a + step;
}

// torch.quantile(x, level) with linear interpolation over all n values (-inf allowed, no
// NaN), computed exactly as rsa_kernels.reference.interpolated_quantile. x is permuted.
template <typename C> C interpolated_quantile(C* x, int64_t n, double level) {
  const QuantileRanks k = quantile_ranks(n, level);
  std::nth_element(x, x + k.lo, x + n);
  C a = x[k.lo];
  if (k.frac == 0.0) return a;
  C b = k.hi == k.lo ? a : *std::min_element(x + k.lo + 1, x + n);
  return interpolate(a, b, k.frac);
}

// ---- Selection on a bracket ------------------------------------------------------------
// Selection over all V items of a row is dominated by mispredicted branches (half of the
// comparisons with a pivot go each way). A sample of the row brackets the answer instead:
// one branch-free sweep counts (or weighs) the items below the bracket and copies the items
// inside it, and the selection runs on those few. The sweep's counts prove whether the
// answer lies in the bracket; when it does not (an unlucky sample), the full selection runs,
// so the result never depends on the sample, only the time does.

constexpr int SAMPLE = 256;            // sample size
constexpr int64_t MIN_BRACKETED = 2048;  // below this, select directly

// Copies the items of x in [lo, hi] to out (room for n + W), returns their number; `below`
// gets the number of items < lo. One vector sweep, no branch on the data.
template <typename C> int64_t filter_range(const C* x, int64_t n, C lo, C hi, C* out, int64_t& below) {
  constexpr int W = width<C>();
  const Vec<C> vlo = splat(lo), vhi = splat(hi);
  IVec<C> nb{};  // per lane: minus the count below lo (a true comparison is -1)
  int64_t m = 0;
  auto step = [&](Vec<C> v) {
    nb += v < vlo;
    m += compress_store<C>(out + m, v, (v >= vlo) & (v <= vhi));
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) step(load(x + j));
  if (j < n) step(load_part(x + j, n - j, std::numeric_limits<C>::quiet_NaN()));  // NaN: neither
  Bits<C> lanes[W];
  std::memcpy(lanes, &nb, sizeof nb);
  below = 0;
  for (int k = 0; k < W; ++k) below -= lanes[k];
  return m;
}

// interpolated_quantile(x, n, level) without permuting x. buf has room for cap >= n + W
// values; rounds of bracketing shrink the candidates (each round's go after the last's while
// they fit), then nth_element runs on the last ones.
template <typename C> C bracketed_interpolated_quantile(const C* x, int64_t n, double level, C* buf, int64_t cap) {
  constexpr int W = width<C>();
  const QuantileRanks k = quantile_ranks(n, level);
  const int64_t need = k.frac == 0.0 ? k.lo : k.hi;  // the highest rank needed
  const C* cur = x;
  int64_t n_cur = n, offset = 0, used = 0;  // cur holds the ranks [offset, offset + n_cur)
  while (n_cur >= MIN_BRACKETED && used + n_cur + W <= cap) {
    C smp[SAMPLE];
    const int64_t stride = n_cur / SAMPLE;
    for (int s = 0; s < SAMPLE; ++s) smp[s] = cur[s * stride];
    // the target's place in the sample, +- 3 standard deviations of a sample rank and a bit
    const double f = double(k.lo - offset) / double(n_cur - 1);
    const double c = f * (SAMPLE - 1), margin = 3.0 * std::sqrt(SAMPLE * f * (1.0 - f)) + 4.0;
    const int64_t il = int64_t(std::floor(c - margin)), ih = int64_t(std::ceil(c + margin)) + 1;
    const C inf = std::numeric_limits<C>::infinity();
    C lo = -inf, hi = inf;
    if (il >= 0) {
      std::nth_element(smp, smp + il, smp + SAMPLE);
      lo = smp[il];
    }
    if (ih < SAMPLE) {
      std::nth_element(smp, smp + ih, smp + SAMPLE);
      hi = smp[ih];
    }
    int64_t below = 0;
    C* out = buf + used;
    const int64_t m = filter_range(cur, n_cur, lo, hi, out, below);
    if (!(offset + below <= k.lo && need < offset + below + m) || m == n_cur) break;  // not narrowed
    offset += below;
    cur = out;
    n_cur = m;
    used += m + W;
  }
  C* sel = const_cast<C*>(cur);
  if (cur == x) {  // nothing narrowed: select on a copy
    std::copy(x, x + n, buf);
    sel = buf;
  }
  const int64_t j = k.lo - offset;
  std::nth_element(sel, sel + j, sel + n_cur);
  C a = sel[j];
  if (k.frac == 0.0) return a;
  C b = k.hi == k.lo ? a : *std::min_element(sel + j + 1, sel + n_cur);
  return interpolate(a, b, k.frac);
}

// weighted_quantile over the items of (d, q) with q > 0 (d = -inf where q = 0, no NaN),
// without permuting them. dc and qc have room for cap >= n + W values each and do not
// overlap; rounds as in bracketed_interpolated_quantile.
template <typename C> C bracketed_weighted_quantile(const C* d, const C* q, int64_t n, C alpha, C* dc, C* qc,
                                                    int64_t cap) {
  constexpr int W = width<C>();
  const C inf = std::numeric_limits<C>::infinity();
  const C* cd = d;
  const C* cq = q;
  int64_t n_cur = n, used = 0;
  C below_total = 0, mass_cur = 1, dmax_cur = inf;  // q-mass below the current items; theirs; their max
  bool narrowed = false;
  while (n_cur >= MIN_BRACKETED && used + n_cur + W <= cap) {
    struct Item {
      C d, q;
    };
    Item smp[SAMPLE];
    const int64_t stride = n_cur / SAMPLE;
    C total = 0, total_sq = 0;
    for (int s = 0; s < SAMPLE; ++s) {
      smp[s] = {cd[s * stride], cq[s * stride]};
      total += smp[s].q;
      total_sq += smp[s].q * smp[s].q;
    }
    if (!(total > 0)) break;
    std::sort(smp, smp + SAMPLE, [](const Item& x, const Item& y) { return x.d < y.d; });
    // the sample's q-weighted quantile of the remaining mass +- 3 standard deviations of its
    // CDF there (with the effective sample size of the weights) and a bit
    const C n_eff = total * total / total_sq;
    // the target as a fraction of the current items' q-mass (the whole row's is 1)
    C target = mass_cur > 0 ? (alpha - below_total) / mass_cur : C(0);
    target = target < 0 ? C(0) : (target > 1 ? C(1) : target);
    const C delta = C(3) * std::sqrt(target * (C(1) - target) / n_eff + C(1) / (n_eff * n_eff)) + C(0.01);
    int il = -1, ih = SAMPLE;
    C cum = 0;
    for (int s = 0; s < SAMPLE; ++s) {
      cum += smp[s].q;
      if (il < 0 && cum >= (target - delta) * total) il = s;
      if (cum >= (target + delta) * total) {
        ih = s + 1;
        break;
      }
    }
    const C lo = il <= 0 ? -inf : smp[il - 1].d, hi = ih >= SAMPLE ? inf : smp[ih].d;
    // one vector sweep: the q-mass below lo, and the support items in [lo, hi] copied
    const Vec<C> vlo = splat(lo), vhi = splat(hi), zero = splat<C>(0);
    Vec<C> below_v = zero, in_v = zero, max_v = splat(-inf);
    C* od = dc + used;
    C* oq = qc + used;
    int64_t m = 0;
    auto step = [&](Vec<C> dv, Vec<C> qv) {
      auto in = (dv >= vlo) & (dv <= vhi) & (qv > zero);
      below_v += dv < vlo ? qv : zero;
      in_v += in ? qv : zero;
      max_v = in ? vmax<C>(max_v, dv) : max_v;
      compress_store<C>(oq + m, qv, in);
      m += compress_store<C>(od + m, dv, in);
    };
    int64_t j = 0;
    for (; j + W <= n_cur; j += W) step(load(cd + j), load(cq + j));
    if (j < n_cur) step(load_part(cd + j, n_cur - j, std::numeric_limits<C>::quiet_NaN()), load_part(cq + j, n_cur - j, C(0)));
    const C mass_below = below_total + hsum<C>(below_v), mass_in = hsum<C>(in_v);
    // tau* is in the bracket when nothing below lo reaches alpha and F(hi) does
    if (!((lo == -inf || mass_below < alpha) && mass_below + mass_in >= alpha && m > 0) || m == n_cur) break;
    below_total = mass_below;
    mass_cur = mass_in;
    dmax_cur = hmax<C>(max_v);
    cd = od;
    cq = oq;
    n_cur = m;
    used += m + W;
    narrowed = true;
  }
  if (narrowed) return weighted_quantile(const_cast<C*>(cd), const_cast<C*>(cq), n_cur, alpha, dmax_cur, below_total);
  int64_t m = 0;
  C dmax = -inf;
  for (int64_t j = 0; j < n; ++j) {
    if (q[j] > 0) {
      dc[m] = d[j];
      qc[m] = q[j];
      dmax = d[j] > dmax ? d[j] : dmax;
      ++m;
    }
  }
  return m ? weighted_quantile(dc, qc, m, alpha, dmax) : -inf;
}

}  // namespace rsa::RSA_ISA
