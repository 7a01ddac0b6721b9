// Host-side choices for the per-ISA CPU kernels (see CMakeLists.txt): which instruction-set build
// this process runs, and the storage type of a tensor as those torch-free objects name it.
#pragma once

#include <cstdlib>
#include <string_view>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cpu_math.h"

namespace kdops::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// KDOPS_CPU_ISA=baseline|avx2|avx512 forces a build (the tests run each one); otherwise the widest
// one the CPU supports. Read on every call, so a test may change the variable between calls.
inline Isa cpu_isa() {
#if defined(__x86_64__)
  const char* forced = std::getenv("KDOPS_CPU_ISA");
  const std::string_view isa = forced ? forced : "";
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  TORCH_CHECK_VALUE(isa.empty() || isa == "baseline" || isa == "avx2" || isa == "avx512",
                    "KDOPS_CPU_ISA must be baseline, avx2 or avx512; got '", isa, "'");
  TORCH_CHECK(isa != "avx512" || has_avx512, "KDOPS_CPU_ISA=avx512 but this CPU lacks AVX-512");
  TORCH_CHECK(isa != "avx2" || has_avx2, "KDOPS_CPU_ISA=avx2 but this CPU lacks AVX2/FMA/F16C");
  if (isa == "baseline") return Isa::kBaseline;
  if (isa == "avx2") return Isa::kAvx2;
  if (isa == "avx512" || has_avx512) return Isa::kAvx512;
  if (has_avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

inline Storage storage_of(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat: return Storage::kFloat32;
    case c10::kDouble: return Storage::kFloat64;
    case c10::kBFloat16: return Storage::kBFloat16;
    case c10::kHalf: return Storage::kFloat16;
    default: TORCH_CHECK(false, "kdops: unsupported floating-point dtype ", dtype);
  }
}

}  // namespace kdops::cpu
