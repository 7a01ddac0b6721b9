// CPU kernel entry points of the divergence family. divergence_cpu_kernel.cpp is compiled once per
// instruction set (see CMakeLists.txt); divergence_cpu.cpp picks the widest one the CPU runs.
#pragma once

#include <cstdint>

#include "../common/cpu_math.h"
#include "divergence.h"

namespace kdops::cpu {

#define KD_DECLARE_DIVERGENCE_ROWS(isa)                                                        \
  namespace isa {                                                                              \
  void divergence_rows(const DivergenceParams& params, Storage storage, int64_t row_begin,     \
                       int64_t row_end);                                                       \
  }

KD_DECLARE_DIVERGENCE_ROWS(baseline)
#if defined(__x86_64__)
KD_DECLARE_DIVERGENCE_ROWS(avx2)
KD_DECLARE_DIVERGENCE_ROWS(avx512)
#endif

#undef KD_DECLARE_DIVERGENCE_ROWS

}  // namespace kdops::cpu
