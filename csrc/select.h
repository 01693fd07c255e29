// Order statistics of one row's deviations D, in expected linear time (no full sort).
#pragma once

#include <algorithm>
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
// fallback). The n pairs (d, q > 0, no NaN) are permuted. Quickselect with a three-way
// partition: ties in d form one block, so the atom at tau* is never split.
template <typename C> C weighted_quantile(C* d, C* q, int64_t n, C alpha, C dmax) {
  int64_t lo = 0, hi = n;
  C below = 0;  // q-mass of the items known to lie below d[lo, hi)
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

// torch.quantile(x, level) with linear interpolation over all n values (-inf allowed, no
// NaN), computed exactly as rsa_kernels.reference.interpolated_quantile: the position in
// double, the interpolation in C with separate roundings (the file is built without FMA
// contraction). x is permuted.
template <typename C> C interpolated_quantile(C* x, int64_t n, double level) {
  double pos = level * double(n - 1);
  int64_t lo = int64_t(pos);
  if (lo > n - 1) lo = n - 1;
  int64_t hi = std::min(lo + 1, n - 1);
  double frac = pos - double(lo);
  std::nth_element(x, x + lo, x + n);
  C a = x[lo];
  if (frac == 0.0) return a;
  C b = hi == lo ? a : *std::min_element(x + lo + 1, x + n);
  // from -inf the formula gives -inf + inf = NaN; torch.quantile (and the reference) say -inf
  if (a == b || a == -std::numeric_limits<C>::infinity()) return a;
  C diff = b - a;
  C step = C(frac) * diff;
  return a + step;
}

}  // namespace rsa
