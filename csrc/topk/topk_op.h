// Host side of topk_kd_loss shared by every backend: argument checks, output allocation and the
// TopKParams a kernel reads. Kernels live in topk_cpu_kernel.cpp and topk_cuda.cu.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../common/reduction_op.h"
#include "topk.h"

namespace kdops {

struct TopKLaunch {
  TopKParams params;
  Reduction reduction;
  at::Tensor loss_rows;         // [N] accumulate type
  at::Tensor grad_student;      // [N, V] input dtype or empty [0]
  at::Tensor grad_teacher;      // [N, K] accumulate type or empty [0]
  at::Tensor grad_temperature;  // [N] accumulate type or empty [0]
  at::Tensor scale;             // 0-d: the reduction's 1/denominator (1 for sum / none)
  at::Tensor keepalive[4];      // contiguous copies the params point into
};

// Checks every argument (messages name it) and allocates the outputs; launches nothing. Ids are
// range-checked by the kernels (a row with an id outside [0, V) gets a NaN loss) and, without a
// host sync, by the Python wrapper.
TopKLaunch prepare_topk(const at::Tensor& student, const at::Tensor& teacher_ids,
                        const at::Tensor& teacher_logprobs, const at::Tensor& temperature,
                        const std::optional<at::Tensor>& valid,
                        const std::optional<at::Tensor>& normalizer, std::string_view divergence,
                        double beta, double alpha, bool renormalize, std::string_view reduction,
                        bool t2_scale, bool grad_student, bool grad_teacher,
                        bool grad_temperature);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_topk(TopKLaunch& launch);

}  // namespace kdops
