// select_top_fraction on the CPU (DESIGN.md 3.7). The valid scores are copied into the compute
// type (float, or double for float64 scores), std::nth_element places the lower order statistic
// v[lo] (O(N) on average), the upper one v[hi] = v[lo + 1] is the minimum of the part above it,
// and the threshold is selection.h's replica of torch.quantile's arithmetic. One parallel pass
// then writes the mask. The result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "selection.h"
#include "selection_op.h"

namespace kdops::cpu {
namespace {

// torch.quantile(valid scores, q), or NaN where nothing is kept: no valid score, or a NaN among
// them (torch.quantile is NaN then, and no score is >= NaN).
template <typename In, typename T>
T quantile_threshold(const In* scores, const bool* valid, int64_t n, double q) {
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> values;
  values.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (valid != nullptr && !valid[i]) continue;
    const T x = static_cast<T>(scores[i]);
    if (std::isnan(x)) return kNaN;
    values.push_back(x);
  }
  if (values.empty()) return kNaN;
  const QuantileRanks<T> ranks = quantile_ranks(static_cast<T>(q), values.size());
  const auto lo = values.begin() + ranks.lo;
  std::nth_element(values.begin(), lo, values.end());
  const T v_lo = *lo;
  const T v_hi = ranks.hi == ranks.lo ? v_lo : *std::min_element(lo + 1, values.end());
  return quantile_lerp(v_lo, v_hi, ranks.weight);
}

template <typename In>
void select_top_fraction_kernel(const SelectionLaunch& launch) {
  using T = at::opmath_type<In>;
  const int64_t n = launch.scores.numel();
  const In* scores = launch.scores.const_data_ptr<In>();
  const bool* valid = launch.valid ? launch.valid->const_data_ptr<bool>() : nullptr;
  bool* mask = launch.mask.mutable_data_ptr<bool>();
  const T threshold = quantile_threshold<In, T>(scores, valid, n, launch.q);
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool counted = valid == nullptr || valid[i];
      mask[i] = counted && static_cast<T>(scores[i]) >= threshold;  // false for a NaN threshold
    }
  });
}

at::Tensor select_top_fraction_cpu(const at::Tensor& scores, double fraction,
                                   const std::optional<at::Tensor>& valid) {
  const SelectionLaunch launch = prepare_selection(scores, fraction, valid);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, launch.scores.scalar_type(),
                                  "select_top_fraction_cpu",
                                  [&] { select_top_fraction_kernel<scalar_t>(launch); });
  return launch.mask;
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("select_top_fraction", &kdops::cpu::select_top_fraction_cpu);
}
