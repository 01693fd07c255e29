// A fresh gradient on 2 MiB pages (docs/cpu_backend.md, "The fresh gradient").
//
// Every implementation returns a new (N, V) gradient, and writing it is mostly the cost of
// faulting its pages in: one fault per 4 KiB page (32000 for 125 MiB), each far dearer on a
// virtual machine than the write itself. A mapping that Linux backs with transparent huge
// pages (madvise(MADV_HUGEPAGE)) takes one fault per 2 MiB. The mapping is aligned to 2 MiB
// so that all of it but the tail can be, and is unmapped when the tensor is freed; small
// tensors, other systems and failures take at::empty.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <cstdint>

#include "simd.h"  // RSA_ISA: this level's namespace

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace rsa::RSA_ISA {  // simd.h: one namespace per instruction-set level

constexpr int64_t HUGE_PAGE = int64_t(2) << 20;

inline at::Tensor fresh_like(const at::Tensor& like) {
  const at::TensorOptions opts = like.options();
  const int64_t bytes = c10::multiply_integers(like.sizes()) * int64_t(like.element_size());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (like.device().is_cpu() && bytes >= 4 * HUGE_PAGE) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t len = (size_t(bytes) + page - 1) / page * page;
    const size_t span = len + size_t(HUGE_PAGE);
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t start = (base + uintptr_t(HUGE_PAGE) - 1) & ~uintptr_t(HUGE_PAGE - 1);
      // keep [start, start + len): the head before the 2 MiB boundary and the tail go back
      if (start > base) munmap(raw, start - base);
      if (base + span > start + len) munmap(reinterpret_cast<void*>(start + len), base + span - (start + len));
      void* data = reinterpret_cast<void*>(start);
      madvise(data, len, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
      return at::from_blob(data, like.sizes(), [len](void* p) { munmap(p, len); }, opts);
    }
  }
#endif
  return at::empty(like.sizes(), opts);
}

}  // namespace rsa::RSA_ISA
