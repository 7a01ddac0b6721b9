// Host side of relation_kd_loss shared by every backend: argument checks, output allocation and
// the RelationParams a kernel reads. Kernels live in relation_cpu_kernel.cpp (with the GEMMs in
// relation_cpu.cpp).
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "relation.h"

namespace kdops {

struct RelationLaunch {
  RelationParams params;
  at::Tensor student;       // [G, N, D_s] as given (last dim contiguous)
  at::Tensor teacher;       // [G, N, D_t]
  at::Tensor row_loss;      // [G, N] accumulate type (forward)
  at::Tensor row_stats;     // [G, N, 4] accumulate type (written by forward, read by backward)
  at::Tensor grad_student;  // [G, N, D_s] input dtype or empty [0] (backward)
  at::Tensor grad_teacher;  // [G, N, D_t] input dtype or empty [0] (backward)
  at::Tensor row_dots;      // [G, N, 2] accumulate type, zero-filled (backward)
  at::Tensor norms[2];      // normalize: the student's and the teacher's token norms [G, N]
  at::Tensor keepalive[3];  // device temperature, contiguous valid and grad_row_loss
};

// Checks every argument (messages name it) and allocates the forward outputs; launches nothing.
RelationLaunch prepare_relation(const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& temperature,
                                const std::optional<at::Tensor>& valid, std::string_view kind,
                                bool exclude_diagonal, bool normalize);

// The same for the backward op: the saved statistics and the requested gradient buffers.
RelationLaunch prepare_relation_backward(const at::Tensor& grad_row_loss, const at::Tensor& student,
                                         const at::Tensor& teacher, const at::Tensor& temperature,
                                         const std::optional<at::Tensor>& valid,
                                         const at::Tensor& row_stats, std::string_view kind,
                                         bool exclude_diagonal, bool normalize,
                                         bool student_grad, bool teacher_grad);

}  // namespace kdops
