// CPU kernel entry points of sequence_logprob. sequence_cpu_kernel.cpp is compiled once per
// instruction set (see CMakeLists.txt); sequence_cpu.cpp picks the widest one the CPU runs.
#pragma once

#include <cstdint>

#include "../common/cpu_math.h"
#include "sequence.h"

namespace kdops::cpu {

#define KD_DECLARE_SEQUENCE_ROWS(isa)                                                       \
  namespace isa {                                                                           \
  void sequence_rows(const SequenceParams& params, Storage storage, int64_t row_begin,      \
                     int64_t row_end);                                                      \
  }

KD_DECLARE_SEQUENCE_ROWS(baseline)
#if defined(__x86_64__)
KD_DECLARE_SEQUENCE_ROWS(avx2)
KD_DECLARE_SEQUENCE_ROWS(avx512)
#endif

#undef KD_DECLARE_SEQUENCE_ROWS

}  // namespace kdops::cpu
