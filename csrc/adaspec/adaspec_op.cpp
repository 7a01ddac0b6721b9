#include "adaspec_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace kdops {

AdaspecLaunch prepare_adaspec(const at::Tensor& draft, const at::Tensor& reference,
                              const at::Tensor& target, const at::Tensor& temperature,
                              const std::optional<at::Tensor>& valid) {
  TORCH_CHECK_VALUE(draft.dim() == 2, "adaspec_token_kl: draft must be 2-D [rows, vocab]; got ",
                    draft.dim(), " dims");
  const auto dtype = draft.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    "adaspec_token_kl: draft must be float32, float64, bfloat16 or float16; got ",
                    dtype);
  for (const auto& [name, other] : {std::pair{"reference", &reference}, std::pair{"target", &target}}) {
    TORCH_CHECK_VALUE(other->sizes() == draft.sizes(), "adaspec_token_kl: ", name,
                      " must have the draft's shape ", draft.sizes(), "; got ", other->sizes());
    TORCH_CHECK_VALUE(other->scalar_type() == dtype, "adaspec_token_kl: ", name, " dtype ",
                      other->scalar_type(), " differs from the draft's ", dtype);
    TORCH_CHECK_VALUE(other->device() == draft.device(), "adaspec_token_kl: ", name, " is on ",
                      other->device(), " but the draft is on ", draft.device());
  }
  TORCH_CHECK_VALUE(draft.size(1) > 0, "adaspec_token_kl: vocab (last dim) must be at least 1");
  TORCH_CHECK_VALUE(draft.stride(1) == 1 && reference.stride(1) == 1 && target.stride(1) == 1,
                    "adaspec_token_kl: the last dim of draft, reference and target must be "
                    "contiguous");
  const int64_t rows = draft.size(0);
  const int64_t vocab = draft.size(1);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = draft.options().dtype(acc);
  TORCH_CHECK_VALUE(temperature.dim() == 0 || (temperature.dim() == 1 && temperature.size(0) == rows),
                    "adaspec_token_kl: temperature must be 0-d or have shape [", rows, "]; got ",
                    temperature.sizes());
  TORCH_CHECK_VALUE(temperature.scalar_type() == acc, "adaspec_token_kl: temperature must be ",
                    acc, " for ", dtype, " logits; got ", temperature.scalar_type());
  if (valid) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 &&
                          valid->size(0) == rows,
                      "adaspec_token_kl: valid must be a bool tensor of shape [", rows, "]");
    TORCH_CHECK_VALUE(valid->device() == draft.device(), "adaspec_token_kl: valid is on ",
                      valid->device(), " but the draft is on ", draft.device());
  }

  AdaspecLaunch launch;
  auto& prm = launch.params;
  prm.draft = draft.data_ptr();
  prm.reference = reference.data_ptr();
  prm.target = target.data_ptr();
  prm.draft_row_stride = draft.stride(0);
  prm.reference_row_stride = reference.stride(0);
  prm.target_row_stride = target.stride(0);
  prm.rows = rows;
  prm.vocab = vocab;
  // A CPU scalar temperature may accompany device logits (a Python float): move it once.
  launch.keepalive[0] = temperature.to(draft.device()).contiguous();
  prm.temperature = launch.keepalive[0].data_ptr();
  prm.temperature_stride = temperature.dim() == 0 ? 0 : 1;
  if (valid) {
    launch.keepalive[1] = valid->contiguous();
    prm.valid = launch.keepalive[1].data_ptr<bool>();
  }
  launch.draft_kl = at::empty({rows}, acc_opts);
  launch.reference_kl = at::empty({rows}, acc_opts);
  prm.draft_kl = launch.draft_kl.data_ptr();
  prm.reference_kl = launch.reference_kl.data_ptr();
  return launch;
}

}  // namespace kdops
