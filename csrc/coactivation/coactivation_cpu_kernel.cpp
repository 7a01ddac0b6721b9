// The co-activation kernels for the CPU. Forward is two passes: every position on its own (one
// sweep over the row keeps the k best logits in a small heap; softmax adds one vectorized
// log-sum-exp sweep while the row is still in cache), then each sequence scatters its positions'
// entries in order, so the features never depend on the thread count. Backward is one position at
// a time: the dense softmax term in one vectorized sweep, then the k kept ids. Compiled per
// instruction set with KD_CPU_ISA naming the namespace; no torch headers.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common/cpu_math.h"
#include "coactivation_cpu.h"

#ifndef KD_CPU_ISA
#error "KD_CPU_ISA must name the instruction-set namespace (baseline, avx2, avx512)"
#endif

namespace kdops::cpu::KD_CPU_ISA {
namespace {

template <typename Acc>
using Entry = std::pair<Acc, int64_t>;  // (logit, id)

// The k best entries of a row, best first, by ranks_before. The heap keeps its worst entry on
// top, so almost every logit costs one comparison; ids arrive in increasing order, so a later
// logit equal to the worst never displaces it (lower id first).
template <typename In, typename Acc>
void select_top(const In* row, int64_t vocab, int64_t k, std::vector<Entry<Acc>>& heap) {
  const auto before = [](const Entry<Acc>& a, const Entry<Acc>& b) {
    return ranks_before(a.first, a.second, b.first, b.second);
  };
  heap.clear();
  for (int64_t j = 0; j < k; ++j) heap.emplace_back(load(row[j]), j);
  std::make_heap(heap.begin(), heap.end(), before);
  for (int64_t j = k; j < vocab; ++j) {
    const Acc z = load(row[j]);
    if (!ranks_before(z, j, heap.front().first, heap.front().second)) continue;
    std::pop_heap(heap.begin(), heap.end(), before);
    heap.back() = {z, j};
    std::push_heap(heap.begin(), heap.end(), before);
  }
  std::sort_heap(heap.begin(), heap.end(), before);
}

template <typename In, typename Acc>
void select_positions(const CoactivationParams& prm, int64_t begin, int64_t end) {
  using M = Math<Acc>;
  const int64_t V = prm.vocab;
  const int64_t K = prm.k;
  const auto* logits = static_cast<const In*>(prm.logits);
  auto* top_values = static_cast<Acc*>(prm.top_values);
  auto* lse_out = static_cast<Acc*>(prm.shifted_lse);
  const Acc inv_tau = Acc(1) / *static_cast<const Acc*>(prm.temperature);
  const bool softmax = prm.transform == CoactivationTransform::kSoftmax;

  std::vector<Entry<Acc>> heap;
  heap.reserve(K);
  for (int64_t pos = begin; pos < end; ++pos) {
    int64_t* ids = prm.top_ids + pos * K;
    Acc* values = top_values + pos * K;
    if (!prm.counts(pos)) {
      std::fill(ids, ids + K, int64_t(0));
      std::fill(values, values + K, Acc(0));
      lse_out[pos] = 0;
      continue;
    }
    const In* row = logits + prm.logits_offset(pos);
    select_top<In, Acc>(row, V, K, heap);
    for (int64_t k = 0; k < K; ++k) ids[k] = heap[k].second;
    if (!softmax) {
      for (int64_t k = 0; k < K; ++k) values[k] = heap[k].first;
      lse_out[pos] = 0;
      continue;
    }
    // The best kept logit is the row's maximum (NaN aside, which poisons the sum anyway).
    const Acc row_max = heap[0].first;
    Acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) sum += M::exp((load(row[j]) - row_max) * inv_tau);
    const Acc log_sum = std::log(sum);
    for (int64_t k = 0; k < K; ++k) values[k] = std::exp((heap[k].first - row_max) * inv_tau - log_sum);
    lse_out[pos] = log_sum;
  }
}

template <typename Acc>
void scatter_sequences(const CoactivationParams& prm, int64_t begin, int64_t end) {
  const int64_t V = prm.vocab;
  const int64_t K = prm.k;
  const auto* top_values = static_cast<const Acc*>(prm.top_values);
  const auto* seq_scale = static_cast<const Acc*>(prm.seq_scale);
  auto* features = static_cast<Acc*>(prm.features);
  for (int64_t b = begin; b < end; ++b) {
    Acc* f = features + b * V;
    std::fill(f, f + V, Acc(0));
    const Acc scale = seq_scale[b];
    for (int64_t pos = b * prm.seq; pos < (b + 1) * prm.seq; ++pos) {
      if (!prm.counts(pos)) continue;
      const int64_t* ids = prm.top_ids + pos * K;
      const Acc* values = top_values + pos * K;
      Acc s = 0;
      for (int64_t k = 0; k < K; ++k) s += values[k];
      const Acc weight = s * scale;
      for (int64_t k = 0; k < K; ++k) f[ids[k]] += values[k] * weight;
    }
  }
}

template <typename In, typename Acc>
void backward_positions(const CoactivationParams& prm, int64_t begin, int64_t end) {
  using M = Math<Acc>;
  const int64_t V = prm.vocab;
  const int64_t K = prm.k;
  const auto* logits = static_cast<const In*>(prm.logits);
  const auto* top_values = static_cast<const Acc*>(prm.top_values);
  const auto* lse_in = static_cast<const Acc*>(prm.shifted_lse);
  const auto* seq_scale = static_cast<const Acc*>(prm.seq_scale);
  const auto* grad_features = static_cast<const Acc*>(prm.grad_features);
  auto* grad_logits = static_cast<In*>(prm.grad_logits);
  const Acc inv_tau = Acc(1) / *static_cast<const Acc*>(prm.temperature);
  const bool softmax = prm.transform == CoactivationTransform::kSoftmax;

  std::vector<Acc> dv(K);
  for (int64_t pos = begin; pos < end; ++pos) {
    In* grad = grad_logits + pos * V;
    if (!prm.counts(pos)) {
      std::fill(grad, grad + V, store<In, Acc>(Acc(0)));
      continue;
    }
    const int64_t* ids = prm.top_ids + pos * K;
    const Acc* values = top_values + pos * K;
    const Acc* g = grad_features + (pos / prm.seq) * V;
    const Acc scale = seq_scale[pos / prm.seq];
    // dv_k = c (g[id_k] s + sum_k' g[id_k'] v_k')
    Acc s = 0, gv = 0;
    for (int64_t k = 0; k < K; ++k) {
      s += values[k];
      gv += g[ids[k]] * values[k];
    }
    for (int64_t k = 0; k < K; ++k) dv[k] = scale * (g[ids[k]] * s + gv);

    if (!softmax) {
      std::fill(grad, grad + V, store<In, Acc>(Acc(0)));
      for (int64_t k = 0; k < K; ++k) grad[ids[k]] = store<In, Acc>(dv[k]);
      continue;
    }
    // (1/tau) p_j (dv_j - D): the dense -p_j D / tau everywhere, then the kept ids (the top-k ids
    // are distinct, so each is written once)
    Acc D = 0;
    for (int64_t k = 0; k < K; ++k) D += values[k] * dv[k];
    const In* row = logits + prm.logits_offset(pos);
    const Acc row_max = load(row[ids[0]]);  // the forward pass's shift
    const Acc log_sum = lse_in[pos];
    const Acc dense_scale = -D * inv_tau;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      grad[j] = store<In, Acc>(M::exp((load(row[j]) - row_max) * inv_tau - log_sum) * dense_scale);
    }
    for (int64_t k = 0; k < K; ++k) grad[ids[k]] = store<In, Acc>(values[k] * (dv[k] - D) * inv_tau);
  }
}

}  // namespace

void coactivation_select_positions(const CoactivationParams& params, Storage storage,
                                   int64_t begin, int64_t end) {
  switch (storage) {
    case Storage::kFloat32: return select_positions<float, float>(params, begin, end);
    case Storage::kFloat64: return select_positions<double, double>(params, begin, end);
    case Storage::kBFloat16: return select_positions<BFloat16Bits, float>(params, begin, end);
    case Storage::kFloat16: return select_positions<_Float16, float>(params, begin, end);
  }
}

void coactivation_scatter_sequences(const CoactivationParams& params, Storage storage,
                                    int64_t begin, int64_t end) {
  if (storage == Storage::kFloat64) return scatter_sequences<double>(params, begin, end);
  scatter_sequences<float>(params, begin, end);
}

void coactivation_backward_positions(const CoactivationParams& params, Storage storage,
                                     int64_t begin, int64_t end) {
  switch (storage) {
    case Storage::kFloat32: return backward_positions<float, float>(params, begin, end);
    case Storage::kFloat64: return backward_positions<double, double>(params, begin, end);
    case Storage::kBFloat16: return backward_positions<BFloat16Bits, float>(params, begin, end);
    case Storage::kFloat16: return backward_positions<_Float16, float>(params, begin, end);
  }
}

}  // namespace kdops::cpu::KD_CPU_ISA
