// Top-k co-activation node features (coactivation_features, DESIGN.md 3.4): the parameters every
// backend reads and the per-position algebra shared by the kernels.
//
// Per position (b, t): x = softmax(z / tau) (transform "softmax") or x = z ("logits"); the kept
// entries are the k largest logits, larger first and, among equal logits, the lower id first (the
// order of a stable descending sort; NaN counts as larger than every number, as in torch.sort).
// Selecting on the logits rather than on x makes the rule exact in every dtype: softmax is
// monotone, but two distinct logits may round to one probability.
//   v_k = x[idx_k],  s = sum_k v_k,  f_b[idx_k] += c_b v_k s   over the valid positions, in order,
// with c_b = 1 / (valid positions of sequence b) when normalizing (no valid position: f_b = 0),
// else 1. These are the row sums of A_b = sum_t x~_t x~_t^T, never formed.
// Backward, g = dL/df_b:  dv_k = c_b (g[idx_k] s + sum_k' g[idx_k'] v_k')
//   logits:   dL/dz = dv at the kept ids, 0 elsewhere
//   softmax:  dL/dz_j = (1/tau) p_j (dv_j - D), D = sum_k v_k dv_k (dv_j = 0 off the kept ids):
//             dense -p_j D / tau everywhere, p_j = exp((z_j - z_max) / tau - shifted_lse),
//             z_max = z[idx_0] (the best kept logit), shifted_lse = log sum_j exp((z_j - z_max) / tau)
//             saved by forward with the kept ids and values. Shifting before scaling keeps the
//             low bits that z / tau - logsumexp(z / tau) would lose with large logits.
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace kdops {

// Largest k any backend accepts (the GPU kernels will hold a position's k entries on chip).
inline constexpr int64_t kCoactivationMaxK = 256;

enum class CoactivationTransform : int32_t { kSoftmax, kLogits };

struct CoactivationParams {
  const void* logits = nullptr;  // [batch, seq, vocab] input dtype, last dim contiguous
  int64_t batch_stride = 0;
  int64_t seq_stride = 0;
  int64_t batch = 0;
  int64_t seq = 0;
  int64_t vocab = 0;
  int64_t k = 0;

  const void* temperature = nullptr;  // accumulate-type scalar (softmax only)
  const bool* valid = nullptr;        // [batch, seq] contiguous; nullptr: every position counts
  const void* seq_scale = nullptr;    // [batch] accumulate type: c_b above
  CoactivationTransform transform = CoactivationTransform::kSoftmax;

  // Per position, contiguous [batch * seq, ...]; written by forward, read by backward. A position
  // that is not valid gets ids 0, values 0 and shifted_lse 0.
  int64_t* top_ids = nullptr;    // [rows, k], best first
  void* top_values = nullptr;    // [rows, k] accumulate type: v_k
  void* shifted_lse = nullptr;   // [rows] accumulate type: log sum exp((z - z_max) / tau) (softmax; else 0)

  void* features = nullptr;             // [batch, vocab] accumulate type (forward)
  const void* grad_features = nullptr;  // [batch, vocab] accumulate type, contiguous (backward)
  void* grad_logits = nullptr;          // [batch, seq, vocab] input dtype, contiguous (backward)

  KD_HOST_DEVICE int64_t positions() const { return batch * seq; }
  KD_HOST_DEVICE bool counts(int64_t position) const { return !valid || valid[position]; }
  // Offset of position (b, t) = position in the (possibly strided) logits.
  KD_HOST_DEVICE int64_t logits_offset(int64_t position) const {
    return (position / seq) * batch_stride + (position % seq) * seq_stride;
  }
};

// Whether logit a (at id_a) is kept before logit b (at id_b): the tie rule above.
template <typename Acc>
KD_HOST_DEVICE bool ranks_before(Acc a, int64_t id_a, Acc b, int64_t id_b) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return id_a < id_b;
}

}  // namespace kdops
