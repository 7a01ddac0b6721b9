// CPU kernel entry points of adaspec_token_kl. adaspec_cpu_kernel.cpp is compiled once per
// instruction set (see CMakeLists.txt); adaspec_cpu.cpp picks the widest one the CPU runs.
#pragma once

#include <cstdint>

#include "../common/cpu_math.h"
#include "adaspec.h"

namespace kdops::cpu {

#define KD_DECLARE_ADASPEC_ROWS(isa)                                                               \
  namespace isa {                                                                                  \
  void adaspec_rows(const AdaspecParams& params, Storage storage, int64_t row_begin, int64_t row_end); \
  }

KD_DECLARE_ADASPEC_ROWS(baseline)
#if defined(__x86_64__)
KD_DECLARE_ADASPEC_ROWS(avx2)
KD_DECLARE_ADASPEC_ROWS(avx512)
#endif

#undef KD_DECLARE_ADASPEC_ROWS

}  // namespace kdops::cpu
