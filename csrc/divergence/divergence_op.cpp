#include "divergence_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../common/memory.h"

namespace kdops {
namespace {

Divergence parse_divergence(std::string_view name, double beta, double alpha) {
  // The exact endpoints are the plain KLs (jsd: TRL's GKD convention; skews: alpha = 0 mixes
  // nothing in), dispatched to the cheaper kernels.
  if (name == "fkl") return Divergence::kFKL;
  if (name == "rkl") return Divergence::kRKL;
  if (name == "jsd") {
    if (beta == 0.0) return Divergence::kFKL;
    if (beta == 1.0) return Divergence::kRKL;
    return Divergence::kJSD;
  }
  if (name == "skew_fkl") return alpha == 0.0 ? Divergence::kFKL : Divergence::kSkewFKL;
  if (name == "skew_rkl") return alpha == 0.0 ? Divergence::kRKL : Divergence::kSkewRKL;
  if (name == "tvd") return Divergence::kTVD;
  TORCH_CHECK_VALUE(false, "kd_loss: divergence must be one of fkl, rkl, jsd, skew_fkl, skew_rkl, ",
                    "tvd; got '", name, "'");
}

}  // namespace

DivergenceLaunch prepare_divergence(const at::Tensor& student, const at::Tensor& teacher,
                                    const at::Tensor& temperature,
                                    const std::optional<at::Tensor>& valid,
                                    const std::optional<at::Tensor>& normalizer,
                                    std::string_view divergence, double beta, double alpha,
                                    std::string_view reduction, bool t2_scale, bool grad_student,
                                    bool grad_teacher, bool grad_temperature) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_loss: student must be 2-D [rows, vocab]; got ",
                    student.dim(), " dims");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "kd_loss: teacher must have the student's ",
                    "shape ", student.sizes(), "; got ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.scalar_type() == student.scalar_type(), "kd_loss: teacher dtype ",
                    teacher.scalar_type(), " differs from student dtype ", student.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "kd_loss: teacher is on ",
                    teacher.device(), " but student is on ", student.device());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    "kd_loss: student must be float32, float64, bfloat16 or float16; got ", dtype);
  TORCH_CHECK_VALUE(student.size(1) > 0, "kd_loss: vocab (last dim) must be at least 1");
  TORCH_CHECK_VALUE(student.stride(1) == 1 && teacher.stride(1) == 1,
                    "kd_loss: the last dim of student and teacher must be contiguous");
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "kd_loss: beta must be in [0, 1]; got ", beta);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "kd_loss: alpha must be in [0, 1]; got ", alpha);

  const int64_t rows = student.size(0);
  const int64_t vocab = student.size(1);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc);

  TORCH_CHECK_VALUE(temperature.dim() == 0 || (temperature.dim() == 1 && temperature.size(0) == rows),
                    "kd_loss: temperature must be 0-d or have shape [", rows, "]; got ",
                    temperature.sizes());
  TORCH_CHECK_VALUE(temperature.scalar_type() == acc, "kd_loss: temperature must be ", acc,
                    " for ", dtype, " logits; got ", temperature.scalar_type());
  if (valid) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 &&
                          valid->size(0) == rows,
                      "kd_loss: valid must be a bool tensor of shape [", rows, "]");
    TORCH_CHECK_VALUE(valid->device() == student.device(), "kd_loss: valid is on ",
                      valid->device(), " but student is on ", student.device());
  }
  if (normalizer) {
    TORCH_CHECK_VALUE(normalizer->dim() == 0, "kd_loss: normalizer must be a 0-d tensor");
  }

  DivergenceLaunch launch;
  launch.reduction = parse_reduction(reduction, "kd_loss");
  auto& prm = launch.params;
  prm.divergence = parse_divergence(divergence, beta, alpha);
  prm.coef = prm.divergence == Divergence::kJSD ? beta : alpha;
  prm.t2_scale = t2_scale;
  prm.rows = rows;
  prm.vocab = vocab;
  prm.student = student.data_ptr();
  prm.teacher = teacher.data_ptr();
  prm.student_row_stride = student.stride(0);
  prm.teacher_row_stride = teacher.stride(0);

  // A CPU scalar temperature may accompany device logits (a Python float): move it once.
  launch.temperature = temperature.to(student.device()).contiguous();
  prm.temperature = launch.temperature.data_ptr();
  prm.temperature_stride = temperature.dim() == 0 ? 0 : 1;
  at::Tensor valid_contig;
  if (valid) {
    valid_contig = valid->contiguous();
    prm.valid = valid_contig.data_ptr<bool>();
  }

  // The reduction's scale is folded into the fused gradient, so backward only multiplies by
  // grad_output.
  launch.scale = reduction_scale(launch.reduction, valid ? std::optional<at::Tensor>(valid_contig)
                                                         : std::nullopt,
                                 normalizer, rows, acc_opts);
  prm.scale = launch.scale.data_ptr();

  launch.loss_rows = at::empty({rows}, acc_opts);
  prm.loss_rows = launch.loss_rows.data_ptr();
  // An unrequested gradient is a fresh empty tensor: op outputs must not alias each other.
  const auto grad_or_empty = [&](bool wanted) {
    return wanted ? empty_gradient({rows, vocab}, student.options()) : at::empty({0}, student.options());
  };
  launch.grad_student = grad_or_empty(grad_student);
  launch.grad_teacher = grad_or_empty(grad_teacher);
  launch.grad_temperature = grad_temperature ? at::empty({rows}, acc_opts) : at::empty({0}, acc_opts);
  prm.grad_student = grad_student ? launch.grad_student.data_ptr() : nullptr;
  prm.grad_teacher = grad_teacher ? launch.grad_teacher.data_ptr() : nullptr;
  prm.grad_temperature = grad_temperature ? launch.grad_temperature.data_ptr() : nullptr;
  // keep `valid` alive through the launch: the params hold its pointer
  if (valid) launch.valid_keepalive = valid_contig;
  return launch;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_divergence(
    DivergenceLaunch& launch) {
  return {reduce_rows(launch.loss_rows, launch.reduction, launch.scale), launch.grad_student,
          launch.grad_teacher, launch.grad_temperature};
}

}  // namespace kdops
