// Host side of kd_loss shared by every backend: argument checks, output allocation, and the
// DivergenceParams a kernel reads. Kernels themselves live in divergence_cpu_kernel.cpp and
// divergence_cuda.cu.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../common/reduction_op.h"
#include "divergence.h"

namespace kdops {

struct DivergenceLaunch {
  DivergenceParams params;
  Reduction reduction;
  at::Tensor loss_rows;      // [N] accumulate type
  at::Tensor grad_student;   // [N, V] or empty [0]
  at::Tensor grad_teacher;   // [N, V] or empty [0]
  at::Tensor grad_temperature;  // [N] or empty [0]
  at::Tensor scale;          // 0-d accumulate type: 1 / (valid rows | normalizer), 1 for sum/none
  at::Tensor temperature;    // kept alive for params.temperature
  at::Tensor valid_keepalive;  // kept alive for params.valid
};

// Checks every argument (messages name it) and allocates the outputs; launches nothing.
DivergenceLaunch prepare_divergence(const at::Tensor& student, const at::Tensor& teacher,
                                    const at::Tensor& temperature,
                                    const std::optional<at::Tensor>& valid,
                                    const std::optional<at::Tensor>& normalizer,
                                    std::string_view divergence, double beta, double alpha,
                                    std::string_view reduction, bool t2_scale, bool grad_student,
                                    bool grad_teacher, bool grad_temperature);

// The op's outputs once the kernel has filled the launch's buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_divergence(
    DivergenceLaunch& launch);

}  // namespace kdops
