// Portable SIMD on GCC/Clang vector extensions: vectors of RSA_VEC_BYTES bytes (32: 8 floats or
// 4 doubles; 64: 16 floats or 8 doubles). The kernels are compiled once per instruction-set
// level (rsa_kernels/extension.py), each build with its own flags, RSA_VEC_BYTES and namespace
// RSA_ISA: portable (the target's baseline, 32), avx2 (-march=x86-64-v3, 32), avx512
// (-march=x86-64-v4, 64). With those flags the vectors compile to AVX2/FMA or AVX-512; on any
// other target the compiler splits them into what the machine has, so the same source builds
// everywhere and the wide level's logic is the narrow one's at another width.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX__) || defined(__FMA__)
#include <immintrin.h>
#endif

#ifndef RSA_VEC_BYTES
#define RSA_VEC_BYTES 32
#endif
#ifndef RSA_ISA
#define RSA_ISA native
#endif
static_assert(RSA_VEC_BYTES == 32 || RSA_VEC_BYTES == 64, "RSA_VEC_BYTES: 32 or 64");

// Every level's code has its own namespace (and its own shared library), so no symbol of one
// level can stand in for another's.
namespace rsa {
inline namespace RSA_ISA {

// Values a vector store may write past the last one kept (compress_store): the widest level's
// float vector, so that buffers sized by the callers (rsa_kernels/backends/cpu_slices.py) fit
// every level.
constexpr int64_t SLACK = 16;

template <typename C> struct Simd;

template <> struct Simd<float> {
  static constexpr int W = RSA_VEC_BYTES / 4;
  typedef float V __attribute__((vector_size(RSA_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(RSA_VEC_BYTES)));
  typedef int32_t Bits;
  // exp(x) is 0 below LO (under half the smallest subnormal) and overflows to inf above HI
  static constexpr float LO = -104.0f, HI = 88.8f;
  static constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
  static constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr Bits BIAS = 127, MANT = 23;
};

template <> struct Simd<double> {
  static constexpr int W = RSA_VEC_BYTES / 8;
  typedef double V __attribute__((vector_size(RSA_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(RSA_VEC_BYTES)));
  typedef int64_t Bits;
  static constexpr double LO = -746.0, HI = 709.8;
  static constexpr double LN2_HI = 0.693147180369123816490, LN2_LO = 1.90821492927058770002e-10;
  static constexpr double MAGIC = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr Bits BIAS = 1023, MANT = 52;
};

template <typename C> using Vec = typename Simd<C>::V;
template <typename C> using IVec = typename Simd<C>::I;
template <typename C> using Bits = typename Simd<C>::Bits;
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

// The vector helpers below map to single AVX2/FMA (x86-64-v3) or AVX-512 (x86-64-v4)
// instructions where the build has them and the width matches, and to plain vector
// arithmetic elsewhere.

// a * b + c. With FMA it is one rounding; the file is built with -ffp-contract=off, so only
// the places that call this use FMA, and they are the same code in forward and backward.
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
#if RSA_VEC_BYTES == 64 && defined(__AVX512F__)
  return (Vec<float>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif RSA_VEC_BYTES == 32 && defined(__FMA__)
  return (Vec<float>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// The float exp's steps in FMA; the double exp keeps separate roundings (its accuracy has
// room to spare, and float64 results stay what they were).
inline Vec<float> mul_add(Vec<float> a, Vec<float> b, Vec<float> c) { return fmadd(a, b, c); }
inline Vec<double> mul_add(Vec<double> a, Vec<double> b, Vec<double> c) { return a * b + c; }

// True when any lane of a comparison mask is set.
template <typename C> inline bool any(IVec<C> mask) {
#if RSA_VEC_BYTES == 64 && defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask) != 0;
#elif RSA_VEC_BYTES == 32 && defined(__AVX__)
  return !_mm256_testz_si256((__m256i)mask, (__m256i)mask);
#else
  Bits<C> lanes[Simd<C>::W];
  std::memcpy(lanes, &mask, sizeof mask);
  for (int i = 0; i < Simd<C>::W; ++i)
    if (lanes[i]) return true;
  return false;
#endif
}

// float exp(r) for |r| <= ln2/2: 1 + r + r^2 P(r), P of degree 4 fitted for the least
// maximum relative error on that interval (3.6e-9 with these float32 coefficients, about
// 0.03 ulp; the rest of the error is rounding). Horner in 6 FMAs; at most 1 ulp with the
// range reduction below over every float (bench/cpu_exp_exhaustive.cpp; tests/test_cpu_exp.py
// checks a dense sample).
inline Vec<float> exp_poly(Vec<float> r) {
  Vec<float> p = splat(1.38145440723747015e-3f);
  p = fmadd(p, r, splat(8.36874544620513916e-3f));
  p = fmadd(p, r, splat(4.16683889925479889e-2f));
  p = fmadd(p, r, splat(1.66665211319923401e-1f));
  p = fmadd(p, r, splat(4.99999940395355225e-1f));
  p = fmadd(p, r, splat(1.0f));
  return fmadd(p, r, splat(1.0f));
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
// This general form is the double exp, and the float exp's path for vectors with a lane
// outside [-87, 88] (subnormal, zero or infinite results, or a result within a factor 2 of
// overflow); both float paths share exp_poly, so they give the same bits where both apply.
template <typename C> inline Vec<C> fexp_general(Vec<C> x) {
  using S = Simd<C>;
  using I = IVec<C>;
  x = x < S::LO ? splat<C>(S::LO) : x;  // comparisons with NaN are false: NaN passes through
  x = x > S::HI ? splat<C>(S::HI) : x;
  Vec<C> t = mul_add(x, splat(C(1.4426950408889634)), splat<C>(S::MAGIC));  // round(x / ln2) in the low mantissa bits
  I bits_t, bits_m;
  std::memcpy(&bits_t, &t, sizeof t);
  Vec<C> mv = splat<C>(S::MAGIC);
  std::memcpy(&bits_m, &mv, sizeof mv);
  I n = bits_t - bits_m;
  Vec<C> nf = t - S::MAGIC;
  Vec<C> r = mul_add(nf, splat<C>(-S::LN2_HI), x);
  r = mul_add(nf, splat<C>(-S::LN2_LO), r);
  Vec<C> p = exp_poly(r);
  I n1 = n >> 1, n2 = n - n1;  // both in the normal exponent range for any clamped x
  I e1 = (n1 + S::BIAS) << S::MANT, e2 = (n2 + S::BIAS) << S::MANT;
  Vec<C> s1, s2;
  std::memcpy(&s1, &e1, sizeof s1);
  std::memcpy(&s2, &e2, sizeof s2);
  return p * s1 * s2;
}

// The lanes the fast float path cannot take (a double has no fast path: all of them).
template <typename C> inline IVec<C> exp_slow_lanes(Vec<C> x) { return (x == x) | (x != x); }
template <> inline IVec<float> exp_slow_lanes<float>(Vec<float> x) { return (x < -87.0f) | (x > 88.0f); }

// float, every lane in [-87, 88] (or NaN): no clamps and no split scaling; 2^n comes from one
// shift of t's bits, where t = x / ln2 rounded + (1.5 2^23 + 127), whose low bits hold
// n + 127, the biased exponent. Gives fexp_general's bits on these lanes. 14 instructions.
template <typename C> inline Vec<C> fexp_fast(Vec<C> x) { return fexp_general<C>(x); }
template <> inline Vec<float> fexp_fast<float>(Vec<float> x) {
  using S = Simd<float>;
  constexpr float MAGIC_BIASED = S::MAGIC + S::BIAS;
  Vec<float> t = fmadd(x, splat(1.44269504088896341f), splat(MAGIC_BIASED));
  Vec<float> nf = t - MAGIC_BIASED;
  Vec<float> r = fmadd(nf, splat(-S::LN2_HI), x);
  r = fmadd(nf, splat(-S::LN2_LO), r);
  IVec<float> e;
  std::memcpy(&e, &t, sizeof t);
  e = e << S::MANT;  // (n + 127) << 23: the exponent field of 2^n; the magic's bits shift out
  Vec<float> scale;
  std::memcpy(&scale, &e, sizeof e);
  return exp_poly(r) * scale;
}

// exp of one vector, or of two or three with one range check between them (one branch, and
// the exps free to interleave): the kernels' hot loops use these.
template <typename C> inline Vec<C> fexp(Vec<C> x) {
  return any<C>(exp_slow_lanes<C>(x)) ? fexp_general<C>(x) : fexp_fast<C>(x);
}

template <typename C> inline void fexp2(Vec<C> a, Vec<C> b, Vec<C>& ea, Vec<C>& eb) {
  if (any<C>(exp_slow_lanes<C>(a) | exp_slow_lanes<C>(b))) {
    ea = fexp_general<C>(a);
    eb = fexp_general<C>(b);
  } else {
    ea = fexp_fast<C>(a);
    eb = fexp_fast<C>(b);
  }
}

template <typename C> inline void fexp3(Vec<C> a, Vec<C> b, Vec<C> c, Vec<C>& ea, Vec<C>& eb, Vec<C>& ec) {
  if (any<C>(exp_slow_lanes<C>(a) | exp_slow_lanes<C>(b) | exp_slow_lanes<C>(c))) {
    ea = fexp_general<C>(a);
    eb = fexp_general<C>(b);
    ec = fexp_general<C>(c);
  } else {
    ea = fexp_fast<C>(a);
    eb = fexp_fast<C>(b);
    ec = fexp_fast<C>(c);
  }
}

// ---- Compression: the lanes a mask selects, moved to the front and stored ---------------
// Writes a whole vector at dst (room for W values past the last kept one is the caller's
// business) and returns how many lanes were kept, in their order.

// For each mask of W lanes, the 32-bit lane indices that gather the selected lanes first
// (a double lane is two 32-bit lanes).
template <int W> struct CompressTable {
  alignas(32) int32_t idx[1 << W][8];
  constexpr CompressTable() : idx() {
    constexpr int per = 8 / W;  // 32-bit lanes per element
    for (int m = 0; m < (1 << W); ++m) {
      int k = 0;
      for (int lane = 0; lane < W; ++lane)
        if (m >> lane & 1) {
          for (int h = 0; h < per; ++h) idx[m][k * per + h] = lane * per + h;
          ++k;
        }
      for (; k < W; ++k)
        for (int h = 0; h < per; ++h) idx[m][k * per + h] = h;
    }
  }
};

template <typename C> inline int compress_store(C* dst, Vec<C> x, IVec<C> mask) {
  constexpr int W = Simd<C>::W;
#if RSA_VEC_BYTES == 64 && defined(__AVX512F__)
  // compress in a register, then one whole store (a compress straight to memory is
  // microcoded and slow on some CPUs, Zen 4 among them)
  if constexpr (W == 16) {
    const __mmask16 k = _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask);
    const __m512 moved = _mm512_maskz_compress_ps(k, (__m512)x);
    std::memcpy(dst, &moved, sizeof moved);
    return __builtin_popcount(unsigned(k));
  } else {
    const __mmask8 k = _mm512_test_epi64_mask((__m512i)mask, (__m512i)mask);
    const __m512d moved = _mm512_maskz_compress_pd(k, (__m512d)x);
    std::memcpy(dst, &moved, sizeof moved);
    return __builtin_popcount(unsigned(k));
  }
#elif RSA_VEC_BYTES == 32 && defined(__AVX2__)
  static constexpr CompressTable<W> table{};
  int bits;
  if constexpr (W == 8) bits = _mm256_movemask_ps((__m256)mask);
  else bits = _mm256_movemask_pd((__m256d)mask);
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.idx[bits]));
  const __m256 moved = _mm256_permutevar8x32_ps((__m256)x, perm);
  std::memcpy(dst, &moved, sizeof moved);
  return __builtin_popcount(unsigned(bits));
#else
  C lanes[W];
  Bits<C> keep[W];
  std::memcpy(lanes, &x, sizeof x);
  std::memcpy(keep, &mask, sizeof mask);
  int k = 0;
  for (int i = 0; i < W; ++i)
    if (keep[i]) dst[k++] = lanes[i];
  return k;
#endif
}

template <typename C> inline C fexp1(C x) { return fexp<C>(splat<C>(x))[0]; }

}  // namespace RSA_ISA
}  // namespace rsa
