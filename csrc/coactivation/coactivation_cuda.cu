// coactivation_features on CUDA devices (DESIGN.md 3.4). The tie rule and the gradient algebra
// are coactivation.h's; host checks and output allocation are coactivation_op.cpp's, shared with
// the CPU backend. The outputs are the CPU kernels' (same kept ids, same saved layout).
//
// Forward, two launches:
//   select    one block per position, one sweep over its logits with 16-byte loads (the next
//             step's vectors in flight while the current ones are processed). In the same sweep:
//             the softmax statistics (running max z_m, s = sum exp((z - z_m) / tau), shifted
//             before scaling as on the CPU) and the top-k. Every logit maps to a unique key that
//             orders like ranks_before (select_key); a logit enters the shared-memory candidate
//             buffer only if its key beats the threshold, the k-th best key kept so far. Past a
//             row's first steps one compare of the step's largest logit against the threshold's
//             value rejects a thread's whole step. Admissions are counted block-wide first; when
//             they would overflow the buffer it is sorted (bitonic, best first), cut to k and the
//             threshold raised, one element per thread at a time, so the buffer never holds more
//             than k + threads keys. The final sort of unique keys fixes the result whatever order
//             the candidates arrived in: deterministic. Writes ids and values best first,
//             shifted_lse, and each position's scatter weight c_b s (0 where it does not count).
//   scatter   f_b[id] += v (c_b s) without float atomics: each warp owns a slice of f_b in shared
//             memory and walks the entries of sequence b in order, 32 at a time; entries of one
//             round with the same id (from different positions) are added by the first of them,
//             in sequence order, so every f_b[id] sums its terms in position order: bitwise
//             identical run to run.
// Backward, one block per position: D = sum_k v_k dv_k (= 2 c s sum_k g[id_k] v_k) from one block
// reduction, the dense softmax term -p_j D / tau for every j in one sweep (16-byte streaming
// stores), a barrier, then the kept ids overwritten with p_j (dv_j - D) / tau, as the CPU kernel
// does; transform "logits" writes zeros and dv at the kept ids; a position that does not count
// gets zeros.
//
// Rows are head | 16-byte vectors | tail as in sequence_cuda.cu. Offsets are 64-bit; indices
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
#include "../selection/selection.h"  // order_key: the order-preserving integer image of a float
#include "coactivation.h"
#include "coactivation_op.h"

namespace kdops::cuda {
namespace {

constexpr int64_t kMaxVocab = std::numeric_limits<int32_t>::max() - 4096;

template <typename In>
using AccOf = typename Storage<In>::Acc;

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// 1 / tau correctly rounded (--use_fast_math would otherwise divide approximately).
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double reciprocal(double x) { return 1.0 / x; }

// exp(x) to the last bit of Acc for the k kept values (fast math would use the MUFU intrinsic).
__device__ __forceinline__ float exact_exp(float x) { return static_cast<float>(::exp(static_cast<double>(x))); }
__device__ __forceinline__ double exact_exp(double x) { return ::exp(x); }

// ---------------------------------------------------------------------------------------------
// Selection keys
// ---------------------------------------------------------------------------------------------

// Greater key = kept first, exactly ranks_before: the order-preserving image of the logit (-0
// as +0, every NaN the largest) above the complement of its id (equal logits: the lower id
// first). Keys are unique within a row and never 0 (the image of -inf is not), so 0 marks an
// empty slot. 32 + 32 bits for float (bf16 and fp16 widen to float exactly), 64 + 32 for double.
template <typename Acc>
using SelectKey = std::conditional_t<std::is_same_v<Acc, double>, unsigned __int128, uint64_t>;

template <typename Acc>
__device__ __forceinline__ SelectKey<Acc> select_key(Acc z, int32_t id) {
  using Image = OrderKey<Acc>;
  Image image = order_key(z);
  if (is_nan_key<Acc>(image)) image = ~Image(0);
  return (SelectKey<Acc>(image) << 32) | static_cast<uint32_t>(~id);
}

template <typename Acc>
__device__ __forceinline__ int32_t key_id(SelectKey<Acc> key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key));
}

// The logit of a key (a NaN for the NaN image; +0 for -0).
template <typename Acc>
__device__ __forceinline__ Acc key_value(SelectKey<Acc> key) {
  return from_order_key<Acc>(static_cast<OrderKey<Acc>>(key >> 32));
}

// Sorts keys[0, count) best first in place; bitonic over the next power of two, the slots past
// count filled with empty keys (which sort last). Called by every thread of the block; keys
// written before the call must be complete (a barrier, or the caller's own writes).
template <typename Key>
__device__ void sort_best_first(Key* keys, int count) {
  int n = 1;
  while (n < count) n <<= 1;
  for (int i = count + static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) keys[i] = 0;
  __syncthreads();
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = static_cast<int>(threadIdx.x); i < n / 2; i += static_cast<int>(blockDim.x)) {
        const int lo = 2 * i - (i & (stride - 1));  // bit `stride` clear; its partner has it set
        const bool best_first = (lo & size) == 0;   // this run's direction (the last run: all)
        const Key a = keys[lo];
        const Key b = keys[lo + stride];
        if ((a < b) == best_first) {
          keys[lo] = b;
          keys[lo + stride] = a;
        }
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Select kernel
// ---------------------------------------------------------------------------------------------

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kSelectUnroll = 2;  // 16-byte vectors per thread and step
// Candidate slots: after a cut to k, one admission per thread always fits; a power of two, the
// largest sort.
constexpr int kCandidates = 2 * kSelectThreads;
static_assert(kCandidates >= kCoactivationMaxK + kSelectThreads, "a round must fit after a cut");
static_assert((kCandidates & (kCandidates - 1)) == 0, "the sort pads to a power of two");
// Register caps: four 256-thread blocks per SM (<= 64 registers); float64 (gradcheck) two.
template <typename In>
constexpr int kSelectMinBlocks = std::is_same_v<In, double> ? 2 : 4;

// max(a, b), NaN if either is (fmax would drop it).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double max_nan(double a, double b) {
  return a != a ? a : (b != b ? b : fmax(a, b));
}

// The largest of a thread's logits in one step, NaN if any is: it gates both the statistics'
// rescale and the candidate filter.
template <int N, typename Acc>
__device__ __forceinline__ Acc step_max(const Acc (&z)[N]) {
  Acc top = z[0];
#pragma unroll
  for (int e = 1; e < N; ++e) top = max_nan(top, z[e]);
  return top;
}

// Online softmax statistics shifted before scaling: (m, s) with s = sum 2^((z - m) c2),
// c2 = log2(e) / tau, m the largest z seen, so that s = sum exp((z - m) / tau) keeps the low bits
// of large logits (coactivation.h). top = step_max(z). -inf values add 0; a NaN makes s NaN (m
// skips it, the sum does not); +inf makes s NaN, as the CPU's (z - z_max) does.
template <int N, typename Acc>
__device__ __forceinline__ void stats_push(Acc& m, Acc& s, const Acc (&z)[N], Acc top, Acc c2) {
  using M = CudaMath<Acc>;
  const Acc nm = fmax(m, top);
  const Acc base = nm == neg_inf<Acc>() ? Acc(0) : nm;  // all -inf so far: every term is 0
  // The step's terms in kChains interleaved partial sums, then into s: a thread's share of a row
  // is then about steps + N / kChains adds deep, not V / threads (float32 rounding grows with
  // the depth, and faster on rows of equal terms).
  constexpr int kChains = N < 4 ? N : 4;
  Acc part[kChains];
#pragma unroll
  for (int l = 0; l < kChains; ++l) part[l] = M::exp2((z[l] - base) * c2);
#pragma unroll
  for (int e = kChains; e < N; ++e) part[e % kChains] += M::exp2((z[e] - base) * c2);
#pragma unroll
  for (int width = kChains / 2; width > 0; width /= 2) {
#pragma unroll
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  }
  s = s * M::exp2((m - base) * c2) + part[0];
  m = nm;
}

template <typename Acc>
struct StatsMergeOp {  // {m, s} of stats_push
  Acc c2;
  __device__ __forceinline__ void operator()(Acc (&a)[2], const Acc (&b)[2]) const {
    using M = CudaMath<Acc>;
    const Acc nm = fmax(a[0], b[0]);
    const Acc base = nm == neg_inf<Acc>() ? Acc(0) : nm;
    a[1] = a[1] * M::exp2((a[0] - base) * c2) + b[1] * M::exp2((b[0] - base) * c2);
    a[0] = nm;
  }
};

// The block's candidate buffer and its bookkeeping. Every member but the pointers is the same in
// every thread (they change only on block-wide values).
template <typename Acc>
struct Candidates {
  using Key = SelectKey<Acc>;
  Key* keys;                          // shared [kCandidates]
  int* cursor;                        // shared: the next free slot (taken by atomics only)
  int (*warp_totals)[kSelectWarps];   // shared [2][warps]: block_sum's exchange, double-buffered
  int k;
  int count = 0;                      // keys in the buffer
  int parity = 0;
  Key threshold = 0;                  // admit keys above it: the k-th best after the last cut
  Acc threshold_value = neg_inf<Acc>();  // its logit, for the cheap test

  // Whether logit z at id (-1: no element) is admitted.
  __device__ __forceinline__ bool admits(Acc z, int32_t id) const {
    // z < threshold_value means key < threshold (NaN compares false and goes on to the key;
    // flush-to-zero keeps the compare monotone, so nothing admissible is dropped here)
    return id >= 0 && !(z < threshold_value) && select_key(z, id) > threshold;
  }

  // Sum of v over the block, in every thread (one barrier).
  __device__ __forceinline__ int block_sum(int v) {
    v = static_cast<int>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(v)));
    int* totals = warp_totals[parity];
    parity ^= 1;  // the next call writes the other half while slow threads may still read this
    if ((threadIdx.x & 31) == 0) totals[threadIdx.x >> 5] = v;
    __syncthreads();
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kSelectWarps; ++w) sum += totals[w];
    return sum;
  }

  // Sorts the buffer, keeps its k best and raises the threshold to the k-th. Needs count >= k.
  __device__ void cut() {
    sort_best_first(keys, count);
    count = k;
    threshold = keys[k - 1];
    threshold_value = key_value<Acc>(threshold);
    if (threadIdx.x == 0) *cursor = count;
    __syncthreads();
  }

  // Offers this thread's N logits: z[e] at id_of(e) (-1: none), top = step_max(z); load(id)
  // reads a logit again. Called by every thread of the block. Past the first steps of a row the
  // threshold is high and top alone rejects the step. The admitted elements are a bit mask and
  // their keys are formed again where they are stored (rare), so that no key stays live across
  // the barrier.
  template <int N, typename IdOf, typename Load>
  __device__ __forceinline__ void offer(const Acc (&z)[N], Acc top, IdOf id_of, Load load) {
    static_assert(N <= 32, "one bit per element");
    uint32_t admitted = 0;
    if (!(top < threshold_value)) {
#pragma unroll
      for (int e = 0; e < N; ++e) admitted |= uint32_t(admits(z[e], id_of(e))) << e;
    }
    const int total = block_sum(__popc(admitted));
    if (total == 0) return;
    if (count + total <= kCandidates) {
      if (admitted != 0) {
        int slot = atomicAdd(cursor, __popc(admitted));
#pragma unroll
        for (int e = 0; e < N; ++e) {
          if (admitted >> e & 1u) keys[slot++] = select_key(z[e], id_of(e));
        }
      }
      count += total;
      return;
    }
    // Too many for the room left (a row's first steps): one element per thread at a time, against
    // the threshold of the moment, cutting whenever a round would overflow; after a cut (k keys)
    // a round always fits. A rolled loop that reads its logits again (cache hits): the fast path
    // keeps the registers and the code stays small.
#pragma unroll 1
    for (int e = 0; e < N; ++e) {
      const int32_t id = id_of(e);
      const auto key_now = [&] { return select_key(load(id), id); };
      bool admit = (admitted >> e & 1u) && key_now() > threshold;
      int round = __syncthreads_count(admit);
      if (count + round > kCandidates) {
        cut();
        admit = admit && key_now() > threshold;
        round = __syncthreads_count(admit);
      }
      if (admit) keys[atomicAdd(cursor, 1)] = key_now();
      count += round;
    }
  }
};

template <typename In>
__global__ void __launch_bounds__(kSelectThreads, kSelectMinBlocks<In>)
    coactivation_select_kernel(const CoactivationParams prm, AccOf<In>* __restrict__ position_weight) {
  using Acc = AccOf<In>;
  using Key = SelectKey<Acc>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  constexpr int kStep = kSelectUnroll * kVec;  // elements per thread and step
  constexpr int32_t kStepVectors = kSelectUnroll * kSelectThreads;
  constexpr Acc kLog2e = Acc(1.442695040888963407359924681001892137);
  __shared__ Key keys[kCandidates];
  __shared__ int cursor;
  __shared__ int warp_totals[2][kSelectWarps];
  __shared__ Acc scratch[32 * 2];
  __shared__ Acc kept[kCoactivationMaxK];

  const int32_t V = static_cast<int32_t>(prm.vocab);
  const int32_t K = static_cast<int32_t>(prm.k);
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const bool softmax = prm.transform == CoactivationTransform::kSoftmax;
  const Acc c2 = reciprocal(*static_cast<const Acc*>(prm.temperature)) * kLog2e;
  auto* top_values = static_cast<Acc*>(prm.top_values);
  auto* lse_out = static_cast<Acc*>(prm.shifted_lse);

  for (int64_t pos = blockIdx.x; pos < prm.positions(); pos += gridDim.x) {
    // (output pointers and 1 / tau are formed where they are used: the sweep is register-bound)
    if (!prm.counts(pos)) {
      int64_t* ids_out = prm.top_ids + pos * K;
      Acc* values_out = top_values + pos * K;
      for (int32_t t = tid; t < K; t += kSelectThreads) {
        ids_out[t] = 0;
        values_out[t] = 0;
      }
      if (tid == 0) {
        lse_out[pos] = 0;
        position_weight[pos] = 0;
      }
      continue;
    }
    const In* z = static_cast<const In*>(prm.logits) + prm.logits_offset(pos);
    const RowSplit split = split_row(z, z, V);
    const auto load = [&](int32_t j) { return Storage<In>::load(z + j); };
    Candidates<Acc> best{keys, &cursor, warp_totals, K};
    if (tid == 0) cursor = 0;  // the previous row's last atomics precede its final cut's barriers
    Acc m = neg_inf<Acc>();
    Acc s = 0;

    // the body, one step of kSelectUnroll vectors per thread, the next step's loads in flight
    const In* body = z + split.head;
    const int32_t steps = (split.vectors + kStepVectors - 1) / kStepVectors;
    const auto load_step = [&](int32_t step, uint4 (&v)[kSelectUnroll]) {
#pragma unroll
      for (int u = 0; u < kSelectUnroll; ++u) {
        const int32_t i = step * kStepVectors + u * kSelectThreads + tid;
        v[u] = i < split.vectors ? load16(body + static_cast<int64_t>(i) * kVec) : make_uint4(0, 0, 0, 0);
      }
    };
    uint4 next[kSelectUnroll];
    if (steps > 0) load_step(0, next);
    for (int32_t step = 0; step < steps; ++step) {
      uint4 current[kSelectUnroll];
#pragma unroll
      for (int u = 0; u < kSelectUnroll; ++u) current[u] = next[u];
      if (step + 1 < steps) load_step(step + 1, next);
      const int32_t first = step * kStepVectors + tid;  // this thread's vector for u = 0
      Acc x[kStep];
#pragma unroll
      for (int u = 0; u < kSelectUnroll; ++u) {
        Acc part[kVec];
        Storage<In>::unpack(current[u], part);
        const bool real = first + u * kSelectThreads < split.vectors;
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[u * kVec + e] = real ? part[e] : neg_inf<Acc>();
      }
      const Acc top = step_max(x);
      if (softmax) stats_push<kStep>(m, s, x, top, c2);
      best.offer(x, top, [&](int e) {
        const int32_t i = first + (e / kVec) * kSelectThreads;
        return i < split.vectors ? split.head + i * kVec + e % kVec : int32_t(-1);
      }, load);
    }
    // head and tail: fewer than 2 kVec elements, one per thread
    const int32_t scalars = split.head + (V - split.tail);
    if (scalars > 0) {
      const int32_t j = tid < split.head ? tid : split.tail + (tid - split.head);
      const bool real = tid < scalars;
      const Acc x[1] = {real ? load(j) : neg_inf<Acc>()};
      if (softmax) stats_push<1>(m, s, x, x[0], c2);
      best.offer(x, x[0], [&](int) { return real ? j : int32_t(-1); }, load);
    }

    // keys[0, k): the kept logits best first (count >= k: every logit was admitted or beaten by
    // k kept ones)
    best.cut();
    Acc shifted_lse = 0;
    Acc z_max = 0;
    if (softmax) {
      Acc st[2] = {m, s};
      block_allreduce<2>(st, scratch, StatsMergeOp<Acc>{c2});
      z_max = key_value<Acc>(keys[0]);  // = m unless the row has a NaN (then s is NaN too)
      // an all -inf row has no softmax: NaN, as on the CPU
      shifted_lse = z_max > neg_inf<Acc>() ? M::log(st[1]) : quiet_nan<Acc>();
    }
    const Acc inv_tau = reciprocal(*static_cast<const Acc*>(prm.temperature));
    int64_t* ids_out = prm.top_ids + pos * K;
    Acc* values_out = top_values + pos * K;
    for (int32_t t = tid; t < K; t += kSelectThreads) {
      const Key key = keys[t];
      const Acc zk = key_value<Acc>(key);
      const Acc v = softmax ? exact_exp((zk - z_max) * inv_tau - shifted_lse) : zk;
      ids_out[t] = key_id<Acc>(key);
      values_out[t] = v;
      kept[t] = v;
    }
    __syncthreads();
    if (tid < 32) {  // s = sum_k v_k in a fixed order
      Acc sum[1] = {0};
      for (int32_t t = tid; t < K; t += 32) sum[0] += kept[t];
      warp_allreduce<1>(sum, SumOp{});
      if (tid == 0) {
        lse_out[pos] = shifted_lse;
        position_weight[pos] = sum[0] * static_cast<const Acc*>(prm.seq_scale)[pos / prm.seq];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scatter kernel
// ---------------------------------------------------------------------------------------------

constexpr int kScatterWarps = 4;
constexpr int kScatterRounds = 8;  // rounds of 32 entries loaded together
// Each warp's slice of f_b: 8 KiB of shared memory.
template <typename Acc>
constexpr int32_t kScatterSlice = 8192 / static_cast<int32_t>(sizeof(Acc));

template <typename Acc>
__global__ void __launch_bounds__(kScatterWarps * 32)
    coactivation_scatter_kernel(const CoactivationParams prm, const Acc* __restrict__ position_weight) {
  constexpr int32_t kSlice = kScatterSlice<Acc>;
  __shared__ Acc slices[kScatterWarps][kSlice];
  __shared__ Acc pending[kScatterWarps][32];
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int32_t K = static_cast<int32_t>(prm.k);
  const int64_t chunks = (prm.vocab + kScatterWarps * kSlice - 1) / (kScatterWarps * kSlice);
  const int64_t entries = prm.seq * K;  // of one sequence, position-major
  const auto* top_values = static_cast<const Acc*>(prm.top_values);
  auto* features = static_cast<Acc*>(prm.features);
  Acc* f = slices[warp];
  Acc* my_pending = pending[warp];

  for (int64_t block = blockIdx.x; block < prm.batch * chunks; block += gridDim.x) {
    const int64_t b = block / chunks;
    const int64_t lo = (block % chunks) * (kScatterWarps * kSlice) + warp * kSlice;
    for (int32_t i = lane; i < kSlice; i += 32) f[i] = 0;
    __syncwarp();
    const int64_t* ids = prm.top_ids + b * entries;
    const Acc* values = top_values + b * entries;
    const Acc* weights = position_weight + b * prm.seq;
    // this lane's entry (position t, slot kk), advanced by 32 entries per round
    int64_t t = lane / K;
    int32_t kk = lane % K;
    for (int64_t base = 0; base < entries; base += 32 * kScatterRounds) {
      int64_t id[kScatterRounds];
      Acc value[kScatterRounds];
      Acc weight[kScatterRounds];
#pragma unroll
      for (int r = 0; r < kScatterRounds; ++r) {
        const int64_t e = base + r * 32 + lane;
        const bool real = e < entries;
        id[r] = real ? __ldg(ids + e) : -1;
        value[r] = real ? __ldg(values + e) : Acc(0);
        weight[r] = real ? __ldg(weights + t) : Acc(0);
        kk += 32 % K;
        t += 32 / K + (kk >= K);
        kk -= kk >= K ? K : 0;
      }
#pragma unroll
      for (int r = 0; r < kScatterRounds; ++r) {
        // weight 0: a position that does not count (and adding v * 0 to f would change nothing)
        const int64_t local = id[r] - lo;
        const bool mine = weight[r] != Acc(0) && local >= 0 && local < kSlice;
        if (!__any_sync(0xffffffffu, mine)) continue;
        // lanes with the same id (positions differ): the first in sequence order adds them all,
        // in order
        const unsigned same = __match_any_sync(0xffffffffu, mine ? static_cast<int32_t>(local) : -1 - lane);
        my_pending[lane] = value[r] * weight[r];
        __syncwarp();
        if (mine && __ffs(same) - 1 == lane) {
          Acc acc = f[local];
          for (unsigned rest = same; rest != 0; rest &= rest - 1) acc += my_pending[__ffs(rest) - 1];
          f[local] = acc;
        }
        __syncwarp();
      }
    }
    Acc* out = features + b * prm.vocab;
    for (int32_t i = lane; i < kSlice && lo + i < prm.vocab; i += 32) out[lo + i] = f[i];
    __syncwarp();  // the slice is read out before the next block zeroes it
  }
}

// ---------------------------------------------------------------------------------------------
// Backward kernel
// ---------------------------------------------------------------------------------------------

constexpr int kBackwardMaxThreads = 512;
constexpr int kBackwardUnroll = 2;  // vectors in flight per thread
template <typename In>
constexpr int kBackwardMinBlocks = std::is_same_v<In, double> ? 1 : 2;

template <typename In>
__global__ void __launch_bounds__(kBackwardMaxThreads, kBackwardMinBlocks<In>)
    coactivation_backward_kernel(const CoactivationParams prm) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  constexpr Acc kLog2e = Acc(1.442695040888963407359924681001892137);
  __shared__ Acc scratch[32 * 2];
  const int32_t V = static_cast<int32_t>(prm.vocab);
  const int32_t K = static_cast<int32_t>(prm.k);
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t threads = static_cast<int32_t>(blockDim.x);
  const bool softmax = prm.transform == CoactivationTransform::kSoftmax;
  const Acc inv_tau = reciprocal(*static_cast<const Acc*>(prm.temperature));
  const Acc c2 = inv_tau * kLog2e;
  const auto* logits = static_cast<const In*>(prm.logits);
  const auto* top_values = static_cast<const Acc*>(prm.top_values);
  const auto* lse_in = static_cast<const Acc*>(prm.shifted_lse);
  const auto* seq_scale = static_cast<const Acc*>(prm.seq_scale);
  const auto* grad_features = static_cast<const Acc*>(prm.grad_features);
  auto* grad_logits = static_cast<In*>(prm.grad_logits);

  for (int64_t pos = blockIdx.x; pos < prm.positions(); pos += gridDim.x) {
    In* g = grad_logits + pos * prm.vocab;
    if (!prm.counts(pos)) {
      fill_row<In>(g, split_row(g, g, V), V, Acc(0));
      continue;
    }
    const int64_t b = pos / prm.seq;
    const int64_t* ids = prm.top_ids + pos * K;
    const Acc* values = top_values + pos * K;
    const Acc* gf = grad_features + b * prm.vocab;
    // s = sum_k v_k, gv = sum_k g[id_k] v_k; dv_k = c (g[id_k] s + gv)
    Acc sums[2] = {0, 0};
    for (int32_t kk = tid; kk < K; kk += threads) {
      const Acc v = values[kk];
      sums[0] += v;
      sums[1] += gf[ids[kk]] * v;
    }
    block_allreduce<2>(sums, scratch, SumOp{});
    const Acc s = sums[0];
    const Acc gv = sums[1];
    const Acc c = seq_scale[b];
    const auto dv_at = [&](int32_t kk) { return c * (gf[ids[kk]] * s + gv); };
    if (!softmax) {  // dL/dz = dv at the kept ids, 0 elsewhere
      fill_row<In>(g, split_row(g, g, V), V, Acc(0));
      __syncthreads();
      for (int32_t kk = tid; kk < K; kk += threads) Storage<In>::store(g + ids[kk], dv_at(kk));
      continue;
    }
    // (1/tau) p_j (dv_j - D) with D = sum_k v_k dv_k = 2 c s gv: the dense -p_j D / tau first
    const Acc D = Acc(2) * c * s * gv;
    const Acc dense = -D * inv_tau;
    const In* z = logits + prm.logits_offset(pos);
    const Acc z_max = Storage<In>::load(z + ids[0]);  // the forward pass's shift
    const Acc lse2 = lse_in[pos] * kLog2e;
    const auto grad_at = [&](Acc zj) { return M::exp2((zj - z_max) * c2 - lse2) * dense; };
    const RowSplit split = split_row(z, g, V);
    const In* body = z + split.head;
    In* g_body = g + split.head;
    for (int32_t base = tid; base < split.vectors; base += kBackwardUnroll * threads) {
      uint4 v[kBackwardUnroll];
#pragma unroll
      for (int u = 0; u < kBackwardUnroll; ++u) {
        const int32_t i = base + u * threads;
        v[u] = i < split.vectors ? load16(body + static_cast<int64_t>(i) * kVec) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kBackwardUnroll; ++u) {
        const int32_t i = base + u * threads;
        if (i >= split.vectors) break;
        Acc x[kVec];
        Storage<In>::unpack(v[u], x);
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[e] = grad_at(x[e]);
        store16(g_body + static_cast<int64_t>(i) * kVec, Storage<In>::pack(x));
      }
    }
    for_each_scalar(split, V, [&](int32_t j) { Storage<In>::store(g + j, grad_at(Storage<In>::load(z + j))); });
    __syncthreads();  // the kept ids overwrite the dense term (the ids of a position are distinct)
    for (int32_t kk = tid; kk < K; kk += threads) {
      Storage<In>::store(g + ids[kk], values[kk] * (dv_at(kk) - D) * inv_tau);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------

unsigned grid_of(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, std::numeric_limits<int32_t>::max()));
}

template <typename In>
void launch_forward(const CoactivationParams& prm, const at::Tensor& position_weight, cudaStream_t stream) {
  using Acc = AccOf<In>;
  auto* weights = static_cast<Acc*>(position_weight.data_ptr());
  if (prm.positions() > 0) {
    coactivation_select_kernel<In><<<grid_of(prm.positions()), kSelectThreads, 0, stream>>>(prm, weights);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t chunk = int64_t(kScatterWarps) * kScatterSlice<Acc>;
  const int64_t blocks = prm.batch * ((prm.vocab + chunk - 1) / chunk);
  coactivation_scatter_kernel<Acc><<<grid_of(blocks), kScatterWarps * 32, 0, stream>>>(prm, weights);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In>
void launch_backward(const CoactivationParams& prm, cudaStream_t stream) {
  constexpr int kVec = Storage<In>::kVec;
  // about kBackwardUnroll vectors per thread
  const int64_t work = (prm.vocab / kVec + kBackwardUnroll - 1) / kBackwardUnroll;
  const int threads = static_cast<int>((std::clamp<int64_t>(work, 32, kBackwardMaxThreads) + 31) / 32 * 32);
  coactivation_backward_kernel<In><<<grid_of(prm.positions()), threads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coactivation_features_cuda(
    const at::Tensor& logits, int64_t k, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, c10::string_view transform, bool normalize) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "coactivation_features (cuda): logits must be a CUDA tensor; got ",
                    logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  CoactivationLaunch launch = prepare_coactivation(logits, k, temperature, valid, transform, normalize);
  const CoactivationParams& prm = launch.params;
  TORCH_CHECK_VALUE(prm.vocab <= kMaxVocab, "coactivation_features (cuda): vocab (last dim) must be at most ",
                    kMaxVocab, "; got ", prm.vocab);
  // c_b s per position, written by the select kernel for the scatter
  const at::Tensor position_weight = launch.top_values.new_empty({prm.positions()});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
  switch (logits.scalar_type()) {
    case at::kFloat: launch_forward<float>(prm, position_weight, stream); break;
    case at::kDouble: launch_forward<double>(prm, position_weight, stream); break;
    case at::kBFloat16: launch_forward<__nv_bfloat16>(prm, position_weight, stream); break;
    case at::kHalf: launch_forward<__half>(prm, position_weight, stream); break;
    default: TORCH_CHECK(false, "coactivation_features (cuda): unsupported dtype ", logits.scalar_type());
  }
  return {launch.features, launch.top_ids, launch.top_values, launch.shifted_lse};
}

at::Tensor coactivation_features_backward_cuda(
    const at::Tensor& grad_features, const at::Tensor& logits, const at::Tensor& top_ids,
    const at::Tensor& top_values, const at::Tensor& shifted_lse, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, c10::string_view transform, bool normalize) {
  TORCH_CHECK_VALUE(logits.is_cuda(),
                    "coactivation_features_backward (cuda): logits must be a CUDA tensor; got ",
                    logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  CoactivationLaunch launch = prepare_coactivation_backward(
      grad_features, logits, top_ids, top_values, shifted_lse, temperature, valid, transform, normalize);
  const CoactivationParams& prm = launch.params;
  TORCH_CHECK_VALUE(prm.vocab <= kMaxVocab,
                    "coactivation_features_backward (cuda): vocab (last dim) must be at most ", kMaxVocab,
                    "; got ", prm.vocab);
  if (prm.positions() > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.get_device()).stream();
    switch (logits.scalar_type()) {
      case at::kFloat: launch_backward<float>(prm, stream); break;
      case at::kDouble: launch_backward<double>(prm, stream); break;
      case at::kBFloat16: launch_backward<__nv_bfloat16>(prm, stream); break;
      case at::kHalf: launch_backward<__half>(prm, stream); break;
      default: TORCH_CHECK(false, "coactivation_features_backward (cuda): unsupported dtype ", logits.scalar_type());
    }
  }
  return launch.grad_logits;
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("coactivation_features", &kdops::cuda::coactivation_features_cuda);
  m.impl("coactivation_features_backward", &kdops::cuda::coactivation_features_backward_cuda);
}
