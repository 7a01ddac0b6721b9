// The adaspec_token_kl kernel for the CPU, one row at a time, in one read of the three rows: they
// stream through L1-sized blocks, each block swept twice while it sits in L1 (its maxima; then
// the exponentials, their sums and the two cross terms against the running maxima, see
// adaspec.h), so DRAM sees each logit once and nothing is stored but two numbers per row.
// Compiled per instruction set with KD_CPU_ISA naming the namespace; the vocabulary loops are
// plain C++ with `omp simd` reductions (-fopenmp-simd, no OpenMP runtime) so that the compiler
// vectorizes them.
#include <cmath>
#include <limits>

#include "../common/cpu_math.h"
#include "adaspec_cpu.h"

#ifndef KD_CPU_ISA
#error "KD_CPU_ISA must name the instruction-set namespace (baseline, avx2, avx512)"
#endif

namespace kdops::cpu::KD_CPU_ISA {
namespace {

// Bytes of the three rows' slices per block: 24 KiB, inside a 32 KiB L1 between the two passes.
constexpr int64_t kBlockBytes = 24 * 1024;

// Running softmax statistics of one row: the largest raw logit seen, the base that the sum's
// exponentials are taken against (that max; 0 until a finite max is seen) and the sum of
// exp((z - base) / tau). Subtracting before scaling keeps x = 0 exact at the max (no FMA
// contraction of z / tau - base), so equal rows give exactly 0.
template <typename Acc>
struct RunningRow {
  Acc max = -std::numeric_limits<Acc>::infinity();
  Acc base = 0;
  Acc sum = 0;

  struct Move {
    Acc factor;  // exp(shift): what the old sum is multiplied by
    Acc shift;   // (base - new base) / tau
  };

  // Moves the sum onto the base of `block_max` when that is larger ((1, 0) otherwise). While
  // nothing finite was summed the factor is 0: the old base is a placeholder whose distance to
  // the new one could overflow exp, and the sum is 0 (or NaN, which 0 * NaN keeps).
  KD_CPU_INLINE Move raise_to(Acc block_max, Acc inv_tau) {
    if (!(block_max > max)) return {Acc(1), Acc(0)};
    const Acc shift = (base - block_max) * inv_tau;
    const bool empty = max == -std::numeric_limits<Acc>::infinity();
    const Acc factor = empty ? Acc(0) : Math<Acc>::exp(shift);  // shift < 0
    max = block_max;
    base = block_max;
    sum *= factor;
    return {factor, shift};
  }
};

template <typename In, typename Acc>
void rows_kernel(const AdaspecParams& prm, int64_t row_begin, int64_t row_end) {
  using M = Math<Acc>;
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  constexpr int64_t kBlock = kBlockBytes / (3 * static_cast<int64_t>(sizeof(In)));
  const int64_t V = prm.vocab;
  const auto* temperature = static_cast<const Acc*>(prm.temperature);
  auto* draft_kl = static_cast<Acc*>(prm.draft_kl);
  auto* reference_kl = static_cast<Acc*>(prm.reference_kl);

  for (int64_t r = row_begin; r < row_end; ++r) {
    if (prm.valid && !prm.valid[r]) {  // never read
      draft_kl[r] = Acc(0);
      reference_kl[r] = Acc(0);
      continue;
    }
    const In* zd = static_cast<const In*>(prm.draft) + r * prm.draft_row_stride;
    const In* zr = static_cast<const In*>(prm.reference) + r * prm.reference_row_stride;
    const In* zt = static_cast<const In*>(prm.target) + r * prm.target_row_stride;
    const Acc inv_tau = Acc(1) / temperature[r * prm.temperature_stride];

    RunningRow<Acc> draft, reference, target;
    Acc cross_d = 0, cross_r = 0;  // C_draft and C_reference of adaspec.h
    for (int64_t begin = 0; begin < V; begin += kBlock) {
      const int64_t end = begin + kBlock < V ? begin + kBlock : V;
      // pass 1: the block's maxima (of the raw logits; tau > 0 keeps the order)
      Acc max_d = -kInf, max_r = -kInf, max_t = -kInf;
#pragma omp simd reduction(max : max_d, max_r, max_t)
      for (int64_t k = begin; k < end; ++k) {
        const Acc d = load(zd[k]), f = load(zr[k]), t = load(zt[k]);
        max_d = d > max_d ? d : max_d;
        max_r = f > max_r ? f : max_r;
        max_t = t > max_t ? t : max_t;
      }
      const Acc sum_t = target.sum;  // rebase_cross wants the target's sum before its move
      const auto move_t = target.raise_to(max_t, inv_tau);
      const Acc shift_d = draft.raise_to(max_d, inv_tau).shift;
      const Acc shift_r = reference.raise_to(max_r, inv_tau).shift;
      cross_d = rebase_cross(cross_d, sum_t, move_t.factor, move_t.shift, shift_d);
      cross_r = rebase_cross(cross_r, sum_t, move_t.factor, move_t.shift, shift_r);

      // pass 2: exponentials against the (now final for this block) bases
      const Acc base_d = draft.base, base_r = reference.base, base_t = target.base;
      Acc sum_d = 0, sum_r = 0, sum_tb = 0, block_cross_d = 0, block_cross_r = 0;
#pragma omp simd reduction(+ : sum_d, sum_r, sum_tb, block_cross_d, block_cross_r)
      for (int64_t k = begin; k < end; ++k) {
        const Acc xd = (load(zd[k]) - base_d) * inv_tau;
        const Acc xr = (load(zr[k]) - base_r) * inv_tau;
        const Acc xt = (load(zt[k]) - base_t) * inv_tau;
        const Acc et = M::exp(xt);
        sum_d += M::exp(xd);
        sum_r += M::exp(xr);
        sum_tb += et;
        block_cross_d += cross_term(et, xt, xd);
        block_cross_r += cross_term(et, xt, xr);
      }
      draft.sum += sum_d;
      reference.sum += sum_r;
      target.sum += sum_tb;
      cross_d += block_cross_d;
      cross_r += block_cross_r;
    }
    const Acc log_sum_t = std::log(target.sum);
    draft_kl[r] = kl_from_stats(cross_d, target.sum, log_sum_t, std::log(draft.sum), Acc(1));
    reference_kl[r] = kl_from_stats(cross_r, target.sum, log_sum_t, std::log(reference.sum), Acc(1));
  }
}

}  // namespace

void adaspec_rows(const AdaspecParams& params, Storage storage, int64_t row_begin, int64_t row_end) {
  switch (storage) {
    case Storage::kFloat32: return rows_kernel<float, float>(params, row_begin, row_end);
    case Storage::kFloat64: return rows_kernel<double, double>(params, row_begin, row_end);
    case Storage::kBFloat16: return rows_kernel<BFloat16Bits, float>(params, row_begin, row_end);
    case Storage::kFloat16: return rows_kernel<_Float16, float>(params, row_begin, row_end);
  }
}

}  // namespace kdops::cpu::KD_CPU_ISA
