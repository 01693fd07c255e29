// rsa_kernels._C: the row-kernel contract of rsa_kernels/backends/__init__.py on CPU tensors.
//
// Rows are split across torch's intra-op threads (at::parallel_for, i.e. OpenMP in the
// standard builds, obeying torch.set_num_threads). Every row is computed by one thread
// from its own data only, so results do not depend on the number of threads.
// Only the headers needed (torch/extension.h would triple the compile time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fresh.h"
#include "rows.h"

namespace {

using rsa::RowOut;

// Row `i` of a 2-D tensor with unit stride in V, as a pointer to C: the tensor's own
// memory when its dtype is C, else converted into `buf`.
template <typename C> const C* row_as(const at::Tensor& t, int64_t i, C* buf) {
  const int64_t v = t.size(1);
  const int64_t off = i * t.stride(0);
  switch (t.scalar_type()) {
    case at::kFloat: {
      const float* p = t.const_data_ptr<float>() + off;
      if constexpr (std::is_same_v<C, float>) return p;
      for (int64_t j = 0; j < v; ++j) buf[j] = C(p[j]);
      return buf;
    }
    case at::kDouble: {
      const double* p = t.const_data_ptr<double>() + off;
      if constexpr (std::is_same_v<C, double>) return p;
      for (int64_t j = 0; j < v; ++j) buf[j] = C(p[j]);
      return buf;
    }
    case at::kBFloat16: {
      const at::BFloat16* p = t.const_data_ptr<at::BFloat16>() + off;
      for (int64_t j = 0; j < v; ++j) buf[j] = C(float(p[j]));
      return buf;
    }
    case at::kHalf: {
      const at::Half* p = t.const_data_ptr<at::Half>() + off;
      for (int64_t j = 0; j < v; ++j) buf[j] = C(float(p[j]));
      return buf;
    }
    default:
      TORCH_CHECK(false, "rsa_kernels._C: unsupported dtype ", t.scalar_type());
  }
}

// Row i of t in place when its dtype is C (no conversion needed), else null.
template <typename C> const C* direct_row(const at::Tensor& t, int64_t i) {
  if (t.scalar_type() != c10::CppTypeToScalarType<C>::value) return nullptr;
  return t.const_data_ptr<C>() + i * t.stride(0);
}

// Where backward_row writes row i: straight into `out` when its dtype is C, else `buf`.
template <typename C> C* out_row(at::Tensor& out, int64_t i, C* buf) {
  if (out.scalar_type() == c10::CppTypeToScalarType<C>::value) return out.data_ptr<C>() + i * out.stride(0);
  return buf;
}

template <typename C> void store_row(at::Tensor& out, int64_t i, const C* src) {
  const int64_t v = out.size(1);
  const int64_t off = i * out.stride(0);
  switch (out.scalar_type()) {
    case at::kFloat: {
      float* p = out.data_ptr<float>() + off;
      if (static_cast<const void*>(p) == static_cast<const void*>(src)) return;
      for (int64_t j = 0; j < v; ++j) p[j] = float(src[j]);
      return;
    }
    case at::kDouble: {
      double* p = out.data_ptr<double>() + off;
      if (static_cast<const void*>(p) == static_cast<const void*>(src)) return;
      for (int64_t j = 0; j < v; ++j) p[j] = double(src[j]);
      return;
    }
    case at::kBFloat16: {
      at::BFloat16* p = out.data_ptr<at::BFloat16>() + off;
      for (int64_t j = 0; j < v; ++j) p[j] = at::BFloat16(float(src[j]));
      return;
    }
    case at::kHalf: {
      at::Half* p = out.data_ptr<at::Half>() + off;
      for (int64_t j = 0; j < v; ++j) p[j] = at::Half(float(src[j]));
      return;
    }
    default:
      TORCH_CHECK(false, "rsa_kernels._C: unsupported dtype ", out.scalar_type());
  }
}

void check_rows(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& labels) {
  for (const at::Tensor* t : {&z, &zr}) {
    TORCH_CHECK(t->device().is_cpu(), "rsa_kernels._C: tensors must be on the CPU");
    TORCH_CHECK(t->dim() == 2 && t->size(1) >= 1, "rsa_kernels._C: rows must be (N, V) with V >= 1");
    TORCH_CHECK(t->size(1) == 1 || t->stride(1) == 1, "rsa_kernels._C: rows must have unit stride in V");
  }
  TORCH_CHECK(zr.sizes() == z.sizes(), "rsa_kernels._C: ref rows must match rows");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "rsa_kernels._C: labels must be a contiguous int64 tensor of N");
}

// A label index, or -1 for a masked row; anything else out of range is an error.
int64_t label_of(const int64_t* labels, int64_t i, int64_t v, int64_t ignore_index) {
  const int64_t y = labels[i];
  if (y == ignore_index) return -1;
  TORCH_CHECK(y >= 0 && y < v, "rsa_kernels._C: label ", y, " outside [0, ", v, ")");
  return y;
}

void check_labels(const at::Tensor& labels, int64_t v, int64_t ignore_index) {
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) label_of(lab, i, v, ignore_index);
}

template <typename C>
void forward_impl(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& labels, int code, double param,
                  int64_t ignore_index, at::Tensor& stats, at::Tensor& saved) {
  const int64_t n = z.size(0), v = z.size(1);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  C* st = stats.data_ptr<C>();
  C* sv = saved.data_ptr<C>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // per-thread scratch: two converted input rows, then forward_row's
    std::vector<C> buf(2 * v + rsa::forward_scratch(v));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = label_of(lab, i, v, ignore_index);
      if (y < 0) continue;  // masked: stats and saved stay 0, no work
      const C* zi = row_as<C>(z, i, buf.data());
      const C* ri = row_as<C>(zr, i, buf.data() + v);
      // the next row to prefetch, where it is read in place (no conversion)
      const C* nz = i + 1 < end ? direct_row<C>(z, i + 1) : nullptr;
      const C* nr = i + 1 < end ? direct_row<C>(zr, i + 1) : nullptr;
      RowOut<C> o = rsa::forward_row<C>(zi, ri, v, y, code, param, buf.data() + 2 * v, nz, nr);
      C* s = st + 4 * i;
      s[0] = o.logp;
      s[1] = o.ref_logp;
      s[2] = o.kl;
      s[3] = o.risk;
      for (int k = 0; k < 5; ++k) sv[5 * i + k] = o.saved[k];
    }
  });
}

template <typename C>
void backward_impl(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& labels, const at::Tensor& saved,
                   const at::Tensor& grads, int code, double param, int64_t ignore_index, at::Tensor& out) {
  const int64_t n = z.size(0), v = z.size(1);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const C* sv = saved.const_data_ptr<C>();
  const C* g = grads.const_data_ptr<C>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> buf(3 * v);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = label_of(lab, i, v, ignore_index);
      C* dst = out_row<C>(out, i, buf.data() + 2 * v);
      if (y < 0) {
        for (int64_t j = 0; j < v; ++j) dst[j] = C(0);
      } else {
        // in place (out is z): row_as returns z's own row when no conversion is needed, and
        // backward_row reads each item before writing it; otherwise z was copied into buf
        const C* zi = row_as<C>(z, i, buf.data());
        const C* ri = row_as<C>(zr, i, buf.data() + v);
        rsa::backward_row<C>(zi, ri, dst, v, y, sv + 5 * i, g[3 * i], g[3 * i + 1], g[3 * i + 2], code, param);
      }
      store_row<C>(out, i, dst);
    }
  });
}

bool is_double(const at::Tensor& z) { return z.scalar_type() == at::kDouble; }

at::ScalarType acc_type(const at::Tensor& z) { return is_double(z) ? at::kDouble : at::kFloat; }

std::vector<at::Tensor> forward(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& labels, int64_t code,
                                double param, int64_t ignore_index) {
  check_rows(z, zr, labels);
  TORCH_CHECK(code >= 0 && code <= 3, "rsa_kernels._C: unknown risk code ", code);
  check_labels(labels, z.size(1), ignore_index);
  auto opts = z.options().dtype(acc_type(z));
  at::Tensor stats = at::zeros({z.size(0), 4}, opts);
  at::Tensor saved = at::zeros({z.size(0), 5}, opts);
  {
    pybind11::gil_scoped_release nogil;
    if (is_double(z))
      forward_impl<double>(z, zr, labels, int(code), param, ignore_index, stats, saved);
    else
      forward_impl<float>(z, zr, labels, int(code), param, ignore_index, stats, saved);
  }
  return {stats, saved};
}

// Writes the gradient into `out` (z itself for an in-place backward, or a fresh tensor of
// z's shape and dtype) and returns it.
at::Tensor backward(const at::Tensor& z, const at::Tensor& zr, const at::Tensor& labels, const at::Tensor& saved,
                    const at::Tensor& grads, int64_t code, double param, int64_t ignore_index, at::Tensor out) {
  check_rows(z, zr, labels);
  TORCH_CHECK(code >= 0 && code <= 3, "rsa_kernels._C: unknown risk code ", code);
  check_labels(labels, z.size(1), ignore_index);
  const auto acc = acc_type(z);
  TORCH_CHECK(saved.scalar_type() == acc && saved.is_contiguous() && saved.dim() == 2 && saved.size(0) == z.size(0) &&
                  saved.size(1) == 5,
              "rsa_kernels._C: saved must be a contiguous (N, 5) tensor of the accumulation dtype");
  TORCH_CHECK(grads.scalar_type() == acc && grads.is_contiguous() && grads.dim() == 2 && grads.size(0) == z.size(0) &&
                  grads.size(1) == 3,
              "rsa_kernels._C: grads must be a contiguous (N, 3) tensor of the accumulation dtype");
  TORCH_CHECK(out.sizes() == z.sizes() && out.scalar_type() == z.scalar_type() &&
                  (out.size(1) == 1 || out.stride(1) == 1),
              "rsa_kernels._C: out must have z's shape and dtype, unit stride in V");
  {
    pybind11::gil_scoped_release nogil;
    if (is_double(z))
      backward_impl<double>(z, zr, labels, saved, grads, int(code), param, ignore_index, out);
    else
      backward_impl<float>(z, zr, labels, saved, grads, int(code), param, ignore_index, out);
  }
  return out;
}

// rsa::fexp applied to every element of a float32 / float64 tensor: what the tests check
// against torch.exp, and the exp that bench/cpu_bounds.py times.
at::Tensor exp_tensor(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "rsa_kernels._C.exp: a float32 or float64 CPU tensor");
  at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options());
  auto run = [&](auto zero) {
    using C = decltype(zero);
    constexpr int W = rsa::width<C>();
    const C* in = src.const_data_ptr<C>();
    C* o = out.data_ptr<C>();
    const int64_t n = src.numel(), blocks = (n + W - 1) / W;
    pybind11::gil_scoped_release nogil;
    at::parallel_for(0, blocks, 1024, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i = b * W, lanes = std::min<int64_t>(W, n - i);
        rsa::store_part(o + i, rsa::fexp<C>(rsa::load_part(in + i, lanes, C(0))), lanes);
      }
    });
  };
  if (src.scalar_type() == at::kFloat) run(0.0f); else run(0.0);
  return out;
}

// The exp's throughput without memory traffic: n float32 exps of values from a 4 KiB block
// (L1-resident), split over torch's threads; returns their sum so nothing is optimised away.
double exp_throughput(int64_t n) {
  constexpr int W = rsa::width<float>(), BLOCK = 1024;
  alignas(32) float vals[BLOCK];
  for (int i = 0; i < BLOCK; ++i) vals[i] = -16.0f + 16.0f * float(i) / BLOCK;  // s = z - A's range
  const int64_t chunks = (n + BLOCK - 1) / BLOCK;
  std::vector<double> part(at::get_num_threads(), 0.0);
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    rsa::Vec<float> a0 = rsa::splat(0.0f), a1 = a0;
    for (int64_t c = c0; c < c1; ++c)
      for (int i = 0; i < BLOCK; i += 2 * W) {
        a0 += rsa::fexp<float>(rsa::load(vals + i));
        a1 += rsa::fexp<float>(rsa::load(vals + i + W));
      }
    part[at::get_thread_num()] += rsa::hsum<float>(a0 + a1);
  });
  double total = 0;
  for (double p : part) total += p;
  return total;
}

}  // namespace

namespace rsa::RSA_ISA {
void register_slices(pybind11::module_& m);  // slices.cpp: the vocabulary-parallel slice kernels
}

#define RSA_STR2(x) #x
#define RSA_STR(x) RSA_STR2(x)
#ifndef RSA_TORCH_VERSION
#define RSA_TORCH_VERSION unknown
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU row kernels of rsa_kernels (SPEC section 1)";
  m.def("forward", &forward, "(z, zr, labels, code, param, ignore_index) -> [stats (N, 4), saved (N, 5)]");
  m.def("backward", &backward, "(z, zr, labels, saved, grads, code, param, ignore_index, out) -> out");
  m.def("fresh_like", &rsa::fresh_like, "(z) -> a new uninitialised tensor like z, on 2 MiB pages where Linux allows");
  m.def("exp", &exp_tensor, "(x) -> the kernels' vectorised exp of a float32/float64 tensor");
  m.def("exp_throughput", &exp_throughput, "(n) -> sum of n float32 exps of cache-resident values (timing)");
  m.attr("SIMD_WIDTH_FLOAT") = rsa::width<float>();
  rsa::register_slices(m);
  // what this build is: rsa_kernels/extension.py checks LEVEL and TORCH_VERSION after loading
  m.attr("LEVEL") = RSA_STR(RSA_ISA);
  m.attr("TORCH_VERSION") = RSA_STR(RSA_TORCH_VERSION);
#ifdef __AVX2__
  m.attr("BUILT_FOR_AVX2") = true;
#else
  m.attr("BUILT_FOR_AVX2") = false;
#endif
#ifdef __AVX512F__
  m.attr("BUILT_FOR_AVX512") = true;
#else
  m.attr("BUILT_FOR_AVX512") = false;
#endif
}
