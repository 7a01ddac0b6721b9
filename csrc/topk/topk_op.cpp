#include "topk_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../common/memory.h"

namespace kdops {
namespace {

// Sets the divergence fields. jsd / skew endpoints become the plain KLs on the support (the
// full-vocabulary fkl is only ever asked for by name).
void parse_topk_divergence(std::string_view name, double beta, double alpha, TopKParams& prm) {
  prm.support_fkl = false;
  if (name == "fkl") {
    prm.divergence = Divergence::kFKL;
  } else if (name == "rkl") {
    prm.divergence = Divergence::kRKL;
  } else if (name == "jsd") {
    prm.divergence = beta == 0.0 ? Divergence::kFKL : beta == 1.0 ? Divergence::kRKL : Divergence::kJSD;
    prm.support_fkl = beta == 0.0;
  } else if (name == "skew_fkl") {
    prm.divergence = alpha == 0.0 ? Divergence::kFKL : Divergence::kSkewFKL;
    prm.support_fkl = alpha == 0.0;
  } else if (name == "skew_rkl") {
    prm.divergence = alpha == 0.0 ? Divergence::kRKL : Divergence::kSkewRKL;
  } else if (name == "tvd") {
    prm.divergence = Divergence::kTVD;
  } else {
    TORCH_CHECK_VALUE(false, "topk_kd_loss: divergence must be one of fkl, rkl, jsd, skew_fkl, ",
                      "skew_rkl, tvd; got '", name, "'");
  }
  prm.coef = prm.divergence == Divergence::kJSD ? beta : alpha;
}

}  // namespace

TopKLaunch prepare_topk(const at::Tensor& student, const at::Tensor& teacher_ids,
                        const at::Tensor& teacher_logprobs, const at::Tensor& temperature,
                        const std::optional<at::Tensor>& valid,
                        const std::optional<at::Tensor>& normalizer, std::string_view divergence,
                        double beta, double alpha, bool renormalize, std::string_view reduction,
                        bool t2_scale, bool grad_student, bool grad_teacher,
                        bool grad_temperature) {
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(student.dim() == 2, "topk_kd_loss: student must be 2-D [rows, vocab]; got ",
                    student.dim(), " dims");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    "topk_kd_loss: student must be float32, float64, bfloat16 or float16; got ",
                    dtype);
  TORCH_CHECK_VALUE(student.size(1) > 0, "topk_kd_loss: vocab (last dim) must be at least 1");
  TORCH_CHECK_VALUE(student.stride(1) == 1, "topk_kd_loss: the student's last dim must be contiguous");
  const int64_t rows = student.size(0);
  const int64_t vocab = student.size(1);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = student.options().dtype(acc);

  TORCH_CHECK_VALUE(teacher_ids.dim() == 2 && teacher_ids.size(0) == rows,
                    "topk_kd_loss: teacher_ids must have shape [", rows, ", K]; got ",
                    teacher_ids.sizes());
  const int64_t k = teacher_ids.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab && k <= kTopKMaxK, "topk_kd_loss: K (teacher_ids.size(-1)) ",
                    "must be in [1, min(V, ", kTopKMaxK, ")] = [1, ", std::min(vocab, kTopKMaxK),
                    "]; got ", k);
  TORCH_CHECK_VALUE(teacher_ids.scalar_type() == at::kLong || teacher_ids.scalar_type() == at::kInt,
                    "topk_kd_loss: teacher_ids must be int64 or int32; got ",
                    teacher_ids.scalar_type());
  TORCH_CHECK_VALUE(teacher_logprobs.sizes() == teacher_ids.sizes(),
                    "topk_kd_loss: teacher_logprobs must have teacher_ids' shape ",
                    teacher_ids.sizes(), "; got ", teacher_logprobs.sizes());
  TORCH_CHECK_VALUE(teacher_logprobs.scalar_type() == acc, "topk_kd_loss: teacher_logprobs must be ",
                    acc, " for ", dtype, " logits; got ", teacher_logprobs.scalar_type());
  TORCH_CHECK_VALUE(teacher_ids.device() == student.device() &&
                        teacher_logprobs.device() == student.device(),
                    "topk_kd_loss: teacher_ids and teacher_logprobs must be on the student's "
                    "device ", student.device());
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "topk_kd_loss: beta must be in [0, 1]; got ", beta);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "topk_kd_loss: alpha must be in [0, 1]; got ",
                    alpha);
  TORCH_CHECK_VALUE(temperature.dim() == 0 || (temperature.dim() == 1 && temperature.size(0) == rows),
                    "topk_kd_loss: temperature must be 0-d or have shape [", rows, "]; got ",
                    temperature.sizes());
  TORCH_CHECK_VALUE(temperature.scalar_type() == acc, "topk_kd_loss: temperature must be ", acc,
                    " for ", dtype, " logits; got ", temperature.scalar_type());
  if (valid) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 &&
                          valid->size(0) == rows,
                      "topk_kd_loss: valid must be a bool tensor of shape [", rows, "]");
    TORCH_CHECK_VALUE(valid->device() == student.device(), "topk_kd_loss: valid is on ",
                      valid->device(), " but student is on ", student.device());
  }
  if (normalizer) {
    TORCH_CHECK_VALUE(normalizer->dim() == 0, "topk_kd_loss: normalizer must be a 0-d tensor");
  }

  TopKLaunch launch;
  launch.reduction = parse_reduction(reduction, "topk_kd_loss");
  auto& prm = launch.params;
  parse_topk_divergence(divergence, beta, alpha, prm);
  prm.renormalize = renormalize;
  prm.t2_scale = t2_scale;
  prm.rows = rows;
  prm.vocab = vocab;
  prm.k = k;
  prm.student = student.data_ptr();
  prm.student_row_stride = student.stride(0);

  const at::Tensor ids = teacher_ids.contiguous();
  const at::Tensor logprobs = teacher_logprobs.contiguous();
  prm.ids = ids.data_ptr();
  prm.ids_are_int64 = ids.scalar_type() == at::kLong;
  prm.logprobs = logprobs.data_ptr();
  // A CPU scalar temperature may accompany device logits (a Python float): move it once.
  const at::Tensor tau = temperature.to(student.device()).contiguous();
  prm.temperature = tau.data_ptr();
  prm.temperature_stride = temperature.dim() == 0 ? 0 : 1;
  std::optional<at::Tensor> valid_contig;
  if (valid) {
    valid_contig = valid->contiguous();
    prm.valid = valid_contig->data_ptr<bool>();
  }
  launch.keepalive[0] = ids;
  launch.keepalive[1] = logprobs;
  launch.keepalive[2] = tau;
  if (valid_contig) launch.keepalive[3] = *valid_contig;

  launch.scale = reduction_scale(launch.reduction, valid_contig, normalizer, rows, acc_opts);
  prm.scale = launch.scale.data_ptr();

  launch.loss_rows = at::empty({rows}, acc_opts);
  prm.loss_rows = launch.loss_rows.data_ptr();
  launch.grad_student = grad_student ? empty_gradient({rows, vocab}, student.options())
                                     : at::empty({0}, student.options());
  launch.grad_teacher = grad_teacher ? at::empty({rows, k}, acc_opts) : at::empty({0}, acc_opts);
  launch.grad_temperature = at::empty({grad_temperature ? rows : 0}, acc_opts);
  prm.grad_student = grad_student ? launch.grad_student.data_ptr() : nullptr;
  prm.grad_teacher = grad_teacher ? launch.grad_teacher.data_ptr() : nullptr;
  prm.grad_temperature = grad_temperature ? launch.grad_temperature.data_ptr() : nullptr;
  return launch;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_topk(TopKLaunch& launch) {
  return {reduce_rows(launch.loss_rows, launch.reduction, launch.scale), launch.grad_student,
          launch.grad_teacher, launch.grad_temperature};
}

}  // namespace kdops
