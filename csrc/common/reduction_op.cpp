#include "reduction_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace kdops {

Reduction parse_reduction(std::string_view name, std::string_view op) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, op, ": reduction must be 'mean', 'sum' or 'none'; got '", name, "'");
}

at::Tensor reduction_scale(Reduction reduction, const std::optional<at::Tensor>& valid,
                           const std::optional<at::Tensor>& normalizer, int64_t rows,
                           const at::TensorOptions& acc_options) {
  const auto acc = acc_options.dtype().toScalarType();
  if (reduction == Reduction::kMean && normalizer) {
    return normalizer->to(acc_options).reciprocal();
  }
  if (reduction == Reduction::kMean) {
    const at::Tensor count = valid ? valid->sum().to(acc) : at::scalar_tensor(rows, acc_options);
    return at::where(count > 0, count.reciprocal(), at::zeros_like(count));
  }
  return at::ones({}, acc_options);
}

at::Tensor reduce_rows(const at::Tensor& loss_rows, Reduction reduction, const at::Tensor& scale) {
  return reduction == Reduction::kNone ? loss_rows : loss_rows.sum() * scale;
}

}  // namespace kdops
