// CPU kernel entry points of the sparse-teacher family. topk_cpu_kernel.cpp is compiled once per
// instruction set (see CMakeLists.txt); topk_cpu.cpp picks the widest one the CPU runs.
#pragma once

#include <cstdint>

#include "../common/cpu_math.h"
#include "topk.h"

namespace kdops::cpu {

#define KD_DECLARE_TOPK_ROWS(isa)                                                              \
  namespace isa {                                                                              \
  void topk_rows(const TopKParams& params, Storage storage, int64_t row_begin, int64_t row_end); \
  }

KD_DECLARE_TOPK_ROWS(baseline)
#if defined(__x86_64__)
KD_DECLARE_TOPK_ROWS(avx2)
KD_DECLARE_TOPK_ROWS(avx512)
#endif

#undef KD_DECLARE_TOPK_ROWS

}  // namespace kdops::cpu
