#include "relation_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace kdops {
namespace {

at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

RelationKind parse_kind(std::string_view kind, std::string_view op) {
  if (kind == "kl") return RelationKind::kKl;
  if (kind == "mse") return RelationKind::kMse;
  TORCH_CHECK_VALUE(kind == "infonce", op, ": kind must be kl, mse or infonce; got '", kind, "'");
  return RelationKind::kInfonce;
}

// Checks shared by forward and backward; fills the fields that describe the inputs.
void describe_inputs(RelationLaunch& launch, const at::Tensor& student, const at::Tensor& teacher,
                     const at::Tensor& temperature, const std::optional<at::Tensor>& valid,
                     std::string_view kind, bool exclude_diagonal, bool normalize,
                     std::string_view op) {
  const auto dtype = student.scalar_type();
  TORCH_CHECK_VALUE(student.dim() == 3, op, ": student must be 3-D [groups, tokens, width]; got ",
                    student.dim(), " dims");
  TORCH_CHECK_VALUE(teacher.dim() == 3, op, ": teacher must be 3-D [groups, tokens, width]; got ",
                    teacher.dim(), " dims");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    op, ": student must be float32, float64, bfloat16 or float16; got ", dtype);
  TORCH_CHECK_VALUE(teacher.scalar_type() == dtype, op, ": teacher dtype ", teacher.scalar_type(),
                    " differs from the student's ", dtype);
  TORCH_CHECK_VALUE(teacher.device() == student.device(), op, ": teacher is on ", teacher.device(),
                    " but the student is on ", student.device());
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(1) == student.size(1), op,
                    ": teacher must have the student's [groups, tokens] = [", student.size(0), ", ",
                    student.size(1), "]; got ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(2) >= 1 && teacher.size(2) >= 1, op,
                    ": the feature widths must be at least 1; got ", student.size(2), " and ",
                    teacher.size(2));
  TORCH_CHECK_VALUE(student.stride(2) == 1 || student.size(2) == 1, op,
                    ": the student's last dim must be contiguous");
  TORCH_CHECK_VALUE(teacher.stride(2) == 1 || teacher.size(2) == 1, op,
                    ": the teacher's last dim must be contiguous");
  const RelationKind parsed = parse_kind(kind, op);
  if (parsed == RelationKind::kInfonce) {
    TORCH_CHECK_VALUE(student.size(2) == teacher.size(2), op,
                      ": infonce needs equal student and teacher widths (project one first); got ",
                      student.size(2), " and ", teacher.size(2));
    TORCH_CHECK_VALUE(!exclude_diagonal, op, ": exclude_diagonal does not apply to infonce ",
                      "(the diagonal is the positive)");
  }
  const auto acc = acc_type(dtype);
  TORCH_CHECK_VALUE(temperature.dim() == 0 && temperature.scalar_type() == acc, op,
                    ": temperature must be a 0-d ", acc, " tensor; got ", temperature.scalar_type(),
                    " of shape ", temperature.sizes());
  const int64_t groups = student.size(0);
  const int64_t tokens = student.size(1);
  if (valid) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 2 &&
                          valid->size(0) == groups && valid->size(1) == tokens,
                      op, ": valid must be a bool tensor of shape [", groups, ", ", tokens, "]");
    TORCH_CHECK_VALUE(valid->device() == student.device(), op, ": valid is on ", valid->device(),
                      " but the student is on ", student.device());
  }

  launch.student = student;
  launch.teacher = teacher;
  auto& prm = launch.params;
  prm.student = student.data_ptr();
  prm.student_group_stride = student.stride(0);
  prm.student_token_stride = student.stride(1);
  prm.student_width = student.size(2);
  prm.teacher = teacher.data_ptr();
  prm.teacher_group_stride = teacher.stride(0);
  prm.teacher_token_stride = teacher.stride(1);
  prm.teacher_width = teacher.size(2);
  prm.groups = groups;
  prm.tokens = tokens;
  prm.kind = parsed;
  prm.exclude_diagonal = exclude_diagonal;
  // A CPU scalar temperature may accompany device features (a Python float): move it once.
  launch.keepalive[0] = temperature.to(student.device()).contiguous();
  prm.temperature = launch.keepalive[0].data_ptr();
  if (valid) {
    launch.keepalive[1] = valid->contiguous();
    prm.valid = launch.keepalive[1].data_ptr<bool>();
  }
  if (normalize) {
    // O(G N) extra: the kernels scale the tiles (relation.h), the features are never copied.
    const auto norms = [&](const at::Tensor& features) {
      return at::linalg_vector_norm(features, 2, {-1}, false, acc);
    };
    launch.norms[0] = norms(student);
    launch.norms[1] = norms(teacher);
    prm.student_norm = launch.norms[0].data_ptr();
    prm.teacher_norm = launch.norms[1].data_ptr();
  }
}

}  // namespace

RelationLaunch prepare_relation(const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& temperature,
                                const std::optional<at::Tensor>& valid, std::string_view kind,
                                bool exclude_diagonal, bool normalize) {
  RelationLaunch launch;
  describe_inputs(launch, student, teacher, temperature, valid, kind, exclude_diagonal, normalize,
                  "relation_kd_loss");
  auto& prm = launch.params;
  const auto acc_opts = student.options().dtype(acc_type(student.scalar_type()));
  launch.row_loss = at::empty({prm.groups, prm.tokens}, acc_opts);
  launch.row_stats = at::empty({prm.groups, prm.tokens, kRelationStats}, acc_opts);
  prm.row_loss = launch.row_loss.data_ptr();
  prm.row_stats = launch.row_stats.data_ptr();
  return launch;
}

RelationLaunch prepare_relation_backward(const at::Tensor& grad_row_loss, const at::Tensor& student,
                                         const at::Tensor& teacher, const at::Tensor& temperature,
                                         const std::optional<at::Tensor>& valid,
                                         const at::Tensor& row_stats, std::string_view kind,
                                         bool exclude_diagonal, bool normalize,
                                         bool student_grad, bool teacher_grad) {
  constexpr std::string_view op = "relation_kd_loss_backward";
  RelationLaunch launch;
  describe_inputs(launch, student, teacher, temperature, valid, kind, exclude_diagonal, normalize,
                  op);
  auto& prm = launch.params;
  const auto acc = acc_type(student.scalar_type());
  TORCH_CHECK_VALUE(grad_row_loss.dim() == 2 && grad_row_loss.size(0) == prm.groups &&
                        grad_row_loss.size(1) == prm.tokens && grad_row_loss.scalar_type() == acc,
                    op, ": grad_row_loss must be ", acc, " [", prm.groups, ", ", prm.tokens, "]");
  TORCH_CHECK_VALUE(row_stats.dim() == 3 && row_stats.size(0) == prm.groups &&
                        row_stats.size(1) == prm.tokens && row_stats.size(2) == kRelationStats &&
                        row_stats.scalar_type() == acc,
                    op, ": row_stats must be ", acc, " [", prm.groups, ", ", prm.tokens, ", ",
                    kRelationStats, "]");
  TORCH_CHECK_VALUE(grad_row_loss.device() == student.device() &&
                        row_stats.device() == student.device(),
                    op, ": grad_row_loss and row_stats must be on the student's device ",
                    student.device());
  // Saved tensors may arrive non-contiguous (e.g. from a traced graph): the kernels index densely.
  launch.row_stats = row_stats.contiguous();
  launch.keepalive[2] = grad_row_loss.contiguous();
  prm.row_stats = launch.row_stats.data_ptr();
  prm.grad_row_loss = launch.keepalive[2].data_ptr();
  const auto gradient = [&](const at::Tensor& features, bool wanted) {
    return at::empty(wanted ? features.sizes() : at::IntArrayRef{0}, features.options());
  };
  launch.grad_student = gradient(student, student_grad);
  launch.grad_teacher = gradient(teacher, teacher_grad);
  prm.grad_student = student_grad ? launch.grad_student.data_ptr() : nullptr;
  prm.grad_teacher = teacher_grad ? launch.grad_teacher.data_ptr() : nullptr;
  launch.row_dots = at::zeros({prm.groups, prm.tokens, kRelationDots}, row_stats.options());
  prm.row_dots = launch.row_dots.data_ptr();
  return launch;
}

}  // namespace kdops
