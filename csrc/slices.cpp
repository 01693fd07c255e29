// Slice kernels of the vocabulary-parallel path: the per-row work on one rank's columns
// [v_k, v_k + w) that rsa_kernels/vocab_parallel/rows.py combines across the group with
// all-reduces (docs/distributed.md). Bound in rsa_kernels/backends/cpu_slices.py.
//
//   slice_partials  one read of each row (max, then 2 exps per item from L2, as forward_row):
//                   the slice's maxima, its exp-sums S, Sr under its own shifts, U = sum e u
//                   (kl), erm's log-sum, the label's logits where the slice holds it, and the
//                   largest zr where z = -inf; for cvar and ra_dpo_cvar a sample's bracket
//                   of the quantile in u = zr - z and (with candidate buffers) the items in
//                   it kept, those outside counted and summed (Collect);
//   slice_search    one level of the exact radix search of cvar / ra_dpo_cvar over the keys
//                   of D: level 0 histograms the top 8 key bits of every item (one read of the
//                   row); level 1 keeps the items under the chosen top digit as candidates
//                   (D, q) and histograms their next digit (done in level 0's read already
//                   for the digit a sample of the row predicts; otherwise one more read of
//                   the row); later levels work on the candidates only; level
//                   KEY_BITS / 8 closes the search (the q-mass at the selected key). Items that
//                   leave the candidates above the selection add to the sums above it (q D,
//                   q) and to its next larger key;
//   slice_bracket   level 0 of a search when the group agreed on a bracket of keys (from
//                   the slices' samples, which slice_partials draws): over the candidates
//                   slice_partials kept (or one read of the row: ra_dpo_cvar's union) it
//                   weighs the items below and above it (vector compares, no scatter) and
//                   keeps those inside as the candidates, a small fraction of the row; the
//                   later levels of slice_search narrow them;
//   slice_candidates, slice_gathered_pick, slice_close_gathered  the gathered end of a
//                   float32 search: the candidates left as one payload row, the selection
//                   from every rank's payloads, the close over them;
//   slice_tail_sums sum q D and q over D > a per-row threshold (ra_dpo_cvar, when rounding
//                   puts the interpolated quantile on the next value);
//   slice_backward  backward_row over the slice: the label term only where the slice holds it.
//
// Rows are the row indices into z the chunk covers; z and zr are float32 or float64 of the
// same dtype (cpu_slices.py converts 16-bit input first), unit stride in V, any row stride.
// Every row is one task on torch's intra-op threads and its results depend on its own data
// only, so they do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "rows.h"

namespace rsa::RSA_ISA {  // simd.h: one namespace per instruction-set level
namespace {

constexpr int RADIX = 8;                // key bits per level
constexpr int BINS = 1 << RADIX;
constexpr int64_t NONE = std::numeric_limits<int64_t>::max();  // "no key above the selection"
constexpr int64_t BRACKETED = -2;  // the search state's guess after a bracketed level 0

// Sortable keys of D (rsa_kernels/backends/slice_keys.py): the IEEE bits, negatives
// flipped, the sign bit set for the others, as unsigned BITS-bit numbers; -0 is made +0
// first (one key for the two zeros), NaN takes the largest key. Whole vectors at a time.
template <typename C> struct Keys {
  static constexpr int BITS = 8 * sizeof(C);
  using Lane = std::conditional_t<BITS == 32, uint32_t, uint64_t>;
  typedef Lane U __attribute__((vector_size(RSA_VEC_BYTES)));
  static constexpr Lane TOP = Lane(1) << (BITS - 1);
  static U of(Vec<C> d) {
    d = d + C(0);
    U b;
    std::memcpy(&b, &d, sizeof b);
    const U k = (b >> (BITS - 1)) != 0 ? ~b : (b | TOP);
    return d != d ? U{} - 1 : k;
  }
  // a signed number of the same order (vector MIN), and back to slice_keys.key_order
  static IVec<C> order(U k) { return (IVec<C>)(k ^ TOP); }
  static int64_t key_order(int64_t o) { return BITS == 64 ? o : int64_t(uint32_t(o) ^ uint32_t(TOP)); }
};

// Digit `level` (0 = the top 8 bits) of a key.
template <typename C> inline int digit(uint64_t key, int level) {
  return int((key >> (Keys<C>::BITS - RADIX * (level + 1))) & (BINS - 1));
}

template <typename C> const C* row_of(const at::Tensor& t, int64_t i) { return t.const_data_ptr<C>() + i * t.stride(0); }

// q and D of W items, with exactly the operations of forward_row / backward_row: D in SPEC
// section 1's one form, (zr - z) + (A - Ar), so that equal zr - z tie on every rank.
template <typename C> struct Deviation {
  Vec<C> q, d;
  Deviation(Vec<C> z, Vec<C> zr, Vec<C> va, Vec<C> var) {
    q = fexp<C>(zr - var);
    d = q != splat<C>(0) ? (zr - z) + (va - var) : splat(NEG_INF<C>);
  }
};

// Pass 1 of the forward for one row of a slice: out[0..9) = max z, max zr, S, Sr, U, T, z_y,
// zr_y, M. Items with z = -inf (D = +inf where q != 0) are left out of U and T: whether they
// count depends on q = exp(zr - Ar), known only with the group's Ar, so M = their largest zr
// goes along instead (the kl and erm of the row are +inf if exp(M - Ar) > 0).
// Reads of rows from memory: while a row's sweep runs from L2, the next row the thread will
// read (nz, nr; null for none) is prefetched into L2, as forward_row does.
template <typename C> inline void prefetch_line(const C* nz, const C* nr, int64_t i) {
  constexpr int64_t LINE = 64 / sizeof(C);
  if (nz && i % LINE == 0) {
    __builtin_prefetch(nz + i, 0, 2);
    __builtin_prefetch(nr + i, 0, 2);
  }
}

// Items (u, e) sorted by u: an LSD radix sort of u's sortable keys, a byte a pass (std::sort's
// mispredicted comparisons cost several times more on a row's small sample).
template <typename Item, int S> void sort_by_u(Item (&items)[S]) {
  using C = decltype(items[0].u);
  using K = Keys<C>;
  typename K::Lane key[S], key2[S];
  Item tmp[S];
  for (int s = 0; s < S; ++s) {
    Vec<C> one = splat(items[s].u);
    const typename K::U k = K::of(one);
    key[s] = k[0];
  }
  Item* src = items;
  Item* dst = tmp;
  typename K::Lane* ks = key;
  typename K::Lane* kd = key2;
  for (int shift = 0; shift < K::BITS; shift += 8) {
    int count[257] = {0};
    for (int s = 0; s < S; ++s) ++count[((ks[s] >> shift) & 255) + 1];
    if (count[((ks[0] >> shift) & 255) + 1] == S) continue;  // one digit for all: nothing moves
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (int s = 0; s < S; ++s) {
      const int at = count[(ks[s] >> shift) & 255]++;
      dst[at] = src[s];
      kd[at] = ks[s];
    }
    std::swap(src, dst);
    std::swap(ks, kd);
  }
  if (src != items) std::copy(src, src + S, items);
}

// ra_dpo_cvar's bracket of its quantile from this slice's row (still in L2 after the sweep):
// the order statistics of a strided sample of u = zr - z around the fraction `level`, +- 4
// standard deviations of a sample rank and a bit (-inf / +inf where the sample cannot bound
// it). D = u + (A - Ar), monotone in u, so the group's quantile of D lies, but for an unlucky
// sample, in the union of the slices' brackets shifted by A - Ar; the search checks that it
// does (rsa_kernels/vocab_parallel/quantile.py), so the sample decides the time, never the
// result. Items outside the reference's support (zr = -inf) have D = -inf, those the policy
// rules out D = +inf (NaN: last, as its key).
template <typename C> void sample_bracket(const C* z, const C* zr, int64_t v, double level, C* out) {
  constexpr int S = 512;
  const C inf = std::numeric_limits<C>::infinity();
  out[0] = -inf;
  out[1] = inf;
  if (level < 0 || v < 4 * S) return;
  C smp[S];
  const int64_t step = v / S;
  for (int s = 0; s < S; ++s) {
    const C a = z[s * step], b = zr[s * step];
    const C u = b - a;
    smp[s] = b == -inf ? -inf : (a == -inf || u != u) ? inf : u;
  }
  const double c = level * (S - 1), margin = 4.0 * std::sqrt(S * level * (1.0 - level)) + 4.0;
  const int64_t il = int64_t(std::floor(c - margin)), ih = std::min<int64_t>(int64_t(std::ceil(c + margin)) + 1, S);
  if (ih < S) {
    std::nth_element(smp, smp + ih, smp + S);
    out[1] = smp[ih];
  }
  if (il >= 0 && il < ih) {
    std::nth_element(smp, smp + il, smp + ih);
    out[0] = smp[il];
  }
}

// cvar's and ra_dpo_cvar's candidates of their quantile, collected in the same read (cz, cr not
// null): the items whose raw u = zr - z lies in this slice's sample bracket [lo, hi] (or is NaN)
// are kept as (z, zr) pairs; those below are counted and their Sr summed, those above counted
// and summed as kl is (Sr, U over them), with their smallest zr (is q = 0 possible for one of them, with the
// group's Ar?) and the largest |z|, |zr| of the items with a finite u (no longer read: D is
// formed as u + (A - Ar), monotone in u, so the bracket needs no rounding bound; issue 30).
// rsa_kernels/vocab_parallel/quantile.py proves from these, with the group's numbers,
// whether the group's quantile lies among the candidates.
template <typename C> struct Collect {
  C* cz;
  C* cr;
  int64_t m = 0;
  Vec<C> lo, hi, sr = splat<C>(0), su = splat<C>(0), sb = splat<C>(0);
  IVec<C> nb{}, nh{}, iota;  // nb, nh: minus the counts (a true comparison is -1)
  bool weighted, bounded_above;
  Collect(C* z, C* r, C l, C h, bool w)
      : cz(z), cr(r), lo(splat(l)), hi(splat(h)), weighted(w), bounded_above(h < std::numeric_limits<C>::infinity()) {
    for (int j = 0; j < width<C>(); ++j) iota[j] = j;
  }
  // the items of one vector (the first `lanes` of the row's tail where TAIL)
  template <bool TAIL> void add(Vec<C> zv, Vec<C> rv, Vec<C> u, Vec<C> er, int lanes) {
    const Vec<C> zero = splat<C>(0), du = rv - zv;
    IVec<C> low = du < lo, up = du > hi, kept = ~(low | up);  // NaN u: kept
    if constexpr (TAIL) {
      const IVec<C> live = iota < lanes;
      low &= live;
      up &= live;
      kept &= live;
    }
    nb += low;
    if (weighted) sb += low ? er : zero;
    if (bounded_above) {
      nh += up;
      sr += up ? er : zero;
      su += (up & (er != zero)) ? er * u : zero;  // z = -inf: u = +inf, so +inf where q may be > 0
    }
    compress_store<C>(cz + m, zv, kept);
    m += compress_store<C>(cr + m, rv, kept);
  }
  // out[0..8): below, above, Sr and U above, the row's smallest finite zr, the largest |z|,
  // |zr| over its finite items, the candidates, Sr below (cvar)
  void finish(C* out, C zr_min, C big) const {
    constexpr int W = width<C>();
    Bits<C> b[W], h[W];
    std::memcpy(b, &nb, sizeof b);
    std::memcpy(h, &nh, sizeof h);
    int64_t below = 0, above = 0;
    for (int j = 0; j < W; ++j) {
      below -= b[j];
      above -= h[j];
    }
    out[0] = C(below);
    out[1] = C(above);
    out[2] = hsum<C>(sr);
    out[3] = hsum<C>(su);
    out[4] = zr_min;
    out[5] = big;
    out[6] = C(m);
    out[7] = hsum<C>(sb);
  }
};

// The maxima of z and zr as row_max2, and their smallest finite values, in the same read
// (which waits on memory: the minima cost nothing there).
template <typename C> void row_extrema(const C* z, const C* zr, int64_t v, C& mz, C& mr, C& nz, C& nr) {
  constexpr int W = width<C>();
  const Vec<C> ninf = splat(NEG_INF<C>), pinf = splat(std::numeric_limits<C>::infinity());
  Vec<C> a = ninf, b = ninf, c = pinf, d = pinf;
  auto take = [&](Vec<C> x, Vec<C> y) {
    a = vmax<C>(a, x);
    b = vmax<C>(b, y);
    c = (x != ninf) & (x < c) ? x : c;
    d = (y != ninf) & (y < d) ? y : d;
  };
  int64_t i = 0;
  for (; i + W <= v; i += W) take(load(z + i), load(zr + i));
  if (i < v) take(load_part(z + i, v - i, NEG_INF<C>), load_part(zr + i, v - i, NEG_INF<C>));
  mz = hmax<C>(a);
  mr = hmax<C>(b);
  nz = -hmax<C>(-c);
  nr = -hmax<C>(-d);
}

// cvar's bracket of its q-weighted quantile at `alpha` from this slice's row, as
// sample_bracket: a strided sample's (u, e = exp(zr - ar)) pairs, sorted by u, and the u where
// the sample's cumulative e reaches alpha -+ 4 standard deviations of its CDF there (the
// weights' effective sample size) and a bit. Within a slice q is e times one factor, so the
// group's quantile lies in the union of the slices' brackets but for unlucky samples.
template <typename C> void weighted_sample_bracket(const C* z, const C* zr, int64_t v, double alpha, C ar, C* out) {
  constexpr int S = 256, W = width<C>();
  const C inf = std::numeric_limits<C>::infinity();
  out[0] = -inf;
  out[1] = inf;
  if (v < 8 * S) return;
  struct Item {
    C u, e;
  };
  Item smp[S];
  alignas(64) C rs[W], es[W];
  const int64_t step = v / S;
  const Vec<C> var = splat(ar);
  double total = 0, total_sq = 0;
  for (int s = 0; s < S; s += W) {
    for (int j = 0; j < W; ++j) rs[j] = zr[(s + j) * step];
    store<C>(es, fexp<C>(load(rs) - var));
    for (int j = 0; j < W; ++j) {
      const C a = z[(s + j) * step], b = rs[j], u = b - a;
      smp[s + j] = {b == -inf ? -inf : (a == -inf || u != u) ? inf : u, es[j] == es[j] ? es[j] : C(0)};
      total += double(smp[s + j].e);
      total_sq += double(smp[s + j].e) * double(smp[s + j].e);
    }
  }
  if (!(total > 0)) return;
  sort_by_u(smp);
  const double n_eff = total * total / total_sq;
  const double delta = 4.0 * std::sqrt(alpha * (1.0 - alpha) / n_eff + 1.0 / (n_eff * n_eff)) + 0.02;
  int il = -1, ih = S;
  double cum = 0;
  for (int s = 0; s < S; ++s) {
    cum += double(smp[s].e);
    if (il < 0 && cum >= (alpha - delta) * total) il = s;
    if (cum >= (alpha + delta) * total) {
      ih = s + 1;
      break;
    }
  }
  out[0] = il <= 0 ? -inf : smp[il - 1].u;
  out[1] = ih >= S ? inf : smp[ih].u;
}

template <typename C>
void partials_row(const C* z, const C* zr, int64_t v, int64_t local, bool erm, C mu, double level, bool weighted,
                  C* out, const C* next_z, const C* next_r, C* cz, C* cr) {
  C mz, mr, nz = 0, nr = 0;  // nz, nr: the smallest finite z, zr (collecting only)
  if (cz)
    row_extrema(z, zr, v, mz, mr, nz, nr);
  else
    row_max2(z, zr, v, mz, mr);
  const C a = lse_shift(mz), ar = lse_shift(mr);
  if (weighted)  // the row is in L2 after the maxima's read
    weighted_sample_bracket(z, zr, v, level, ar, out + 9);
  else
    sample_bracket(z, zr, v, level, out + 9);
  const Vec<C> va = splat(a), var = splat(ar), ninf = splat(NEG_INF<C>), zero = splat<C>(0), vmu = splat(mu);
  Vec<C> sz = zero, sr = zero, su = zero, m_inf = ninf;
  OnlineLse<C> lse_t;
  Collect<C> col(cz, cr, out[9], out[10], weighted);
  constexpr int W = width<C>();
  auto sweep = [&](auto erm_tag, auto collect_tag) {
    constexpr bool IS_ERM = decltype(erm_tag)::value, COLLECT = decltype(collect_tag)::value;
    auto pass = [&](Vec<C> zv, Vec<C> rv, int lanes) {  // the tail's fill, -inf in both, adds nothing
      Vec<C> xz = zv - va, xr = rv - var, u = xr - xz, ez, er;
      const IVec<C> in = zv != ninf;  // NaN z stays in: NaN in gives NaN out
      if constexpr (IS_ERM) {
        Vec<C> t = xr + vmu * u, et;
        fexp3<C>(xz, xr, t - lse_t.m, ez, er, et);
        auto supp = (er != zero) & in;
        lse_t.add(supp ? t : ninf, supp ? et : zero);
      } else {
        fexp2<C>(xz, xr, ez, er);
      }
      sz += ez;
      sr += er;
      su += ((er != zero) & in) ? er * u : zero;
      m_inf = (zv == ninf) & (rv > m_inf) ? rv : m_inf;
      if constexpr (COLLECT) {
        if (lanes == W)
          col.template add<false>(zv, rv, u, er, W);
        else
          col.template add<true>(zv, rv, u, er, lanes);
      }
    };
    int64_t i = 0;
    for (; i + W <= v; i += W) {
      prefetch_line(next_z, next_r, i);
      pass(load(z + i), load(zr + i), W);
    }
    if (i < v) pass(load_part(z + i, v - i, NEG_INF<C>), load_part(zr + i, v - i, NEG_INF<C>), int(v - i));
  };
  if (erm)
    sweep(std::true_type{}, std::false_type{});
  else if (cz)
    sweep(std::false_type{}, std::true_type{});
  else
    sweep(std::false_type{}, std::false_type{});
  out[0] = mz;
  out[1] = mr;
  out[2] = hsum<C>(sz);
  out[3] = hsum<C>(sr);
  out[4] = hsum<C>(su);
  out[5] = erm ? lse_t.value() : NEG_INF<C>;
  out[6] = local >= 0 ? z[local] : C(0);
  out[7] = local >= 0 ? zr[local] : C(0);
  out[8] = hmax<C>(m_inf);
  if (cz) {
    const C big = std::max(std::max(std::abs(mz), std::abs(mr)), std::max(std::abs(nz), std::abs(nr)));
    col.finish(out + 11, nr, big);
  }
}

// What one row of the search holds between calls (views into the caller's tensors).
template <typename C> struct RowSearch {
  C* cand_d;            // candidates: D and q of the items under the chosen prefix
  C* cand_q;
  int64_t* count;       // how many
  double* sums;         // above the selection: sum q D, sum q; at it: sum q
  int64_t* min_above;   // the smallest key above the selection, as key_order (NONE: none)
  // The guess: the top digit the group will pick, from this slice's own histogram. Level 0
  // computes the candidates, the sums above and the next histogram for it while the row is
  // still in cache; level 1 takes them if the group picked the guess, else reads the row.
  int64_t* guess;       // -1: none
  double* spec_hist;    // BINS
  double* spec_sums;    // sum q D, sum q above the guess
  int64_t* spec_min;
};

// The items above the selection, per lane: sum q D, sum q and the smallest key.
template <typename C> struct Above {
  bool track_min;  // only ra_dpo_cvar needs the smallest key above (its HI)
  Vec<C> qd = splat<C>(0), q = splat<C>(0);
  IVec<C> min_o = IVec<C>{} + std::numeric_limits<Bits<C>>::max(), any = IVec<C>{};

  explicit Above(bool min) : track_min(min) {}
  void add(Vec<C> d, Vec<C> qv, IVec<C> up, IVec<C> order) {
    const Vec<C> zero = splat<C>(0);
    qd += (up & (qv != zero)) ? qv * d : zero;  // q = 0 adds nothing (never 0 * -inf)
    q += up ? qv : zero;
    if (track_min) {
      min_o = (up & (order < min_o)) ? order : min_o;
      any |= up;
    }
  }
  // adds the sums to sums[0..2) and lowers *min to the smallest key above, if any
  void finish(double* sums, int64_t* min) const {
    constexpr int W = width<C>();
    sums[0] += double(hsum<C>(qd));
    sums[1] += double(hsum<C>(q));
    Bits<C> mins[W], anys[W];
    std::memcpy(mins, &min_o, sizeof mins);
    std::memcpy(anys, &any, sizeof anys);
    for (int j = 0; j < W; ++j)
      if (anys[j]) {
        const int64_t o = Keys<C>::key_order(int64_t(mins[j]));
        *min = o < *min ? o : *min;
      }
  }
};

// The pieces of the search over one row, in whole vectors but the histogram's scatter.
// Only eligible items take part: cvar's support (q > 0, weighed by q), every item for
// ra_dpo_cvar (counted).
template <typename C> struct Radix {
  using K = Keys<C>;
  using U = typename K::U;
  static constexpr int W = width<C>();
  bool weighted;
  IVec<C> iota;
  // one histogram per lane (no chain of adds to one bin), padded so that the lanes' bins do
  // not alias modulo 4 KiB (false store-to-load dependencies: twice the time, measured)
  double hist[W][BINS + 24];
  uint32_t counts[W][BINS + 8];  // the same for ra_dpo_cvar's counts (integer adds are cheaper)

  explicit Radix(bool w) : weighted(w) {
    for (int j = 0; j < W; ++j) iota[j] = j;
  }
  static U digits(U k, int level) { return (k >> (K::BITS - RADIX * (level + 1))) & (U{} + (BINS - 1)); }
  static U splat_u(int x) { return U{} + typename K::Lane(x); }
  IVec<C> eligible(Vec<C> q, int n) const {
    IVec<C> el = iota < n;
    return weighted ? (el & (q > splat<C>(0))) : el;
  }
  Vec<C> weight(Vec<C> q, IVec<C> take) const { return take ? (weighted ? q : splat<C>(1)) : splat<C>(0); }
  // hist[lane][digit `level` of k] += w (q, or 1 where eligible); the counts of ra_dpo_cvar,
  // whose every item in the row is eligible, add 1 per lane of a whole vector (n == W)
  void scatter(U k, int level, Vec<C> w, int n) {
    const U dg = digits(k, level);
    typename K::Lane dd[W];
    std::memcpy(dd, &dg, sizeof dd);
    if (!weighted && n == W) {
      for (int j = 0; j < W; ++j) ++counts[j][dd[j]];
      return;
    }
    C ww[W];
    std::memcpy(ww, &w, sizeof ww);
    if (weighted) {
      for (int j = 0; j < W; ++j) hist[j][dd[j]] += double(ww[j]);
    } else {
      for (int j = 0; j < W; ++j) counts[j][dd[j]] += ww[j] != 0;
    }
  }
  void clear() {
    if (weighted)
      std::memset(hist, 0, sizeof hist);
    else
      std::memset(counts, 0, sizeof counts);
  }
  void merge(double* out) const {
    for (int b = 0; b < BINS; ++b) {
      double t = 0;
      for (int j = 0; j < W; ++j) t += weighted ? hist[j][b] : double(counts[j][b]);
      out[b] = t;
    }
  }

  // Over the row's items (z, zr; A, Ar): f(d, q, keys, eligible) per vector
  template <typename F>
  static void rows(const C* z, const C* zr, int64_t v, C A, C Ar, const C* nz, const C* nr, F f) {
    const Vec<C> va = splat(A), var = splat(Ar);
    int64_t i = 0;
    for (; i + W <= v; i += W) {
      prefetch_line(nz, nr, i);
      Deviation<C> dv(load(z + i), load(zr + i), va, var);
      f(dv.d, dv.q, W);
    }
    if (i < v) {
      Deviation<C> dv(load_part(z + i, v - i, C(0)), load_part(zr + i, v - i, NEG_INF<C>), va, var);
      f(dv.d, dv.q, int(v - i));
    }
  }

  // The top digit where the weight of a sample of the row (every step-th item) reaches
  // `target` of the sample's total: the slice's guess of the group's pick, or -1.
  int sample_guess(const C* z, const C* zr, int64_t v, C A, C Ar, double target) {
    constexpr int64_t SAMPLES = 256;
    const int64_t step = v > SAMPLES ? v / SAMPLES : 1;
    alignas(64) C zs[W], rs[W];
    clear();
    const Vec<C> va = splat(A), var = splat(Ar);
    for (int64_t i = 0; i < v; i += step * W) {
      int n = 0;
      for (; n < W && i + n * step < v; ++n) {
        zs[n] = z[i + n * step];
        rs[n] = zr[i + n * step];
      }
      Deviation<C> dv(load_part(zs, n, C(0)), load_part(rs, n, NEG_INF<C>), va, var);
      scatter(K::of(dv.d), 0, weight(dv.q, eligible(dv.q, n)), n);
    }
    double sample[BINS];
    merge(sample);
    double total = 0, cum = 0;
    for (int b = 0; b < BINS; ++b) total += sample[b];
    for (int b = 0; total > 0 && b < BINS; ++b) {
      cum += sample[b];
      if (sample[b] > 0 && cum >= target * total) return b;
    }
    return -1;
  }

  // Level 0: the histogram of the top digit of every item, in one read of the row; with a
  // guess (>= 0), the row's collect for it too (see collect), into st and above.
  int64_t top_histogram(const C* z, const C* zr, int64_t v, C A, C Ar, int guess, RowSearch<C>& st,
                        Above<C>& above, const C* nz, const C* nr) {
    clear();
    int64_t m = 0;
    const U p = splat_u(guess);
    rows(z, zr, v, A, Ar, nz, nr, [&](Vec<C> d, Vec<C> q, int n) {
      const U k = K::of(d);
      const IVec<C> el = eligible(q, n);
      scatter(k, 0, weight(q, el), n);
      if (guess >= 0) {
        const U dg = digits(k, 0);
        const IVec<C> kept = el & (dg == p);
        above.add(d, q, el & (dg > p), K::order(k));
        compress_store<C>(st.cand_q + m, q, kept);
        m += compress_store<C>(st.cand_d + m, d, kept);
      }
    });
    return m;
  }

  // Level 0 of a bracketed search (counts only: ra_dpo_cvar): the items whose key lies in
  // [lo, hi] become the candidates, those above go to `above`, those below are only counted;
  // one read of the row, vector compares instead of the histogram's scatter.
  // `items(f)` runs f(d, q, lanes) over the items: the row's (rows) or the stored candidates'
  // (stored: those write their D and q back over themselves, behind the read).
  template <typename Items>
  int64_t bracket_read(Items items, U lo, U hi, RowSearch<C>& st, Above<C>& above, int64_t& below_count,
                       int64_t& above_count, double* masses) {
    int64_t m = 0;
    C* const cd = st.cand_d;
    C* const cq = st.cand_q;
    IVec<C> nb{}, na{};  // minus the counts, per lane (a true comparison is -1)
    Vec<C> mb = splat<C>(0), ma = splat<C>(0), mi = splat<C>(0);  // cvar: the q-masses below, above, inside
    items([&](Vec<C> d, Vec<C> q, int n) {
      const U k = K::of(d);
      const IVec<C> el = eligible(q, n);
      const IVec<C> low = el & (IVec<C>)(k < lo), up = el & (IVec<C>)(k > hi), kept = el & ~low & ~up;
      nb += low;
      na += up;
      if (weighted) {
        mb += low ? q : splat<C>(0);
        ma += up ? q : splat<C>(0);
        mi += kept ? q : splat<C>(0);
      }
      above.add(d, q, up, K::order(k));
      compress_store<C>(cq + m, q, kept);  // no branch: half the vectors hold a candidate
      m += compress_store<C>(cd + m, d, kept);
    });
    Bits<C> lb[W], la[W];
    std::memcpy(lb, &nb, sizeof lb);
    std::memcpy(la, &na, sizeof la);
    below_count = above_count = 0;
    for (int j = 0; j < W; ++j) {
      below_count -= lb[j];
      above_count -= la[j];
    }
    masses[0] = double(hsum<C>(mb));
    masses[1] = double(hsum<C>(ma));
    masses[2] = double(hsum<C>(mi));
    return m;
  }

  // D and q of the first m stored candidates: raw z in cand_d, zr in cand_q (slice_partials')
  template <typename F> static void stored(const RowSearch<C>& st, int64_t m, C A, C Ar, F f) {
    const Vec<C> va = splat(A), var = splat(Ar);
    for (int64_t i = 0; i < m; i += W) {
      const int lanes = int(m - i < W ? m - i : W);
      Deviation<C> dv(load_part(st.cand_d + i, lanes, C(0)), load_part(st.cand_q + i, lanes, NEG_INF<C>), va, var);
      f(dv.d, dv.q, lanes);
    }
  }

  // Level 1 (a wrong guess): the items whose top digit is `pick` become the candidates, those
  // above it go to `above`; returns how many were kept. One more read of the row.
  int64_t collect(const C* z, const C* zr, int64_t v, C A, C Ar, int pick, RowSearch<C>& st, Above<C>& above,
                  const C* nz, const C* nr) {
    int64_t m = 0;
    const U p = splat_u(pick);
    rows(z, zr, v, A, Ar, nz, nr, [&](Vec<C> d, Vec<C> q, int n) {
      const U k = K::of(d), dg = digits(k, 0);
      const IVec<C> el = eligible(q, n), kept = el & (dg == p);
      above.add(d, q, el & (dg > p), K::order(k));
      compress_store<C>(st.cand_q + m, q, kept);
      m += compress_store<C>(st.cand_d + m, d, kept);
    });
    return m;
  }

  // Levels 2 .. levels: the candidates whose digit level - 1 is `pick` stay (compacted in
  // place: the writes stay behind the vector just read), those above go to `above`; at the
  // close (compact false) the kept ones' q-mass is the atom's, into *at.
  int64_t narrow(RowSearch<C>& st, int64_t n, int level, int pick, Above<C>& above, bool compact, double* at) {
    int64_t m = 0;
    const U p = splat_u(pick);
    Vec<C> at_q = splat<C>(0);
    for (int64_t i = 0; i < n; i += W) {
      const int lanes = int(n - i < W ? n - i : W);
      const Vec<C> d = load_part(st.cand_d + i, lanes, C(0)), q = load_part(st.cand_q + i, lanes, C(0));
      const U k = K::of(d), dg = digits(k, level - 1);
      const IVec<C> el = eligible(q, lanes), kept = el & (dg == p);
      above.add(d, q, el & (dg > p), K::order(k));
      if (compact) {
        compress_store<C>(st.cand_q + m, q, kept);
        m += compress_store<C>(st.cand_d + m, d, kept);
      } else {
        at_q += kept ? q : splat<C>(0);
      }
    }
    if (!compact) *at += double(hsum<C>(at_q));
    return m;
  }

  // The histogram of digit `level` of the first m candidates.
  void candidate_histogram(const RowSearch<C>& st, int64_t m, int level) {
    clear();
    for (int64_t i = 0; i < m; i += W) {
      const int lanes = int(m - i < W ? m - i : W);
      const Vec<C> d = load_part(st.cand_d + i, lanes, C(0)), q = load_part(st.cand_q + i, lanes, C(0));
      scatter(K::of(d), level, weight(q, eligible(q, lanes)), lanes);
    }
  }
};

// One level of the search for one row: the histogram of the next digit into out_hist
// (level < levels), the sums above the selection, the candidates.
template <typename C>
void search_row(const C* z, const C* zr, int64_t v, C A, C Ar, bool weighted, int level, int levels,
                uint64_t prefix, double target, RowSearch<C> st, double* out_hist, const C* nz, const C* nr) {
  Radix<C> rx(weighted);
  if (level == 0) {
    // the guess of the group's pick from a sample of the row; the one read of the row then
    // also collects the candidates, the sums above and (after) the next histogram for it
    const int guess = rx.sample_guess(z, zr, v, A, Ar, target);
    Above<C> above(!weighted);
    const int64_t m = rx.top_histogram(z, zr, v, A, Ar, guess, st, above, nz, nr);
    rx.merge(out_hist);
    *st.guess = guess;
    if (guess >= 0) {
      *st.count = m;
      rx.candidate_histogram(st, m, 1);
      rx.merge(st.spec_hist);
      st.spec_sums[0] = st.spec_sums[1] = 0;
      *st.spec_min = NONE;
      above.finish(st.spec_sums, st.spec_min);
    }
    return;
  }
  const int pick = digit<C>(prefix, level - 1);
  Above<C> above(!weighted);
  const bool bracketed = *st.guess == BRACKETED;  // level 0 kept the bracket's items
  if (level == 1 && !bracketed && *st.guess == pick) {  // guessed right
    std::memcpy(out_hist, st.spec_hist, BINS * sizeof(double));
    st.sums[0] += st.spec_sums[0];
    st.sums[1] += st.spec_sums[1];
    *st.min_above = *st.spec_min < *st.min_above ? *st.spec_min : *st.min_above;
    return;
  }
  if (level == 1 && !bracketed) {
    *st.count = rx.collect(z, zr, v, A, Ar, pick, st, above, nz, nr);
  } else {
    *st.count = rx.narrow(st, *st.count, level, pick, above, level < levels, st.sums + 2);
    if (level == levels) *st.count = 0;
  }
  if (level < levels && out_hist) {  // (none asked: the candidates are all the caller wants)
    rx.candidate_histogram(st, *st.count, level);
    rx.merge(out_hist);
  }
  above.finish(st.sums, st.min_above);
}

void check_slice(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& rows) {
  TORCH_CHECK(z.device().is_cpu() && zr.device().is_cpu(), "rsa_kernels._C: tensors must be on the CPU");
  TORCH_CHECK(z.dim() == 2 && zr.sizes() == z.sizes(), "rsa_kernels._C: z and zr must be (N, w) of one shape");
  TORCH_CHECK(z.scalar_type() == zr.scalar_type() && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "rsa_kernels._C: slice kernels take float32 or float64 z and zr of one dtype");
  TORCH_CHECK(z.size(1) <= 1 || (z.stride(1) == 1 && zr.stride(1) == 1), "rsa_kernels._C: rows must have unit stride");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "rsa_kernels._C: rows must be a contiguous int64 vector");
  const int64_t* r = rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < z.size(0), "rsa_kernels._C: row index ", r[i], " outside [0, ", z.size(0), ")");
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous(), "rsa_kernels._C: ",
              name, " must be a contiguous vector of ", n, " ", dtype);
}

at::Tensor slice_partials(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& rows, const at::Tensor& local,
                          bool erm, double mu, double level, bool weighted, at::Tensor cand_z,
                          at::Tensor cand_zr) {
  check_slice(z, zr, rows);
  const int64_t n = rows.size(0), v = z.size(1);
  check_vector(local, n, at::kLong, "local");
  const int64_t* lab = local.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(lab[i] < v, "rsa_kernels._C: label column ", lab[i], " outside the slice");
  const bool collect = cand_z.numel() > 0;
  if (collect) {
    TORCH_CHECK(!erm && level >= 0, "rsa_kernels._C: candidates are collected for a quantile's bracket only");
    for (const at::Tensor* t : {&cand_z, &cand_zr})
      TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) >= v + SLACK && t->scalar_type() == z.scalar_type() &&
                      t->is_contiguous(), "rsa_kernels._C: candidates must be contiguous (n, >= w + 16) of z's dtype");
  }
  at::Tensor out = at::zeros({n, 19}, z.options());
  const int64_t* r = rows.const_data_ptr<int64_t>();
  pybind11::gil_scoped_release nogil;
  auto run = [&](auto zero) {
    using C = decltype(zero);
    C* o = out.data_ptr<C>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const bool next = i + 1 < e;
        partials_row<C>(row_of<C>(z, r[i]), row_of<C>(zr, r[i]), v, lab[i], erm, C(mu), level, weighted, o + 19 * i,
                        next ? row_of<C>(z, r[i + 1]) : nullptr, next ? row_of<C>(zr, r[i + 1]) : nullptr,
                        collect ? cand_z.data_ptr<C>() + i * cand_z.size(1) : nullptr,
                        collect ? cand_zr.data_ptr<C>() + i * cand_zr.size(1) : nullptr);
      }
    });
  };
  if (z.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return out;
}

// One search level for every row of the chunk; returns the (n, 256) float64 histogram of the
// next digit (an empty tensor for the close). cand_d, cand_q: (n, >= w + 16) candidates;
// state: count (n,) int64, sums (n, 3) float64, min_above (n,) int64, guess (n,) int64,
// spec_hist (n, 256) float64, spec_sums (n, 2) float64, spec_min (n,) int64, kept across
// the levels. target: the weight the search reaches, as a fraction of the total (level 0's
// guess).
void check_search(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& rows, const at::Tensor& a,
                  const at::Tensor& ar, const at::Tensor& cand_d, const at::Tensor& cand_q,
                  const std::vector<at::Tensor>& state) {
  check_slice(z, zr, rows);
  const int64_t n = rows.size(0), v = z.size(1);
  for (const at::Tensor* t : {&a, &ar}) check_vector(*t, n, z.scalar_type(), "A, Ar");
  TORCH_CHECK(state.size() == 7, "rsa_kernels._C: the search state is 7 tensors");
  const std::vector<int64_t> widths = {1, 3, 1, 1, BINS, 2, 1};
  for (size_t j = 0; j < state.size(); ++j) {
    const at::Tensor& t = state[j];
    const auto dtype = (j == 1 || j == 4 || j == 5) ? at::kDouble : at::kLong;
    TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == n * widths[j] && t.size(0) == n,
                "rsa_kernels._C: search state ", j, " must be a contiguous (n, ", widths[j], ") ", dtype, " tensor");
  }
  for (const at::Tensor* t : {&cand_d, &cand_q})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) >= v + SLACK && t->scalar_type() == z.scalar_type() &&
                    t->is_contiguous(), "rsa_kernels._C: candidates must be contiguous (n, >= w + 16) of z's dtype");
}

template <typename C> RowSearch<C> row_state(at::Tensor& cand_d, at::Tensor& cand_q, std::vector<at::Tensor>& state,
                                             int64_t i) {
  const int64_t cap = cand_d.size(1);
  return RowSearch<C>{cand_d.data_ptr<C>() + i * cap,          cand_q.data_ptr<C>() + i * cap,
                      state[0].data_ptr<int64_t>() + i,         state[1].data_ptr<double>() + 3 * i,
                      state[2].data_ptr<int64_t>() + i,         state[3].data_ptr<int64_t>() + i,
                      state[4].data_ptr<double>() + BINS * i,   state[5].data_ptr<double>() + 2 * i,
                      state[6].data_ptr<int64_t>() + i};
}

at::Tensor slice_search(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& rows, const at::Tensor& a,
                        const at::Tensor& ar, bool weighted, int64_t level, const at::Tensor& prefix, double target,
                        at::Tensor cand_d, at::Tensor cand_q, std::vector<at::Tensor> state, bool histogram) {
  check_search(z, zr, rows, a, ar, cand_d, cand_q, state);
  const int64_t n = rows.size(0), v = z.size(1);
  const int levels = z.scalar_type() == at::kDouble ? 64 / RADIX : 32 / RADIX;
  TORCH_CHECK(level >= 0 && level <= levels, "rsa_kernels._C: search level ", level, " outside [0, ", levels, "]");
  check_vector(prefix, n, at::kLong, "prefix");
  const int64_t* cnt = state[0].const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n && level >= 2; ++i)
    TORCH_CHECK(cnt[i] >= 0 && cnt[i] <= v, "rsa_kernels._C: candidate count outside [0, w]");
  TORCH_CHECK(histogram || level >= 2, "rsa_kernels._C: levels 0 and 1 always histogram");
  const bool hist_rows = level < levels && histogram;
  at::Tensor hist = at::empty({hist_rows ? n : 0, BINS}, z.options().dtype(at::kDouble));
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* pre = prefix.const_data_ptr<int64_t>();
  pybind11::gil_scoped_release nogil;
  auto run = [&](auto zero) {
    using C = decltype(zero);
    const C* pa = a.const_data_ptr<C>();
    const C* par = ar.const_data_ptr<C>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        RowSearch<C> st = row_state<C>(cand_d, cand_q, state, i);
        const bool next = i + 1 < e && level <= 1;
        search_row<C>(row_of<C>(z, r[i]), row_of<C>(zr, r[i]), v, pa[i], par[i], weighted, int(level), levels,
                      uint64_t(pre[i]), target, st, hist_rows ? hist.data_ptr<double>() + BINS * i : nullptr,
                      next ? row_of<C>(z, r[i + 1]) : nullptr, next ? row_of<C>(zr, r[i + 1]) : nullptr);
      }
    });
  };
  if (z.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return hist;
}

// Level 0 of ra_dpo_cvar's search with the group's bracket [lo[i], hi[i]] of keys (an
// unbounded one, lo 0 and hi all ones, runs the plain level 0): returns (n, 258) float64,
// the histogram of the top digit of the candidates (the items in the bracket), the number
// of items below the bracket and above it. The state is slice_search's; its later levels
// narrow the candidates.
at::Tensor slice_bracket(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& rows, const at::Tensor& a,
                         const at::Tensor& ar, const at::Tensor& lo, const at::Tensor& hi, double target,
                         bool weighted, at::Tensor cand_d, at::Tensor cand_q, std::vector<at::Tensor> state,
                         const at::Tensor& stored) {
  check_search(z, zr, rows, a, ar, cand_d, cand_q, state);
  const int64_t n = rows.size(0), v = z.size(1);
  check_vector(lo, n, at::kLong, "lo");
  check_vector(hi, n, at::kLong, "hi");
  const bool from_stored = stored.numel() > 0;  // the candidates slice_partials kept, their counts
  if (from_stored) {
    check_vector(stored, n, at::kLong, "stored");
    const int64_t* c = stored.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(c[i] >= 0 && c[i] <= v, "rsa_kernels._C: stored count outside [0, w]");
  }
  const int64_t* cnt = from_stored ? stored.const_data_ptr<int64_t>() : nullptr;
  const int levels = z.scalar_type() == at::kDouble ? 64 / RADIX : 32 / RADIX;
  at::Tensor out = at::zeros({n, BINS + 2}, z.options().dtype(at::kDouble));
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* plo = lo.const_data_ptr<int64_t>();
  const int64_t* phi = hi.const_data_ptr<int64_t>();
  pybind11::gil_scoped_release nogil;
  auto run = [&](auto zero) {
    using C = decltype(zero);
    using U = typename Keys<C>::U;
    using Lane = typename Keys<C>::Lane;
    const C* pa = a.const_data_ptr<C>();
    const C* par = ar.const_data_ptr<C>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        RowSearch<C> st = row_state<C>(cand_d, cand_q, state, i);
        double* o = out.data_ptr<double>() + (BINS + 2) * i;
        const bool next = i + 1 < e;
        const C* nz = next ? row_of<C>(z, r[i + 1]) : nullptr;
        const C* nr = next ? row_of<C>(zr, r[i + 1]) : nullptr;
        const Lane l = Lane(uint64_t(plo[i])), h = Lane(uint64_t(phi[i]));
        if (!from_stored && l == 0 && h == Lane(~Lane(0))) {  // unbounded: the plain level 0
          search_row<C>(row_of<C>(z, r[i]), row_of<C>(zr, r[i]), v, pa[i], par[i], weighted, 0, levels, 0, target,
                        st, o, nz, nr);
          continue;
        }
        Radix<C> rx(weighted);
        Above<C> above(!weighted);
        int64_t nb = 0, na = 0;
        double masses[3];
        const C* zi = row_of<C>(z, r[i]);
        const C* ri = row_of<C>(zr, r[i]);
        const C A = pa[i], Ar = par[i];
        *st.count = from_stored
            ? rx.bracket_read([&](auto f) { Radix<C>::stored(st, cnt[i], A, Ar, f); }, U{} + l, U{} + h, st, above,
                              nb, na, masses)
            : rx.bracket_read([&](auto f) { Radix<C>::rows(zi, ri, v, A, Ar, nz, nr, f); }, U{} + l, U{} + h, st,
                              above, nb, na, masses);
        const int top = digit<C>(uint64_t(l), 0);
        if (top == digit<C>(uint64_t(h), 0)) {
          // every key in the bracket has this top digit: one bin, and the group picks it (where
          // the bracket holds), so level 1's histogram is prepared now, as for a right guess
          o[top] = weighted ? masses[2] : double(*st.count);
          rx.candidate_histogram(st, *st.count, 1);
          rx.merge(st.spec_hist);
          st.spec_sums[0] = st.spec_sums[1] = 0;  // no candidate leaves at level 1
          *st.spec_min = NONE;
          *st.guess = top;
        } else {
          *st.guess = BRACKETED;
          rx.candidate_histogram(st, *st.count, 0);
          rx.merge(o);
        }
        o[BINS] = weighted ? masses[0] : double(nb);
        o[BINS + 1] = weighted ? masses[1] : double(na);
        above.finish(st.sums, st.min_above);
      }
    });
  };
  if (z.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return out;
}

// (n, 2) float64: sum of q D and of q over the items with D > threshold[i].
at::Tensor slice_tail_sums(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& rows, const at::Tensor& a,
                           const at::Tensor& ar, const at::Tensor& threshold) {
  check_slice(z, zr, rows);
  const int64_t n = rows.size(0), v = z.size(1);
  for (const at::Tensor* t : {&a, &ar, &threshold}) check_vector(*t, n, z.scalar_type(), "A, Ar, threshold");
  at::Tensor out = at::zeros({n, 2}, z.options().dtype(at::kDouble));
  const int64_t* r = rows.const_data_ptr<int64_t>();
  pybind11::gil_scoped_release nogil;
  auto run = [&](auto zero) {
    using C = decltype(zero);
    constexpr int W = width<C>();
    const C* pa = a.const_data_ptr<C>();
    const C* par = ar.const_data_ptr<C>();
    const C* pt = threshold.const_data_ptr<C>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const C* zi = row_of<C>(z, r[i]);
        const C* ri = row_of<C>(zr, r[i]);
        const Vec<C> va = splat(pa[i]), var = splat(par[i]), vt = splat(pt[i]);
        double qd = 0, qs = 0;
        auto body = [&](Vec<C> zv, Vec<C> rv, int lanes) {
          Deviation<C> dv(zv, rv, va, var);
          auto above = dv.d > vt;
          for (int k = 0; k < lanes; ++k)
            if (above[k]) {
              const double q = double(dv.q[k]);
              qd += q != 0 ? q * double(dv.d[k]) : 0.0;
              qs += q;
            }
        };
        int64_t j = 0;
        for (; j + W <= v; j += W) body(load(zi + j), load(ri + j), W);
        if (j < v) body(load_part(zi + j, v - j, C(0)), load_part(ri + j, v - j, NEG_INF<C>), int(v - j));
        o[2 * i] = qd;
        o[2 * i + 1] = qs;
      }
    });
  };
  if (z.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return out;
}

// The gradient of the slice's columns into `out` (z itself for in place, or a tensor of z's
// shape). local[i]: the row's label column, -1 where another rank holds the label, -2 for a
// masked row (zeros). saved (N, 5) and grads (N, 3) in z's dtype.
at::Tensor slice_backward(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& local, const at::Tensor& saved,
                          const at::Tensor& grads, int64_t code, double param, at::Tensor out) {
  const int64_t n = z.size(0), v = z.size(1);
  TORCH_CHECK(z.dim() == 2 && zr.sizes() == z.sizes() && out.sizes() == z.sizes(), "rsa_kernels._C: shapes differ");
  TORCH_CHECK(z.scalar_type() == zr.scalar_type() && z.scalar_type() == out.scalar_type() &&
                  (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "rsa_kernels._C: slice kernels take float32 or float64 z, zr and out of one dtype");
  TORCH_CHECK(v <= 1 || (z.stride(1) == 1 && zr.stride(1) == 1 && out.stride(1) == 1),
              "rsa_kernels._C: rows must have unit stride");
  TORCH_CHECK(code >= 0 && code <= 3, "rsa_kernels._C: unknown risk code ", code);
  check_vector(local, n, at::kLong, "local");
  TORCH_CHECK(saved.scalar_type() == z.scalar_type() && saved.is_contiguous() && saved.dim() == 2 &&
                  saved.size(0) == n && saved.size(1) == 5, "rsa_kernels._C: saved must be contiguous (N, 5)");
  TORCH_CHECK(grads.scalar_type() == z.scalar_type() && grads.is_contiguous() && grads.dim() == 2 &&
                  grads.size(0) == n && grads.size(1) == 3, "rsa_kernels._C: grads must be contiguous (N, 3)");
  const int64_t* lab = local.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(lab[i] >= -2 && lab[i] < v, "rsa_kernels._C: label column ", lab[i], " outside the slice");
  pybind11::gil_scoped_release nogil;
  auto run = [&](auto zero) {
    using C = decltype(zero);
    const C* sv = saved.const_data_ptr<C>();
    const C* g = grads.const_data_ptr<C>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        C* dst = out.data_ptr<C>() + i * out.stride(0);
        const C* zi = row_of<C>(z, i);
        const C* ri = row_of<C>(zr, i);
        if (lab[i] == -2 || v == 0) {
          for (int64_t j = 0; j < v; ++j) dst[j] = C(0);
          continue;
        }
        const C* s = sv + 5 * i;
        const C* gi = g + 3 * i;
        if (lab[i] >= 0) {
          backward_row<C>(zi, ri, dst, v, lab[i], s, gi[0], gi[1], gi[2], int(code), param);
          continue;
        }
        // no label here: backward_row adds the label term at column y, so it runs with y = 0
        // and column 0 is then replaced by its value without that term, computed first (dst
        // may be z itself) as a row of one item whose label slot is the spare tmp[1]
        C tmp[2] = {C(0), C(0)};
        backward_row<C>(zi, ri, tmp, 1, 1, s, gi[0], gi[1], gi[2], int(code), param);
        backward_row<C>(zi, ri, dst, v, 0, s, gi[0], gi[1], gi[2], int(code), param);
        dst[0] = tmp[0];
      }
    });
  };
  if (z.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return out;
}

// slice_keys.radix_pick, row by row: updates below and prefix in place, returns the weight at
// the picked bin. The same comparisons and the same sequential cumulative sums, so the same
// bits as torch's cumsum.
at::Tensor slice_pick(const at::Tensor& hist, at::Tensor below, at::Tensor prefix, double target, int64_t shift) {
  const int64_t n = hist.size(0);
  TORCH_CHECK(hist.dim() == 2 && hist.size(1) == BINS && hist.scalar_type() == at::kDouble && hist.is_contiguous() &&
                  hist.device().is_cpu(), "rsa_kernels._C: hist must be a contiguous (n, 256) float64 CPU tensor");
  check_vector(below, n, at::kDouble, "below");
  check_vector(prefix, n, at::kLong, "prefix");
  TORCH_CHECK(shift >= 0 && shift < 64, "rsa_kernels._C: shift outside [0, 64)");
  at::Tensor at_w = at::empty({n}, hist.options());
  const double* h = hist.const_data_ptr<double>();
  double* bl = below.data_ptr<double>();
  int64_t* pre = prefix.data_ptr<int64_t>();
  double* at_p = at_w.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const double* row = h + BINS * i;
    double cum = 0, before = 0, cum_last = 0;
    int first = -1, last = BINS - 1;
    bool any = false;
    for (int b = 0; b < BINS; ++b) {
      const double prev = cum;
      cum += row[b];
      if (row[b] > 0) {
        if (first < 0 && bl[i] + cum >= target) {
          first = b;
          before = prev;
        }
        last = b;
        cum_last = prev;
        any = true;
      }
    }
    const int pick = first >= 0 ? first : last;
    if (first < 0) before = any ? cum_last : [&] {  // an empty row: bin BINS - 1
      double c = 0;
      for (int b = 0; b < BINS - 1; ++b) c += row[b];
      return c;
    }();
    bl[i] += pick > 0 ? before : 0.0;
    at_p[i] = row[pick];
    pre[i] |= int64_t(uint64_t(pick) << shift);
  }
  return at_w;
}

// The gathered end of a search (rsa_kernels/vocab_parallel/quantile.py): each row's first
// `most` candidates (those slice_search left under its prefix) as one int64 payload row:
// count, the smallest key above that left earlier (key_order), `most` keys (key_order; NONE
// past the count) and `most` weights (double bits: q, or 1 for counts; 0 past the count).
at::Tensor slice_candidates(const at::Tensor& cand_d, const at::Tensor& cand_q, const std::vector<at::Tensor>& state,
                            bool weighted, int64_t most) {
  const int64_t n = cand_d.size(0);
  TORCH_CHECK(state.size() == 7 && cand_d.sizes() == cand_q.sizes() && cand_d.is_contiguous() &&
                  cand_q.is_contiguous() && cand_d.scalar_type() == cand_q.scalar_type() && most > 0,
              "rsa_kernels._C: slice_candidates takes a search's candidates and state");
  at::Tensor out = at::empty({n, 2 + 2 * most}, cand_d.options().dtype(at::kLong));
  const int64_t* count = state[0].const_data_ptr<int64_t>();
  const int64_t* min_above = state[2].const_data_ptr<int64_t>();
  auto run = [&](auto zero) {
    using C = decltype(zero);
    using K = Keys<C>;
    const int64_t cap = cand_d.size(1);
    for (int64_t i = 0; i < n; ++i) {
      int64_t* o = out.data_ptr<int64_t>() + i * (2 + 2 * most);
      const C* d = cand_d.const_data_ptr<C>() + i * cap;
      const C* q = cand_q.const_data_ptr<C>() + i * cap;
      const int64_t m = std::min(count[i], most);
      o[0] = count[i];
      o[1] = min_above[i];
      for (int64_t j = 0; j < most; ++j) {
        double w = 0;
        int64_t key = NONE;
        if (j < m) {
          const typename K::U k = K::of(splat(d[j]));
          // slice_keys.key_order of the key: itself for 32 bits, the top bit flipped for 64
          key = K::BITS == 64 ? int64_t(uint64_t(k[0]) ^ (uint64_t(1) << 63)) : int64_t(uint64_t(k[0]));
          w = weighted ? double(q[j]) : 1.0;
        }
        o[2 + j] = key;
        std::memcpy(o + 2 + most + j, &w, sizeof w);
      }
    }
  };
  if (cand_d.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return out;
}

// The selection from the gathered payloads (P, n, 2 + 2 most) of slice_candidates, the same on
// every rank: per row, the smallest key whose cumulative weight over the items (in key order)
// on top of below[i] reaches target, else the largest key with weight (slice_pick's, key by
// key), and an empty row's `empty_key[i]`. Returns (n, 4) float64 bits as int64: key
// (key_order), the new below, the weight at the key, the smallest key above it (the items'
// or the ranks' earlier ones).
at::Tensor slice_gathered_pick(const at::Tensor& parts, const at::Tensor& below, double target,
                               const at::Tensor& empty_key) {
  TORCH_CHECK(parts.dim() == 3 && parts.scalar_type() == at::kLong && parts.is_contiguous(),
              "rsa_kernels._C: parts must be a contiguous (P, n, 2 + 2 most) int64 tensor");
  const int64_t p = parts.size(0), n = parts.size(1), most = (parts.size(2) - 2) / 2;
  check_vector(below, n, at::kDouble, "below");
  check_vector(empty_key, n, at::kLong, "empty_key");
  at::Tensor out = at::empty({n, 4}, parts.options());
  std::vector<std::pair<int64_t, double>> items;
  for (int64_t i = 0; i < n; ++i) {
    items.clear();
    int64_t next = NONE;
    for (int64_t r = 0; r < p; ++r) {
      const int64_t* o = parts.const_data_ptr<int64_t>() + (r * n + i) * (2 + 2 * most);
      next = std::min(next, o[1]);
      const int64_t m = std::min(o[0], most);
      for (int64_t j = 0; j < m; ++j) {
        double w;
        std::memcpy(&w, o + 2 + most + j, sizeof w);
        if (w > 0) items.emplace_back(o[2 + j], w);
      }
    }
    std::sort(items.begin(), items.end());  // by key, then weight: the same order on every rank
    const double b0 = below.const_data_ptr<double>()[i];
    double cum = 0;
    int64_t key = empty_key.const_data_ptr<int64_t>()[i];
    double before = 0, at = 0;
    for (size_t j = 0; j < items.size();) {
      size_t e = j;
      double w = 0;
      for (; e < items.size() && items[e].first == items[j].first; ++e) w += items[e].second;
      key = items[j].first;  // the largest so far: the fallback
      before = cum;
      at = w;
      cum += w;
      j = e;
      if (b0 + cum >= target) break;
    }
    for (const auto& it : items)
      if (it.first > key) {
        next = std::min(next, it.first);
        break;
      }
    int64_t* o = out.data_ptr<int64_t>() + 4 * i;
    const double new_below = b0 + before;
    o[0] = key;
    std::memcpy(o + 1, &new_below, sizeof new_below);
    std::memcpy(o + 2, &at, sizeof at);
    o[3] = next;
  }
  return out;
}

// The close of a gathered search, on this rank's candidates (their keys from slice_candidates'
// payload, key_order, NONE past the count): sum q D and sum q over those above the key,
// sum q at it, into sums (n, 3), and min_above lowered to the smallest key above it.
void slice_close_gathered(const at::Tensor& cand_d, const at::Tensor& cand_q, const at::Tensor& keys,
                          const at::Tensor& key, at::Tensor sums, at::Tensor min_above) {
  const int64_t n = keys.size(0), m = keys.size(1), cap = cand_d.size(1);
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.stride(1) == 1 && m <= cap && cand_d.is_contiguous() &&
                  cand_q.is_contiguous() && sums.is_contiguous() && sums.scalar_type() == at::kDouble &&
                  sums.size(0) == n && sums.size(1) == 3,
              "rsa_kernels._C: slice_close_gathered takes a search's candidates, their keys and its sums");
  check_vector(key, n, at::kLong, "key");
  check_vector(min_above, n, at::kLong, "min_above");
  auto run = [&](auto zero) {
    using C = decltype(zero);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* k = keys.const_data_ptr<int64_t>() + i * keys.stride(0);
      const C* d = cand_d.const_data_ptr<C>() + i * cap;
      const C* q = cand_q.const_data_ptr<C>() + i * cap;
      const int64_t sel = key.const_data_ptr<int64_t>()[i];
      double* o = sums.data_ptr<double>() + 3 * i;
      int64_t* mn = min_above.data_ptr<int64_t>() + i;
      for (int64_t j = 0; j < m && k[j] != NONE; ++j) {
        const double qj = double(q[j]);
        if (k[j] > sel) {
          o[0] += qj != 0 ? qj * double(d[j]) : 0.0;  // never 0 * -inf
          o[1] += qj;
          *mn = std::min(*mn, k[j]);
        } else if (k[j] == sel) {
          o[2] += qj;
        }
      }
    }
  };
  if (cand_d.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
}

}  // namespace

void register_slices(pybind11::module_& m) {
  m.def("slice_close_gathered", &slice_close_gathered,
        "(cand_d, cand_q, keys, key, sums, min_above): the close over gathered candidates, in place");
  m.def("slice_candidates", &slice_candidates,
        "(cand_d, cand_q, state, weighted, most) -> (n, 2 + 2 most) int64: count, next key, keys, weight bits");
  m.def("slice_gathered_pick", &slice_gathered_pick,
        "(parts (P, n, 2 + 2 most), below, target, empty_key) -> (n, 4) int64: key, below, at (double bits), next");
  m.def("slice_partials", &slice_partials,
        "(z, zr, rows, local, erm, mu, level, weighted, cand_z, cand_zr) -> (n, 19): max z, max zr, S, Sr, U, T, "
        "z_y, zr_y, M per row of the slice, the bracket of u = zr - z around the fraction level (of the items, or "
        "of the weights exp(zr - max zr); < 0: -inf, inf), and with candidate buffers (else empty tensors) what "
        "was collected: below, above, Sr and U above, the row's min finite zr, max |z|, |zr|, candidates, Sr "
        "below (weighted)");
  m.def("slice_bracket", &slice_bracket,
        "(z, zr, rows, A, Ar, lo, hi, target, weighted, cand_d, cand_q, state, stored) -> (n, 258): level 0 "
        "within key brackets (counts, or q-masses where weighted), over the rows or (stored: their counts) over "
        "slice_partials' candidates");
  m.def("slice_search", &slice_search,
        "(z, zr, rows, A, Ar, weighted, level, prefix, target, cand_d, cand_q, state, histogram) -> (n, 256) "
        "histogram (none where histogram is false: the narrowing only)");
  m.def("slice_pick", &slice_pick, "(hist, below, prefix, target, shift) -> at; below, prefix updated in place");
  m.def("slice_tail_sums", &slice_tail_sums, "(z, zr, rows, A, Ar, threshold) -> (n, 2) float64: sum q D, sum q over D > t");
  m.def("slice_backward", &slice_backward, "(z, zr, local, saved, grads, code, param, out) -> out");
}

}  // namespace rsa::RSA_ISA
