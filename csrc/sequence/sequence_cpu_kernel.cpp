// The sequence_logprob kernel for the CPU, one row at a time. Sweep 1 streams the row from DRAM
// in L1-sized blocks, each read twice while it sits in L1 (its max, then its exponentials against
// the running max), so the only DRAM traffic is the row itself; the label's logit is one more
// load. With the gradient, sweep 2 re-reads the row (from L2 for rows up to a few hundred KiB)
// and writes -softmax, then the label's entry. Compiled per instruction set with KD_CPU_ISA
// naming the namespace; the loops are plain C++ with `omp simd` reductions (-fopenmp-simd, no
// OpenMP runtime) so that the compiler vectorizes them. No scratch memory.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/cpu_math.h"
#include "sequence_cpu.h"

#ifndef KD_CPU_ISA
#error "KD_CPU_ISA must name the instruction-set namespace (baseline, avx2, avx512)"
#endif

namespace kdops::cpu::KD_CPU_ISA {
namespace {

// Elements per block of sweep 1: 8 KiB of float32, well inside L1.
constexpr int64_t kBlock = 2048;

template <typename In, typename Acc>
void rows_kernel(const SequenceParams& prm, int64_t row_begin, int64_t row_end) {
  using M = Math<Acc>;
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  constexpr Acc kNaN = std::numeric_limits<Acc>::quiet_NaN();
  const int64_t V = prm.vocab;
  const auto* logits = static_cast<const In*>(prm.logits);
  auto* token_logprob = static_cast<Acc*>(prm.token_logprob);

  for (int64_t r = row_begin; r < row_end; ++r) {
    const In* z = logits + r * prm.logits_row_stride;
    In* g = prm.grad_logits ? static_cast<In*>(prm.grad_logits) + r * V : nullptr;
    const int64_t label = label_at(prm, r);
    const LabelKind kind = classify_label(label, prm.ignore_index, V);
    if (kind != LabelKind::kValid) {
      const Acc value = kind == LabelKind::kIgnored ? Acc(0) : kNaN;
      token_logprob[r] = value;
      if (g) std::fill(g, g + V, store<In, Acc>(value));
      continue;
    }

    // sweep 1: online max and sum of exp(z - max)
    Acc run_max = -kInf;
    Acc sum = 0;
    for (int64_t begin = 0; begin < V; begin += kBlock) {
      const int64_t end = std::min(V, begin + kBlock);
      Acc block_max = -kInf;
#pragma omp simd reduction(max : block_max)
      for (int64_t j = begin; j < end; ++j) {
        const Acc x = load(z[j]);
        block_max = x > block_max ? x : block_max;
      }
      if (block_max > run_max) {
        sum *= std::exp(run_max - block_max);  // nothing summed yet: 0 * exp(-inf) = 0
        run_max = block_max;
      }
      // while every value so far is -inf, exp(-inf - 0) = 0 (exp(-inf - -inf) would be NaN)
      const Acc base = run_max == -kInf ? Acc(0) : run_max;
      Acc block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
      for (int64_t j = begin; j < end; ++j) block_sum += M::exp(load(z[j]) - base);
      sum += block_sum;
    }
    // An all -inf row: -inf - -inf = NaN, as log_softmax gives; +inf anywhere: NaN as well.
    const Acc log_sum = std::log(sum);
    const Acc logprob = (load(z[label]) - run_max) - log_sum;
    token_logprob[r] = logprob;
    if (!g) continue;

    // sweep 2: -softmax everywhere, then 1 - p at the label (a branch-free loop vectorizes)
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] = store<In, Acc>(-M::exp((load(z[j]) - run_max) - log_sum));
    g[label] = store<In, Acc>(Acc(1) - M::exp(logprob));
  }
}

}  // namespace

void sequence_rows(const SequenceParams& params, Storage storage, int64_t row_begin,
                   int64_t row_end) {
  switch (storage) {
    case Storage::kFloat32: return rows_kernel<float, float>(params, row_begin, row_end);
    case Storage::kFloat64: return rows_kernel<double, double>(params, row_begin, row_end);
    case Storage::kBFloat16: return rows_kernel<BFloat16Bits, float>(params, row_begin, row_end);
    case Storage::kFloat16: return rows_kernel<_Float16, float>(params, row_begin, row_end);
  }
}

}  // namespace kdops::cpu::KD_CPU_ISA
