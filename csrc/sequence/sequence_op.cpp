#include "sequence_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../common/memory.h"

namespace kdops {

SequenceLaunch prepare_sequence(const at::Tensor& logits, const at::Tensor& labels,
                                int64_t ignore_index, bool grad) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(logits.dim() == 2, "sequence_logprob: logits must be 2-D [rows, vocab]; got ",
                    logits.dim(), " dims");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    "sequence_logprob: logits must be float32, float64, bfloat16 or float16; got ",
                    dtype);
  TORCH_CHECK_VALUE(logits.size(1) > 0, "sequence_logprob: vocab (last dim) must be at least 1");
  TORCH_CHECK_VALUE(logits.stride(1) == 1, "sequence_logprob: the logits' last dim must be contiguous");
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == rows,
                    "sequence_logprob: labels must have shape [", rows, "]; got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                    "sequence_logprob: labels must be int64 or int32; got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "sequence_logprob: labels is on ",
                    labels.device(), " but logits is on ", logits.device());

  SequenceLaunch launch;
  launch.labels = labels.contiguous();
  auto& prm = launch.params;
  prm.logits = logits.data_ptr();
  prm.logits_row_stride = logits.stride(0);
  prm.labels = launch.labels.data_ptr();
  prm.labels_are_int64 = launch.labels.scalar_type() == at::kLong;
  prm.ignore_index = ignore_index;
  prm.rows = rows;
  prm.vocab = vocab;

  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  launch.token_logprob = at::empty({rows}, logits.options().dtype(acc));
  prm.token_logprob = launch.token_logprob.data_ptr();
  launch.grad_logits = grad ? empty_gradient({rows, vocab}, logits.options())
                            : at::empty({0}, logits.options());
  prm.grad_logits = grad ? launch.grad_logits.data_ptr() : nullptr;
  return launch;
}

}  // namespace kdops
