// Sparse-teacher divergence (topk_kd_loss, DESIGN.md 3.2): the parameters every backend reads and
// the per-row algebra shared by the CPU and CUDA kernels. The per-element terms are
// divergence.h's; this header only says how they are put together on a K-entry support.
//
// Per row: a = z / tau (full vocabulary), b_k = teacher_logprobs_k / tau on the K ids,
// lp = log_softmax_K(b) when renormalizing, else lp = b; p = exp(lp).
//   fkl (exact):   lq_k = a[id_k] - logsumexp_V(a)          q = softmax_V(a) on the full row
//   others:        lq_k = a[id_k] - logsumexp_K(a[ids])      q~ = softmax over the K ids
// element_terms<D>(q_k, p_k, lq_k, lp_k) gives loss_k, u_k, v_k; U = sum u, W = sum v.
// Student gradient dL/da_j = dense_j + sum_{k: id_k = j} c_k with
//   fkl:     dense_j = -q_j U (every j),  c_k = u_k
//   others:  dense_j = 0,                 c_k = u_k - q~_k U
// Teacher gradient dL/db_k = v_k - p_k W (renormalized) or v_k (as given).
// Temperature: dL/dtau = -(1/tau) (sum_j dL/da_j lq_j + sum_k dL/db_k lp_k); both sums may use
// log-probabilities in place of a and b because each gradient sums to zero over its row, except
// the unrenormalized teacher, where lp = b exactly. For fkl the student sum is
//   sum_k u_k lq_k - U * sum_j q_j lq_j   (the last factor is the full row's sum q log q).
#pragma once

#include <cstdint>

#include "../divergence/divergence.h"

namespace kdops {

// Largest K any backend accepts (the GPU kernels hold a row's K entries on chip).
inline constexpr int64_t kTopKMaxK = 4096;

struct TopKParams {
  const void* student = nullptr;  // [rows, vocab] input dtype, row stride below, last dim contiguous
  int64_t student_row_stride = 0;
  const void* ids = nullptr;      // [rows, K] int32 or int64, contiguous
  bool ids_are_int64 = true;
  const void* logprobs = nullptr;  // [rows, K] accumulate type, contiguous
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t k = 0;

  const void* temperature = nullptr;  // accumulate-type scalar or per-row values
  int64_t temperature_stride = 0;     // 0: one temperature for every row
  const bool* valid = nullptr;        // nullptr: every row counts

  // kFKL is the exact full-vocabulary fkl; every other value is that divergence on the support
  // (jsd at beta 0 / 1 arrives as kFKL / kRKL only through support_fkl / kRKL, see below).
  Divergence divergence = Divergence::kFKL;
  bool support_fkl = false;  // KL(p || q~) on the support (jsd with beta = 0)
  double coef = 0.0;         // beta (jsd) or alpha (skews)
  bool renormalize = true;
  bool t2_scale = false;

  void* loss_rows = nullptr;         // [rows] accumulate type (t2 included; NaN for a bad id)
  void* grad_student = nullptr;      // [rows, vocab] input dtype, contiguous, or nullptr
  void* grad_teacher = nullptr;      // [rows, K] accumulate type, or nullptr
  void* grad_temperature = nullptr;  // [rows] accumulate type, scaled by `scale`, or nullptr
  const void* scale = nullptr;       // accumulate-type scalar: the reduction's 1/denominator
};

// Whether the student side is the full-vocabulary softmax (exact fkl) or the K-support one.
KD_HOST_DEVICE bool full_vocab_student(const TopKParams& p) {
  return p.divergence == Divergence::kFKL && !p.support_fkl;
}

}  // namespace kdops
