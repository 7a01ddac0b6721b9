// Host-side reduction handling shared by every loss op: parsing the option, the scale folded into
// fused gradients, and the final reduction of per-row losses.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

namespace kdops {

enum class Reduction { kMean, kSum, kNone };

// `op` names the caller in the error message.
Reduction parse_reduction(std::string_view name, std::string_view op);

// 0-d accumulate-type tensor by which the per-row losses (and so the fused gradients) are
// multiplied: 1 / normalizer or 1 / (number of valid rows, 0 when none) for mean, else 1.
// Stays on the device: no host synchronisation.
at::Tensor reduction_scale(Reduction reduction, const std::optional<at::Tensor>& valid,
                           const std::optional<at::Tensor>& normalizer, int64_t rows,
                           const at::TensorOptions& acc_options);

// The op's loss output: per-row losses as they are (none) or their sum times the scale.
at::Tensor reduce_rows(const at::Tensor& loss_rows, Reduction reduction, const at::Tensor& scale);

}  // namespace kdops
