// sequence_logprob on CUDA devices (DESIGN.md 3.8). The per-row rules are sequence.h's; host
// checks and output allocation are sequence_op.cpp's, shared with the CPU backend.
//
// One block per row (grid-stride over rows), in base 2 like the other kdops kernels
// (x = z log2(e), log2 p = x - m - log2 s):
//   sweep 1   online (m, s = sum 2^(x - m)) over the row with 16-byte loads, kUnroll vectors in
//             flight per thread, then one block all-reduce. Thread 0 loads the label's logit
//             before the sweep, which hides its latency.
//   sweep 2   (grad) -p_j for every j and 1 - p_y at the label, 16-byte streaming stores. The
//             vectors go in reverse order: those sweep 1 read last are re-read first, while they
//             are most likely still in L2.
// Rows are head | 16-byte vectors | tail: when the logits row and the gradient row share their
// address modulo 16, the few head and tail elements go one by one and the body in vectors;
// otherwise the whole row goes element by element (correct, slower). Offsets are 64-bit; indices
// inside a row 32-bit (the host checks V).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_math.cuh"
#include "sequence.h"
#include "sequence_op.h"

namespace kdops::cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kUnroll = 2;  // vectors in flight per thread per step
// Register caps: two 512-thread blocks per SM (<= 64 registers); float64 (for gradcheck) gets one.
template <typename In>
constexpr int kMinBlocks = std::is_same_v<In, double> ? 1 : 2;
constexpr int64_t kMaxVocab = std::numeric_limits<int32_t>::max() - 4096;

template <typename In>
using AccOf = typename Storage<In>::Acc;

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename Math>
struct StatsOp {  // {m, s}
  template <typename T>
  __device__ __forceinline__ void operator()(T (&a)[2], const T (&b)[2]) const {
    stats_merge<T, Math>(a[0], a[1], b[0], b[1]);
  }
};

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<In>)
    sequence_logprob_kernel(const SequenceParams prm) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  constexpr Acc kLog2e = Acc(1.442695040888963407359924681001892137);
  constexpr Acc kLn2 = Acc(0.693147180559945309417232121458176568);
  __shared__ Acc scratch[32 * 2];
  const int32_t V = static_cast<int32_t>(prm.vocab);
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t threads = static_cast<int32_t>(blockDim.x);
  auto* token_logprob = static_cast<Acc*>(prm.token_logprob);

  for (int64_t r = blockIdx.x; r < prm.rows; r += gridDim.x) {
    const In* z = static_cast<const In*>(prm.logits) + r * prm.logits_row_stride;
    In* g = prm.grad_logits ? static_cast<In*>(prm.grad_logits) + r * prm.vocab : nullptr;
    const RowSplit split = split_row(z, g, V);
    const int64_t label = label_at(prm, r);
    const LabelKind kind = classify_label(label, prm.ignore_index, prm.vocab);
    if (kind != LabelKind::kValid) {
      const Acc value = kind == LabelKind::kIgnored ? Acc(0) : quiet_nan<Acc>();
      if (tid == 0) token_logprob[r] = value;
      if (g) fill_row<In>(g, split, V, value);  // an ignored row: 0; a bad label: NaN
      continue;
    }
    const int32_t y = static_cast<int32_t>(label);
    const Acc x_label = tid == 0 ? scale_logit(Storage<In>::load(z + y), kLog2e) : Acc(0);

    // sweep 1
    Acc st[2] = {neg_inf<Acc>(), Acc(0)};
    const In* body = z + split.head;
    for (int32_t base = tid; base < split.vectors; base += kUnroll * threads) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t i = base + u * threads;
        v[u] = i < split.vectors ? load16(body + static_cast<int64_t>(i) * kVec) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * threads >= split.vectors) break;
        Acc x[kVec];
        Storage<In>::unpack(v[u], x);
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[e] = scale_logit(x[e], kLog2e);
        stats_push<kVec, Acc, M>(st[0], st[1], x);
      }
    }
    for_each_scalar(split, V, [&](int32_t j) {
      const Acc x[1] = {scale_logit(Storage<In>::load(z + j), kLog2e)};
      stats_push<1, Acc, M>(st[0], st[1], x);
    });
    block_allreduce<2>(st, scratch, StatsOp<M>{});
    // one accurate log per row; an all -inf row gives m = log2 s = -inf and NaN below, as
    // log_softmax does
    const Acc m = st[0];
    const Acc log2_s = static_cast<Acc>(::log2(static_cast<double>(st[1])));
    if (tid == 0) token_logprob[r] = ((x_label - m) - log2_s) * kLn2;
    if (g == nullptr) continue;

    // sweep 2, vectors in reverse order (see the header)
    const auto grad_at = [&](int32_t j, Acc zj) {
      const Acc p = M::exp2((scale_logit(zj, kLog2e) - m) - log2_s);
      return j == y ? Acc(1) - p : -p;
    };
    In* g_body = g + split.head;
    for (int32_t base = tid; base < split.vectors; base += kUnroll * threads) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t i = split.vectors - 1 - (base + u * threads);
        v[u] = i >= 0 ? load16(body + static_cast<int64_t>(i) * kVec) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t i = split.vectors - 1 - (base + u * threads);
        if (i < 0) break;
        Acc x[kVec];
        Storage<In>::unpack(v[u], x);
        const int32_t first = split.head + i * kVec;
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[e] = grad_at(first + e, x[e]);
        store16(g_body + static_cast<int64_t>(i) * kVec, Storage<In>::pack(x));
      }
    }
    for_each_scalar(split, V, [&](int32_t j) { Storage<In>::store(g + j, grad_at(j, Storage<In>::load(z + j))); });
  }
}

template <typename In>
void launch(const SequenceParams& prm, cudaStream_t stream) {
  constexpr int kVec = Storage<In>::kVec;
  // about kUnroll vectors per thread and sweep
  const int64_t work = (prm.vocab / kVec + kUnroll - 1) / kUnroll;
  const int threads = static_cast<int>((std::clamp<int64_t>(work, 32, kMaxThreads) + 31) / 32 * 32);
  const auto grid = static_cast<unsigned>(std::min<int64_t>(prm.rows, std::numeric_limits<int32_t>::max()));
  sequence_logprob_kernel<In><<<grid, threads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sequence_logprob_cuda(const at::Tensor& logits,
                                                         const at::Tensor& labels,
                                                         int64_t ignore_index, bool grad) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "sequence_logprob (cuda): logits must be a CUDA tensor; got ",
                    logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const SequenceLaunch launch_args = prepare_sequence(logits, labels, ignore_index, grad);
  const SequenceParams& prm = launch_args.params;
  TORCH_CHECK_VALUE(prm.vocab <= kMaxVocab, "sequence_logprob (cuda): vocab (last dim) must be at most ",
                    kMaxVocab, "; got ", prm.vocab);
  if (prm.rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
    switch (logits.scalar_type()) {
      case at::kFloat: launch<float>(prm, stream); break;
      case at::kDouble: launch<double>(prm, stream); break;
      case at::kBFloat16: launch<__nv_bfloat16>(prm, stream); break;
      case at::kHalf: launch<__half>(prm, stream); break;
      default: TORCH_CHECK(false, "sequence_logprob (cuda): unsupported dtype ", logits.scalar_type());
    }
  }
  return finish_sequence(launch_args);
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("sequence_logprob", &kdops::cuda::sequence_logprob_cuda);
}
