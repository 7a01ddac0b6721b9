// Allocation helpers shared by the op wrappers.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdops {

// A fresh [rows, vocab] buffer for a fused gradient. On Linux a large CPU buffer is advised into
// transparent huge pages before its first touch: the kernel then takes one fault per 2 MiB
// instead of one per 4 KiB, which on a 500 MB gradient is most of the cost of the allocation
// (c10 only does this under THP_MEM_ALLOC_ENABLE=1). Harmless where THP is off.
inline at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor buffer = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (buffer.device().is_cpu() && buffer.nbytes() >= 4 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + buffer.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return buffer;
}

}  // namespace kdops
