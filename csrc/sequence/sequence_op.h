// Host side of sequence_logprob shared by every backend: argument checks, output allocation and
// the SequenceParams a kernel reads. Kernels live in sequence_cpu_kernel.cpp and sequence_cuda.cu.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "sequence.h"

namespace kdops {

struct SequenceLaunch {
  SequenceParams params;
  at::Tensor token_logprob;  // [rows] accumulate type
  at::Tensor grad_logits;    // [rows, vocab] input dtype or empty [0]
  at::Tensor labels;         // the contiguous labels the params point into
};

// Checks every argument (messages name it) and allocates the outputs; launches nothing. Labels
// are range-checked by the kernels (NaN rows) and, before them, by the Python wrapper.
SequenceLaunch prepare_sequence(const at::Tensor& logits, const at::Tensor& labels,
                                int64_t ignore_index, bool grad);

inline std::tuple<at::Tensor, at::Tensor> finish_sequence(const SequenceLaunch& launch) {
  return {launch.token_logprob, launch.grad_logits};
}

}  // namespace kdops
