// adaspec_token_kl on the CPU: rows split across threads with at::parallel_for, each chunk handed
// to the widest instruction-set build of adaspec_cpu_kernel.cpp that this CPU runs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_dispatch.h"
#include "adaspec_cpu.h"
#include "adaspec_op.h"

namespace kdops::cpu {
namespace {

using RowsFn = void (*)(const AdaspecParams&, Storage, int64_t, int64_t);

RowsFn pick_rows_kernel() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512: return avx512::adaspec_rows;
    case Isa::kAvx2: return avx2::adaspec_rows;
#endif
    default: return baseline::adaspec_rows;
  }
}

std::tuple<at::Tensor, at::Tensor> adaspec_token_kl_cpu(const at::Tensor& draft,
                                                         const at::Tensor& reference,
                                                         const at::Tensor& target,
                                                         const at::Tensor& temperature,
                                                         const std::optional<at::Tensor>& valid) {
  AdaspecLaunch launch = prepare_adaspec(draft, reference, target, temperature, valid);
  const RowsFn rows_kernel = pick_rows_kernel();
  const Storage storage = storage_of(draft.scalar_type());
  const AdaspecParams& params = launch.params;
  // The kernel keeps no scratch: a task only needs enough work to outweigh its scheduling.
  const int64_t grain = std::max<int64_t>(1, 4096 / params.vocab);
  at::parallel_for(0, params.rows, grain, [&](int64_t begin, int64_t end) {
    rows_kernel(params, storage, begin, end);
  });
  return finish_adaspec(launch);
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("adaspec_token_kl", &kdops::cpu::adaspec_token_kl_cpu);
}
