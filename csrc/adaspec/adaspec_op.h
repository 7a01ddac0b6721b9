// Host side of adaspec_token_kl shared by every backend: argument checks, output allocation and
// the AdaspecParams a kernel reads. Kernels live in adaspec_cpu_kernel.cpp and adaspec_cuda.cu.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "adaspec.h"

namespace kdops {

struct AdaspecLaunch {
  AdaspecParams params;
  at::Tensor draft_kl;      // [N] accumulate type
  at::Tensor reference_kl;  // [N] accumulate type
  at::Tensor keepalive[2];  // the device temperature and contiguous valid the params point into
};

// Checks every argument (messages name it) and allocates the outputs; launches nothing.
AdaspecLaunch prepare_adaspec(const at::Tensor& draft, const at::Tensor& reference,
                              const at::Tensor& target, const at::Tensor& temperature,
                              const std::optional<at::Tensor>& valid);

inline std::tuple<at::Tensor, at::Tensor> finish_adaspec(AdaspecLaunch& launch) {
  return {launch.draft_kl, launch.reference_kl};
}

}  // namespace kdops
