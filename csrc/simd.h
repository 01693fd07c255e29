// Portable SIMD on GCC/Clang vector extensions: 256-bit vectors of float (8) or double (4).
// With -march=x86-64-v3 they compile to AVX2/FMA; on any other target the compiler splits
// them into what the machine has, so the same source builds everywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace rsa {

template <typename C> struct Simd;

template <> struct Simd<float> {
  static constexpr int W = 8;
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef int32_t Bits;
  // exp(x) is 0 below LO (under half the smallest subnormal) and overflows to inf above HI
  static constexpr float LO = -104.0f, HI = 88.8f;
  static constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
  static constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr Bits BIAS = 127, MANT = 23;
};

template <> struct Simd<double> {
  static constexpr int W = 4;
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  typedef int64_t Bits;
  static constexpr double LO = -746.0, HI = 709.8;
  static constexpr double LN2_HI = 0.693147180369123816490, LN2_LO = 1.90821492927058770002e-10;
  static constexpr double MAGIC = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr Bits BIAS = 1023, MANT = 52;
};

template <typename C> using Vec = typename Simd<C>::V;
template <typename C> using IVec = typename Simd<C>::I;
template <typename C> constexpr int width() { return Simd<C>::W; }

template <typename C> inline Vec<C> splat(C x) { return Vec<C>{} + x; }

template <typename C> inline Vec<C> load(const C* p) {
  Vec<C> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The first n (< W) lanes from p, the rest `fill`: the row's tail goes through the same code.
template <typename C> inline Vec<C> load_part(const C* p, int64_t n, C fill) {
  Vec<C> v = splat<C>(fill);
  std::memcpy(&v, p, n * sizeof(C));
  return v;
}

template <typename C> inline void store(C* p, Vec<C> v) { std::memcpy(p, &v, sizeof v); }

template <typename C> inline void store_part(C* p, Vec<C> v, int64_t n) { std::memcpy(p, &v, n * sizeof(C)); }

template <typename C> inline Vec<C> vmax(Vec<C> a, Vec<C> b) { return a > b ? a : b; }

// Horizontal reductions in a fixed lane order, so a row's result never depends on threads.
template <typename C> inline C hsum(Vec<C> v) {
  C lanes[Simd<C>::W];
  std::memcpy(lanes, &v, sizeof v);
  C s = 0;
  for (int i = 0; i < Simd<C>::W; ++i) s += lanes[i];
  return s;
}

template <typename C> inline C hmax(Vec<C> v) {
  C lanes[Simd<C>::W];
  std::memcpy(lanes, &v, sizeof v);
  C m = lanes[0];
  for (int i = 1; i < Simd<C>::W; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}

template <typename C> inline Vec<C> select(IVec<C> mask, Vec<C> a, Vec<C> b) { return mask ? a : b; }

// Polynomial exp(r) for |r| <= ln2/2 (Taylor; its error is below half an ulp at these degrees).
inline Vec<float> exp_poly(Vec<float> r) {
  Vec<float> p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

inline Vec<double> exp_poly(Vec<double> r) {
  static constexpr double c[] = {1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800,
                                 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120,
                                 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};
  Vec<double> p = splat(c[0]);
  for (int i = 1; i < 14; ++i) p = p * r + c[i];
  return p;
}

// exp with IEEE edge behaviour: exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN, and correct
// subnormal results (2^n is applied as two normal factors), because "q > 0" decides which
// vocabulary items belong to the reference's support and must agree with torch's exp.
template <typename C> inline Vec<C> fexp(Vec<C> x) {
  using S = Simd<C>;
  using I = IVec<C>;
  x = x < S::LO ? splat<C>(S::LO) : x;  // comparisons with NaN are false: NaN passes through
  x = x > S::HI ? splat<C>(S::HI) : x;
  Vec<C> t = x * C(1.4426950408889634) + S::MAGIC;  // round(x / ln2) in the low mantissa bits
  I bits_t, bits_m;
  std::memcpy(&bits_t, &t, sizeof t);
  Vec<C> mv = splat<C>(S::MAGIC);
  std::memcpy(&bits_m, &mv, sizeof mv);
  I n = bits_t - bits_m;
  Vec<C> nf = t - S::MAGIC;
  Vec<C> r = x - nf * S::LN2_HI - nf * S::LN2_LO;
  Vec<C> p = exp_poly(r);
  I n1 = n >> 1, n2 = n - n1;  // both in the normal exponent range for any clamped x
  I e1 = (n1 + S::BIAS) << S::MANT, e2 = (n2 + S::BIAS) << S::MANT;
  Vec<C> s1, s2;
  std::memcpy(&s1, &e1, sizeof s1);
  std::memcpy(&s2, &e2, sizeof s2);
  return p * s1 * s2;
}

template <typename C> inline C fexp1(C x) { return fexp<C>(splat<C>(x))[0]; }

}  // namespace rsa
