// The fused divergence kernel for the CPU: one row at a time, four sweeps over the row while it
// sits in L2 (max; exp and sums; loss and side sums; gradient), so DRAM sees each input once and
// the gradient once. Compiled per instruction set with KD_CPU_ISA naming the namespace; the loops
// are plain C++ with `omp simd` reductions (-fopenmp-simd, no OpenMP runtime) so the compiler
// vectorizes them, and the only temporaries are two rows of exponentials per call.
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/cpu_math.h"
#include "divergence_cpu.h"

#ifndef KD_CPU_ISA
#error "KD_CPU_ISA must name the instruction-set namespace (baseline, avx2, avx512)"
#endif

namespace kdops::cpu::KD_CPU_ISA {
namespace {

template <typename In, typename Acc, Divergence D>
void rows_kernel(const DivergenceParams& prm, int64_t row_begin, int64_t row_end) {
  using M = Math<Acc>;
  const int64_t V = prm.vocab;
  const auto* student = static_cast<const In*>(prm.student);
  const auto* teacher = static_cast<const In*>(prm.teacher);
  const auto* temperature = static_cast<const Acc*>(prm.temperature);
  auto* loss_rows = static_cast<Acc*>(prm.loss_rows);
  auto* grad_tau_rows = static_cast<Acc*>(prm.grad_temperature);
  const Acc scale = *static_cast<const Acc*>(prm.scale);
  const Acc coef = static_cast<Acc>(prm.coef);
  const bool any_grad = prm.grad_student || prm.grad_teacher || grad_tau_rows;
  // fkl and rkl fold their loss into the exponential sweep, and their side sums are known from
  // it: fkl U = -1, W = L + 1; rkl U = L + 1, W = -1. The others need a sweep for loss, U, W.
  constexpr bool kPlainKL = D == Divergence::kFKL || D == Divergence::kRKL;
  // fkl's student gradient is q - p and rkl's teacher gradient p - q: from the stored
  // exponentials alone, when nothing else is wanted.
  const bool difference_only =
      (D == Divergence::kFKL && !prm.grad_teacher && !grad_tau_rows) ||
      (D == Divergence::kRKL && !prm.grad_student && !grad_tau_rows);

  std::vector<Acc> exps(2 * V);
  Acc* ea = exps.data();
  Acc* eb = exps.data() + V;

  for (int64_t r = row_begin; r < row_end; ++r) {
    const In* s = student + r * prm.student_row_stride;
    const In* t = teacher + r * prm.teacher_row_stride;
    In* gs = prm.grad_student ? static_cast<In*>(prm.grad_student) + r * V : nullptr;
    In* gt = prm.grad_teacher ? static_cast<In*>(prm.grad_teacher) + r * V : nullptr;

    if (prm.valid && !prm.valid[r]) {
      loss_rows[r] = Acc(0);
      if (grad_tau_rows) grad_tau_rows[r] = Acc(0);
      for (int64_t k = 0; k < V; ++k) {
        if (gs) gs[k] = store<In, Acc>(Acc(0));
        if (gt) gt[k] = store<In, Acc>(Acc(0));
      }
      continue;
    }

    const Acc tau = temperature[r * prm.temperature_stride];
    const Acc inv_tau = Acc(1) / tau;

    // sweep 1: row maxima (of the raw logits; tau > 0 keeps the order)
    Acc max_s = -std::numeric_limits<Acc>::infinity();
    Acc max_t = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : max_s, max_t)
    for (int64_t k = 0; k < V; ++k) {
      const Acc zs = load(s[k]);
      const Acc zt = load(t[k]);
      max_s = zs > max_s ? zs : max_s;
      max_t = zt > max_t ? zt : max_t;
    }
    // Logits are shifted before they are scaled, (z - max) / tau: the row's maximum then maps to
    // exactly 0 (z / tau - max / tau, contracted into an fma, leaves its rounding error there,
    // and equal rows or V = 1 would not give exactly 0).

    // sweep 2: exponentials (kept when a later sweep reads them: every divergence but a
    // forward-only fkl / rkl), their sums, and for fkl / rkl the loss numerator
    // sum e (x_teacher - x_student) on the shifted logits (exactly 0 for equal rows).
    auto exp_sweep = [&](auto keep_exps) {
      Acc sum_s = 0, sum_t = 0, cross = 0;
#pragma omp simd reduction(+ : sum_s, sum_t, cross)
      for (int64_t k = 0; k < V; ++k) {
        const Acc xs = (load(s[k]) - max_s) * inv_tau;
        const Acc xt = (load(t[k]) - max_t) * inv_tau;
        const Acc es = M::exp(xs);
        const Acc et = M::exp(xt);
        if constexpr (decltype(keep_exps)::value) {
          ea[k] = es;
          eb[k] = et;
        }
        sum_s += es;
        sum_t += et;
        if constexpr (D == Divergence::kFKL) cross += xlogratio(et, xt, xs);
        if constexpr (D == Divergence::kRKL) cross += xlogratio(es, xs, xt);
      }
      return std::array<Acc, 3>{sum_s, sum_t, cross};
    };
    const auto [sum_s, sum_t, cross] = (kPlainKL && !any_grad) ? exp_sweep(std::false_type{})
                                                               : exp_sweep(std::true_type{});
    const Acc log_sum_s = std::log(sum_s);
    const Acc log_sum_t = std::log(sum_t);
    const Acc inv_sum_s = Acc(1) / sum_s;
    const Acc inv_sum_t = Acc(1) / sum_t;
    const Acc t2 = prm.t2_scale ? tau * tau : Acc(1);
    const Acc grad_scale = scale * t2 * inv_tau;

    Acc loss = 0, side_s = 0, side_t = 0;
    if constexpr (D == Divergence::kFKL) {
      loss = cross * inv_sum_t - (log_sum_t - log_sum_s);
      side_s = Acc(-1);
      side_t = loss + Acc(1);
    } else if constexpr (D == Divergence::kRKL) {
      loss = cross * inv_sum_s - (log_sum_s - log_sum_t);
      side_s = loss + Acc(1);
      side_t = Acc(-1);
    }

    auto terms_at = [&](int64_t k, Acc& q, Acc& p, Acc& lq, Acc& lp) __attribute__((always_inline)) {
      q = ea[k] * inv_sum_s;
      p = eb[k] * inv_sum_t;
      // (z - max) / tau - log sum, never z / tau - lse: with large logits the latter loses the
      // low bits
      lq = (load(s[k]) - max_s) * inv_tau - log_sum_s;
      lp = (load(t[k]) - max_t) * inv_tau - log_sum_t;
      return element_terms<D, Acc, M>(q, p, lq, lp, coef);
    };

    if (!kPlainKL) {
      // sweep 3: the row loss and the side sums U, W
#pragma omp simd reduction(+ : loss, side_s, side_t)
      for (int64_t k = 0; k < V; ++k) {
        Acc q, p, lq, lp;
        const ElementTerms<Acc> e = terms_at(k, q, p, lq, lp);
        loss += e.loss;
        side_s += e.u;
        side_t += e.v;
      }
    }
    loss_rows[r] = loss * t2;
    if (!any_grad) continue;

    if (difference_only) {
      In* g = D == Divergence::kFKL ? gs : gt;
      const Acc inv_sum_g = D == Divergence::kFKL ? inv_sum_s : inv_sum_t;
      const Acc inv_sum_o = D == Divergence::kFKL ? inv_sum_t : inv_sum_s;
      const Acc* eg = D == Divergence::kFKL ? ea : eb;
      const Acc* eo = D == Divergence::kFKL ? eb : ea;
#pragma omp simd
      for (int64_t k = 0; k < V; ++k) {
        g[k] = store<In, Acc>((eg[k] * inv_sum_g - eo[k] * inv_sum_o) * grad_scale);
      }
      continue;
    }

    // sweep 4: gradients, and sum_k dL/da_k lq_k + dL/db_k lp_k for the temperature. Which
    // gradients are stored is a compile-time choice: a conditional store would keep the loop
    // from vectorizing where the ISA has no masked stores (AVX2, SSE).
    auto gradient_sweep = [&](auto store_student, auto store_teacher) {
      Acc tau_sum = 0;
#pragma omp simd reduction(+ : tau_sum)
      for (int64_t k = 0; k < V; ++k) {
        Acc q, p, lq, lp;
        const ElementTerms<Acc> e = terms_at(k, q, p, lq, lp);
        const Acc da = logit_grad(e.u, q, side_s);
        const Acc db = logit_grad(e.v, p, side_t);
        if constexpr (decltype(store_student)::value) gs[k] = store<In, Acc>(da * grad_scale);
        if constexpr (decltype(store_teacher)::value) gt[k] = store<In, Acc>(db * grad_scale);
        tau_sum += temperature_term(da, lq) + temperature_term(db, lp);
      }
      return tau_sum;
    };
    using Yes = std::true_type;
    using No = std::false_type;
    const Acc tau_sum = gs ? (gt ? gradient_sweep(Yes{}, Yes{}) : gradient_sweep(Yes{}, No{}))
                           : (gt ? gradient_sweep(No{}, Yes{}) : gradient_sweep(No{}, No{}));
    if (grad_tau_rows) {
      // d(t2 L)/dtau = t2' L + t2 dL/dtau with dL/dtau = -tau_sum / tau
      const Acc dloss_dtau = -tau_sum * inv_tau;
      const Acc dt2 = prm.t2_scale ? Acc(2) * tau : Acc(0);
      grad_tau_rows[r] = scale * (dt2 * loss + t2 * dloss_dtau);
    }
  }
}

template <typename In, typename Acc>
void dispatch_divergence(const DivergenceParams& prm, int64_t begin, int64_t end) {
  switch (prm.divergence) {
    case Divergence::kFKL: return rows_kernel<In, Acc, Divergence::kFKL>(prm, begin, end);
    case Divergence::kRKL: return rows_kernel<In, Acc, Divergence::kRKL>(prm, begin, end);
    case Divergence::kJSD: return rows_kernel<In, Acc, Divergence::kJSD>(prm, begin, end);
    case Divergence::kSkewFKL: return rows_kernel<In, Acc, Divergence::kSkewFKL>(prm, begin, end);
    case Divergence::kSkewRKL: return rows_kernel<In, Acc, Divergence::kSkewRKL>(prm, begin, end);
    case Divergence::kTVD: return rows_kernel<In, Acc, Divergence::kTVD>(prm, begin, end);
  }
}

}  // namespace

void divergence_rows(const DivergenceParams& params, Storage storage, int64_t row_begin,
                     int64_t row_end) {
  switch (storage) {
    case Storage::kFloat32: return dispatch_divergence<float, float>(params, row_begin, row_end);
    case Storage::kFloat64: return dispatch_divergence<double, double>(params, row_begin, row_end);
    case Storage::kBFloat16:
      return dispatch_divergence<BFloat16Bits, float>(params, row_begin, row_end);
    case Storage::kFloat16: return dispatch_divergence<_Float16, float>(params, row_begin, row_end);
  }
}

}  // namespace kdops::cpu::KD_CPU_ISA
