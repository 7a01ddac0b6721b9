// kd_loss on the CPU: rows split across threads with at::parallel_for, each chunk handed to the
// widest instruction-set build of divergence_cpu_kernel.cpp that this CPU runs.
#include <cstdlib>
#include <string_view>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "divergence_cpu.h"
#include "divergence_op.h"

namespace kdops::cpu {
namespace {

using RowsFn = void (*)(const DivergenceParams&, Storage, int64_t, int64_t);

// KDOPS_CPU_ISA=baseline|avx2|avx512 forces a build (tests run each one); otherwise the widest
// one the CPU supports.
RowsFn pick_rows_kernel() {
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
  if (isa == "baseline") return baseline::divergence_rows;
  if (isa == "avx2") return avx2::divergence_rows;
  if (isa == "avx512" || has_avx512) return avx512::divergence_rows;
  if (has_avx2) return avx2::divergence_rows;
#endif
  return baseline::divergence_rows;
}

Storage storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return Storage::kFloat32;
    case at::kDouble: return Storage::kFloat64;
    case at::kBFloat16: return Storage::kBFloat16;
    case at::kHalf: return Storage::kFloat16;
    default: TORCH_CHECK(false, "kd_loss: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& normalizer,
    c10::string_view divergence, double beta, double alpha, c10::string_view reduction,
    bool t2_scale, bool grad_student, bool grad_teacher, bool grad_temperature) {
  DivergenceLaunch launch = prepare_divergence(
      student, teacher, temperature, valid, normalizer, divergence, beta, alpha, reduction,
      t2_scale, grad_student, grad_teacher, grad_temperature);
  const RowsFn rows_kernel = pick_rows_kernel();
  const Storage storage = storage_of(student.scalar_type());
  const DivergenceParams& params = launch.params;
  // A task should own enough rows to amortize its scratch allocation.
  const int64_t grain = std::max<int64_t>(1, 16384 / params.vocab);
  at::parallel_for(0, params.rows, grain, [&](int64_t begin, int64_t end) {
    rows_kernel(params, storage, begin, end);
  });
  return finish_divergence(launch);
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("kd_loss", &kdops::cpu::kd_loss_cpu);
}
