// sequence_logprob on the CPU: rows split across threads with at::parallel_for, each chunk handed
// to the widest instruction-set build of sequence_cpu_kernel.cpp that this CPU runs.
#include <algorithm>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_dispatch.h"
#include "sequence_cpu.h"
#include "sequence_op.h"

namespace kdops::cpu {
namespace {

using RowsFn = void (*)(const SequenceParams&, Storage, int64_t, int64_t);

RowsFn pick_rows_kernel() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512: return avx512::sequence_rows;
    case Isa::kAvx2: return avx2::sequence_rows;
#endif
    default: return baseline::sequence_rows;
  }
}

std::tuple<at::Tensor, at::Tensor> sequence_logprob_cpu(const at::Tensor& logits,
                                                        const at::Tensor& labels,
                                                        int64_t ignore_index, bool grad) {
  const SequenceLaunch launch = prepare_sequence(logits, labels, ignore_index, grad);
  const RowsFn rows_kernel = pick_rows_kernel();
  const Storage storage = storage_of(logits.scalar_type());
  const SequenceParams& params = launch.params;
  // Rows are independent and need no scratch: a task only has to outweigh its scheduling.
  const int64_t grain = std::max<int64_t>(1, 16384 / params.vocab);
  at::parallel_for(0, params.rows, grain, [&](int64_t begin, int64_t end) {
    rows_kernel(params, storage, begin, end);
  });
  return finish_sequence(launch);
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("sequence_logprob", &kdops::cpu::sequence_logprob_cpu);
}
