// adaspec_token_kl on CUDA devices: one block per row (grid-stride over rows), one read of the
// three rows. Host checks and output allocation are adaspec_op.cpp's, shared with the CPU backend;
// the algebra is adaspec.h's, in base 2 as the kd_loss kernels keep it (x = z log2(e) / tau, one
// MUFU.EX2 per exponential, see common/cuda_math.cuh).
//
// Each thread keeps running statistics of its share of the row: the maxima of the three rows, the
// sums 2^(x - max) and the two cross terms; it folds in 16-byte vectors (8 bf16 / fp16, 4 fp32, 2
// fp64 per row and load), kUnroll vectors of each row in flight. The block then merges the
// threads' statistics (warp shuffles, then shared memory) and thread 0 writes the two KLs.
// DRAM bytes per element: 3 loads of the input dtype (6 for bf16), nothing written but 2 numbers
// per row. Arithmetic per element: 3 exponentials, plus 3 per vector when the maxima move.
//
// Vector access. A row is head | 16-byte vectors | tail. When the three rows share the same
// address modulo 16 the few head and tail elements are handled one by one and the body with
// 16-byte loads; otherwise the whole row goes element by element (correct, slower). Offsets are
// 64-bit (row * stride); indices inside a row are 32-bit (the host checks V).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_math.cuh"
#include "adaspec.h"
#include "adaspec_op.h"

namespace kdops::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kUnroll = 2;  // vectors of each row in flight per thread per step
// Register caps: three blocks of 256 threads per SM (<= 85 registers; bf16 needs 89 uncapped,
// for 8 elements of each row plus the statistics); float64, for gradcheck, gets one.
template <typename In>
constexpr int kMinBlocks = std::is_same_v<In, double> ? 1 : 3;
constexpr int64_t kMaxVocab = std::numeric_limits<int32_t>::max() - 4096;

template <typename In>
using AccOf = typename Storage<In>::Acc;

// A thread's (and after the merge, the row's) statistics, as one array for block_allreduce.
// Sides: 0 draft, 1 reference, 2 target. max: the largest x seen (-inf until one is finite);
// sum: sum 2^(x - base) with base = max (0 while it is -inf); cross: C_draft, C_reference of
// adaspec.h against the same bases.
enum Slot : int { kMax = 0, kSum = 3, kCross = 6, kSlots = 8 };
constexpr int kDraft = 0, kReference = 1, kTarget = 2;

template <typename Acc>
__device__ __forceinline__ Acc base_of(Acc max) {
  return max == neg_inf<Acc>() ? Acc(0) : max;
}

template <typename Acc>
__device__ __forceinline__ void init_stats(Acc (&st)[kSlots]) {
#pragma unroll
  for (int side = 0; side < 3; ++side) {
    st[kMax + side] = neg_inf<Acc>();
    st[kSum + side] = Acc(0);
  }
  st[kCross] = st[kCross + 1] = Acc(0);
}

// Moves the statistics onto larger maxima (new_max >= st's maxima, side by side). The factor
// 2^(max - new base) is 0 while a side's max is -inf (nothing summed; no overflow from the
// placeholder base).
template <typename Acc>
__device__ __forceinline__ void rebase(Acc (&st)[kSlots], const Acc (&new_max)[3]) {
  using M = CudaMath<Acc>;
  Acc factor[3], shift[3];
#pragma unroll
  for (int side = 0; side < 3; ++side) {
    const Acc new_base = base_of(new_max[side]);
    factor[side] = M::exp2(st[kMax + side] - new_base);
    shift[side] = base_of(st[kMax + side]) - new_base;
  }
  const Acc sum_t = st[kSum + kTarget];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    st[kCross + s] = rebase_cross(st[kCross + s], sum_t, factor[kTarget], shift[kTarget], shift[s]);
  }
#pragma unroll
  for (int side = 0; side < 3; ++side) {
    st[kSum + side] *= factor[side];
    st[kMax + side] = new_max[side];
  }
}

// Folds N elements of each row (already scaled to x) into the statistics: one rebase for all N.
template <int N, typename Acc>
__device__ __forceinline__ void push(Acc (&st)[kSlots], const Acc (&xd)[N], const Acc (&xr)[N],
                                     const Acc (&xt)[N]) {
  using M = CudaMath<Acc>;
  Acc new_max[3] = {st[kMax + kDraft], st[kMax + kReference], st[kMax + kTarget]};
#pragma unroll
  for (int e = 0; e < N; ++e) {
    new_max[kDraft] = fmax(new_max[kDraft], xd[e]);
    new_max[kReference] = fmax(new_max[kReference], xr[e]);
    new_max[kTarget] = fmax(new_max[kTarget], xt[e]);
  }
  rebase(st, new_max);
  const Acc base_d = base_of(new_max[kDraft]);
  const Acc base_r = base_of(new_max[kReference]);
  const Acc base_t = base_of(new_max[kTarget]);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const Acc d = xd[e] - base_d, r = xr[e] - base_r, t = xt[e] - base_t;
    const Acc et = M::exp2(t);
    st[kSum + kDraft] += M::exp2(d);
    st[kSum + kReference] += M::exp2(r);
    st[kSum + kTarget] += et;
    st[kCross] += cross_term(et, t, d);
    st[kCross + 1] += cross_term(et, t, r);
  }
}

// block_allreduce's combiner: both sides moved onto the larger maxima, then added.
struct MergeStats {
  template <typename Acc>
  __device__ __forceinline__ void operator()(Acc (&a)[kSlots], const Acc (&b)[kSlots]) const {
    Acc other[kSlots];
#pragma unroll
    for (int i = 0; i < kSlots; ++i) other[i] = b[i];
    Acc new_max[3];
#pragma unroll
    for (int side = 0; side < 3; ++side) new_max[side] = fmax(a[kMax + side], b[kMax + side]);
    rebase(a, new_max);
    rebase(other, new_max);
#pragma unroll
    for (int i = kSum; i < kSlots; ++i) a[i] += other[i];
  }
};

// One row's pointers and its head | vectors | tail split.
template <typename In>
struct RowRef {
  const In* d;
  const In* r;
  const In* t;
  int32_t head;     // elements before the first vector
  int32_t nvec;     // 16-byte vectors after the head
  int32_t nscalar;  // elements handled one by one: head and tail

  __device__ __forceinline__ int32_t scalar_index(int32_t j) const {
    return j < head ? j : j + nvec * Storage<In>::kVec;
  }
};

template <typename In>
__device__ __forceinline__ RowRef<In> make_row(const AdaspecParams& prm, int64_t row) {
  constexpr int kVec = Storage<In>::kVec;
  const int32_t V = static_cast<int32_t>(prm.vocab);
  RowRef<In> ref;
  ref.d = static_cast<const In*>(prm.draft) + row * prm.draft_row_stride;
  ref.r = static_cast<const In*>(prm.reference) + row * prm.reference_row_stride;
  ref.t = static_cast<const In*>(prm.target) + row * prm.target_row_stride;
  const auto mis = [](const void* p) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u); };
  const uint32_t off = mis(ref.d);
  if (mis(ref.r) == off && mis(ref.t) == off) {
    const int32_t head = off == 0 ? 0 : static_cast<int32_t>((16u - off) / sizeof(In));
    ref.head = head < V ? head : V;
    ref.nvec = (V - ref.head) / kVec;
  } else {
    ref.head = V;
    ref.nvec = 0;
  }
  ref.nscalar = V - ref.nvec * kVec;
  return ref;
}

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<In>) adaspec_kernel(const AdaspecParams prm) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  using S = Storage<In>;
  constexpr int kVec = S::kVec;
  constexpr Acc kLog2e = Acc(1.4426950408889634);
  constexpr Acc kLn2 = Acc(0.6931471805599453);
  __shared__ Acc scratch[32 * kSlots];
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t threads = static_cast<int32_t>(blockDim.x);
  auto* draft_kl = static_cast<Acc*>(prm.draft_kl);
  auto* reference_kl = static_cast<Acc*>(prm.reference_kl);

  for (int64_t r = blockIdx.x; r < prm.rows; r += gridDim.x) {
    if (prm.valid && !prm.valid[r]) {  // never read
      if (tid == 0) draft_kl[r] = reference_kl[r] = Acc(0);
      continue;
    }
    const Acc c = kLog2e / static_cast<const Acc*>(prm.temperature)[r * prm.temperature_stride];
    const RowRef<In> row = make_row<In>(prm, r);
    Acc st[kSlots];
    init_stats(st);

    const In* d = row.d + row.head;
    const In* f = row.r + row.head;
    const In* t = row.t + row.head;
    for (int32_t first = tid; first < row.nvec; first += kUnroll * threads) {
      uint4 vd[kUnroll], vr[kUnroll], vt[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t i = first + u * threads;
        if (i < row.nvec) {
          const int64_t off = static_cast<int64_t>(i) * kVec;
          vd[u] = load16(d + off);
          vr[u] = load16(f + off);
          vt[u] = load16(t + off);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (first + u * threads >= row.nvec) break;
        Acc xd[kVec], xr[kVec], xt[kVec];
        S::unpack(vd[u], xd);
        S::unpack(vr[u], xr);
        S::unpack(vt[u], xt);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          xd[e] = scale_logit(xd[e], c);
          xr[e] = scale_logit(xr[e], c);
          xt[e] = scale_logit(xt[e], c);
        }
        push<kVec>(st, xd, xr, xt);
      }
    }
    for (int32_t j = tid; j < row.nscalar; j += threads) {
      const int32_t k = row.scalar_index(j);
      const Acc xd[1] = {scale_logit(S::load(row.d + k), c)};
      const Acc xr[1] = {scale_logit(S::load(row.r + k), c)};
      const Acc xt[1] = {scale_logit(S::load(row.t + k), c)};
      push<1>(st, xd, xr, xt);
    }

    block_allreduce<kSlots>(st, scratch, MergeStats{});
    if (tid == 0) {
      const Acc sum_t = st[kSum + kTarget];
      const Acc log_sum_t = M::log(sum_t);
      draft_kl[r] = kl_from_stats(st[kCross], sum_t, log_sum_t, M::log(st[kSum + kDraft]), kLn2);
      reference_kl[r] =
          kl_from_stats(st[kCross + 1], sum_t, log_sum_t, M::log(st[kSum + kReference]), kLn2);
    }
  }
}

template <typename In>
void launch(const AdaspecParams& prm, cudaStream_t stream) {
  constexpr int kVec = Storage<In>::kVec;
  // about kUnroll vectors per thread, within [32, kMaxThreads], a whole number of warps
  const int64_t work = (prm.vocab + kVec * kUnroll - 1) / (kVec * kUnroll);
  const int threads = static_cast<int>((std::clamp<int64_t>(work, 32, kMaxThreads) + 31) / 32 * 32);
  const int64_t blocks = std::min<int64_t>(prm.rows, std::numeric_limits<int32_t>::max());
  adaspec_kernel<In><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> adaspec_token_kl_cuda(const at::Tensor& draft,
                                                          const at::Tensor& reference,
                                                          const at::Tensor& target,
                                                          const at::Tensor& temperature,
                                                          const std::optional<at::Tensor>& valid) {
  TORCH_CHECK_VALUE(draft.is_cuda(), "adaspec_token_kl (cuda): draft must be a CUDA tensor; got ",
                    draft.device());
  const c10::cuda::CUDAGuard guard(draft.device());
  AdaspecLaunch launch_args = prepare_adaspec(draft, reference, target, temperature, valid);
  const AdaspecParams& prm = launch_args.params;
  TORCH_CHECK_VALUE(prm.vocab <= kMaxVocab, "adaspec_token_kl (cuda): vocab (last dim) must be at ",
                    "most ", kMaxVocab, "; got ", prm.vocab);
  if (prm.rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(draft.get_device()).stream();
    switch (draft.scalar_type()) {
      case at::kFloat: launch<float>(prm, stream); break;
      case at::kDouble: launch<double>(prm, stream); break;
      case at::kBFloat16: launch<__nv_bfloat16>(prm, stream); break;
      case at::kHalf: launch<__half>(prm, stream); break;
      default: TORCH_CHECK(false, "adaspec_token_kl (cuda): unsupported dtype ", draft.scalar_type());
    }
  }
  return finish_adaspec(launch_args);
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("adaspec_token_kl", &kdops::cuda::adaspec_token_kl_cuda);
}
