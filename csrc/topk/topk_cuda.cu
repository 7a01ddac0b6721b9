// topk_kd_loss on CUDA devices (DESIGN.md 3.2). The per-row algebra is topk.h's, the per-element
// terms divergence.h's with the device Math policy of common/cuda_math.cuh; host checks, output
// allocation and the reduction scale are topk_op.cpp's, shared with the CPU backend.
//
// Per row, in base 2 like the kd_loss kernels (x = z log2(e) / tau, log2 q = x - lse2):
//   sweep 1   exact fkl only: online (max, sum 2^(x - max)) of the student row -> lse2; with a
//             temperature gradient also h = sum 2^(x - max) (x - max), which gives the row's
//             sum q log q = ln 2 (h / s - log2 s)
//   K phase   the row's K entries in shared memory (id, x at the id, teacher value); the teacher's
//             log-normalizer over K (renormalize) and, for the support divergences, the student's;
//             element_terms per entry -> loss, U, W (one block reduction); a second pass over the
//             entries gives the student corrections c_k, the teacher gradient and the temperature
//             sum (recomputing the terms: cheaper than keeping them)
//   sweep 2   student gradient only: the dense term for every j with 16-byte stores (fkl: -q_j U;
//             otherwise 0), a barrier, then each id's exact value dense_j + sum of c_k over all
//             entries with that id overwrites it. The sums come from a shared-memory hash table
//             (open addressing, float atomics), so duplicate ids get one float32 total and every
//             duplicate writes the same value; the rounded gradient is never read back. (Three or
//             more entries with one id add in a run-dependent order: the last bit may vary.)
// Ids outside [0, V) are never dereferenced: the entry's student logit is NaN and its loss NaN.
//
// Two launch shapes of one kernel per input dtype (the divergence, the id width and the sweeps'
// source are run-time switches):
//
// * staged (exact fkl with the student gradient; fp32 / bf16 / fp16): sweep 2 needs the row again,
//   and a whole row per block (256 KB in bf16 at V = 128256) would have to come back from L2, where
//   a GPU's worth of rows in flight does not fit. So the row is split over a thread-block cluster
//   of C = 1, 2, 4 or 8 blocks, each copying its slice into shared memory once (cp.async, at most
//   kStageBytes: three blocks per SM on H100/H200); the statistics are combined block-wide and
//   then cluster-wide through distributed shared memory. Every block runs the (small) K phase
//   itself on the same data with the same reduction order, so all get bit-identical row values
//   without a second exchange; each block writes the gradient of its own slice, ids included.
//   DRAM bytes per element: read the student once and write the gradient once (bf16: 2 + 2).
// * plain (everything else, and the fallback): one block per row reads the student row from
//   global memory in each sweep it needs (exact fkl with the gradient: twice, the second mostly
//   from L2 for short rows); the support divergences read only the K gathered logits and write
//   zeros plus the K corrections.
//
// Rows are head | 16-byte vectors | tail as in divergence_cuda.cu: when the student and gradient
// rows share their address modulo 16, the few head and tail elements go one by one and the body
// in 16-byte vectors; otherwise the whole row goes element by element (correct, slower). Offsets
// are 64-bit; indices inside a row 32-bit (the host checks V). KDOPS_CUDA_NO_CLUSTER=1 (read once
// per process) forces the plain shape, so that both can be tested on one machine.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string_view>
#include <tuple>
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_math.cuh"
#include "topk.h"
#include "topk_op.h"

namespace kdops::cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kPlainUnroll = 2;  // vectors in flight per thread per step when reading global memory
constexpr int kStagedMaxThreads = 256;
constexpr int kStagedMinThreads = 64;
// Register caps: two 512-thread blocks per SM (<= 64 registers), which also lets three staged
// 256-thread blocks share an SM; float64 (for gradcheck) gets one block.
template <typename In>
constexpr int kMinBlocks = std::is_same_v<In, double> ? 1 : 2;
// A staged block's slice of the student row, at most: three blocks per SM on H100/H200 (228 KiB).
constexpr int64_t kStageBytes = 64 * 1024;
constexpr int kMaxClusterSize = 8;  // the portable limit
constexpr int64_t kMaxVocab = std::numeric_limits<int32_t>::max() - 4096;

template <typename In>
using AccOf = typename Storage<In>::Acc;

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fffffff);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000ll);
}

// ---------------------------------------------------------------------------------------------
// Row statistics with the entropy sum
// ---------------------------------------------------------------------------------------------

// Base-2 online statistics (m, s, h): s = sum 2^(x - m), h = sum 2^(x - m) (x - m). Moving to a
// new base n rescales h to 2^(m - n) (h + (m - n) s). Nothing seen yet (s = 0, m = -inf)
// rescales to 0 without forming -inf * 0; a NaN sum stays NaN.
template <typename T, typename Math>
__device__ __forceinline__ T rescaled_entropy(T m, T s, T h, T base) {
  return s == T(0) ? T(0) : Math::exp2(m - base) * (h + (m - base) * s);
}

// stats_push (cuda_math.cuh) plus h. A value whose weight 2^(x - base) is 0 (-inf, or underflow)
// adds nothing to h, so -inf never meets the 0 weight.
template <int N, typename T, typename Math>
__device__ __forceinline__ void entropy_stats_push(T& m, T& s, T& h, const T (&x)[N]) {
  T mx = x[0];
#pragma unroll
  for (int e = 1; e < N; ++e) mx = fmax(mx, x[e]);
  const T nm = fmax(m, mx);
  const T base = nm == neg_inf<T>() ? T(0) : nm;
  T hs = rescaled_entropy<T, Math>(m, s, h, base);
  T acc = s * Math::exp2(m - base);
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const T d = x[e] - base;
    const T w = Math::exp2(d);
    acc += w;
    hs += w == T(0) ? T(0) : w * d;
  }
  m = nm;
  s = acc;
  h = hs;
}

template <typename Math>
struct StatsOp {  // {m, s}
  template <typename T>
  __device__ __forceinline__ void operator()(T (&a)[2], const T (&b)[2]) const {
    stats_merge<T, Math>(a[0], a[1], b[0], b[1]);
  }
};

template <typename Math>
struct EntropyStatsOp {  // {m, s, h}
  template <typename T>
  __device__ __forceinline__ void operator()(T (&a)[3], const T (&b)[3]) const {
    const T nm = fmax(a[0], b[0]);
    const T base = nm == neg_inf<T>() ? T(0) : nm;
    a[2] = rescaled_entropy<T, Math>(a[0], a[1], a[2], base) +
           rescaled_entropy<T, Math>(b[0], b[1], b[2], base);
    a[1] = a[1] * Math::exp2(a[0] - base) + b[1] * Math::exp2(b[0] - base);
    a[0] = nm;
  }
};

// ---------------------------------------------------------------------------------------------
// Layout: launch geometry, shared memory, this block's part of a row
// ---------------------------------------------------------------------------------------------

struct TopKGeometry {
  int32_t csize;       // blocks per row (a cluster when > 1)
  int32_t vpc;         // 16-byte vectors per block; staged: the slice held in shared memory
  int32_t table_bits;  // log2 of the id hash table's slots (used with the student gradient)
  bool staged;
};

// Dynamic shared memory: [stage vectors] then x[K], y[K], table sums (accumulate type), then
// ids[K], table keys (int32). Sizes in elements; every array stays aligned to its type.
template <typename Acc>
struct RowShared {
  uint4* stage;
  Acc* x;          // student logit at the entry's id, base-2 scaled (NaN for a bad id)
  Acc* y;          // teacher: base-2 scaled (renormalize) or lp = b itself (as given)
  Acc* table_sum;  // per slot: sum of c_k over the entries with that id
  int32_t* id;     // the entry's id, -1 when outside [0, V)
  int32_t* table_key;
};

// Hash table slots: 2^table_bits, none when table_bits is 0 (no student gradient).
KD_HOST_DEVICE int32_t table_slots(int table_bits) { return table_bits > 0 ? int32_t(1) << table_bits : 0; }

inline size_t shared_bytes(int64_t stage_vectors, int64_t k, int table_bits, size_t acc_size) {
  const int64_t slots = table_slots(table_bits);
  return static_cast<size_t>(16 * stage_vectors + (2 * k + slots) * static_cast<int64_t>(acc_size) +
                             (k + slots) * 4);
}

template <typename Acc>
__device__ __forceinline__ RowShared<Acc> carve_shared(uint4* base, const TopKGeometry& geo, int32_t k) {
  RowShared<Acc> sh;
  sh.stage = base;
  sh.x = reinterpret_cast<Acc*>(base + (geo.staged ? geo.vpc : 0));
  sh.y = sh.x + k;
  sh.table_sum = sh.y + k;
  sh.id = reinterpret_cast<int32_t*>(sh.table_sum + table_slots(geo.table_bits));
  sh.table_key = sh.id + k;
  return sh;
}

// This block's part of row r: vectors [first, last) of the aligned body and the elements
// [lo, hi) it owns: those vectors, plus the head (rank 0) and the tail (last rank) one by one.
// Every gradient element of the row is written by exactly one block, ids included.
template <typename In>
struct RowSlice {
  const In* z;  // student row
  In* g;        // gradient row, nullptr when not requested
  int32_t head;
  int32_t first;
  int32_t last;
  int32_t lo;
  int32_t hi;
  int32_t head_count;  // owned scalars: [0, head_count) and [tail_start, tail_start + tail_count)
  int32_t tail_start;
  int32_t tail_count;

  __device__ __forceinline__ int32_t scalar_index(int32_t j) const {
    return j < head_count ? j : tail_start + (j - head_count);
  }
};

template <typename In>
__device__ __forceinline__ RowSlice<In> make_slice(const TopKParams& prm, int64_t r, int32_t rank,
                                                   const TopKGeometry& geo) {
  constexpr int kVec = Storage<In>::kVec;
  const int32_t V = static_cast<int32_t>(prm.vocab);
  RowSlice<In> sl;
  sl.z = static_cast<const In*>(prm.student) + r * prm.student_row_stride;
  sl.g = prm.grad_student ? static_cast<In*>(prm.grad_student) + r * prm.vocab : nullptr;
  const auto mis = [](const void* p) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u); };
  const uint32_t off = mis(sl.z);
  if (sl.g == nullptr || mis(sl.g) == off) {
    const int32_t head = off == 0 ? 0 : static_cast<int32_t>((16u - off) / sizeof(In));
    sl.head = min(head, V);
  } else {
    sl.head = V;
  }
  const int32_t nvec = (V - sl.head) / kVec;
  sl.first = min(nvec, rank * geo.vpc);
  sl.last = min(nvec, sl.first + geo.vpc);
  sl.tail_start = sl.head + nvec * kVec;
  const bool first_rank = rank == 0;
  const bool last_rank = rank == geo.csize - 1;
  sl.lo = first_rank ? 0 : sl.head + sl.first * kVec;
  sl.hi = last_rank ? V : sl.head + sl.last * kVec;
  sl.head_count = first_rank ? sl.head : 0;
  sl.tail_count = last_rank ? V - sl.tail_start : 0;
  return sl;
}

// Where a sweep's 16-byte vectors come from: global memory (plain) or this block's staged slice.
template <typename In>
struct GlobalVectors {
  const In* body;  // row + head
  __device__ __forceinline__ uint4 operator()(int32_t i) const {
    return load16(body + static_cast<int64_t>(i) * Storage<In>::kVec);
  }
};

struct StagedVectors {
  const uint4* stage;  // slice [first, last)
  int32_t first;
  __device__ __forceinline__ uint4 operator()(int32_t i) const { return stage[i - first]; }
};

// f(i, vector) for this thread's vectors i in [first, last): i = first + threadIdx.x + k *
// blockDim.x (the staging copy uses the same assignment, so a thread reads only shared memory it
// filled itself). U vectors are loaded before any is used.
template <int U, typename Src, typename F>
__device__ __forceinline__ void for_each_vector(const Src& src, int32_t first, int32_t last, F&& f) {
  const int32_t stride = static_cast<int32_t>(blockDim.x);
  for (int32_t base = first + static_cast<int32_t>(threadIdx.x); base < last; base += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t i = base + u * stride;
      v[u] = (U == 1 || i < last) ? src(i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t i = base + u * stride;
      if (U == 1 || i < last) f(i, v[u]);
    }
  }
}

// f(k, z_k) for this thread's share of the block's one-by-one elements.
template <typename In, typename F>
__device__ __forceinline__ void for_each_scalar(const RowSlice<In>& sl, F&& f) {
  const int32_t count = sl.head_count + sl.tail_count;
  for (int32_t j = static_cast<int32_t>(threadIdx.x); j < count; j += static_cast<int32_t>(blockDim.x)) {
    const int32_t k = sl.scalar_index(j);
    f(k, Storage<In>::load(sl.z + k));
  }
}

// Block all-reduce, then across the row's cluster through `slot` (4 values of this block's
// shared memory that the other blocks read).
template <int K, typename Acc, typename Op>
__device__ __forceinline__ void row_allreduce(Acc (&v)[K], Op op, Acc* scratch, Acc* slot,
                                              int32_t csize) {
  block_allreduce<K>(v, scratch, op);
  if (csize > 1) cluster_allreduce<K>(v, slot, static_cast<uint32_t>(csize), op);
}

// ---------------------------------------------------------------------------------------------
// Sweeps over the student row
// ---------------------------------------------------------------------------------------------

template <bool kEntropy, int N, typename T>
__device__ __forceinline__ void push_stats(T (&st)[3], const T (&x)[N]) {
  if constexpr (kEntropy) {
    entropy_stats_push<N, T, CudaMath<T>>(st[0], st[1], st[2], x);
  } else {
    stats_push<N, T, CudaMath<T>>(st[0], st[1], x);
  }
}

// This thread's (m, s[, h]) of its elements; st = {m, s, h} (h stays 0 without kEntropy).
template <bool kEntropy, int U, typename In, typename Src>
__device__ __forceinline__ void row_stats(const Src& src, const RowSlice<In>& sl, AccOf<In> c,
                                          AccOf<In> (&st)[3]) {
  using Acc = AccOf<In>;
  constexpr int kVec = Storage<In>::kVec;
  st[0] = neg_inf<Acc>();
  st[1] = Acc(0);
  st[2] = Acc(0);
  for_each_vector<U>(src, sl.first, sl.last, [&](int32_t, const uint4& v) {
    Acc x[kVec];
    Storage<In>::unpack(v, x);
#pragma unroll
    for (int e = 0; e < kVec; ++e) x[e] = scale_logit(x[e], c);
    push_stats<kEntropy>(st, x);
  });
  for_each_scalar(sl, [&](int32_t, Acc z) {
    const Acc x[1] = {scale_logit(z, c)};
    push_stats<kEntropy>(st, x);
  });
}

// The fkl dense gradient q_j * dense_scale (dense_scale = -U * grad_scale) on this block's elements.
template <int U, typename In, typename Src>
__device__ __forceinline__ void write_dense(const Src& src, const RowSlice<In>& sl, AccOf<In> c,
                                            AccOf<In> lse2, AccOf<In> dense_scale) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  for_each_vector<U>(src, sl.first, sl.last, [&](int32_t i, const uint4& v) {
    Acc g[kVec];
    Storage<In>::unpack(v, g);
#pragma unroll
    for (int e = 0; e < kVec; ++e) g[e] = M::exp2(scale_logit(g[e], c) - lse2) * dense_scale;
    store16(sl.g + sl.head + static_cast<int64_t>(i) * kVec, Storage<In>::pack(g));
  });
  for_each_scalar(sl, [&](int32_t k, Acc z) {
    Storage<In>::store(sl.g + k, M::exp2(scale_logit(z, c) - lse2) * dense_scale);
  });
}

// Zeros on this block's elements of the gradient row (no student read).
template <typename In>
__device__ __forceinline__ void write_zeros(const RowSlice<In>& sl) {
  constexpr int kVec = Storage<In>::kVec;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int32_t i = sl.first + static_cast<int32_t>(threadIdx.x); i < sl.last;
       i += static_cast<int32_t>(blockDim.x)) {
    store16(sl.g + sl.head + static_cast<int64_t>(i) * kVec, zero);
  }
  const int32_t count = sl.head_count + sl.tail_count;
  for (int32_t j = static_cast<int32_t>(threadIdx.x); j < count; j += static_cast<int32_t>(blockDim.x)) {
    Storage<In>::store(sl.g + sl.scalar_index(j), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Id hash table (open addressing, linear probing; more slots than entries, so probes end)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t table_home(int32_t id, int bits) {
  return (static_cast<uint32_t>(id) * 0x9E3779B1u) >> (32 - bits);  // Fibonacci hashing
}

// The slot of `id`, claiming an empty one (key -1) if the id is new.
__device__ __forceinline__ int32_t table_insert(int32_t* keys, int bits, int32_t id) {
  const uint32_t mask = (1u << bits) - 1u;
  for (uint32_t h = table_home(id, bits);; h = (h + 1u) & mask) {
    const int32_t prev = atomicCAS(keys + h, -1, id);
    if (prev == -1 || prev == id) return static_cast<int32_t>(h);
  }
}

// The slot of an inserted id (after a barrier).
__device__ __forceinline__ int32_t table_find(const int32_t* keys, int bits, int32_t id) {
  const uint32_t mask = (1u << bits) - 1u;
  uint32_t h = table_home(id, bits);
  while (keys[h] != id) h = (h + 1u) & mask;
  return static_cast<int32_t>(h);
}

// ---------------------------------------------------------------------------------------------
// One row
// ---------------------------------------------------------------------------------------------

// Everything one block needs to take part in a row.
template <typename In>
struct RowContext {
  using Acc = AccOf<In>;
  const TopKParams& prm;
  const TopKGeometry& geo;
  int64_t r;
  RowSlice<In> sl;
  RowShared<Acc> sh;
  Acc* scratch;
  bool leader_block;  // rank 0 writes the row's loss, teacher and temperature gradients
};

// K phase and sweep 2 for divergence D, after the full-row statistics (lse2, and sum q ln q as
// `entropy`; both unused for the support divergences).
template <Divergence D, typename In>
__device__ __forceinline__ void finish_row(const RowContext<In>& rc, AccOf<In> tau, AccOf<In> inv_tau,
                                           AccOf<In> c, AccOf<In> lse2, AccOf<In> entropy) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr Acc kLn2 = Acc(0.693147180559945309417232121458176568);
  const TopKParams& prm = rc.prm;
  const RowSlice<In>& sl = rc.sl;
  const RowShared<Acc>& sh = rc.sh;
  const int32_t K = static_cast<int32_t>(prm.k);
  const int32_t V = static_cast<int32_t>(prm.vocab);
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t threads = static_cast<int32_t>(blockDim.x);
  const bool full = full_vocab_student(prm);
  const bool renormalize = prm.renormalize;
  const bool want_tau = prm.grad_temperature != nullptr;
  const int bits = rc.geo.table_bits;
  const Acc coef = static_cast<Acc>(prm.coef);
  const Acc scale = *static_cast<const Acc*>(prm.scale);
  const Acc t2 = prm.t2_scale ? tau * tau : Acc(1);
  const Acc grad_scale = scale * t2 * inv_tau;
  const bool leader = rc.leader_block && tid == 0;

  // Entries: every thread handles k = tid + i * threads in each pass below, so it reads back
  // only entries it wrote itself.
  if (sl.g) {
    for (int32_t h = tid; h < table_slots(bits); h += threads) {
      sh.table_key[h] = -1;
      sh.table_sum[h] = Acc(0);
    }
  }
  const int64_t row_k = rc.r * prm.k;
  const Acc* logprobs = static_cast<const Acc*>(prm.logprobs) + row_k;
  Acc kst[4] = {neg_inf<Acc>(), Acc(0), neg_inf<Acc>(), Acc(0)};  // student, teacher over K
  for (int32_t k = tid; k < K; k += threads) {
    const int64_t raw = prm.ids_are_int64 ? static_cast<const int64_t*>(prm.ids)[row_k + k]
                                          : static_cast<const int32_t*>(prm.ids)[row_k + k];
    const bool in_range = raw >= 0 && raw < V;
    const int32_t id = in_range ? static_cast<int32_t>(raw) : -1;
    const Acc x = in_range ? scale_logit(Storage<In>::load(sl.z + id), c) : quiet_nan<Acc>();
    const Acc lp_in = logprobs[k];
    const Acc y = renormalize ? scale_logit(lp_in, c) : lp_in * inv_tau;
    sh.id[k] = id;
    sh.x[k] = x;
    sh.y[k] = y;
    const Acc xs[1] = {x};
    const Acc ys[1] = {y};
    stats_push<1, Acc, M>(kst[0], kst[1], xs);
    stats_push<1, Acc, M>(kst[2], kst[3], ys);
  }
  if (!full || renormalize) block_allreduce<4>(kst, rc.scratch, StatsPairOp<M>{});
  const Acc student_lse2 = full ? lse2 : kst[0] + static_cast<Acc>(::log2(static_cast<double>(kst[1])));
  const Acc teacher_lse2 = kst[2] + static_cast<Acc>(::log2(static_cast<double>(kst[3])));

  struct Probs {
    Acc q, p, lq, lp;
  };
  const auto probs = [&](int32_t k) {
    Probs e;
    const Acc l2q = sh.x[k] - student_lse2;
    e.q = M::exp2(l2q);
    e.lq = l2q * kLn2;
    if (renormalize) {
      const Acc l2p = sh.y[k] - teacher_lse2;
      e.p = M::exp2(l2p);
      e.lp = l2p * kLn2;
    } else {
      e.lp = sh.y[k];
      e.p = M::exp(e.lp);
    }
    return e;
  };

  // pass 1: loss, U, W (its reduction is also the barrier between the table's reset and the
  // inserts of pass 2)
  Acc sums[3] = {Acc(0), Acc(0), Acc(0)};
  for (int32_t k = tid; k < K; k += threads) {
    const Probs e = probs(k);
    const ElementTerms<Acc> t = element_terms<D, Acc, M>(e.q, e.p, e.lq, e.lp, coef);
    sums[0] += sh.id[k] < 0 ? quiet_nan<Acc>() : t.loss;
    sums[1] += t.u;
    sums[2] += t.v;
  }
  block_allreduce<3>(sums, rc.scratch, SumOp{});
  const Acc loss = sums[0];
  const Acc side_s = sums[1];  // U
  const Acc side_t = sums[2];  // W

  // pass 2: corrections c_k into the table, teacher gradient, temperature sum
  Acc* grad_teacher = prm.grad_teacher ? static_cast<Acc*>(prm.grad_teacher) + row_k : nullptr;
  Acc tau_sum[1] = {Acc(0)};
  for (int32_t k = tid; k < K; k += threads) {
    const Probs e = probs(k);
    const ElementTerms<Acc> t = element_terms<D, Acc, M>(e.q, e.p, e.lq, e.lp, coef);
    const Acc correction = full ? t.u : logit_grad(t.u, e.q, side_s);
    const Acc db = renormalize ? logit_grad(t.v, e.p, side_t) : t.v;
    if (want_tau) tau_sum[0] += temperature_term(correction, e.lq) + temperature_term(db, e.lp);
    if (grad_teacher && rc.leader_block) grad_teacher[k] = db * grad_scale;
    const int32_t id = sh.id[k];
    if (sl.g && id >= 0) atomicAdd(sh.table_sum + table_insert(sh.table_key, bits, id), correction);
  }
  if (want_tau) {
    block_allreduce<1>(tau_sum, rc.scratch, SumOp{});
    // plus fkl's dense part: sum_j (-q_j U) lq_j = -U sum q ln q
    const Acc tau_total = full ? tau_sum[0] - side_s * entropy : tau_sum[0];
    if (leader) {
      // d(t2 L)/dtau = t2' L + t2 dL/dtau with dL/dtau = -tau_total / tau
      const Acc dt2 = prm.t2_scale ? Acc(2) * tau : Acc(0);
      static_cast<Acc*>(prm.grad_temperature)[rc.r] = scale * (dt2 * loss + t2 * (-tau_total * inv_tau));
    }
  }
  if (leader) static_cast<Acc*>(prm.loss_rows)[rc.r] = loss * t2;
  if (!sl.g) return;

  // sweep 2: dense term, then the exact values at the ids this block owns
  if (full) {
    const Acc dense_scale = -side_s * grad_scale;
    if (rc.geo.staged) {
      write_dense<1, In>(StagedVectors{sh.stage, sl.first}, sl, c, lse2, dense_scale);
    } else {
      write_dense<kPlainUnroll, In>(GlobalVectors<In>{sl.z + sl.head}, sl, c, lse2, dense_scale);
    }
  } else {
    write_zeros<In>(sl);
  }
  __syncthreads();  // dense stores before the overwrites; every insert done before the reads
  for (int32_t k = tid; k < K; k += threads) {
    const int32_t id = sh.id[k];
    if (id < sl.lo || id >= sl.hi) continue;  // a bad id (-1) is below every lo
    const Acc corrections = sh.table_sum[table_find(sh.table_key, bits, id)];
    const Acc da = full ? logit_grad(corrections, M::exp2(sh.x[k] - lse2), side_s) : corrections;
    Storage<In>::store(sl.g + id, da * grad_scale);
  }
}

// A masked row: zeros, and nothing of the row is read.
template <typename In>
__device__ __forceinline__ void zero_row(const RowContext<In>& rc) {
  using Acc = AccOf<In>;
  const TopKParams& prm = rc.prm;
  if (rc.sl.g) write_zeros<In>(rc.sl);
  if (!rc.leader_block) return;
  if (prm.grad_teacher) {
    Acc* grad_teacher = static_cast<Acc*>(prm.grad_teacher) + rc.r * prm.k;
    for (int32_t k = static_cast<int32_t>(threadIdx.x); k < prm.k; k += static_cast<int32_t>(blockDim.x)) {
      grad_teacher[k] = Acc(0);
    }
  }
  if (threadIdx.x == 0) {
    static_cast<Acc*>(prm.loss_rows)[rc.r] = Acc(0);
    if (prm.grad_temperature) static_cast<Acc*>(prm.grad_temperature)[rc.r] = Acc(0);
  }
}

// One counted row: sweep 1 (exact fkl only), then the divergence's K phase and sweep 2.
// `exchange_slot` is the cluster exchange buffer for sweep 1's statistics.
template <typename In>
__device__ __forceinline__ void process_row(const RowContext<In>& rc, AccOf<In>* exchange_slot) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  constexpr Acc kLn2 = Acc(0.693147180559945309417232121458176568);
  const TopKParams& prm = rc.prm;
  const RowSlice<In>& sl = rc.sl;
  const Acc tau = static_cast<const Acc*>(prm.temperature)[rc.r * prm.temperature_stride];
  // correctly rounded even under --use_fast_math (approximate float division)
  const Acc inv_tau = static_cast<Acc>(1.0 / static_cast<double>(tau));
  const Acc c = static_cast<Acc>(1.442695040888963407359924681001892137 / static_cast<double>(tau));

  Acc lse2 = Acc(0);
  Acc entropy = Acc(0);  // sum_j q_j ln q_j, for the temperature gradient
  if (full_vocab_student(prm)) {
    const bool want_entropy = prm.grad_temperature != nullptr;
    Acc st[3];
    if (rc.geo.staged) {
      const In* body = sl.z + sl.head;
      for (int32_t i = sl.first + static_cast<int32_t>(threadIdx.x); i < sl.last;
           i += static_cast<int32_t>(blockDim.x)) {
        cp_async16(rc.sh.stage + (i - sl.first), body + static_cast<int64_t>(i) * kVec);
      }
      cp_async_wait_all();  // this thread's copies landed; it reads only those
      const StagedVectors src{rc.sh.stage, sl.first};
      if (want_entropy) {
        row_stats<true, 1, In>(src, sl, c, st);
      } else {
        row_stats<false, 1, In>(src, sl, c, st);
      }
    } else {
      const GlobalVectors<In> src{sl.z + sl.head};
      if (want_entropy) {
        row_stats<true, kPlainUnroll, In>(src, sl, c, st);
      } else {
        row_stats<false, kPlainUnroll, In>(src, sl, c, st);
      }
    }
    if (want_entropy) {
      row_allreduce<3>(st, EntropyStatsOp<M>{}, rc.scratch, exchange_slot, rc.geo.csize);
    } else {
      Acc ms[2] = {st[0], st[1]};
      row_allreduce<2>(ms, StatsOp<M>{}, rc.scratch, exchange_slot, rc.geo.csize);
      st[0] = ms[0];
      st[1] = ms[1];
    }
    // one accurate log per row (an all -inf row gives -inf here and NaN downstream)
    const Acc log2_s = static_cast<Acc>(::log2(static_cast<double>(st[1])));
    lse2 = st[0] + log2_s;
    entropy = kLn2 * (st[2] / st[1] - log2_s);
  }

  switch (prm.divergence) {
    case Divergence::kFKL: return finish_row<Divergence::kFKL, In>(rc, tau, inv_tau, c, lse2, entropy);
    case Divergence::kRKL: return finish_row<Divergence::kRKL, In>(rc, tau, inv_tau, c, lse2, entropy);
    case Divergence::kJSD: return finish_row<Divergence::kJSD, In>(rc, tau, inv_tau, c, lse2, entropy);
    case Divergence::kSkewFKL:
      return finish_row<Divergence::kSkewFKL, In>(rc, tau, inv_tau, c, lse2, entropy);
    case Divergence::kSkewRKL:
      return finish_row<Divergence::kSkewRKL, In>(rc, tau, inv_tau, c, lse2, entropy);
    case Divergence::kTVD: return finish_row<Divergence::kTVD, In>(rc, tau, inv_tau, c, lse2, entropy);
  }
}

// ----------------------------------------------------------------------------------------------
// Kernel
// ----------------------------------------------------------------------------------------------

// geo.csize blocks per row (a cluster when > 1), grid-stride over rows by clusters.
template <typename In>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks<In>)
    topk_kd_kernel(const TopKParams prm, const TopKGeometry geo) {
  using Acc = AccOf<In>;
  extern __shared__ uint4 dynamic_shared[];  // see RowShared
  __shared__ Acc scratch[32 * 4];
  // Sweep 1's cluster exchange, two slots used in turn: a slot is written again only after the
  // next exchange's barrier, by which time every block has read it.
  __shared__ Acc exchange[2 * 4];

  // No barrier is needed before the first exchange: a block reads another's shared memory only
  // after a cluster barrier that every block has reached.
  const int32_t rank = geo.csize > 1 ? static_cast<int32_t>(cluster_rank()) : 0;
  const RowShared<Acc> sh = carve_shared<Acc>(dynamic_shared, geo, static_cast<int32_t>(prm.k));
  const int64_t clusters = gridDim.x / geo.csize;
  uint32_t exchanges = 0;
  for (int64_t r = blockIdx.x / geo.csize; r < prm.rows; r += clusters) {
    const RowContext<In> rc{prm, geo, r, make_slice<In>(prm, r, rank, geo), sh, scratch, rank == 0};
    if (prm.valid && !prm.valid[r]) {
      zero_row<In>(rc);
      continue;
    }
    process_row<In>(rc, exchange + 4 * (exchanges & 1u));
    if (full_vocab_student(prm)) ++exchanges;
    __syncthreads();  // the next row resets the entries and the table this row's scatter read
  }
  // Other blocks may still be reading this block's last exchange slot.
  if (geo.csize > 1) cluster_sync_exit();
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

bool clusters_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("KDOPS_CUDA_NO_CLUSTER");
    return v != nullptr && std::string_view(v) != "" && std::string_view(v) != "0";
  }();
  return disabled;
}

struct DeviceSupport {
  size_t max_dynamic_shared = 0;  // per block, after the kernel's static shared memory
  bool clusters = false;          // sm_90 code on an sm_90 device
};

// Per device and dtype, once: allow the kernel all of the device's opt-in shared memory (large K
// and the staged slices need more than the default 48 KiB) and prefer shared memory over L1.
template <typename In>
const DeviceSupport& device_support(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceSupport> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  if (found != cache.end()) return found->second;

  const auto kernel = topk_kd_kernel<In>;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  int major = 0;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  DeviceSupport support;
  support.max_dynamic_shared = static_cast<size_t>(optin) - attr.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(support.max_dynamic_shared)));
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           static_cast<int>(cudaSharedmemCarveoutMaxShared)) != cudaSuccess) {
    (void)cudaGetLastError();  // a hint only
  }
  support.clusters = major >= 9 && attr.ptxVersion >= 90;
  return cache.emplace(device, support).first->second;
}

// A 1-D launch of `grid` blocks in clusters of `cluster` (no cluster attribute for 1); the
// attribute lives in the caller's storage, which the returned config points to.
cudaLaunchConfig_t launch_config(int64_t grid, int threads, size_t smem_bytes, int cluster,
                                 cudaStream_t stream, cudaLaunchAttribute& attribute) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return config;
}

// Whether the device can hold at least one cluster of this shape (asked once per shape).
template <typename In>
bool cluster_fits(int device, int csize, int threads, size_t smem_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int, size_t>, bool> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, csize, threads, smem_bytes);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = launch_config(csize, threads, smem_bytes, csize, nullptr, attribute);
  int clusters = 0;
  const bool fits = cudaOccupancyMaxActiveClusters(&clusters, topk_kd_kernel<In>, &config) == cudaSuccess &&
                    clusters > 0;
  if (!fits) (void)cudaGetLastError();  // not fatal: the plain shape serves
  return cache.emplace(key, fits).first->second;
}

int round_up_warp(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

struct TopKLaunchShape {
  TopKGeometry geo;
  int threads;
  size_t smem_bytes;
};

// Staged when the row's gradient needs a second read of it and a cluster of at most
// kMaxClusterSize blocks can hold the row in kStageBytes slices; plain otherwise.
template <typename In>
TopKLaunchShape plan_launch(const TopKParams& prm, int device) {
  using Acc = AccOf<In>;
  constexpr int kVec = Storage<In>::kVec;
  const DeviceSupport& support = device_support<In>(device);
  int table_bits = 0;
  if (prm.grad_student) {
    table_bits = 1;
    while ((int64_t(1) << table_bits) < 2 * prm.k) ++table_bits;  // load factor <= 1/2
  }
  const int64_t vectors = prm.vocab / kVec;  // at least any row's count
  const bool full = full_vocab_student(prm);

  if (full && prm.grad_student && !std::is_same_v<In, double> && !clusters_disabled() && vectors > 0) {
    const int max_cluster = support.clusters ? kMaxClusterSize : 1;
    for (int c = 1; c <= max_cluster; c *= 2) {
      const int64_t vpc = (vectors + c - 1) / c;
      if (16 * vpc > kStageBytes) continue;
      const int threads = round_up_warp(std::clamp<int64_t>(vpc, kStagedMinThreads, kStagedMaxThreads));
      const size_t smem = shared_bytes(vpc, prm.k, table_bits, sizeof(Acc));
      if (smem <= support.max_dynamic_shared && (c == 1 || cluster_fits<In>(device, c, threads, smem))) {
        return {TopKGeometry{c, static_cast<int32_t>(vpc), table_bits, true}, threads, smem};
      }
      break;
    }
  }

  // about kPlainUnroll vectors per thread and sweep, at least one thread per entry where possible
  const int64_t sweep_work = (full || prm.grad_student) ? (vectors + kPlainUnroll - 1) / kPlainUnroll : 0;
  const int threads = round_up_warp(std::clamp<int64_t>(std::max(sweep_work, prm.k), 32, kMaxThreads));
  const size_t smem = shared_bytes(0, prm.k, table_bits, sizeof(Acc));
  TORCH_CHECK(smem <= support.max_dynamic_shared, "topk_kd_loss (cuda): K = ", prm.k, " needs ", smem,
              " bytes of shared memory per block for ", sizeof(Acc) == 8 ? "float64" : "float32",
              " accumulation; this device allows ", support.max_dynamic_shared);
  return {TopKGeometry{1, static_cast<int32_t>(vectors), table_bits, false}, threads, smem};
}

template <typename In>
void launch(const TopKParams& prm, int device, cudaStream_t stream) {
  const TopKLaunchShape shape = plan_launch<In>(prm, device);
  const int csize = shape.geo.csize;
  const int64_t grid = csize * std::min<int64_t>(prm.rows, std::numeric_limits<int32_t>::max() / csize);
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = launch_config(grid, shape.threads, shape.smem_bytes, csize, stream, attribute);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, topk_kd_kernel<In>, prm, shape.geo));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kd_loss_cuda(
    const at::Tensor& student, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const at::Tensor& temperature, const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& normalizer, c10::string_view divergence, double beta,
    double alpha, bool renormalize, c10::string_view reduction, bool t2_scale, bool grad_student,
    bool grad_teacher, bool grad_temperature) {
  TORCH_CHECK_VALUE(student.is_cuda(), "topk_kd_loss (cuda): student must be a CUDA tensor; got ",
                    student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  TopKLaunch launch_args = prepare_topk(student, teacher_ids, teacher_logprobs, temperature, valid,
                                        normalizer, divergence, beta, alpha, renormalize, reduction,
                                        t2_scale, grad_student, grad_teacher, grad_temperature);
  const TopKParams& prm = launch_args.params;
  TORCH_CHECK_VALUE(prm.vocab <= kMaxVocab, "topk_kd_loss (cuda): vocab (last dim) must be at most ",
                    kMaxVocab, "; got ", prm.vocab);
  if (prm.rows > 0) {
    const int device = student.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    switch (student.scalar_type()) {
      case at::kFloat: launch<float>(prm, device, stream); break;
      case at::kDouble: launch<double>(prm, device, stream); break;
      case at::kBFloat16: launch<__nv_bfloat16>(prm, device, stream); break;
      case at::kHalf: launch<__half>(prm, device, stream); break;
      default: TORCH_CHECK(false, "topk_kd_loss (cuda): unsupported dtype ", student.scalar_type());
    }
  }
  return finish_topk(launch_args);
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("topk_kd_loss", &kdops::cuda::topk_kd_loss_cuda);
}
