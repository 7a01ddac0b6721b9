// The sparse-teacher kernel for the CPU, one row at a time. The student row is swept at most three
// times while it sits in L2 (max; exponentials and their sum; gradient), the teacher's K entries
// are handled in scalar code between the sweeps. Compiled per instruction set with KD_CPU_ISA
// naming the namespace; the vocabulary loops are plain C++ with `omp simd` reductions
// (-fopenmp-simd, no OpenMP runtime) so that the compiler vectorizes them.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common/cpu_math.h"
#include "topk_cpu.h"

#ifndef KD_CPU_ISA
#error "KD_CPU_ISA must name the instruction-set namespace (baseline, avx2, avx512)"
#endif

namespace kdops::cpu::KD_CPU_ISA {
namespace {

// Elements per block of the full-vocabulary statistics sweep: 8 KiB of float32, well inside L1.
constexpr int64_t kStatsBlock = 2048;

// Per-call scratch, reused across the rows of one call.
template <typename Acc>
struct RowScratch {
  std::vector<Acc> exps;        // [V] exp(a - block base): fkl's dense gradient term
  std::vector<Acc> block_base;  // [V / kStatsBlock] the base of each block's exponentials
  std::vector<int64_t> ids;     // [K]
  std::vector<Acc> lq, lp, q, p, u, v;  // [K] per-entry terms
  std::vector<std::pair<int64_t, Acc>> fixes;  // [K] (id, sparse correction c_k), sorted by id
};

// log(sum_k exp(x_k - m)) with m = max_k x_k returned through max_out; a vectorizable pair of loops
// (the exponent is <= 0, where the polynomial exp is accurate).
template <typename Acc>
KD_CPU_INLINE Acc log_sum_exp_of(const Acc* x, int64_t n, Acc& max_out) {
  using M = Math<Acc>;
  Acc m = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = x[k] > m ? x[k] : m;
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += M::exp(x[k] - m);
  max_out = m;
  return std::log(sum);
}

template <typename In, typename Acc, Divergence D>
void rows_kernel(const TopKParams& prm, int64_t row_begin, int64_t row_end) {
  using M = Math<Acc>;
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  const int64_t V = prm.vocab;
  const int64_t K = prm.k;
  const auto* student = static_cast<const In*>(prm.student);
  const auto* logprobs = static_cast<const Acc*>(prm.logprobs);
  const auto* temperature = static_cast<const Acc*>(prm.temperature);
  auto* loss_rows = static_cast<Acc*>(prm.loss_rows);
  auto* grad_teacher = static_cast<Acc*>(prm.grad_teacher);
  auto* grad_tau_rows = static_cast<Acc*>(prm.grad_temperature);
  const Acc scale = *static_cast<const Acc*>(prm.scale);
  const Acc coef = static_cast<Acc>(prm.coef);
  const bool full_vocab = full_vocab_student(prm);

  const auto id_at = [&](int64_t r, int64_t k) -> int64_t {
    return prm.ids_are_int64 ? static_cast<const int64_t*>(prm.ids)[r * K + k]
                             : static_cast<const int32_t*>(prm.ids)[r * K + k];
  };

  RowScratch<Acc> sc;
  if (full_vocab && prm.grad_student) {
    sc.exps.resize(V);
    sc.block_base.resize((V + kStatsBlock - 1) / kStatsBlock);
  }
  for (auto* vec : {&sc.lq, &sc.lp, &sc.q, &sc.p, &sc.u, &sc.v}) vec->resize(K);
  sc.ids.resize(K);
  sc.fixes.reserve(K);

  for (int64_t r = row_begin; r < row_end; ++r) {
    const In* s = student + r * prm.student_row_stride;
    In* gs = prm.grad_student ? static_cast<In*>(prm.grad_student) + r * V : nullptr;
    Acc* gt = grad_teacher ? grad_teacher + r * K : nullptr;
    const auto zero_gradients = [&] {
      if (gs) std::fill(gs, gs + V, store<In, Acc>(Acc(0)));
      if (gt) std::fill(gt, gt + K, Acc(0));
    };

    bool ids_ok = true;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t id = id_at(r, k);
      sc.ids[k] = id;
      ids_ok = ids_ok && id >= 0 && id < V;
    }
    if (!full_vocab && r + 1 < row_end) {
      // The support divergences only gather K scattered logits per row, each a likely cache miss:
      // start the next row's gathers now, so that they overlap this row's arithmetic.
      const In* next = student + (r + 1) * prm.student_row_stride;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = id_at(r + 1, k);
        if (id >= 0 && id < V) __builtin_prefetch(next + id);
      }
    }
    const bool counted = !prm.valid || prm.valid[r];
    if (!counted || !ids_ok) {
      // a bad id gives a NaN loss (the wrapper has already raised or asserted on it)
      const Acc value = counted ? std::numeric_limits<Acc>::quiet_NaN() : Acc(0);
      loss_rows[r] = value;
      if (grad_tau_rows) grad_tau_rows[r] = value;
      zero_gradients();
      continue;
    }

    const Acc tau = temperature[r * prm.temperature_stride];
    const Acc inv_tau = Acc(1) / tau;

    // The K-entry loops below are written to vectorize: on the support divergences they are all
    // the work there is. teacher: lp = b - logsumexp_K(b) (renormalized) or b, b = logprobs / tau
    Acc* lp = sc.lp.data();
    Acc* p = sc.p.data();
    const Acc* row_logprobs = logprobs + r * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) lp[k] = row_logprobs[k] * inv_tau;
    if (prm.renormalize) {
      Acc max_b;
      const Acc log_sum = log_sum_exp_of(lp, K, max_b);
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        lp[k] = (lp[k] - max_b) - log_sum;
        p[k] = M::exp(lp[k]);  // lp <= 0
      }
    } else {
      // as given, possibly > 0 (nonsense for log-probabilities, but not clamped): libm
      for (int64_t k = 0; k < K; ++k) p[k] = std::exp(lp[k]);
    }

    // student: log-probabilities at the ids, over the full row (exact fkl) or over the K ids
    Acc dense_sum_qlq = 0;  // full row's sum q log q (the fkl temperature gradient needs it)
    Acc inv_sum = 0;        // 1 / sum exp(a - max) over the full row
    Acc row_max = 0;        // max(z) over the full row
    if (full_vocab) {
      // Online statistics over blocks small enough to stay in L1 between their two passes (the
      // block's max, then its exponentials against the running max): the row streams in from
      // DRAM once, overlapped with the exponentials, instead of a whole-row max sweep that only
      // waits on memory. Kept exponentials are relative to their block's base; block_base holds
      // those bases for the gradient sweep.
      Acc run_max = -kInf;
      Acc sum = 0, sum_ex = 0;
      Acc* exps = sc.exps.empty() ? nullptr : sc.exps.data();
      const auto exp_sweep = [&](auto keep_exps, auto with_entropy) {
        for (int64_t begin = 0, b = 0; begin < V; begin += kStatsBlock, ++b) {
          const int64_t end = std::min(V, begin + kStatsBlock);
          Acc block_max = -kInf;
#pragma omp simd reduction(max : block_max)
          for (int64_t j = begin; j < end; ++j) {
            const Acc z = load(s[j]);
            block_max = z > block_max ? z : block_max;
          }
          if (block_max > run_max) {  // move the sums to the new base
            if (run_max == -kInf) {
              sum = sum_ex = 0;
            } else {
              const Acc d = (run_max - block_max) * inv_tau;
              const Acc f = std::exp(d);
              if constexpr (decltype(with_entropy)::value) sum_ex = f * (sum_ex + d * sum);
              sum *= f;
            }
            run_max = block_max;
          }
          // shifted before scaling: the maximum maps to exactly 0 (see divergence_cpu_kernel.cpp)
          const Acc base = run_max;
          if constexpr (decltype(keep_exps)::value) sc.block_base[b] = base;
          Acc block_sum = 0, block_ex = 0;
#pragma omp simd reduction(+ : block_sum, block_ex)
          for (int64_t j = begin; j < end; ++j) {
            const Acc x = (load(s[j]) - base) * inv_tau;
            const Acc e = M::exp(x);
            if constexpr (decltype(keep_exps)::value) exps[j] = e;
            block_sum += e;
            if constexpr (decltype(with_entropy)::value) block_ex += e == Acc(0) ? Acc(0) : e * x;
          }
          sum += block_sum;
          sum_ex += block_ex;
        }
      };
      using Yes = std::true_type;
      using No = std::false_type;
      if (exps) {
        grad_tau_rows ? exp_sweep(Yes{}, Yes{}) : exp_sweep(Yes{}, No{});
      } else {
        grad_tau_rows ? exp_sweep(No{}, Yes{}) : exp_sweep(No{}, No{});
      }
      row_max = run_max;
      const Acc log_sum = std::log(sum);
      inv_sum = Acc(1) / sum;
      dense_sum_qlq = sum_ex * inv_sum - log_sum;
      for (int64_t k = 0; k < K; ++k) {
        // (x - max) - log sum, never x - lse: with large logits the latter loses the low bits
        sc.lq[k] = (load(s[sc.ids[k]]) - row_max) * inv_tau - log_sum;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) sc.lq[k] = load(s[sc.ids[k]]) * inv_tau;
      Acc max_a;
      const Acc log_sum = log_sum_exp_of(sc.lq.data(), K, max_a);
      Acc* lq = sc.lq.data();
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) lq[k] = (lq[k] - max_a) - log_sum;
    }

    Acc loss = 0, side_s = 0, side_t = 0;
    {
      const Acc* lq = sc.lq.data();
      Acc* q = sc.q.data();
      Acc* u = sc.u.data();
      Acc* v = sc.v.data();
#pragma omp simd reduction(+ : loss, side_s, side_t)
      for (int64_t k = 0; k < K; ++k) {
        q[k] = M::exp(lq[k]);  // lq <= 0
        const ElementTerms<Acc> e = element_terms<D, Acc, M>(q[k], p[k], lq[k], lp[k], coef);
        u[k] = e.u;
        v[k] = e.v;
        loss += e.loss;
        side_s += e.u;
        side_t += e.v;
      }
    }
    const Acc t2 = prm.t2_scale ? tau * tau : Acc(1);
    const Acc grad_scale = scale * t2 * inv_tau;
    loss_rows[r] = loss * t2;

    if (!gs && !gt && !grad_tau_rows) continue;

    // per-entry gradients: c_k for the student (dense term aside; written over u), dL/db_k for
    // the teacher
    Acc tau_sum = full_vocab ? temperature_term(-side_s, dense_sum_qlq) : Acc(0);
    {
      const Acc* lq = sc.lq.data();
      const Acc* q = sc.q.data();
      const Acc* v = sc.v.data();
      Acc* c = sc.u.data();
      const Acc teacher_side = prm.renormalize ? side_t : Acc(0);  // as given: dL/db = v
      const Acc student_side = full_vocab ? Acc(0) : side_s;       // exact fkl: c = u
#pragma omp simd reduction(+ : tau_sum)
      for (int64_t k = 0; k < K; ++k) {
        c[k] = logit_grad(c[k], q[k], student_side);
        const Acc db = logit_grad(v[k], p[k], teacher_side);
        if (gt) gt[k] = db * grad_scale;
        tau_sum += temperature_term(c[k], lq[k]) + temperature_term(db, lp[k]);
      }
    }
    if (grad_tau_rows) {
      // d(t2 L)/dtau = t2' L + t2 dL/dtau with dL/dtau = -tau_sum / tau
      const Acc dt2 = prm.t2_scale ? Acc(2) * tau : Acc(0);
      grad_tau_rows[r] = scale * (dt2 * loss - t2 * tau_sum * inv_tau);
    }
    if (!gs) continue;

    // student gradient: the dense term everywhere (fkl: q_j * -U; otherwise 0) ...
    const Acc dense_scale = -side_s * inv_sum * grad_scale;
    if (full_vocab) {
      const Acc* exps = sc.exps.data();
      for (int64_t begin = 0, b = 0; begin < V; begin += kStatsBlock, ++b) {
        const int64_t end = std::min(V, begin + kStatsBlock);
        const Acc block_scale = dense_scale * M::exp((sc.block_base[b] - row_max) * inv_tau);
#pragma omp simd
        for (int64_t j = begin; j < end; ++j) gs[j] = store<In, Acc>(exps[j] * block_scale);
      }
    } else {
      std::fill(gs, gs + V, store<In, Acc>(Acc(0)));
    }
    // ... then each id once, with every entry naming it summed in Acc: duplicates stay exact and
    // no rounded value is read back
    sc.fixes.clear();
    for (int64_t k = 0; k < K; ++k) sc.fixes.emplace_back(sc.ids[k], sc.u[k]);
    std::sort(sc.fixes.begin(), sc.fixes.end(),
              [](const auto& x, const auto& y) { return x.first < y.first; });
    for (size_t i = 0; i < sc.fixes.size();) {
      const int64_t id = sc.fixes[i].first;
      Acc total = 0;
      for (; i < sc.fixes.size() && sc.fixes[i].first == id; ++i) total += sc.fixes[i].second;
      const Acc block_to_row = full_vocab
                                   ? M::exp((sc.block_base[id / kStatsBlock] - row_max) * inv_tau)
                                   : Acc(0);
      const Acc dense = full_vocab ? sc.exps[id] * dense_scale * block_to_row : Acc(0);
      gs[id] = store<In, Acc>(dense + total * grad_scale);
    }
  }
}

template <typename In, typename Acc>
void dispatch_divergence(const TopKParams& prm, int64_t begin, int64_t end) {
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

void topk_rows(const TopKParams& params, Storage storage, int64_t row_begin, int64_t row_end) {
  switch (storage) {
    case Storage::kFloat32: return dispatch_divergence<float, float>(params, row_begin, row_end);
    case Storage::kFloat64: return dispatch_divergence<double, double>(params, row_begin, row_end);
    case Storage::kBFloat16:
      return dispatch_divergence<BFloat16Bits, float>(params, row_begin, row_end);
    case Storage::kFloat16: return dispatch_divergence<_Float16, float>(params, row_begin, row_end);
  }
}

}  // namespace kdops::cpu::KD_CPU_ISA
