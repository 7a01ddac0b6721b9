// CPU kernel entry points of the co-activation family. coactivation_cpu_kernel.cpp is compiled
// once per instruction set (see CMakeLists.txt); coactivation_cpu.cpp picks the widest one the CPU
// runs.
#pragma once

#include <cstdint>

#include "../common/cpu_math.h"
#include "coactivation.h"

namespace kdops::cpu {

// select_positions: top-k ids, values and shifted_lse of positions [begin, end).
// scatter_sequences: the features of sequences [begin, end) from the selected entries.
// backward_positions: the logit gradient of positions [begin, end).
#define KD_DECLARE_COACTIVATION(isa)                                                          \
  namespace isa {                                                                             \
  void coactivation_select_positions(const CoactivationParams& params, Storage storage,       \
                                     int64_t begin, int64_t end);                             \
  void coactivation_scatter_sequences(const CoactivationParams& params, Storage storage,      \
                                      int64_t begin, int64_t end);                            \
  void coactivation_backward_positions(const CoactivationParams& params, Storage storage,     \
                                       int64_t begin, int64_t end);                           \
  }

KD_DECLARE_COACTIVATION(baseline)
#if defined(__x86_64__)
KD_DECLARE_COACTIVATION(avx2)
KD_DECLARE_COACTIVATION(avx512)
#endif

#undef KD_DECLARE_COACTIVATION

}  // namespace kdops::cpu
