// topk_kd_loss on the CPU: rows split across threads with at::parallel_for, each chunk handed to
// the widest instruction-set build of topk_cpu_kernel.cpp that this CPU runs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_dispatch.h"
#include "topk_cpu.h"
#include "topk_op.h"

namespace kdops::cpu {
namespace {

using RowsFn = void (*)(const TopKParams&, Storage, int64_t, int64_t);

RowsFn pick_rows_kernel() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512: return avx512::topk_rows;
    case Isa::kAvx2: return avx2::topk_rows;
#endif
    default: return baseline::topk_rows;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kd_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const at::Tensor& temperature, const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& normalizer, c10::string_view divergence, double beta,
    double alpha, bool renormalize, c10::string_view reduction, bool t2_scale, bool grad_student,
    bool grad_teacher, bool grad_temperature) {
  TopKLaunch launch = prepare_topk(student, teacher_ids, teacher_logprobs, temperature, valid,
                                   normalizer, divergence, beta, alpha, renormalize, reduction,
                                   t2_scale, grad_student, grad_teacher, grad_temperature);
  const RowsFn rows_kernel = pick_rows_kernel();
  const Storage storage = storage_of(student.scalar_type());
  const TopKParams& params = launch.params;
  // A task should own enough rows to amortize its scratch allocation.
  const int64_t grain = std::max<int64_t>(1, 16384 / (params.vocab + params.k));
  at::parallel_for(0, params.rows, grain, [&](int64_t begin, int64_t end) {
    rows_kernel(params, storage, begin, end);
  });
  return finish_topk(launch);
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("topk_kd_loss", &kdops::cpu::topk_kd_loss_cpu);
}
