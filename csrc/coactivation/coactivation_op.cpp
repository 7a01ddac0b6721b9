#include "coactivation_op.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../common/memory.h"

namespace kdops {
namespace {

at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by forward and backward; fills the fields that describe the input.
void describe_input(CoactivationLaunch& launch, const at::Tensor& logits, int64_t k,
                    const at::Tensor& temperature, const std::optional<at::Tensor>& valid,
                    std::string_view transform, bool normalize, std::string_view op) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be 3-D [batch, seq, vocab]; got ",
                    logits.dim(), " dims");
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    op, ": logits must be float32, float64, bfloat16 or float16; got ", dtype);
  TORCH_CHECK_VALUE(logits.stride(2) == 1, op, ": the logits' last dim must be contiguous");
  const int64_t batch = logits.size(0);
  const int64_t seq = logits.size(1);
  const int64_t vocab = logits.size(2);
  TORCH_CHECK_VALUE(vocab >= 1, op, ": vocab (last dim) must be at least 1");
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min(vocab, kCoactivationMaxK), op, ": k must be in [1, min(V, ",
                    kCoactivationMaxK, ")] = [1, ", std::min(vocab, kCoactivationMaxK), "]; got ", k);
  const auto acc = acc_type(dtype);
  TORCH_CHECK_VALUE(temperature.dim() == 0 && temperature.scalar_type() == acc, op,
                    ": temperature must be a 0-d ", acc, " tensor; got ", temperature.scalar_type(),
                    " of shape ", temperature.sizes());
  TORCH_CHECK_VALUE(transform == "softmax" || transform == "logits", op,
                    ": transform must be softmax or logits; got '", transform, "'");
  if (valid) {
    TORCH_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 2 &&
                          valid->size(0) == batch && valid->size(1) == seq,
                      op, ": valid must be a bool tensor of shape [", batch, ", ", seq, "]");
    TORCH_CHECK_VALUE(valid->device() == logits.device(), op, ": valid is on ", valid->device(),
                      " but logits are on ", logits.device());
  }

  auto& prm = launch.params;
  prm.logits = logits.data_ptr();
  prm.batch_stride = logits.stride(0);
  prm.seq_stride = logits.stride(1);
  prm.batch = batch;
  prm.seq = seq;
  prm.vocab = vocab;
  prm.k = k;
  prm.transform = transform == "softmax" ? CoactivationTransform::kSoftmax
                                         : CoactivationTransform::kLogits;

  // A CPU scalar temperature may accompany device logits (a Python float): move it once.
  const at::Tensor tau = temperature.to(logits.device()).contiguous();
  prm.temperature = tau.data_ptr();
  launch.keepalive[0] = tau;
  const auto acc_opts = logits.options().dtype(acc);
  // c_b: 1 / (valid positions of b) when normalizing (any value serves when there are none: no
  // position of b is scattered), else 1. Computed on the device, no host sync.
  at::Tensor seq_scale;
  if (!normalize) {
    seq_scale = at::ones({batch}, acc_opts);
  } else if (valid) {
    seq_scale = valid->sum(1).to(acc).clamp_min(1).reciprocal();
  } else {
    seq_scale = at::full({batch}, 1.0 / static_cast<double>(std::max<int64_t>(seq, 1)), acc_opts);
  }
  prm.seq_scale = seq_scale.data_ptr();
  launch.keepalive[1] = seq_scale;
  if (valid) {
    const at::Tensor valid_contig = valid->contiguous();
    prm.valid = valid_contig.data_ptr<bool>();
    launch.keepalive[2] = valid_contig;
  }
}

}  // namespace

CoactivationLaunch prepare_coactivation(const at::Tensor& logits, int64_t k,
                                        const at::Tensor& temperature,
                                        const std::optional<at::Tensor>& valid,
                                        std::string_view transform, bool normalize) {
  CoactivationLaunch launch;
  describe_input(launch, logits, k, temperature, valid, transform, normalize,
                 "coactivation_features");
  auto& prm = launch.params;
  const auto acc_opts = logits.options().dtype(acc_type(logits.scalar_type()));
  launch.features = at::empty({prm.batch, prm.vocab}, acc_opts);
  launch.top_ids = at::empty({prm.batch, prm.seq, k}, logits.options().dtype(at::kLong));
  launch.top_values = at::empty({prm.batch, prm.seq, k}, acc_opts);
  launch.shifted_lse = at::empty({prm.batch, prm.seq}, acc_opts);
  prm.features = launch.features.data_ptr();
  prm.top_ids = launch.top_ids.data_ptr<int64_t>();
  prm.top_values = launch.top_values.data_ptr();
  prm.shifted_lse = launch.shifted_lse.data_ptr();
  return launch;
}

CoactivationLaunch prepare_coactivation_backward(
    const at::Tensor& grad_features, const at::Tensor& logits, const at::Tensor& top_ids,
    const at::Tensor& top_values, const at::Tensor& shifted_lse, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, std::string_view transform, bool normalize) {
  constexpr std::string_view op = "coactivation_features_backward";
  CoactivationLaunch launch;
  TORCH_CHECK_VALUE(top_ids.dim() == 3, op, ": top_ids must be [batch, seq, k]; got ",
                    top_ids.sizes());
  const int64_t k = top_ids.size(2);
  describe_input(launch, logits, k, temperature, valid, transform, normalize, op);
  auto& prm = launch.params;
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK_VALUE(top_ids.size(0) == prm.batch && top_ids.size(1) == prm.seq &&
                        top_ids.scalar_type() == at::kLong,
                    op, ": top_ids must be int64 [", prm.batch, ", ", prm.seq, ", k]");
  TORCH_CHECK_VALUE(top_values.sizes() == top_ids.sizes() && top_values.scalar_type() == acc, op,
                    ": top_values must be ", acc, " of top_ids' shape ", top_ids.sizes());
  TORCH_CHECK_VALUE(shifted_lse.dim() == 2 && shifted_lse.size(0) == prm.batch &&
                        shifted_lse.size(1) == prm.seq && shifted_lse.scalar_type() == acc,
                    op, ": shifted_lse must be ", acc, " [", prm.batch, ", ", prm.seq, "]");
  TORCH_CHECK_VALUE(grad_features.dim() == 2 && grad_features.size(0) == prm.batch &&
                        grad_features.size(1) == prm.vocab && grad_features.scalar_type() == acc,
                    op, ": grad_features must be ", acc, " [", prm.batch, ", ", prm.vocab, "]");
  for (const at::Tensor* t : {&grad_features, &top_ids, &top_values, &shifted_lse}) {
    TORCH_CHECK_VALUE(t->device() == logits.device(), op, ": every tensor must be on the logits' ",
                      "device ", logits.device());
  }
  // Saved tensors may arrive non-contiguous (e.g. from a traced graph): the kernels index densely.
  const at::Tensor ids = top_ids.contiguous();
  const at::Tensor values = top_values.contiguous();
  const at::Tensor lse_contig = shifted_lse.contiguous();
  const at::Tensor grad = grad_features.contiguous();
  prm.top_ids = ids.data_ptr<int64_t>();
  prm.top_values = values.data_ptr();
  prm.shifted_lse = lse_contig.data_ptr();
  prm.grad_features = grad.data_ptr();
  launch.top_ids = ids;
  launch.top_values = values;
  launch.shifted_lse = lse_contig;
  launch.keepalive[3] = grad;
  launch.grad_logits = empty_gradient({prm.batch, prm.seq, prm.vocab}, logits.options());
  prm.grad_logits = launch.grad_logits.data_ptr();
  return launch;
}

}  // namespace kdops
