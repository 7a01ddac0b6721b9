// select_top_fraction on CUDA devices (DESIGN.md 3.7): radix select of the two order statistics
// torch.quantile interpolates, then the mask. Checks and output are selection_op.cpp's, the
// quantile arithmetic and the order-preserving keys selection.h's (shared with the CPU backend).
//
// Scores are read in their storage type and widened to the compute type T (float; double for
// float64). Each is ranked by its unsigned image key = order_key(x) (32 or 64 bits), digits of
// 11 bits from the top. With n valid scores, torch.quantile reads v[lo] and v[hi], hi <= lo + 1.
//
//   1 top_digit_histogram   full read: histogram of the top digit of the valid keys (block-local
//                           in shared memory, merged with atomics) and the number of NaNs
//   2 pick_top_buckets      one block: n, the ranks lo and hi, the buckets b_lo <= b_hi holding
//                           them (buckets strictly between are empty)
//   3 split_and_compact     full read + the mask written once: a digit above b_hi is kept, below
//                           b_lo dropped; the keys of buckets b_lo..b_hi (the candidates, a few
//                           percent of typical data) are appended with their index to a buffer
//   4 candidate_histogram + pick_bucket, once per remaining digit (fp32: 11 + 10 bits; fp64: four
//                           of 11 and one of 9): the group holding v[lo] narrows to one key
//   5 candidate_min_above   min key > key(v[lo]): v[hi] unless the rank hi still lies on v[lo]
//   6 finish_threshold      one thread: t = lerp(v[lo], v[hi], w) (selection.h) and key(t)
//   7 mark_candidates       mask[index] = key >= key(t) for each candidate
//
// DRAM traffic: two reads of the scores (and of `valid`, when given) and one byte of mask per
// score, plus the candidates (key + 8-byte index, written once, read once per step 4..7). Every
// decision is on the device (the picks read the histograms, the later kernels read their loop
// bound and threshold from device memory): no host synchronisation, all on the current stream.
// The result is exact and deterministic: atomics only ever add counts or take minima, whose
// results do not depend on their order (the candidates' order in the buffer does, nothing else).
//
// The shortcut of step 3 needs t in [v[lo], v[hi]], which holds unless v[hi] - v[lo] is not
// finite (an infinite order statistic or an overflowing difference: torch's t may then be NaN or
// +-inf). pick_top_buckets therefore compacts every valid score when b_lo..b_hi contain values of
// magnitude above max/2 (or infinities): slower, same answer. Masks are decided by comparing
// keys, never floats, so --use_fast_math's flush-to-zero cannot reorder subnormal scores.
//
// Memory: the candidate buffer is sized for the worst case (every score a candidate: heavy ties,
// or all scores within one top-digit bucket), 4 + 8 bytes per score (8 + 8 for float64); the
// histograms and state are about 16 KiB per digit level.
#include <algorithm>
#include <cstdint>
#include <limits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "selection.h"
#include "selection_op.h"

namespace kdops::cuda {
namespace {

constexpr int kDigitBits = 11;
constexpr int kMaxBins = 1 << kDigitBits;
constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // scores in flight per thread
constexpr int kChunk = kThreads * kUnroll;
constexpr int kBlocksPerSm = 4;  // 512 threads and 8 KiB of histogram each
constexpr int kPickThreads = kMaxBins / 2;  // two bins per thread
constexpr unsigned kFullWarp = 0xffffffffu;

// The digit levels of a Key, from the top: level l covers bits [shift, shift + width).
template <typename Key>
struct Digits {
  static constexpr int kKeyBits = 8 * sizeof(Key);
  static constexpr int kLevels = (kKeyBits + kDigitBits - 1) / kDigitBits;
  static constexpr int shift(int level) {
    return std::max(kKeyBits - kDigitBits * (level + 1), 0);
  }
  static constexpr int width(int level) { return kKeyBits - kDigitBits * level - shift(level); }
};

// Device-resident state of one call (zeroed before step 1).
template <typename Key>
struct SelectState {
  unsigned long long count;       // n: valid non-NaN scores
  unsigned long long nan_count;   // valid NaN scores: any, and nothing is kept
  unsigned long long candidates;  // appended by split_and_compact
  unsigned long long below;       // valid scores below the group holding v[lo]
  unsigned long long rank;        // rank of v[lo] inside that group
  unsigned long long le_count;    // after the last level: valid scores <= v[lo]
  Key prefix;                     // key bits of the group, above the next digit
  Key key_above;                  // min key > key(v[lo])
  Key threshold_key;              // key(t)
  unsigned bucket_lo, bucket_hi;  // top digits compacted by split_and_compact
  int nothing_kept;
};

template <typename In, typename T>
__device__ __forceinline__ T widen(In x) {
  if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<In, __half>) {
    return __half2float(x);
  } else {
    return x;
  }
}

template <typename Key>
__device__ __forceinline__ void atomic_min_key(Key* address, Key value) {
  if constexpr (sizeof(Key) == 8) {
    atomicMin(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
  } else {
    atomicMin(reinterpret_cast<unsigned*>(address), static_cast<unsigned>(value));
  }
}

template <typename Key>
__device__ __forceinline__ Key warp_min(Key value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = std::min(value, static_cast<Key>(__shfl_xor_sync(kFullWarp, value, offset)));
  }
  return value;
}

__device__ __forceinline__ unsigned warp_sum(unsigned value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullWarp, value, offset);
  return value;
}

__device__ void clear_shared_histogram(unsigned* bins) {
  for (int b = threadIdx.x; b < kMaxBins; b += blockDim.x) bins[b] = 0;
  __syncthreads();
}

__device__ void flush_shared_histogram(const unsigned* bins, unsigned long long* global_bins) {
  __syncthreads();
  for (int b = threadIdx.x; b < kMaxBins; b += blockDim.x) {
    if (bins[b] != 0) atomicAdd(global_bins + b, static_cast<unsigned long long>(bins[b]));
  }
}

// Calls visit(index, score as T, counted) for kUnroll scores per thread per step, the loads of a
// step issued before any use. Every thread of a block runs the same number of steps (out-of-range
// lanes get counted = false), so visit may use warp collectives.
template <typename In, typename T, typename Visit>
__device__ __forceinline__ void for_each_score(const In* scores, const bool* valid, int64_t n,
                                               Visit&& visit) {
  for (int64_t chunk = int64_t(blockIdx.x) * kChunk; chunk < n; chunk += int64_t(gridDim.x) * kChunk) {
    In x[kUnroll];
    bool counted[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = chunk + u * kThreads + threadIdx.x;
      counted[u] = i < n && (valid == nullptr || valid[i]);
      x[u] = i < n ? scores[i] : In{};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      visit(chunk + u * kThreads + threadIdx.x, widen<In, T>(x[u]), counted[u]);
    }
  }
}

// --- 1 ---------------------------------------------------------------------------------------

template <typename In, typename T>
__global__ void __launch_bounds__(kThreads) top_digit_histogram(
    const In* __restrict__ scores, const bool* __restrict__ valid, int64_t n,
    unsigned long long* __restrict__ histogram, SelectState<OrderKey<T>>* state) {
  using Key = OrderKey<T>;
  constexpr int kShift = Digits<Key>::shift(0);
  __shared__ unsigned bins[kMaxBins];
  clear_shared_histogram(bins);
  unsigned nans = 0;
  for_each_score<In, T>(scores, valid, n, [&](int64_t, T x, bool counted) {
    if (!counted) return;
    const Key key = order_key(x);
    if (is_nan_key<T>(key)) {
      ++nans;
    } else {
      atomicAdd(bins + (key >> kShift), 1u);
    }
  });
  nans = warp_sum(nans);
  if ((threadIdx.x & 31) == 0 && nans != 0) atomicAdd(&state->nan_count, static_cast<unsigned long long>(nans));
  flush_shared_histogram(bins, histogram);
}

// --- 2, 4: picking the bucket of a rank --------------------------------------------------------

// Exclusive prefix sum over the block (kPickThreads = 32 warps).
__device__ unsigned long long block_exclusive_scan(unsigned long long value) {
  __shared__ unsigned long long warp_totals[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  unsigned long long inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned long long other = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const unsigned long long total = warp_totals[lane];
    unsigned long long scanned = total;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const unsigned long long other = __shfl_up_sync(kFullWarp, scanned, offset);
      if (lane >= offset) scanned += other;
    }
    warp_totals[lane] = scanned - total;
  }
  __syncthreads();
  return warp_totals[warp] + inclusive - value;
}

// The bucket holding `rank` (< the total count): thread t owns bins 2t and 2t + 1 (counts c0, c1,
// `start` scores before them); the one whose range holds the rank reports the bucket and the
// count before it.
__device__ void find_bucket(unsigned long long c0, unsigned long long c1, unsigned long long start,
                            unsigned long long rank, unsigned* bucket, unsigned long long* below) {
  if (start <= rank && rank < start + c0) {
    *bucket = 2 * threadIdx.x;
    *below = start;
  } else if (start + c0 <= rank && rank < start + c0 + c1) {
    *bucket = 2 * threadIdx.x + 1;
    *below = start + c0;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPickThreads) pick_top_buckets(
    const unsigned long long* __restrict__ histogram, double q, SelectState<OrderKey<T>>* state) {
  using Key = OrderKey<T>;
  constexpr int kShift = Digits<Key>::shift(0);
  __shared__ unsigned bucket_lo, bucket_hi;
  __shared__ unsigned long long below_lo, below_hi;
  const unsigned long long c0 = histogram[2 * threadIdx.x];
  const unsigned long long c1 = histogram[2 * threadIdx.x + 1];
  const unsigned long long start = block_exclusive_scan(c0 + c1);
  __shared__ unsigned long long total;
  if (threadIdx.x == kPickThreads - 1) total = start + c0 + c1;
  __syncthreads();
  const unsigned long long n = total;
  if (n == 0 || state->nan_count != 0) {
    if (threadIdx.x == 0) {
      state->nothing_kept = 1;
      state->bucket_lo = state->bucket_hi = kMaxBins;  // nothing compacted, nothing kept
    }
    return;
  }
  const QuantileRanks<T> ranks = quantile_ranks(static_cast<T>(q), static_cast<int64_t>(n));
  find_bucket(c0, c1, start, ranks.lo, &bucket_lo, &below_lo);
  find_bucket(c0, c1, start, ranks.hi, &bucket_hi, &below_hi);
  __syncthreads();
  if (threadIdx.x != 0) return;
  state->count = n;
  state->prefix = bucket_lo;
  state->below = below_lo;
  state->rank = ranks.lo - below_lo;
  state->key_above = std::numeric_limits<Key>::max();
  // The shortcut of split_and_compact needs v[hi] - v[lo] finite: true when every value of the
  // two buckets has magnitude <= max / 2 (NaN bounds, from the top bucket, fail the test).
  const T bound_lo = from_order_key<T>(Key(bucket_lo) << kShift);
  const T bound_hi = from_order_key<T>(Key((Key(bucket_hi) + 1) << kShift) - 1);
  constexpr T kHalfMax = std::numeric_limits<T>::max() / 2;
  const bool finite_gap = fabs(bound_lo) <= kHalfMax && fabs(bound_hi) <= kHalfMax;
  state->bucket_lo = finite_gap ? bucket_lo : 0;
  state->bucket_hi = finite_gap ? bucket_hi : kMaxBins - 1;
}

template <typename Key>
__global__ void __launch_bounds__(kPickThreads) pick_bucket(
    const unsigned long long* __restrict__ histogram, int width, bool last_level,
    SelectState<Key>* state) {
  __shared__ unsigned bucket;
  __shared__ unsigned long long below;
  const unsigned long long c0 = histogram[2 * threadIdx.x];
  const unsigned long long c1 = histogram[2 * threadIdx.x + 1];
  const unsigned long long start = block_exclusive_scan(c0 + c1);
  if (state->nothing_kept) return;  // uniform over the block
  find_bucket(c0, c1, start, state->rank, &bucket, &below);
  __syncthreads();
  if (threadIdx.x != 0) return;
  state->prefix = (state->prefix << width) | bucket;
  state->below += below;
  state->rank -= below;
  if (last_level) state->le_count = state->below + histogram[bucket];  // the bucket is one key
}

// --- 3 ---------------------------------------------------------------------------------------

template <typename In, typename T>
__global__ void __launch_bounds__(kThreads) split_and_compact(
    const In* __restrict__ scores, const bool* __restrict__ valid, int64_t n,
    bool* __restrict__ mask, OrderKey<T>* __restrict__ candidate_keys,
    int64_t* __restrict__ candidate_index, SelectState<OrderKey<T>>* state) {
  using Key = OrderKey<T>;
  constexpr int kShift = Digits<Key>::shift(0);
  const unsigned bucket_lo = state->bucket_lo;
  const unsigned bucket_hi = state->bucket_hi;
  const int lane = threadIdx.x & 31;
  for_each_score<In, T>(scores, valid, n, [&](int64_t i, T x, bool counted) {
    const Key key = order_key(x);
    const unsigned digit = static_cast<unsigned>(key >> kShift);
    // NaNs reach here only when not counted, or with nothing_kept (empty bucket range)
    const bool candidate = counted && digit >= bucket_lo && digit <= bucket_hi;
    if (i < n) mask[i] = counted && digit > bucket_hi;
    const unsigned ballot = __ballot_sync(kFullWarp, candidate);
    if (ballot == 0) return;
    unsigned long long base = 0;
    if (lane == 0) base = atomicAdd(&state->candidates, static_cast<unsigned long long>(__popc(ballot)));
    base = __shfl_sync(kFullWarp, base, 0);
    if (candidate) {
      const unsigned long long slot = base + __popc(ballot & ((1u << lane) - 1));
      candidate_keys[slot] = key;
      candidate_index[slot] = i;
    }
  });
}

// --- 4, 5, 7: passes over the candidates --------------------------------------------------------

template <typename Key>
__global__ void __launch_bounds__(kThreads) candidate_histogram(
    const Key* __restrict__ keys, int shift, int width, unsigned long long* __restrict__ histogram,
    const SelectState<Key>* state) {
  __shared__ unsigned bins[kMaxBins];
  clear_shared_histogram(bins);
  const int64_t count = state->candidates;
  const Key prefix = state->prefix;
  const Key digit_mask = (Key(1) << width) - 1;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Key key = keys[i];
    if ((key >> (shift + width)) == prefix) atomicAdd(bins + ((key >> shift) & digit_mask), 1u);
  }
  flush_shared_histogram(bins, histogram);
}

template <typename Key>
__global__ void __launch_bounds__(kThreads) candidate_min_above(const Key* __restrict__ keys,
                                                                SelectState<Key>* state) {
  const int64_t count = state->candidates;
  const Key key_lo = state->prefix;
  Key smallest = std::numeric_limits<Key>::max();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Key key = keys[i];
    if (key > key_lo) smallest = std::min(smallest, key);
  }
  smallest = warp_min(smallest);
  if ((threadIdx.x & 31) == 0 && smallest != std::numeric_limits<Key>::max()) {
    atomic_min_key(&state->key_above, smallest);
  }
}

template <typename T>
__global__ void finish_threshold(double q, SelectState<OrderKey<T>>* state) {
  if (state->nothing_kept) return;
  const QuantileRanks<T> ranks =
      quantile_ranks(static_cast<T>(q), static_cast<int64_t>(state->count));
  const T v_lo = from_order_key<T>(state->prefix);
  const bool hi_is_tie = static_cast<unsigned long long>(ranks.hi) < state->le_count;
  const T v_hi = hi_is_tie ? v_lo : from_order_key<T>(state->key_above);
  const OrderKey<T> threshold = order_key(quantile_lerp(v_lo, v_hi, ranks.weight));
  if (is_nan_key<T>(threshold)) {
    state->nothing_kept = 1;  // t = NaN (torch's lerp on an infinite order statistic)
  } else {
    state->threshold_key = threshold;
  }
}

template <typename Key>
__global__ void __launch_bounds__(kThreads) mark_candidates(
    const Key* __restrict__ keys, const int64_t* __restrict__ index, bool* __restrict__ mask,
    const SelectState<Key>* state) {
  if (state->nothing_kept) return;  // split_and_compact wrote false for every candidate
  const int64_t count = state->candidates;
  const Key threshold = state->threshold_key;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    mask[index[i]] = keys[i] >= threshold;
  }
}

// --- launch ------------------------------------------------------------------------------------

template <typename In>
void launch(const SelectionLaunch& args, int device, cudaStream_t stream) {
  using T = std::conditional_t<std::is_same_v<In, double>, double, float>;
  using Key = OrderKey<T>;
  using D = Digits<Key>;
  const int64_t n = args.scores.numel();
  const auto options = args.scores.options();

  // one zeroed allocation: the state, then one histogram per digit level
  constexpr int64_t kStateBytes = 256;
  static_assert(sizeof(SelectState<Key>) <= kStateBytes);
  constexpr int64_t kHistogramBytes = kMaxBins * sizeof(unsigned long long);
  at::Tensor scratch = at::zeros({kStateBytes + D::kLevels * kHistogramBytes}, options.dtype(at::kByte));
  auto* state = reinterpret_cast<SelectState<Key>*>(scratch.data_ptr());
  auto histogram = [&](int level) {
    return reinterpret_cast<unsigned long long*>(scratch.data_ptr<uint8_t>() + kStateBytes +
                                                 level * kHistogramBytes);
  };
  at::Tensor candidate_keys = at::empty({n}, options.dtype(sizeof(Key) == 8 ? at::kLong : at::kInt));
  at::Tensor candidate_index = at::empty({n}, options.dtype(at::kLong));
  auto* keys = reinterpret_cast<Key*>(candidate_keys.data_ptr());
  auto* index = candidate_index.data_ptr<int64_t>();

  const In* scores = reinterpret_cast<const In*>(args.scores.const_data_ptr());
  const bool* valid = args.valid ? args.valid->const_data_ptr<bool>() : nullptr;
  bool* mask = args.mask.mutable_data_ptr<bool>();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int grid = static_cast<int>(std::min<int64_t>((n + kChunk - 1) / kChunk, int64_t(sms) * kBlocksPerSm));
  // the candidate passes read their count from the device: a grid for the worst case
  const int candidate_grid = static_cast<int>(
      std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sms) * kBlocksPerSm));

  top_digit_histogram<In, T><<<grid, kThreads, 0, stream>>>(scores, valid, n, histogram(0), state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pick_top_buckets<T><<<1, kPickThreads, 0, stream>>>(histogram(0), args.q, state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  split_and_compact<In, T><<<grid, kThreads, 0, stream>>>(scores, valid, n, mask, keys, index, state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int level = 1; level < D::kLevels; ++level) {
    candidate_histogram<Key><<<candidate_grid, kThreads, 0, stream>>>(
        keys, D::shift(level), D::width(level), histogram(level), state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_bucket<Key><<<1, kPickThreads, 0, stream>>>(histogram(level), D::width(level),
                                                      level == D::kLevels - 1, state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  candidate_min_above<Key><<<candidate_grid, kThreads, 0, stream>>>(keys, state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_threshold<T><<<1, 1, 0, stream>>>(args.q, state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mark_candidates<Key><<<candidate_grid, kThreads, 0, stream>>>(keys, index, mask, state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor select_top_fraction_cuda(const at::Tensor& scores, double fraction,
                                    const std::optional<at::Tensor>& valid) {
  TORCH_CHECK_VALUE(scores.is_cuda(), "select_top_fraction (cuda): scores must be a CUDA tensor; got ",
                    scores.device());
  const c10::cuda::CUDAGuard guard(scores.device());
  const SelectionLaunch args = prepare_selection(scores, fraction, valid);
  if (args.scores.numel() == 0) return args.mask;
  const int device = scores.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  switch (args.scores.scalar_type()) {
    case at::kFloat: launch<float>(args, device, stream); break;
    case at::kDouble: launch<double>(args, device, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(args, device, stream); break;
    case at::kHalf: launch<__half>(args, device, stream); break;
    default: TORCH_CHECK(false, "select_top_fraction (cuda): unsupported dtype ", args.scores.scalar_type());
  }
  return args.mask;
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("select_top_fraction", &kdops::cuda::select_top_fraction_cuda);
}
