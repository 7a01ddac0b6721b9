// Host side of coactivation_features shared by every backend: argument checks, output allocation
// and the CoactivationParams a kernel reads. Kernels live in coactivation_cpu_kernel.cpp.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "coactivation.h"

namespace kdops {

struct CoactivationLaunch {
  CoactivationParams params;
  at::Tensor features;    // [B, V] accumulate type (forward)
  at::Tensor top_ids;     // [B, T, k] int64
  at::Tensor top_values;  // [B, T, k] accumulate type
  at::Tensor shifted_lse;  // [B, T] accumulate type
  at::Tensor grad_logits;  // [B, T, V] input dtype (backward)
  at::Tensor keepalive[4];  // contiguous copies the params point into
};

// Checks every argument (messages name it) and allocates the forward outputs; launches nothing.
CoactivationLaunch prepare_coactivation(const at::Tensor& logits, int64_t k,
                                        const at::Tensor& temperature,
                                        const std::optional<at::Tensor>& valid,
                                        std::string_view transform, bool normalize);

// The same for the backward op: the saved per-position entries and the gradient buffer.
CoactivationLaunch prepare_coactivation_backward(
    const at::Tensor& grad_features, const at::Tensor& logits, const at::Tensor& top_ids,
    const at::Tensor& top_values, const at::Tensor& shifted_lse, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, std::string_view transform, bool normalize);

}  // namespace kdops
