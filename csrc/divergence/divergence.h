// Per-element math of the divergence family (kd_loss), shared by the CPU and CUDA kernels.
//
// Notation per row (DESIGN.md 3.1): a = z_s / tau, b = z_t / tau, q = softmax(a), p = softmax(b),
// lq = log q, lp = log p. Every divergence L(q, p) is handled through three per-element numbers:
//
//   loss_k           the element's share of L (row loss = sum_k loss_k)
//   u_k = q_k dL/dq_k    student side        v_k = p_k dL/dp_k    teacher side
//
// With U = sum_k u_k and W = sum_k v_k the softmax chain rule gives
//   dL/da_k = u_k - q_k U        dL/db_k = v_k - p_k W
// and u, v stay finite where q or p underflow to 0 (the products are taken analytically), so the
// kernels need exactly one reduction sweep (loss, U, W) before the gradient sweep.
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace kdops {

enum class Divergence : int32_t { kFKL = 0, kRKL = 1, kJSD = 2, kSkewFKL = 3, kSkewRKL = 4, kTVD = 5 };

template <typename T>
struct ElementTerms {
  T loss;
  T u;  // q * dL/dq
  T v;  // p * dL/dp
};

// x * (lx - ly) with 0 * log 0 = 0; an x > 0 against ly = -inf stays +inf (a truly infinite term)
// and a NaN x stays NaN (the guard tests x == 0, not x > 0).
template <typename T>
KD_HOST_DEVICE T xlogratio(T x, T lx, T ly) {
  return x == T(0) ? T(0) : x * (lx - ly);
}

// KL(x || lambda x + (1 - lambda) y) and its two sides (DistiLLM's skew KL).
// Returns {loss, x dL/dx, y dL/dy}.
template <typename T, typename Math>
KD_HOST_DEVICE ElementTerms<T> skew_terms(T x, T y, T lx, T lambda) {
  const T mix = lambda * x + (T(1) - lambda) * y;
  const bool live = !(x == T(0));  // x == 0 adds nothing to L nor to its derivatives; NaN is live
  const T safe_mix = live ? mix : T(1);
  const T lmix = Math::log(safe_mix);
  const T ratio = x / safe_mix;
  ElementTerms<T> t;
  t.loss = live ? x * (lx - lmix) : T(0);
  t.u = live ? x * (lx - lmix + T(1) - lambda * ratio) : T(0);
  t.v = live ? -(T(1) - lambda) * ratio * y : T(0);
  return t;
}

// One element's terms for divergence D. `coef` is beta (jsd) or alpha (skews).
template <Divergence D, typename T, typename Math>
KD_HOST_DEVICE ElementTerms<T> element_terms(T q, T p, T lq, T lp, T coef) {
  ElementTerms<T> t;
  if constexpr (D == Divergence::kFKL) {
    t.loss = xlogratio(p, lp, lq);
    t.u = -p;
    t.v = p == T(0) ? T(0) : p * (lp - lq + T(1));
  } else if constexpr (D == Divergence::kRKL) {
    t.loss = xlogratio(q, lq, lp);
    t.u = q == T(0) ? T(0) : q * (lq - lp + T(1));
    t.v = -q;
  } else if constexpr (D == Divergence::kJSD) {
    // m = beta p + (1 - beta) q; dL/dq = (1 - beta)(lq - lm), dL/dp = beta (lp - lm), and the row
    // loss is exactly U + W. Only called with 0 < beta < 1 (the endpoints dispatch to fkl / rkl).
    const T beta = coef;
    const T m = beta * p + (T(1) - beta) * q;
    const T lm = Math::log(m == T(0) ? T(1) : m);  // m == 0 only where q == p == 0: unused
    t.u = (T(1) - beta) * xlogratio(q, lq, lm);
    t.v = beta * xlogratio(p, lp, lm);
    t.loss = t.u + t.v;
  } else if constexpr (D == Divergence::kSkewFKL) {
    // KL(p || alpha p + (1 - alpha) q): x = p (teacher), y = q (student).
    const ElementTerms<T> s = skew_terms<T, Math>(p, q, lp, coef);
    t.loss = s.loss;
    t.u = s.v;
    t.v = s.u;
  } else if constexpr (D == Divergence::kSkewRKL) {
    // KL(q || (1 - alpha) p + alpha q): x = q (student), y = p (teacher).
    t = skew_terms<T, Math>(q, p, lq, coef);
  } else {  // kTVD: 1/2 sum |p - q|, subgradient sign(0) = 0
    const T diff = q - p;
    const T half_sign = diff > T(0) ? T(0.5) : (diff < T(0) ? T(-0.5) : T(0));
    t.loss = diff > T(0) ? T(0.5) * diff : T(-0.5) * diff;
    t.u = half_sign * q;
    t.v = -half_sign * p;
  }
  return t;
}

// dL/dz for one side, before the per-row scale: u - q * U (student) or v - p * W (teacher).
template <typename T>
KD_HOST_DEVICE T logit_grad(T side, T prob, T side_sum) {
  return side - prob * side_sum;
}

// Contribution of one logit to sum_k dL/da_k * lq_k. Because sum_k dL/da_k = 0 the temperature
// gradient dL/dtau = -(1/tau) (sum_k dL/da_k a_k + sum_k dL/db_k b_k) may use the log-probabilities
// in place of a and b: smaller numbers, no -inf * 0 where both vanish.
template <typename T>
KD_HOST_DEVICE T temperature_term(T grad, T logprob) {
  return grad != T(0) ? grad * logprob : T(0);
}

// Everything a kernel needs for one launch. Plain data, no torch types, so CUDA and the
// per-ISA CPU objects share it. Rows are [rows, vocab] with a row stride (last dim contiguous).
struct DivergenceParams {
  const void* student = nullptr;
  const void* teacher = nullptr;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  int64_t rows = 0;
  int64_t vocab = 0;

  const void* temperature = nullptr;  // accumulate-type scalar or per-row values
  int64_t temperature_stride = 0;     // 0: one temperature for every row
  const bool* valid = nullptr;        // nullptr: every row counts

  Divergence divergence = Divergence::kFKL;
  double coef = 0.0;  // beta (jsd) or alpha (skews)
  bool t2_scale = false;

  // Outputs. loss_rows and the gradients are always written for every row (0 for invalid rows).
  void* loss_rows = nullptr;      // [rows] accumulate type, unscaled per-row loss (t2 included)
  void* grad_student = nullptr;   // [rows, vocab] input dtype, contiguous, or nullptr
  void* grad_teacher = nullptr;   // [rows, vocab] input dtype, contiguous, or nullptr
  void* grad_temperature = nullptr;  // [rows] accumulate type, scaled by `scale`, or nullptr
  const void* scale = nullptr;    // accumulate-type scalar: the reduction's 1/denominator
};

}  // namespace kdops
