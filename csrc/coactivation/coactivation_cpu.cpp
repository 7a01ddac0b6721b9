// coactivation_features on the CPU: positions split across threads for the selection (and the
// backward), sequences for the scatter, each chunk handed to the widest instruction-set build of
// coactivation_cpu_kernel.cpp that this CPU runs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_dispatch.h"
#include "coactivation_cpu.h"
#include "coactivation_op.h"

namespace kdops::cpu {
namespace {

using RangeFn = void (*)(const CoactivationParams&, Storage, int64_t, int64_t);

struct CoactivationKernels {
  RangeFn select;
  RangeFn scatter;
  RangeFn backward;
};

CoactivationKernels pick_kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512:
      return {avx512::coactivation_select_positions, avx512::coactivation_scatter_sequences,
              avx512::coactivation_backward_positions};
    case Isa::kAvx2:
      return {avx2::coactivation_select_positions, avx2::coactivation_scatter_sequences,
              avx2::coactivation_backward_positions};
#endif
    default:
      return {baseline::coactivation_select_positions, baseline::coactivation_scatter_sequences,
              baseline::coactivation_backward_positions};
  }
}

// A task should own enough positions to amortize its scratch allocation.
int64_t position_grain(const CoactivationParams& prm) {
  return std::max<int64_t>(1, 16384 / prm.vocab);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coactivation_features_cpu(
    const at::Tensor& logits, int64_t k, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, c10::string_view transform, bool normalize) {
  CoactivationLaunch launch = prepare_coactivation(logits, k, temperature, valid, transform, normalize);
  const CoactivationKernels kernels = pick_kernels();
  const Storage storage = storage_of(logits.scalar_type());
  const CoactivationParams& prm = launch.params;
  at::parallel_for(0, prm.positions(), position_grain(prm), [&](int64_t begin, int64_t end) {
    kernels.select(prm, storage, begin, end);
  });
  // One sequence per task at most: its positions are scattered in order, whatever the threads.
  at::parallel_for(0, prm.batch, 1, [&](int64_t begin, int64_t end) {
    kernels.scatter(prm, storage, begin, end);
  });
  return {launch.features, launch.top_ids, launch.top_values, launch.shifted_lse};
}

at::Tensor coactivation_features_backward_cpu(
    const at::Tensor& grad_features, const at::Tensor& logits, const at::Tensor& top_ids,
    const at::Tensor& top_values, const at::Tensor& shifted_lse, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, c10::string_view transform, bool normalize) {
  CoactivationLaunch launch = prepare_coactivation_backward(
      grad_features, logits, top_ids, top_values, shifted_lse, temperature, valid, transform,
      normalize);
  const CoactivationKernels kernels = pick_kernels();
  const Storage storage = storage_of(logits.scalar_type());
  const CoactivationParams& prm = launch.params;
  at::parallel_for(0, prm.positions(), position_grain(prm), [&](int64_t begin, int64_t end) {
    kernels.backward(prm, storage, begin, end);
  });
  return launch.grad_logits;
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("coactivation_features", &kdops::cpu::coactivation_features_cpu);
  m.impl("coactivation_features_backward", &kdops::cpu::coactivation_features_backward_cpu);
}
