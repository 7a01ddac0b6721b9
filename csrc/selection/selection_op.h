// Host side of select_top_fraction shared by the CPU and CUDA backends: argument checks, the
// quantile level in the compute type, and the output. Kernels live in selection_cpu.cpp and
// selection_cuda.cu.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace kdops {

struct SelectionLaunch {
  at::Tensor scores;                // [N], contiguous
  std::optional<at::Tensor> valid;  // [N] bool, contiguous, or none: every score counts
  double q;                         // 1 - fraction, in double (kernels round it to their type)
  at::Tensor mask;                  // [N] bool, the output (uninitialized)
};

// Checks every argument (messages name it) and allocates the mask; launches nothing.
SelectionLaunch prepare_selection(const at::Tensor& scores, double fraction,
                                  const std::optional<at::Tensor>& valid);

}  // namespace kdops
