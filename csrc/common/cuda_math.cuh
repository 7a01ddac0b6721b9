// Device-side building blocks shared by the kdops CUDA kernels: the Math policy that the per-element
// templates (e.g. divergence.h) call, storage traits for 16-byte vector access to fp32 / fp64 /
// bf16 / fp16 rows, asynchronous global->shared copies, and warp / block / cluster reductions.
//
// Numerics. Everything is built with --use_fast_math. The kernels' exponentials are base 2
// (CudaMath::exp2 = MUFU.EX2: relative error about 2^-22 whatever the argument, no argument
// scaling), with logits pre-multiplied by log2(e) / tau. log does NOT use the intrinsic: JSD and
// the skew divergences take differences such as log q - log m of nearby values, where __logf's
// 3-ulp relative error of the logarithm itself would show, so log is the same Cephes-style
// polynomial as the CPU build (csrc/common/log_poly.h), around device bit casts: about
// 1 ulp, FMA pipe only. Under flush-to-zero subnormal arguments count as 0 (log = -inf); the
// kernels never produce subnormal probabilities because every product that would is flushed.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "log_poly.h"
#include "macros.h"

namespace kdops::cuda {

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return __int_as_float(static_cast<int>(0xff800000u));
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}

// Natural log for x >= 0: log(0) = -inf (subnormals count as 0), log(+inf) = +inf, NaN stays NaN.
__device__ __forceinline__ float log_f32(float x) {
  const int bits = __float_as_int(x);
  // x = 2^e * m, m in [sqrt(1/2), sqrt(2)), kept as m - 1
  int e = ((bits >> 23) & 0xff) - 126;
  float m = __int_as_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  float result = log_reduced_f32(m, static_cast<float>(e));
  result = x < 1.17549435e-38f ? neg_inf<float>() : result;  // 0 (and flushed subnormals)
  result = x == __int_as_float(0x7f800000) ? x : result;     // +inf
  return x != x ? x : result;                                 // NaN
}

// The Math policy of the shared per-element templates (divergence.h), plus exp2/log2 for the
// kernels' own base-2 sweeps. Host versions exist only so that the __host__ __device__ templates
// that name the policy stay well-formed; kernels use the device branch.
template <typename T>
struct CudaMath;

template <>
struct CudaMath<float> {
  static KD_HOST_DEVICE float exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return std::exp(x);
#endif
  }
  static KD_HOST_DEVICE float log(float x) {
#if defined(__CUDA_ARCH__)
    return log_f32(x);
#else
    return std::log(x);
#endif
  }
  // 2^x, one MUFU.EX2: relative error about 2^-22 whatever x; 2^-inf = 0, results below 2^-126
  // flush to 0, NaN stays NaN.
  static KD_HOST_DEVICE float exp2(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return std::exp2(x);
#endif
  }
};

template <>
struct CudaMath<double> {
  static KD_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static KD_HOST_DEVICE double log(double x) { return ::log(x); }
  static KD_HOST_DEVICE double exp2(double x) { return ::exp2(x); }
};

// z * c, rounded on its own (c = log2(e) / tau): the statistics sweep and the later sweeps must
// see the same value, which they would not if the compiler fused the product into a later
// subtraction in one place and not in the other (then a one-element row would not give
// log q = 0 exactly).
__device__ __forceinline__ float scale_logit(float z, float c) { return __fmul_rn(z, c); }
__device__ __forceinline__ double scale_logit(double z, double c) { return __dmul_rn(z, c); }

// Online softmax statistics in base 2: (m, s) with s = sum 2^(x - m) over the values x seen
// (x = a log2(e), a = z / tau), m their max. -inf values contribute 0; a NaN value makes s NaN
// (fmax ignores it, the sum does not), so NaN reaches every output of the row; +inf makes the
// row NaN downstream (as log_softmax does). Folds N values at once: one max, then N independent
// exp2 with the -inf guard paid once: while the max is -inf every value is -inf (or NaN), and
// 2^(-inf - 0) = 0.
template <int N, typename T, typename Math>
__device__ __forceinline__ void stats_push(T& m, T& s, const T (&x)[N]) {
  T mx = x[0];
#pragma unroll
  for (int e = 1; e < N; ++e) mx = fmax(mx, x[e]);
  const T nm = fmax(m, mx);
  const T base = nm == neg_inf<T>() ? T(0) : nm;
  T acc = s * Math::exp2(m - base);  // m = -inf: s = 0 and 2^-inf = 0
#pragma unroll
  for (int e = 0; e < N; ++e) acc += Math::exp2(x[e] - base);
  m = nm;
  s = acc;
}

// Merges base-2 statistics (om, os) into (m, s).
template <typename T, typename Math>
__device__ __forceinline__ void stats_merge(T& m, T& s, T om, T os) {
  const T nm = fmax(m, om);
  const T base = nm == neg_inf<T>() ? T(0) : nm;
  s = s * Math::exp2(m - base) + os * Math::exp2(om - base);
  m = nm;
}

// Combiners for the reductions below: a <- a (+) b.
struct SumOp {
  template <int K, typename T>
  __device__ __forceinline__ void operator()(T (&a)[K], const T (&b)[K]) const {
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] += b[k];
  }
};

// Two independent (max, sum) pairs: {m0, s0, m1, s1}.
template <typename Math>
struct StatsPairOp {
  template <typename T>
  __device__ __forceinline__ void operator()(T (&a)[4], const T (&b)[4]) const {
    stats_merge<T, Math>(a[0], a[1], b[0], b[1]);
    stats_merge<T, Math>(a[2], a[3], b[2], b[3]);
  }
};

// ---------------------------------------------------------------------------------------------
// Storage traits: 16-byte vectors of the input dtype <-> accumulate-type arrays
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t bits_of(__nv_bfloat162 h) {
  uint32_t w;
  __builtin_memcpy(&w, &h, sizeof(w));
  return w;
}
__device__ __forceinline__ uint32_t bits_of(__half2 h) {
  uint32_t w;
  __builtin_memcpy(&w, &h, sizeof(w));
  return w;
}

template <typename In>
struct Storage;

template <>
struct Storage<float> {
  using Acc = float;
  static constexpr int kVec = 4;
  static __device__ __forceinline__ Acc load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void store(float* p, Acc v) { __stcs(p, v); }
  static __device__ __forceinline__ void unpack(const uint4& r, Acc (&o)[kVec]) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const Acc (&v)[kVec]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  }
};

template <>
struct Storage<double> {
  using Acc = double;
  static constexpr int kVec = 2;
  static __device__ __forceinline__ Acc load(const double* p) { return __ldg(p); }
  static __device__ __forceinline__ void store(double* p, Acc v) { __stcs(p, v); }
  static __device__ __forceinline__ void unpack(const uint4& r, Acc (&o)[kVec]) {
    o[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    o[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  static __device__ __forceinline__ uint4 pack(const Acc (&v)[kVec]) {
    return make_uint4(static_cast<uint32_t>(__double2loint(v[0])),
                      static_cast<uint32_t>(__double2hiint(v[0])),
                      static_cast<uint32_t>(__double2loint(v[1])),
                      static_cast<uint32_t>(__double2hiint(v[1])));
  }
};

template <>
struct Storage<__nv_bfloat16> {
  using Acc = float;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ Acc load(const __nv_bfloat16* p) {
    const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, Acc v) {
    *p = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, Acc (&o)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = __uint_as_float(w[i] << 16);  // lower address: low half
      o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint4 pack(const Acc (&v)[kVec]) {
    return make_uint4(bits_of(__floats2bfloat162_rn(v[0], v[1])),
                      bits_of(__floats2bfloat162_rn(v[2], v[3])),
                      bits_of(__floats2bfloat162_rn(v[4], v[5])),
                      bits_of(__floats2bfloat162_rn(v[6], v[7])));
  }
};

template <>
struct Storage<__half> {
  using Acc = float;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ Acc load(const __half* p) {
    const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
    return __half2float(__ushort_as_half(b));
  }
  static __device__ __forceinline__ void store(__half* p, Acc v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ void unpack(const uint4& r, Acc (&o)[kVec]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      __builtin_memcpy(&h, &w[i], sizeof(h));
      const float2 f = __half22float2(h);
      o[2 * i] = f.x;
      o[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const Acc (&v)[kVec]) {
    return make_uint4(bits_of(__floats2half2_rn(v[0], v[1])), bits_of(__floats2half2_rn(v[2], v[3])),
                      bits_of(__floats2half2_rn(v[4], v[5])), bits_of(__floats2half2_rn(v[6], v[7])));
  }
};

// A row as head | 16-byte vectors | tail: elements [0, head) and [tail, V) one by one, `vectors`
// vectors of Storage<In>::kVec elements from element `head`.
struct RowSplit {
  int32_t head;
  int32_t vectors;
  int32_t tail;
};

__device__ __forceinline__ uint32_t misalignment(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// The split of row a, vectorized only if row b (read or written at the same indices; nullptr:
// none) shares its alignment; otherwise the whole row goes one by one (correct, slower).
template <typename In>
__device__ __forceinline__ RowSplit split_row(const In* a, const In* b, int32_t V) {
  constexpr int kVec = Storage<In>::kVec;
  const uint32_t off = misalignment(a);
  RowSplit split;
  if (b == nullptr || misalignment(b) == off) {
    split.head = min(off == 0 ? 0 : static_cast<int32_t>((16u - off) / sizeof(In)), V);
  } else {
    split.head = V;
  }
  split.vectors = (V - split.head) / kVec;
  split.tail = split.head + split.vectors * kVec;
  return split;
}

// f(j) for this thread's share of the split's one-by-one elements.
template <typename F>
__device__ __forceinline__ void for_each_scalar(const RowSplit& split, int32_t V, F&& f) {
  const int32_t count = split.head + (V - split.tail);
  for (int32_t k = static_cast<int32_t>(threadIdx.x); k < count; k += static_cast<int32_t>(blockDim.x)) {
    f(k < split.head ? k : split.tail + (k - split.head));
  }
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

// Streaming store: the gradient is not read again by this kernel, so it should not push the rows
// that are (the plain path's second sweep) out of L2.
__device__ __forceinline__ void store16(void* p, const uint4& v) { __stcs(static_cast<uint4*>(p), v); }

// `value` everywhere on row g of V elements laid out as `split` (split_row); nothing is read.
template <typename In>
__device__ __forceinline__ void fill_row(In* g, const RowSplit& split, int32_t V,
                                         typename Storage<In>::Acc value) {
  using Acc = typename Storage<In>::Acc;
  constexpr int kVec = Storage<In>::kVec;
  Acc values[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) values[e] = value;
  const uint4 packed = Storage<In>::pack(values);
  for (int32_t i = static_cast<int32_t>(threadIdx.x); i < split.vectors; i += static_cast<int32_t>(blockDim.x)) {
    store16(g + split.head + static_cast<int64_t>(i) * kVec, packed);
  }
  for_each_scalar(split, V, [&](int32_t j) { Storage<In>::store(g + j, value); });
}

// 16-byte global -> shared copy that bypasses registers (and L1). Completion is awaited per
// thread with cp_async_wait_all(), which also makes the data visible to the issuing thread; other
// threads need a barrier after that.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = load16(gmem);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Reductions. All are all-reduces (every participating thread ends with the result) and are
// deterministic: the combination order is fixed. Lanes of a warp may disagree in the last bit
// after the butterfly (FMA contraction makes a combiner asymmetric), but block_allreduce folds the
// lane-0 values in warp order in every thread and cluster_allreduce folds the published block
// values in rank order in every warp, so all threads of a block (of a cluster) end bit-identical.
// ---------------------------------------------------------------------------------------------

template <int K, typename T, typename Op>
__device__ __forceinline__ void warp_allreduce(T (&v)[K], Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    T other[K];
#pragma unroll
    for (int k = 0; k < K; ++k) other[k] = __shfl_xor_sync(0xffffffffu, v[k], offset);
    op(v, other);
  }
}

// blockDim.x must be a multiple of 32 (at most 1024); scratch holds 32 * K values. Called by every
// thread of the block; starts with a barrier so that scratch may be reused call after call.
template <int K, typename T, typename Op>
__device__ __forceinline__ void block_allreduce(T (&v)[K], T* scratch, Op op) {
  warp_allreduce<K>(v, op);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = scratch[k];
  for (int w = 1; w < warps; ++w) {
    T other[K];
#pragma unroll
    for (int k = 0; k < K; ++k) other[k] = scratch[w * K + k];
    op(v, other);
  }
}

// Thread-block clusters (sm_90). Wrappers so that code compiled for older targets still builds;
// there they must not be reached (the host launches clusters only for sm_90 code).
__device__ __forceinline__ uint32_t cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return __clusterRelativeBlockRank();
#else
  return 0;
#endif
}

// Cluster barrier that publishes this block's own shared-memory writes to the cluster: a release
// fence restricted to shared::cta (MEMBAR.CTA class, not the GPU-wide membar that a plain
// `barrier.cluster.arrive` (.release) costs, which would wait for every outstanding global store
// of the gradient), a relaxed arrive, and the wait (acquire). Every thread of every block calls it;
// the barriers are the non-.aligned forms, which do not assume a converged warp.
__device__ __forceinline__ void cluster_sync_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.release.sync_restrict::shared::cta.cluster;\n" ::: "memory");
  asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory");
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
#else
  __trap();
#endif
}

// Cluster barrier without any memory ordering, for the end of a kernel: no block may exit while
// another can still read its shared memory. Readers have consumed every value they loaded (the
// loads completed) before they arrive.
__device__ __forceinline__ void cluster_sync_exit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory");
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
#else
  __trap();
#endif
}

constexpr int kMaxCluster = 16;  // 16 is a non-portable size (sm_90 accepts it per kernel)

// Cluster all-reduce of a value that every thread of each block already holds (after
// block_allreduce). Pull model: thread 0 writes the block's K values into its own `slot`
// (4 values of this block's shared memory); cluster_sync_shared() publishes them; then in every
// warp lane c < csize reads block c's slot through distributed shared memory and the warp folds
// the csize values in rank order with shuffles, so all threads of all blocks get bit-identical
// results without a further block barrier.
// Reuse rules (the caller's job): a slot may be written again only after one more cluster barrier
// (use a different slot for consecutive exchanges), and a block must not exit before a final
// cluster_sync_exit() once the last exchange has been read.
template <int K, typename T, typename Op>
__device__ __forceinline__ void cluster_allreduce(T (&v)[K], T* slot, uint32_t csize, Op op) {
  static_assert(K <= 4, "cluster exchange slots hold 4 values");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) slot[k] = v[k];
  }
  cluster_sync_shared();
  const uint32_t lane = threadIdx.x & 31u;
  T mine[K];
  if (lane < csize) {
    const T* src = static_cast<const T*>(__cluster_map_shared_rank(slot, lane));
#pragma unroll
    for (int k = 0; k < K; ++k) mine[k] = src[k];
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) mine[k] = T(0);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = __shfl_sync(0xffffffffu, mine[k], 0);
  for (uint32_t c = 1; c < csize; ++c) {
    T other[K];
#pragma unroll
    for (int k = 0; k < K; ++k) other[k] = __shfl_sync(0xffffffffu, mine[k], static_cast<int>(c));
    op(v, other);
  }
#else
  __trap();
#endif
}

}  // namespace kdops::cuda
