// Token relation distillation (relation_kd_loss, DESIGN.md 3.6): the parameters every backend
// reads and the per-entry algebra shared by the CPU and CUDA kernels.
//
// Features F_s [G, N, D_s], F_t [G, N, D_t] (G sequences, or 1 for scope "batch"). Row i of group
// g counts when valid[g, i]; its columns J_i are the valid tokens of g, less i itself when
// exclude_diagonal; n_i = |J_i| is the same for every valid row of a group. With tau the
// temperature, the tempered relation entries of row i at column j are
//   kl, mse:  a_j = <F_s[i], F_s[j]> / tau (student),  b_j = <F_t[i], F_t[j]> / tau (teacher)
//   infonce:  c_j = <F_s[i], F_t[j]> / tau
// and, with q = softmax_J(a), p = softmax_J(b):
//   kl:       r_i = sum_j p_j (log p_j - log q_j)
//   mse:      r_i = (1/n_i) sum_j d_j^2,  d_j = p_j - q_j
//   infonce:  r_i = lse_j c_j - c_i
// Kernels mask a column by setting its tempered entry to -inf (exp gives 0), so one loop serves
// every column; a row without columns (or not valid) gets r_i = 0, zero statistics and a zero
// gradient. Per-row statistics saved for backward (row_stats [G, N, 4], accumulate type):
//   kl: (lse_s, lse_t, r_i, 0)   mse: (lse_s, lse_t, sigma_s, sigma_t)   infonce: (lse_c, 0, 0, 0)
// with sigma_s = sum_j q_j d_j and sigma_t = sum_j p_j d_j.
//
// Normalization is fused (no normalized copy): with normalize, the relations are those of the
// unit tokens u_i = s_i F_i, s_i = 1 / max(|F_i|, eps) (F.normalize's rule), so an entry is the
// raw inner product x_ij = <F_i, F_j> times s_i s_j / tau. The op computes the norms |F_i| in the
// accumulate type (params.student_norm, params.teacher_norm; nullptr: s = 1); the kernels scale
// each tile entry by the row's and the column's s.
//
// Backward, w_i = grad_row_loss[i] (0 at rows that do not count). Self relations (kl, mse) are
// symmetric, so entry (i, j) of the student's matrix feeds row i and row j; with respect to the
// relation tokens u,
//   g_i = sum_j M_ij u_j,   M_ij = (dA_ij + dA_ji) / tau,   dA_ij = w_i dr_i/da_j  (same for F_t)
// and both terms come from the one tile entry S[i, j] = S[j, i] (the second with row j's
// statistics). infonce: dC_ij = w_i (softmax_j(c)_j - [j == i]);
//   g_s[i] = (1/tau) sum_j dC_ij u_t[j],   g_t[j] = (1/tau) sum_i dC_ij u_s[i].
// On the raw features, with the kernel weights W_ij = s_i s_j M_ij applied to raw F_j and the row
// dot c_i = <g_i, u_i> = sum_j W_ij x_ij (accumulated from the same tile entries),
//   dF_i = sum_j W_ij F_j - rho_i F_i,   rho_i = s_i^2 c_i if normalizing and |F_i| > eps, else 0
// (u's Jacobian (I - u u^T) / |F| on the unclamped rows, I / eps on the clamped ones). Backward
// also returns c per token (row_dots [G, N, 2]: the student's, the teacher's; 0 for a gradient not
// asked for): the temperature's gradient is
//   dL/dtau = -(sum_i c_s[i] + sum_i c_t[i]) / (2 tau)  (kl, mse),   -sum_i c_s[i] / tau (infonce).
#pragma once

#include <cstdint>

#include "../common/macros.h"

namespace kdops {

enum class RelationKind : int32_t { kKl, kMse, kInfonce };

// Slots of a row of row_stats (infonce keeps its lse in kLseStudent).
inline constexpr int64_t kRelationStats = 4;
enum RelationStat : int32_t { kLseStudent = 0, kLseTeacher = 1, kRowStat0 = 2, kRowStat1 = 3 };

// Slots of a row of row_dots (backward's per-token c_i).
inline constexpr int64_t kRelationDots = 2;
enum RelationDot : int32_t { kDotStudent = 0, kDotTeacher = 1 };

// F.normalize's eps: tokens with |F| <= eps are divided by eps instead.
inline constexpr double kRelationNormEps = 1e-12;

struct RelationParams {
  // Features, input dtype, last dim contiguous; any group and token strides.
  const void* student = nullptr;
  int64_t student_group_stride = 0;
  int64_t student_token_stride = 0;
  int64_t student_width = 0;  // D_s
  const void* teacher = nullptr;
  int64_t teacher_group_stride = 0;
  int64_t teacher_token_stride = 0;
  int64_t teacher_width = 0;  // D_t

  int64_t groups = 0;  // G
  int64_t tokens = 0;  // N
  const void* temperature = nullptr;  // accumulate-type scalar, on the features' device
  const bool* valid = nullptr;        // [G, N] contiguous; nullptr: every token counts
  // normalize: the tokens' L2 norms, [G, N] accumulate type, contiguous; nullptr: raw features.
  // Both are set or neither.
  const void* student_norm = nullptr;
  const void* teacher_norm = nullptr;
  RelationKind kind = RelationKind::kKl;
  bool exclude_diagonal = false;

  // Forward outputs, contiguous, accumulate type: row_loss [G, N], row_stats [G, N, 4].
  void* row_loss = nullptr;
  void* row_stats = nullptr;

  // Backward: grad_row_loss [G, N] accumulate type, contiguous (row_stats above is read); the
  // requested feature gradients [G, N, D] in the input dtype, contiguous, or nullptr.
  const void* grad_row_loss = nullptr;
  void* grad_student = nullptr;
  void* grad_teacher = nullptr;
  // row_dots [G, N, 2] accumulate type, contiguous, zero-filled by the host: c_i of the student
  // (slot kDotStudent) where grad_student is set, of the teacher where grad_teacher is.
  void* row_dots = nullptr;

  KD_HOST_DEVICE bool counts(int64_t group, int64_t token) const {
    return !valid || valid[group * tokens + token];
  }
};

// s_i of a token of L2 norm `norm` (normalize).
template <typename Acc>
KD_HOST_DEVICE Acc relation_scale(Acc norm) {
  return Acc(1) / (norm > Acc(kRelationNormEps) ? norm : Acc(kRelationNormEps));
}

// rho_i of relation.h's backward (dF_i = sum_j W_ij F_j - rho_i F_i) from the token's norm and
// c_i; `norm` is null without normalize.
template <typename Acc>
KD_HOST_DEVICE Acc relation_radial(const Acc* norm, int64_t token, Acc row_dot) {
  if (!norm || !(norm[token] > Acc(kRelationNormEps))) return Acc(0);
  const Acc s = Acc(1) / norm[token];
  return s * s * row_dot;
}

// n_i of a valid row, from the number of valid tokens in its group.
KD_HOST_DEVICE int64_t relation_columns(int64_t valid_tokens, bool exclude_diagonal) {
  return valid_tokens - (exclude_diagonal ? 1 : 0);
}

// kl's r_i from one sweep's sums against shifts m_s, m_t (the row maxima): with
// x_j = a_j - m_s, y_j = b_j - m_t, teacher_sum = sum_j e^{y_j}, student_sum = sum_j e^{x_j} and
// weighted = sum_j e^{y_j} (y_j - x_j),
//   r_i = weighted / teacher_sum - log teacher_sum + log student_sum.
// The same value as sum_j p_j (b_j - a_j) + lse_s - lse_t, but the entries that dominate (those
// near their row's maximum) enter as small shifted values instead of as differences of numbers
// of the size of the entries: r keeps its digits when it is much smaller than the entries.
template <typename Acc>
KD_HOST_DEVICE Acc kl_row_value(Acc weighted, Acc teacher_sum, Acc log_student_sum,
                                Acc log_teacher_sum) {
  return weighted / teacher_sum - (log_teacher_sum - log_student_sum);
}

// One term of the weighted sum: e^{y_j} (y_j - x_j); a masked column (e = 0, x = y = -inf) adds 0.
template <typename Acc>
KD_HOST_DEVICE Acc kl_weighted_term(Acc teacher_exp, Acc shifted_a, Acc shifted_b) {
  return teacher_exp > Acc(0) ? teacher_exp * (shifted_b - shifted_a) : Acc(0);
}

// Row r's share of the entry (r, j) gradients of a self relation, already times its weight w:
// d_student = w dr/da_j, d_teacher = w dr/db_j. `exp` is the backend's exp. For kl, row_stat0
// is r; a masked column (a = b = -inf) gives 0 and 0.
template <typename Acc, typename Exp>
KD_HOST_DEVICE void kl_entry_grads(Acc a, Acc b, Acc lse_s, Acc lse_t, Acc r, Acc w, Exp exp,
                                   Acc& d_student, Acc& d_teacher) {
  const Acc log_q = a - lse_s;
  const Acc log_p = b - lse_t;
  const Acc q = exp(log_q);
  const Acc p = exp(log_p);
  d_student = w * (q - p);
  d_teacher = p > Acc(0) ? w * p * ((log_p - log_q) - r) : Acc(0);
}

// mse: w2n = 2 w / n_r; dr/da_j = -(2/n) q_j (d_j - sigma_s), dr/db_j = (2/n) p_j (d_j - sigma_t).
template <typename Acc, typename Exp>
KD_HOST_DEVICE void mse_entry_grads(Acc a, Acc b, Acc lse_s, Acc lse_t, Acc sigma_s, Acc sigma_t,
                                    Acc w2n, Exp exp, Acc& d_student, Acc& d_teacher) {
  const Acc q = exp(a - lse_s);
  const Acc p = exp(b - lse_t);
  const Acc d = p - q;
  d_student = -w2n * q * (d - sigma_s);
  d_teacher = w2n * p * (d - sigma_t);
}

// infonce: w dr/dc_j = w (softmax_j - [j == i]); the diagonal is passed its own flag.
template <typename Acc>
KD_HOST_DEVICE Acc infonce_entry_grad(Acc softmax, bool diagonal, Acc w) {
  return w * (diagonal ? softmax - Acc(1) : softmax);
}

}  // namespace kdops
