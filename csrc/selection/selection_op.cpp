#include "selection_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace kdops {

SelectionLaunch prepare_selection(const at::Tensor& scores, double fraction,
                                  const std::optional<at::Tensor>& valid) {
  const auto dtype = scores.scalar_type();
  TORCH_CHECK_VALUE(scores.dim() == 1, "select_top_fraction: scores must be 1-D [N]; got ",
                    scores.dim(), " dims");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    "select_top_fraction: scores must be float32, float64, bfloat16 or float16; "
                    "got ", dtype);
  // Written so that NaN fails too.
  TORCH_CHECK_VALUE(fraction > 0.0 && fraction <= 1.0,
                    "select_top_fraction: fraction must be in (0, 1]; got ", fraction);
  if (valid) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 &&
                          valid->size(0) == scores.size(0),
                      "select_top_fraction: valid must be a bool tensor of shape [",
                      scores.size(0), "]; got ", valid->scalar_type(), " ", valid->sizes());
    TORCH_CHECK_VALUE(valid->device() == scores.device(), "select_top_fraction: valid is on ",
                      valid->device(), " but scores are on ", scores.device());
  }
  SelectionLaunch launch;
  launch.scores = scores.contiguous();
  if (valid) launch.valid = valid->contiguous();
  launch.q = 1.0 - fraction;
  launch.mask = at::empty({scores.size(0)}, scores.options().dtype(at::kBool));
  return launch;
}

}  // namespace kdops
