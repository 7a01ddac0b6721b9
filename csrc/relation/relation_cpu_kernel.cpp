// The elementwise half of relation_kd_loss on the CPU. relation_cpu.cpp walks blocks of rows,
// writes each block's strips of raw inner products with BLAS (block x N, never N x N) and calls
// these kernels on them; a strip is about 512 KiB, so the sweeps below read it from cache.
//
// Forward, per row: sweep 1 scales, tempers and masks the strip in place (x s_i s_j / tau on the
// row's columns, -inf elsewhere, so later sweeps need no mask) and takes its maximum; sweep 2 sums the
// exponentials: kl finishes there with its shifted weighted sum (relation.h; two sweeps over a row
// in cache beat the online rescaling, which costs an exp per element more); mse takes one more
// sweep for d = p - q against the now known lse. Backward, per row: one sweep computes both terms
// of each gradient entry (row i's with its statistics, row j's with the column arrays),
// overwrites the strip with W (relation.h), ready for dF = W @ F, and sums the row's c = W . x.
// Without normalize the scales are ones (one more multiply per entry instead of two loops). Rows are independent and nothing here
// depends on which thread runs a block. Compiled per instruction set with KD_CPU_ISA naming the
// namespace; `omp simd` loops (-fopenmp-simd, no OpenMP runtime) with exp from cpu_math.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/cpu_math.h"
#include "relation_cpu.h"

#ifndef KD_CPU_ISA
#error "KD_CPU_ISA must name the instruction-set namespace (baseline, avx2, avx512)"
#endif

namespace kdops::cpu::KD_CPU_ISA {
namespace {

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

template <typename Acc>
struct ExpOf {
  KD_CPU_INLINE Acc operator()(Acc x) const { return Math<Acc>::exp(x); }
};

// The group's valid mask as bytes: GCC vectorizes loads of uint8_t but not of bool.
const uint8_t* valid_tokens(const RelationParams& prm, int64_t group) {
  return reinterpret_cast<const uint8_t*>(prm.valid + group * prm.tokens);
}

// n_i of the valid rows of a group (the same for all of them).
int64_t group_columns(const RelationParams& prm, const uint8_t* valid) {
  int64_t count = 0;
  for (int64_t j = 0; j < prm.tokens; ++j) count += valid[j];
  return relation_columns(count, prm.exclude_diagonal);
}

// x_j (row_factor col_scale_j) on the columns (valid and not `diagonal`), -inf elsewhere, in
// place; the maximum. row_factor = s_i / tau: backward forms the same products.
template <typename Acc>
KD_CPU_INLINE Acc temper_row(Acc* x, const uint8_t* valid, int64_t n, int64_t diagonal,
                             Acc row_factor, const Acc* col_scale) {
  Acc row_max = kNegInf<Acc>;
#pragma omp simd reduction(max : row_max)
  for (int64_t j = 0; j < n; ++j) {
    const Acc v = valid[j] && j != diagonal ? x[j] * (row_factor * col_scale[j]) : kNegInf<Acc>;
    x[j] = v;
    row_max = v > row_max ? v : row_max;
  }
  return row_max;
}

template <typename Acc>
KD_CPU_INLINE Acc sum_exp(const Acc* x, int64_t n, Acc shift) {
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += Math<Acc>::exp(x[j] - shift);
  return sum;
}

template <typename Acc>
void forward_block(const RelationParams& prm, const RelationBlock& blk) {
  using M = Math<Acc>;
  const int64_t N = prm.tokens;
  const uint8_t* valid = valid_tokens(prm, blk.group);
  const Acc inv_tau = Acc(1) / *static_cast<const Acc*>(prm.temperature);
  const int64_t columns = group_columns(prm, valid);
  auto* row_loss = static_cast<Acc*>(prm.row_loss) + blk.group * N;
  auto* row_stats = static_cast<Acc*>(prm.row_stats) + blk.group * N * kRelationStats;
  const bool infonce = prm.kind == RelationKind::kInfonce;
  const auto* student_scale = static_cast<const Acc*>(blk.student_scale);
  const auto* teacher_scale = static_cast<const Acc*>(blk.teacher_scale);

  for (int64_t i = blk.row_begin; i < blk.row_end; ++i) {
    Acc* stats = row_stats + i * kRelationStats;
    std::fill(stats, stats + kRelationStats, Acc(0));
    row_loss[i] = 0;
    if (!valid[i] || columns == 0) continue;
    Acc* a = static_cast<Acc*>(blk.student_strip) + (i - blk.row_begin) * blk.ld;
    const int64_t diagonal = prm.exclude_diagonal ? i : -1;
    const Acc max_a = temper_row(a, valid, N, diagonal, inv_tau * student_scale[i],
                                 infonce ? teacher_scale : student_scale);
    const Acc log_student_sum = std::log(sum_exp(a, N, max_a));
    const Acc lse_s = max_a + log_student_sum;
    stats[kLseStudent] = lse_s;
    if (infonce) {
      row_loss[i] = lse_s - a[i];  // c_i, the positive: always one of the row's columns
      continue;
    }

    Acc* b = static_cast<Acc*>(blk.teacher_strip) + (i - blk.row_begin) * blk.ld;
    const Acc max_b = temper_row(b, valid, N, diagonal, inv_tau * teacher_scale[i], teacher_scale);
    if (prm.kind == RelationKind::kKl) {
      Acc teacher_sum = 0, weighted = 0;
#pragma omp simd reduction(+ : teacher_sum, weighted)
      for (int64_t j = 0; j < N; ++j) {
        const Acc y = b[j] - max_b;
        const Acc e = M::exp(y);
        teacher_sum += e;
        weighted += kl_weighted_term(e, a[j] - max_a, y);
      }
      const Acc log_teacher_sum = std::log(teacher_sum);
      const Acc lse_t = max_b + log_teacher_sum;
      const Acc r = kl_row_value(weighted, teacher_sum, log_student_sum, log_teacher_sum);
      stats[kLseTeacher] = lse_t;
      stats[kRowStat0] = r;
      row_loss[i] = r;
      continue;
    }

    const Acc lse_t = max_b + std::log(sum_exp(b, N, max_b));
    Acc squares = 0, sigma_s = 0, sigma_t = 0;
#pragma omp simd reduction(+ : squares, sigma_s, sigma_t)
    for (int64_t j = 0; j < N; ++j) {
      const Acc q = M::exp(a[j] - lse_s);
      const Acc p = M::exp(b[j] - lse_t);
      const Acc d = p - q;
      squares += d * d;
      sigma_s += q * d;
      sigma_t += p * d;
    }
    stats[kLseTeacher] = lse_t;
    stats[kRowStat0] = sigma_s;
    stats[kRowStat1] = sigma_t;
    row_loss[i] = squares / static_cast<Acc>(columns);
  }
}

// The column arrays of one group.
template <typename Acc>
struct GroupColumns {
  const Acc* weight;
  const Acc* lse_s;
  const Acc* lse_t;
  const Acc* stat0;
  const Acc* stat1;

  GroupColumns(const RelationColumns& cols, int64_t offset)
      : weight(static_cast<const Acc*>(cols.weight) + offset),
        lse_s(static_cast<const Acc*>(cols.stats[kLseStudent]) + offset),
        lse_t(static_cast<const Acc*>(cols.stats[kLseTeacher]) + offset),
        stat0(static_cast<const Acc*>(cols.stats[kRowStat0]) + offset),
        stat1(static_cast<const Acc*>(cols.stats[kRowStat1]) + offset) {}
};

// The row's slots of row_dots.
template <typename Acc>
Acc* row_dots_of(const RelationParams& prm, int64_t group, int64_t row) {
  return static_cast<Acc*>(prm.row_dots) + (group * prm.tokens + row) * kRelationDots;
}

// kl / mse. Entry (i, j) of either strip is the same inner product as (j, i): row i's share of
// its gradient uses row i's statistics, row j's share the column arrays.
template <typename Acc, bool kKl, bool kStudent, bool kTeacher>
void self_backward_block(const RelationParams& prm, const RelationColumns& cols,
                         const RelationBlock& blk) {
  const int64_t N = prm.tokens;
  const uint8_t* valid = valid_tokens(prm, blk.group);
  const Acc inv_tau = Acc(1) / *static_cast<const Acc*>(prm.temperature);
  const GroupColumns<Acc> col(cols, blk.group * N);
  const auto* student_scale = static_cast<const Acc*>(blk.student_scale);
  const auto* teacher_scale = static_cast<const Acc*>(blk.teacher_scale);
  const int64_t columns = group_columns(prm, valid);
  const Acc two_over_n = columns > 0 ? Acc(2) / static_cast<Acc>(columns) : Acc(0);
  const ExpOf<Acc> exp;

  for (int64_t i = blk.row_begin; i < blk.row_end; ++i) {
    Acc* ms = static_cast<Acc*>(blk.student_strip) + (i - blk.row_begin) * blk.ld;
    Acc* mt = static_cast<Acc*>(blk.teacher_strip) + (i - blk.row_begin) * blk.ld;
    if (!valid[i]) {
      if (kStudent) std::fill(ms, ms + N, Acc(0));
      if (kTeacher) std::fill(mt, mt + N, Acc(0));
      continue;
    }
    const int64_t diagonal = prm.exclude_diagonal ? i : -1;
    const Acc w_i = col.weight[i];
    const Acc lse_s_i = col.lse_s[i];
    const Acc lse_t_i = col.lse_t[i];
    const Acc stat0_i = col.stat0[i];
    const Acc stat1_i = col.stat1[i];
    const Acc student_factor = inv_tau * student_scale[i];
    const Acc teacher_factor = inv_tau * teacher_scale[i];
    // Entry j: a, b from the raw products x (s_i s_j / tau, as in forward), W = (both rows'
    // shares) s_i s_j / tau written over x, and c += W x.
    Acc dot_s = 0, dot_t = 0;
#pragma omp simd reduction(+ : dot_s, dot_t)
    for (int64_t j = 0; j < N; ++j) {
      const bool keep = valid[j] && j != diagonal;
      const Acc xs = ms[j], xt = mt[j];
      const Acc ws = student_factor * student_scale[j], wt = teacher_factor * teacher_scale[j];
      const Acc a = keep ? xs * ws : kNegInf<Acc>;
      const Acc b = keep ? xt * wt : kNegInf<Acc>;
      Acc ds_i, dt_i, ds_j, dt_j;
      if constexpr (kKl) {
        kl_entry_grads(a, b, lse_s_i, lse_t_i, stat0_i, w_i, exp, ds_i, dt_i);
        kl_entry_grads(a, b, col.lse_s[j], col.lse_t[j], col.stat0[j], col.weight[j], exp, ds_j,
                       dt_j);
      } else {
        mse_entry_grads(a, b, lse_s_i, lse_t_i, stat0_i, stat1_i, w_i * two_over_n, exp, ds_i,
                        dt_i);
        mse_entry_grads(a, b, col.lse_s[j], col.lse_t[j], col.stat0[j], col.stat1[j],
                        col.weight[j] * two_over_n, exp, ds_j, dt_j);
      }
      if (kStudent) {
        const Acc weight = (ds_i + ds_j) * ws;
        ms[j] = weight;
        dot_s += weight * xs;
      }
      if (kTeacher) {
        const Acc weight = (dt_i + dt_j) * wt;
        mt[j] = weight;
        dot_t += weight * xt;
      }
    }
    Acc* dots = row_dots_of<Acc>(prm, blk.group, i);
    if (kStudent) dots[kDotStudent] = dot_s;
    if (kTeacher) dots[kDotTeacher] = dot_t;
  }
}

// infonce. Row pass (block rows i): W_ij = w_i (softmax_j - [j == i]) s_i s_j / tau with row i's
// lse. Column pass (block rows j, strip entries over i): W_ji = w_i (softmax_ij - [i == j])
// s_i s_j / tau with each column's lse and weight. The positive is re-done after the sweep from
// its saved entry, as w (s - 1): s w - w would lose the low bits when s is near 1.
template <typename Acc>
void infonce_backward_block(const RelationParams& prm, const RelationColumns& cols,
                            const RelationBlock& blk, bool column_pass) {
  using M = Math<Acc>;
  const int64_t N = prm.tokens;
  const uint8_t* valid = valid_tokens(prm, blk.group);
  const Acc inv_tau = Acc(1) / *static_cast<const Acc*>(prm.temperature);
  const GroupColumns<Acc> col(cols, blk.group * N);
  const auto* student_scale = static_cast<const Acc*>(blk.student_scale);
  const auto* teacher_scale = static_cast<const Acc*>(blk.teacher_scale);
  const Acc* row_scale = column_pass ? teacher_scale : student_scale;
  const Acc* col_scale = column_pass ? student_scale : teacher_scale;

  for (int64_t r = blk.row_begin; r < blk.row_end; ++r) {
    Acc* m = static_cast<Acc*>(blk.student_strip) + (r - blk.row_begin) * blk.ld;
    if (!valid[r]) {
      std::fill(m, m + N, Acc(0));
      continue;
    }
    const Acc row_factor = inv_tau * row_scale[r];
    const Acc x_r = m[r];
    Acc dot = 0;
    if (column_pass) {
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < N; ++i) {
        const Acc x = m[i];
        const Acc factor = row_factor * col_scale[i];
        const Acc c = valid[i] ? x * factor : kNegInf<Acc>;
        m[i] = infonce_entry_grad(M::exp(c - col.lse_s[i]), false, col.weight[i]) * factor;
        dot += m[i] * x;
      }
    } else {
      const Acc lse = col.lse_s[r];
      const Acc w = col.weight[r];
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < N; ++j) {
        const Acc x = m[j];
        const Acc factor = row_factor * col_scale[j];
        const Acc c = valid[j] ? x * factor : kNegInf<Acc>;
        m[j] = infonce_entry_grad(M::exp(c - lse), false, w) * factor;
        dot += m[j] * x;
      }
    }
    const Acc factor_r = row_factor * col_scale[r];
    const Acc positive =
        infonce_entry_grad(M::exp(x_r * factor_r - col.lse_s[r]), true, col.weight[r]) * factor_r;
    dot += (positive - m[r]) * x_r;
    m[r] = positive;
    row_dots_of<Acc>(prm, blk.group, r)[column_pass ? kDotTeacher : kDotStudent] = dot;
  }
}

template <typename Acc, bool kKl>
void self_backward_sides(const RelationParams& prm, const RelationColumns& cols,
                         const RelationBlock& blk) {
  const bool student = prm.grad_student != nullptr;
  const bool teacher = prm.grad_teacher != nullptr;
  if (student && teacher) return self_backward_block<Acc, kKl, true, true>(prm, cols, blk);
  if (student) return self_backward_block<Acc, kKl, true, false>(prm, cols, blk);
  if (teacher) return self_backward_block<Acc, kKl, false, true>(prm, cols, blk);
}

template <typename Acc>
void backward_block(const RelationParams& prm, const RelationColumns& cols,
                    const RelationBlock& blk, RelationPass pass) {
  if (pass != RelationPass::kSelf) {
    return infonce_backward_block<Acc>(prm, cols, blk, pass == RelationPass::kInfonceColumns);
  }
  if (prm.kind == RelationKind::kKl) return self_backward_sides<Acc, true>(prm, cols, blk);
  self_backward_sides<Acc, false>(prm, cols, blk);
}

}  // namespace

void relation_forward_block(const RelationParams& params, Storage storage,
                            const RelationBlock& block) {
  if (storage == Storage::kFloat64) return forward_block<double>(params, block);
  forward_block<float>(params, block);
}

void relation_backward_block(const RelationParams& params, Storage storage,
                             const RelationColumns& columns, const RelationBlock& block,
                             RelationPass pass) {
  if (storage == Storage::kFloat64) return backward_block<double>(params, columns, block, pass);
  backward_block<float>(params, columns, block, pass);
}

}  // namespace kdops::cpu::KD_CPU_ISA
