// Exhaustive accuracy check of the cpu kernels' float32 exp (csrc/simd.h) over all 2^32
// inputs against std::exp in double, correctly rounded. Not part of the test suite (minutes
// on 1 core); tests/test_cpu_exp.py checks a dense sample. Build and run:
//
//   g++ -O3 -march=x86-64-v3 -ffp-contract=off -Icsrc bench/cpu_exp_exhaustive.cpp -o /tmp/exp_all && /tmp/exp_all
//
// Prints the largest error in ulps of the rounded result (subnormal results: in units of
// the smallest subnormal) and the number of inputs whose rounded exp is 0, inf or NaN but
// whose computed one is not exactly that.
#include "simd.h"
#include <cstdio>
#include <cmath>
#include <cstring>
using namespace rsa;
int main() {
  double maxulp = 0; float worst = 0; long bad = 0, n = 0;
  for (uint64_t b = 0; b < (1ull << 32); b += 8) {
    uint32_t bits[8]; float x[8];
    for (int k = 0; k < 8; ++k) { bits[k] = uint32_t(b + k); }
    std::memcpy(x, bits, sizeof x);
    Vec<float> y = fexp<float>(load(x));
    float out[8]; std::memcpy(out, &y, sizeof out);
    for (int k = 0; k < 8; ++k) {
      double ref = std::exp(double(x[k]));
      float rf = float(ref);
      if (std::isnan(x[k])) { if (!std::isnan(out[k])) ++bad; continue; }
      if (std::isinf(rf) || rf == 0) { if (out[k] != rf) { if (bad < 5) printf("edge x=%a got %a want %a\n", x[k], out[k], rf); ++bad; } continue; }
      // ulp at the reference (subnormal: fixed ulp)
      int e; std::frexp(rf, &e);
      double ulp = std::ldexp(1.0, std::max(e - 24, -149));
      double err = std::fabs(double(out[k]) - ref) / ulp;
      ++n;
      if (err > maxulp) { maxulp = err; worst = x[k]; }
    }
  }
  printf("max error %.3f ulp at x=%.9g (%ld finite nonzero results), %ld edge mismatches\n", maxulp, worst, n, bad);
}
