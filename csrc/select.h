// Order statistics of one row's deviations D, in expected linear time (no full sort).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace rsa {

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
constexpr int64_t MIN_BRACKETED = 4096;  // below this, select directly

// Copies the items of x in [lo, hi] to out (room for n), returns their number; `below` gets
// the number of items < lo. Branch-free: every item is written, the index advances on a hit.
template <typename C> int64_t filter_range(const C* x, int64_t n, C lo, C hi, C* out, int64_t& below) {
  int64_t m = 0, b = 0;
  for (int64_t j = 0; j < n; ++j) {
    const C v = x[j];
    out[m] = v;
    m += (v >= lo) & (v <= hi);
    b += v < lo;
  }
  below = b;
  return m;
}

// interpolated_quantile(x, n, level) without permuting x; buf has room for n values.
template <typename C> C bracketed_interpolated_quantile(const C* x, int64_t n, double level, C* buf) {
  const QuantileRanks k = quantile_ranks(n, level);
  if (n >= MIN_BRACKETED) {
    C smp[SAMPLE];
    const int64_t stride = n / SAMPLE;
    for (int s = 0; s < SAMPLE; ++s) smp[s] = x[s * stride];
    std::sort(smp, smp + SAMPLE);
    // the target's place in the sample, +- 3 standard deviations of a sample rank and a bit
    const double f = double(k.lo) / double(n - 1);
    const double c = f * (SAMPLE - 1), margin = 3.0 * std::sqrt(SAMPLE * f * (1.0 - f)) + 4.0;
    const int64_t il = int64_t(std::floor(c - margin)), ih = int64_t(std::ceil(c + margin)) + 1;
    const C inf = std::numeric_limits<C>::infinity();
    const C lo = il < 0 ? -inf : smp[il], hi = ih >= SAMPLE ? inf : smp[ih];
    int64_t below = 0;
    const int64_t m = filter_range(x, n, lo, hi, buf, below);
    const int64_t need = k.frac == 0.0 ? k.lo : k.hi;  // the highest rank needed
    if (below <= k.lo && need < below + m) {
      const int64_t j = k.lo - below;
      std::nth_element(buf, buf + j, buf + m);
      C a = buf[j];
      if (k.frac == 0.0) return a;
      C b = k.hi == k.lo ? a : *std::min_element(buf + j + 1, buf + m);
      return interpolate(a, b, k.frac);
    }
  }
  std::copy(x, x + n, buf);
  return interpolated_quantile(buf, n, level);
}

// weighted_quantile over the items of (d, q) with q > 0 (d = -inf where q = 0, no NaN),
// without permuting them; dc and qc have room for n values each.
template <typename C> C bracketed_weighted_quantile(const C* d, const C* q, int64_t n, C alpha, C* dc, C* qc) {
  if (n >= MIN_BRACKETED) {
    struct Item {
      C d, q;
    };
    Item smp[SAMPLE];
    const int64_t stride = n / SAMPLE;
    C total = 0, total_sq = 0;
    for (int s = 0; s < SAMPLE; ++s) {
      smp[s] = {d[s * stride], q[s * stride]};
      total += smp[s].q;
      total_sq += smp[s].q * smp[s].q;
    }
    if (total > 0) {
      std::sort(smp, smp + SAMPLE, [](const Item& x, const Item& y) { return x.d < y.d; });
      // the sample's q-weighted alpha-quantile +- 3 standard deviations of its CDF there
      // (with the effective sample size of the weights) and a bit
      const C n_eff = total * total / total_sq;
      const C delta = C(3) * std::sqrt(alpha * (C(1) - alpha) / n_eff) + C(0.02);
      int il = -1, ih = SAMPLE;
      C cum = 0;
      for (int s = 0; s < SAMPLE; ++s) {
        cum += smp[s].q;
        if (il < 0 && cum >= (alpha - delta) * total) il = s;
        if (cum >= (alpha + delta) * total) {
          ih = s + 1;
          break;
        }
      }
      const C inf = std::numeric_limits<C>::infinity();
      const C lo = il <= 0 ? -inf : smp[il - 1].d, hi = ih >= SAMPLE ? inf : smp[ih].d;
      // one branch-free sweep: the q-mass below lo, and the support items in [lo, hi]
      int64_t m = 0;
      C mass_below = 0, mass_in = 0, dmax = -inf;
      for (int64_t j = 0; j < n; ++j) {
        const C dv = d[j], qv = q[j];
        dc[m] = dv;
        qc[m] = qv;
        const bool in = (dv >= lo) & (dv <= hi) & (qv > 0);
        m += in;
        mass_below += dv < lo ? qv : C(0);
        mass_in += in ? qv : C(0);
        dmax = in && dv > dmax ? dv : dmax;
      }
      // tau* is in the bracket when nothing below lo reaches alpha and F(hi) does
      if ((lo == -inf || mass_below < alpha) && mass_below + mass_in >= alpha && m > 0)
        return weighted_quantile(dc, qc, m, alpha, dmax, mass_below);
    }
  }
  int64_t m = 0;
  C dmax = -std::numeric_limits<C>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (q[j] > 0) {
      dc[m] = d[j];
      qc[m] = q[j];
      dmax = d[j] > dmax ? d[j] : dmax;
      ++m;
    }
  }
  return m ? weighted_quantile(dc, qc, m, alpha, dmax) : -std::numeric_limits<C>::infinity();
}

}  // namespace rsa
