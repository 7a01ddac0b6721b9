// AdaSPEC's per-token statistics (adaspec_token_kl, DESIGN.md 3.7): the parameters every backend
// reads and the algebra of the one-read statistics, shared by the CPU and CUDA kernels.
//
// Per valid row, with p = softmax(b) (b = target / tau) and q_s = softmax(a_s) for the two
// students s = draft, reference (a_s = logits_s / tau):
//
//   KL(p || q_s) = sum_k p_k (lp_k - lq_s,k) = C_s / S_t - log S_t + log S_s
//   S_x = sum_k exp(x_k - base_x)                        x = a_draft, a_reference, b
//   C_s = sum_k exp(b_k - base_t) ((b_k - base_t) - (a_s,k - base_s))
//
// for any finite bases (the kernels use each row's running maximum), so one sweep over the three
// rows gives both KLs: kd_loss's folded fkl (divergence_cpu_kernel.cpp) with two students sharing
// the teacher's sums. C_s is 0 where the target vanishes (0 log 0 = 0) and +inf where the target
// has mass that a student gives none (a truly infinite KL). When a running maximum grows the sums
// move to the new base (rebase_cross); the same formulas hold in base 2 (the CUDA kernels), with
// the result multiplied by ln 2 (kl_from_stats' `unit`).
#pragma once

#include <cstdint>

#include "../common/macros.h"
#include "../divergence/divergence.h"

namespace kdops {

struct AdaspecParams {
  const void* draft = nullptr;      // [rows, vocab] input dtype, row strides below, last dim contiguous
  const void* reference = nullptr;
  const void* target = nullptr;
  int64_t draft_row_stride = 0;
  int64_t reference_row_stride = 0;
  int64_t target_row_stride = 0;
  int64_t rows = 0;
  int64_t vocab = 0;

  const void* temperature = nullptr;  // accumulate-type scalar or per-row values
  int64_t temperature_stride = 0;     // 0: one temperature for every row
  const bool* valid = nullptr;        // nullptr: every row counts

  void* draft_kl = nullptr;      // [rows] accumulate type; 0 for rows that do not count
  void* reference_kl = nullptr;  // [rows] accumulate type
};

// C_s after the bases move: base_t by shift_t = base_t - new base_t (<= 0), base_s by shift_s;
// factor_t = exp(shift_t) is the target's rescale factor and sum_t its sum before the move.
// A factor that underflowed to 0 drops the old terms, as exponentials taken against the final
// maximum would have underflowed too (and an infinite old term gives no 0 * inf = NaN there; a
// NaN input still reaches the result through the sums).
template <typename T>
KD_HOST_DEVICE T rebase_cross(T cross, T sum_t, T factor_t, T shift_t, T shift_s) {
  return factor_t == T(0) ? T(0) : factor_t * (cross + sum_t * (shift_t - shift_s));
}

// One element's share of C_s: e_t (x_t - x_s) with x = value - base, 0 where e_t == 0.
template <typename T>
KD_HOST_DEVICE T cross_term(T e_t, T x_t, T x_s) {
  return xlogratio(e_t, x_t, x_s);
}

// KL(p || q_s) from the row sums; `unit` converts the exponent's units to nats (1, or ln 2 for
// base-2 sums) and log_sum_* are natural logs.
template <typename T>
KD_HOST_DEVICE T kl_from_stats(T cross, T sum_t, T log_sum_t, T log_sum_s, T unit) {
  return unit * cross / sum_t - (log_sum_t - log_sum_s);
}

}  // namespace kdops
