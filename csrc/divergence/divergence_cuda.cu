// kd_loss on CUDA devices. The per-element math is divergence.h's (element_terms, logit_grad,
// temperature_term) with the device Math policy of common/cuda_math.cuh; host checks, output
// allocation and the reduction scale are divergence_op.cpp's, shared with the CPU backend.
//
// Per row, with a = z_s / tau, b = z_t / tau:
//   sweep 1  online (max, sum exp) of a and of b        -> lse_a, lse_b     (exchange 0)
//            (kept in base 2: x = a log2 e, sums of 2^(x - max), so each element costs one
//            multiply, one max, one subtract, one MUFU.EX2 and one add; log2 q = x - lse2 and
//            q = 2^(log2 q) in the later sweeps, log q = ln 2 log2 q for the shared terms)
//   then either (fkl with only the student gradient, rkl with only the teacher gradient, and both
//   with no gradient at all; DESIGN.md's one-sweep case, U = -1 resp. W = -1 exactly)
//   sweep 2  loss and gradient q - p (p - q) together                        (exchange 2: loss)
//   or, for everything else,
//   sweep 2  loss, U = sum u, W = sum v                                       (exchange 1)
//   sweep 3  gradients u - q U, v - p W and the temperature sum               (exchange 2: tau)
// The one-sweep case computes the loss in the gradient sweep (sum p (lp - lq) from the same q, p,
// lq, lp the gradient needs) rather than folding it into the online statistics: same number of
// sweeps, no extra online state, and the terms stay small (no cancellation of sum p (b - a)
// against lse_b - lse_a).
//
// Two kernels per input dtype; the divergence is a run-time switch after the statistics sweep
// (each kernel holds the six divergence variants of sweeps 2 and 3, nothing is templated on the
// reduction or on which gradients are wanted):
//
// * staged (bf16, fp16, fp32): the row is split over a thread-block cluster of C = 1, 2, 4, 8 or
//   16 blocks (C > 1 on sm_90 only; 16 where the device schedules that non-portable size). Each
//   block copies its slice of both rows into shared memory once (cp.async, 16 bytes per thread and
//   copy) and every later sweep reads shared memory. Row statistics, loss, U, W and the
//   temperature sum are combined block-wide (warp shuffles + shared memory) and then cluster-wide
//   through distributed shared memory. C is the smallest that keeps a block's slices within
//   kStageBytes (64 KiB: three blocks per SM on H100/H200, so one block's copies overlap another's
//   arithmetic); rows longer than that (bf16 V > 262144 with C = 16), or devices that schedule no
//   such cluster, get the plain kernel.
//   DRAM bytes per element: read student + teacher once, write each requested gradient once.
//   bf16 fkl with the student gradient: 2 + 2 + 2 = 6 B/element (V = 128256: C = 8, 62.6 KiB of
//   slices per block; fp32 V = 128256: C = 16, 12 B/element).
// * plain (all dtypes; the only one for float64): one block per row streams the row from global
//   memory in every sweep. DRAM bytes per element when the row does not stay in L2 between sweeps
//   (large V): one-sweep case 2 x (s + t) + gradient = 4 + 4 + 2 = 10 B (bf16); general case
//   3 x (s + t) + gradients = 12 + 2 or 4 B (bf16). Rows short enough to stay in L2 read DRAM once.
//
// Vector access. A row is head | 16-byte vectors | tail. When student, teacher and the gradient
// rows (contiguous [N, V], row r at r * V) share the same address modulo 16, the few head and tail
// elements (< 16 / sizeof) are handled one by one and the body with 16-byte loads and stores
// (8 bf16 per load). When they do not (odd strides), the whole row is handled element by element
// (correct, slower). Offsets are 64-bit (row * stride); indices inside a row are 32-bit (the host
// checks V).
//
// Which kernel runs follows from the dtype, V and the device alone. KDOPS_CUDA_NO_CLUSTER=1 (read
// once per process) forces the plain kernel for every call (no clusters and no shared-memory
// staging), so that both kernels can be timed and tested on the same machine.
//
// Arithmetic per element (sm_90 SASS, bf16): statistics 14 instructions with 2.25 MUFU.EX2; the
// fkl one-sweep gradient 18 instructions with 2 MUFU.EX2. The MUFU pipe (16 per clock per SM)
// caps the staged kernel's arithmetic at roughly 1e12 elements/s on an H100, about twice what 80%
// of its copy bandwidth needs at 6 bytes per element, so DRAM should remain the limit.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string_view>
#include <type_traits>
#include <unordered_map>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_math.cuh"
#include "divergence.h"
#include "divergence_op.h"

namespace kdops::cuda {
namespace {

constexpr int kPlainMaxThreads = 512;
constexpr int kPlainUnroll = 2;       // vectors of each input in flight per thread per step
constexpr int kStagedMaxThreads = 256;
// Register caps: the staged kernel's 64 KiB slices allow three blocks per SM (<= 85 registers);
// two plain blocks of 512 threads need <= 64 (float64, for gradcheck, gets one).
constexpr int kStagedMinBlocks = 3;
template <typename In>
constexpr int kPlainMinBlocks = std::is_same_v<In, double> ? 1 : 2;
constexpr int kStagedMinThreads = 64;
// Slices of both rows per block, at most: three blocks per SM on H100/H200 (228 KiB), two on A100.
constexpr int64_t kStageBytes = 64 * 1024;
constexpr int64_t kMaxVocab = std::numeric_limits<int32_t>::max() - 4096;

// Exchange buffers, one per kind of reduction in a row (see cluster_allreduce).
enum Phase : int { kPhaseStats = 0, kPhaseSums = 1, kPhaseFinal = 2, kPhases = 3 };

template <typename In>
using AccOf = typename Storage<In>::Acc;

// One row's pointers and its head | vectors | tail split.
template <typename In>
struct RowRef {
  const In* s;
  const In* t;
  In* gs;        // nullptr: not requested
  In* gt;
  int32_t head;  // elements before the first vector
  int32_t nvec;  // 16-byte vectors after the head
  int32_t nscalar;  // elements handled one by one: head and tail

  __device__ __forceinline__ int32_t scalar_index(int32_t j) const {
    return j < head ? j : j + nvec * Storage<In>::kVec;
  }
};

template <typename In>
__device__ __forceinline__ RowRef<In> make_row(const DivergenceParams& prm, int64_t r) {
  constexpr int kVec = Storage<In>::kVec;
  const int32_t V = static_cast<int32_t>(prm.vocab);
  RowRef<In> row;
  row.s = static_cast<const In*>(prm.student) + r * prm.student_row_stride;
  row.t = static_cast<const In*>(prm.teacher) + r * prm.teacher_row_stride;
  row.gs = prm.grad_student ? static_cast<In*>(prm.grad_student) + r * prm.vocab : nullptr;
  row.gt = prm.grad_teacher ? static_cast<In*>(prm.grad_teacher) + r * prm.vocab : nullptr;
  const auto mis = [](const void* p) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u); };
  const uint32_t off = mis(row.s);
  const bool together = mis(row.t) == off && (row.gs == nullptr || mis(row.gs) == off) &&
                        (row.gt == nullptr || mis(row.gt) == off);
  if (together) {
    const int32_t head = off == 0 ? 0 : static_cast<int32_t>((16u - off) / sizeof(In));
    row.head = head < V ? head : V;
    row.nvec = (V - row.head) / kVec;
  } else {
    row.head = V;
    row.nvec = 0;
  }
  row.nscalar = V - row.nvec * kVec;
  return row;
}

// Where a sweep's 16-byte vectors come from: global memory (plain) or this block's staged slices.
template <typename In>
struct GlobalVectors {
  const In* s;  // row + head
  const In* t;
  __device__ __forceinline__ uint4 student(int32_t i) const {
    return load16(s + static_cast<int64_t>(i) * Storage<In>::kVec);
  }
  __device__ __forceinline__ uint4 teacher(int32_t i) const {
    return load16(t + static_cast<int64_t>(i) * Storage<In>::kVec);
  }
};

struct StagedVectors {
  const uint4* s;  // slice [first, first + vpc)
  const uint4* t;
  int32_t first;
  __device__ __forceinline__ uint4 student(int32_t i) const { return s[i - first]; }
  __device__ __forceinline__ uint4 teacher(int32_t i) const { return t[i - first]; }
};

// f(i, student vector, teacher vector) for this thread's vectors i in [first, last): i = first +
// threadIdx.x + k * blockDim.x (the staging copy uses the same assignment, so a thread only reads
// shared memory it filled itself). U vectors of each input are loaded before any is used.
template <int U, typename Src, typename F>
__device__ __forceinline__ void for_each_vector(const Src& src, int32_t first, int32_t last, F&& f) {
  const int32_t stride = static_cast<int32_t>(blockDim.x);
  for (int32_t base = first + static_cast<int32_t>(threadIdx.x); base < last; base += U * stride) {
    uint4 vs[U], vt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t i = base + u * stride;
      if (U == 1 || i < last) {
        vs[u] = src.student(i);
        vt[u] = src.teacher(i);
      } else {
        vs[u] = vt[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int32_t i = base + u * stride;
      if (U == 1 || i < last) f(i, vs[u], vt[u]);
    }
  }
}

// f(k, z_s, z_t) for this thread's share (participant p of P) of the row's one-by-one elements.
template <typename In, typename F>
__device__ __forceinline__ void for_each_scalar(const RowRef<In>& row, int32_t p, int32_t P, F&& f) {
  for (int32_t j = p; j < row.nscalar; j += P) {
    const int32_t k = row.scalar_index(j);
    f(k, Storage<In>::load(row.s + k), Storage<In>::load(row.t + k));
  }
}

// How one block takes part in a row: its vectors [first, last), its share (p of P) of the
// one-by-one elements, whether it writes the row's scalars, and how it all-reduces.
template <typename In, typename Src, typename Reduce>
struct RowWork {
  const DivergenceParams& prm;
  int64_t r;
  RowRef<In> row;
  Src src;
  int32_t first;
  int32_t last;
  int32_t p;
  int32_t P;
  bool leader;
  Reduce reduce;
};

template <typename In, typename Work>
__device__ __forceinline__ void zero_row(const Work& w) {
  constexpr int kVec = Storage<In>::kVec;
  const RowRef<In>& row = w.row;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int32_t i = w.first + static_cast<int32_t>(threadIdx.x); i < w.last;
       i += static_cast<int32_t>(blockDim.x)) {
    const int64_t off = row.head + static_cast<int64_t>(i) * kVec;
    if (row.gs) store16(row.gs + off, zero);
    if (row.gt) store16(row.gt + off, zero);
  }
  for (int32_t j = w.p; j < row.nscalar; j += w.P) {
    const int32_t k = row.scalar_index(j);
    if (row.gs) Storage<In>::store(row.gs + k, 0);
    if (row.gt) Storage<In>::store(row.gt + k, 0);
  }
  if (w.leader) {
    static_cast<AccOf<In>*>(w.prm.loss_rows)[w.r] = 0;
    if (w.prm.grad_temperature) static_cast<AccOf<In>*>(w.prm.grad_temperature)[w.r] = 0;
  }
}

// Everything after the statistics: sweeps 2 (and 3) for divergence D.
// Base 2: x = z log2(e) / tau = z * c, log2 q = x_s - lse2_s, q = 2^(log2 q), log q = ln 2 log2 q.
template <Divergence D, int U, typename In, typename Work>
__device__ __forceinline__ void finish_row(const Work& w, AccOf<In> tau, AccOf<In> inv_tau,
                                           AccOf<In> c, AccOf<In> lse2_s, AccOf<In> lse2_t) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  const DivergenceParams& prm = w.prm;
  const RowRef<In>& row = w.row;
  const Acc coef = static_cast<Acc>(prm.coef);
  const Acc scale = *static_cast<const Acc*>(prm.scale);
  const Acc t2 = prm.t2_scale ? tau * tau : Acc(1);
  const Acc grad_scale = scale * t2 * inv_tau;
  Acc* loss_rows = static_cast<Acc*>(prm.loss_rows);
  Acc* grad_tau_rows = static_cast<Acc*>(prm.grad_temperature);
  const bool want_tau = grad_tau_rows != nullptr;

  struct Probs {
    Acc q, p, lq, lp;
  };
  constexpr Acc kLn2 = Acc(0.693147180559945309417232121458176568);
  const auto probs = [&](Acc zs, Acc zt) {
    Probs x;
    const Acc l2q = scale_logit(zs, c) - lse2_s;
    const Acc l2p = scale_logit(zt, c) - lse2_t;
    x.q = M::exp2(l2q);
    x.p = M::exp2(l2p);
    x.lq = l2q * kLn2;
    x.lp = l2p * kLn2;
    return x;
  };

  if constexpr (D == Divergence::kFKL || D == Divergence::kRKL) {
    // U = -1 (fkl) / W = -1 (rkl) exactly: the gradient is q - p (p - q) and needs no row sum.
    In* const g = D == Divergence::kFKL ? row.gs : row.gt;
    const bool one_sweep = !want_tau && (D == Divergence::kFKL ? row.gt == nullptr : row.gs == nullptr);
    if (one_sweep) {
      const Acc gscale = D == Divergence::kFKL ? grad_scale : -grad_scale;
      Acc loss[1] = {Acc(0)};
      const auto element = [&](Acc zs, Acc zt) {
        const Probs x = probs(zs, zt);
        loss[0] += element_terms<D, Acc, M>(x.q, x.p, x.lq, x.lp, coef).loss;
        return (x.q - x.p) * gscale;
      };
      for_each_vector<U>(w.src, w.first, w.last, [&](int32_t i, const uint4& vs, const uint4& vt) {
        Acc zs[kVec], zt[kVec], gv[kVec];
        Storage<In>::unpack(vs, zs);
        Storage<In>::unpack(vt, zt);
#pragma unroll
        for (int e = 0; e < kVec; ++e) gv[e] = element(zs[e], zt[e]);
        if (g) store16(g + row.head + static_cast<int64_t>(i) * kVec, Storage<In>::pack(gv));
      });
      for_each_scalar(row, w.p, w.P, [&](int32_t k, Acc zs, Acc zt) {
        const Acc gk = element(zs, zt);
        if (g) Storage<In>::store(g + k, gk);
      });
      w.reduce(kPhaseFinal, loss, SumOp{});
      if (w.leader) loss_rows[w.r] = loss[0] * t2;
      return;
    }
  }

  // sweep 2: loss, U, W
  Acc sums[3] = {Acc(0), Acc(0), Acc(0)};
  const auto add_terms = [&](Acc zs, Acc zt) {
    const Probs x = probs(zs, zt);
    const ElementTerms<Acc> e = element_terms<D, Acc, M>(x.q, x.p, x.lq, x.lp, coef);
    sums[0] += e.loss;
    sums[1] += e.u;
    sums[2] += e.v;
  };
  for_each_vector<U>(w.src, w.first, w.last, [&](int32_t, const uint4& vs, const uint4& vt) {
    Acc zs[kVec], zt[kVec];
    Storage<In>::unpack(vs, zs);
    Storage<In>::unpack(vt, zt);
#pragma unroll
    for (int e = 0; e < kVec; ++e) add_terms(zs[e], zt[e]);
  });
  for_each_scalar(row, w.p, w.P, [&](int32_t, Acc zs, Acc zt) { add_terms(zs, zt); });
  w.reduce(kPhaseSums, sums, SumOp{});
  const Acc loss = sums[0];
  if (w.leader) loss_rows[w.r] = loss * t2;
  if (row.gs == nullptr && row.gt == nullptr && !want_tau) return;

  // sweep 3: gradients and sum_k dL/da_k lq_k + dL/db_k lp_k
  const Acc side_s = sums[1];
  const Acc side_t = sums[2];
  Acc tau_sum[1] = {Acc(0)};
  const auto grads = [&](Acc zs, Acc zt, Acc& ga, Acc& gb) {
    const Probs x = probs(zs, zt);
    const ElementTerms<Acc> e = element_terms<D, Acc, M>(x.q, x.p, x.lq, x.lp, coef);
    const Acc da = logit_grad(e.u, x.q, side_s);
    const Acc db = logit_grad(e.v, x.p, side_t);
    ga = da * grad_scale;
    gb = db * grad_scale;
    if (want_tau) tau_sum[0] += temperature_term(da, x.lq) + temperature_term(db, x.lp);
  };
  for_each_vector<U>(w.src, w.first, w.last, [&](int32_t i, const uint4& vs, const uint4& vt) {
    Acc zs[kVec], zt[kVec], ga[kVec], gb[kVec];
    Storage<In>::unpack(vs, zs);
    Storage<In>::unpack(vt, zt);
#pragma unroll
    for (int e = 0; e < kVec; ++e) grads(zs[e], zt[e], ga[e], gb[e]);
    const int64_t off = row.head + static_cast<int64_t>(i) * kVec;
    if (row.gs) store16(row.gs + off, Storage<In>::pack(ga));
    if (row.gt) store16(row.gt + off, Storage<In>::pack(gb));
  });
  for_each_scalar(row, w.p, w.P, [&](int32_t k, Acc zs, Acc zt) {
    Acc ga, gb;
    grads(zs, zt, ga, gb);
    if (row.gs) Storage<In>::store(row.gs + k, ga);
    if (row.gt) Storage<In>::store(row.gt + k, gb);
  });
  if (want_tau) {
    w.reduce(kPhaseFinal, tau_sum, SumOp{});
    if (w.leader) {
      // d(t2 L)/dtau = t2' L + t2 dL/dtau with dL/dtau = -tau_sum / tau
      const Acc dt2 = prm.t2_scale ? Acc(2) * tau : Acc(0);
      grad_tau_rows[w.r] = scale * (dt2 * loss + t2 * (-tau_sum[0] * inv_tau));
    }
  }
}

// One valid row: statistics, then the divergence's own sweeps.
template <int U, typename In, typename Work>
__device__ __forceinline__ void process_row(const Work& w) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  constexpr int kVec = Storage<In>::kVec;
  const DivergenceParams& prm = w.prm;
  const Acc tau = static_cast<const Acc*>(prm.temperature)[w.r * prm.temperature_stride];
  // correctly rounded even under --use_fast_math (approximate float division)
  const Acc inv_tau = static_cast<Acc>(1.0 / static_cast<double>(tau));
  const Acc c = static_cast<Acc>(1.442695040888963407359924681001892137 / static_cast<double>(tau));

  // sweep 1, base 2 (x = a log2 e): {max x_s, sum 2^(x_s - max), max x_t, sum 2^(x_t - max)}
  Acc st[4] = {neg_inf<Acc>(), Acc(0), neg_inf<Acc>(), Acc(0)};
  for_each_vector<U>(w.src, w.first, w.last, [&](int32_t, const uint4& vs, const uint4& vt) {
    Acc a[kVec], b[kVec];
    Storage<In>::unpack(vs, a);
    Storage<In>::unpack(vt, b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      a[e] = scale_logit(a[e], c);
      b[e] = scale_logit(b[e], c);
    }
    stats_push<kVec, Acc, M>(st[0], st[1], a);
    stats_push<kVec, Acc, M>(st[2], st[3], b);
  });
  for_each_scalar(w.row, w.p, w.P, [&](int32_t, Acc zs, Acc zt) {
    const Acc a[1] = {scale_logit(zs, c)};
    const Acc b[1] = {scale_logit(zt, c)};
    stats_push<1, Acc, M>(st[0], st[1], a);
    stats_push<1, Acc, M>(st[2], st[3], b);
  });
  w.reduce(kPhaseStats, st, StatsPairOp<M>{});
  // one accurate log per row (an all -inf row gives -inf here and NaN downstream, as on the CPU)
  const Acc lse2_s = st[0] + static_cast<Acc>(::log2(static_cast<double>(st[1])));
  const Acc lse2_t = st[2] + static_cast<Acc>(::log2(static_cast<double>(st[3])));

  switch (prm.divergence) {
    case Divergence::kFKL: return finish_row<Divergence::kFKL, U, In>(w, tau, inv_tau, c, lse2_s, lse2_t);
    case Divergence::kRKL: return finish_row<Divergence::kRKL, U, In>(w, tau, inv_tau, c, lse2_s, lse2_t);
    case Divergence::kJSD: return finish_row<Divergence::kJSD, U, In>(w, tau, inv_tau, c, lse2_s, lse2_t);
    case Divergence::kSkewFKL:
      return finish_row<Divergence::kSkewFKL, U, In>(w, tau, inv_tau, c, lse2_s, lse2_t);
    case Divergence::kSkewRKL:
      return finish_row<Divergence::kSkewRKL, U, In>(w, tau, inv_tau, c, lse2_s, lse2_t);
    case Divergence::kTVD: return finish_row<Divergence::kTVD, U, In>(w, tau, inv_tau, c, lse2_s, lse2_t);
  }
}

// Reductions of the plain kernel: the block.
template <typename Acc>
struct BlockReduce {
  Acc* scratch;  // 32 * 4
  template <int K, typename Op>
  __device__ __forceinline__ void operator()(int, Acc (&v)[K], Op op) const {
    block_allreduce<K>(v, scratch, op);
  }
};

// Reductions of the staged kernel: the block, then the cluster.
template <typename Acc>
struct ClusterReduce {
  Acc* scratch;   // 32 * 4
  Acc* exchange;  // kPhases * 4: this block's slots, read by the whole cluster
  uint32_t csize;
  template <int K, typename Op>
  __device__ __forceinline__ void operator()(int phase, Acc (&v)[K], Op op) const {
    block_allreduce<K>(v, scratch, op);
    if (csize > 1) cluster_allreduce<K>(v, exchange + phase * 4, csize, op);
  }
};

// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

// One block per row (grid-stride over rows); every sweep reads global memory.
template <typename In>
__global__ void __launch_bounds__(kPlainMaxThreads, kPlainMinBlocks<In>)
    divergence_plain_kernel(const DivergenceParams prm) {
  using Acc = AccOf<In>;
  __shared__ Acc scratch[32 * 4];
  const BlockReduce<Acc> reduce{scratch};
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t threads = static_cast<int32_t>(blockDim.x);
  for (int64_t r = blockIdx.x; r < prm.rows; r += gridDim.x) {
    const RowRef<In> row = make_row<In>(prm, r);
    const RowWork<In, GlobalVectors<In>, BlockReduce<Acc>> w{
        prm, r, row, GlobalVectors<In>{row.s + row.head, row.t + row.head}, 0, row.nvec, tid,
        threads, tid == 0, reduce};
    if (prm.valid && !prm.valid[r]) {
      zero_row<In>(w);
      continue;
    }
    process_row<kPlainUnroll, In>(w);
  }
}

// A cluster of csize blocks per row (grid-stride over rows by clusters); block `rank` stages
// vectors [rank * vpc, (rank + 1) * vpc) of both rows in dynamic shared memory.
template <typename In>
__global__ void __launch_bounds__(kStagedMaxThreads, kStagedMinBlocks)
    divergence_staged_kernel(const DivergenceParams prm, int32_t csize, int32_t vpc) {
  using Acc = AccOf<In>;
  constexpr int kVec = Storage<In>::kVec;
  extern __shared__ uint4 stage[];  // student slice [vpc], then teacher slice [vpc]
  __shared__ Acc scratch[32 * 4];
  __shared__ Acc exchange[kPhases * 4];

  // No barrier is needed before the first exchange: a block reads another's shared memory only
  // after a cluster barrier that every block has reached, so all are running by then.
  const uint32_t rank = csize > 1 ? cluster_rank() : 0u;
  const ClusterReduce<Acc> reduce{scratch, exchange, static_cast<uint32_t>(csize)};
  const int32_t tid = static_cast<int32_t>(threadIdx.x);
  const int32_t threads = static_cast<int32_t>(blockDim.x);
  const int64_t clusters = gridDim.x / csize;
  uint4* stage_s = stage;
  uint4* stage_t = stage + vpc;
  for (int64_t r = blockIdx.x / csize; r < prm.rows; r += clusters) {
    const RowRef<In> row = make_row<In>(prm, r);
    const int32_t first = min(row.nvec, static_cast<int32_t>(rank) * vpc);
    const int32_t last = min(row.nvec, first + vpc);
    const bool masked = prm.valid && !prm.valid[r];
    if (!masked) {
      const In* s = row.s + row.head;
      const In* t = row.t + row.head;
      for (int32_t i = first + tid; i < last; i += threads) {
        cp_async16(stage_s + (i - first), s + static_cast<int64_t>(i) * kVec);
        cp_async16(stage_t + (i - first), t + static_cast<int64_t>(i) * kVec);
      }
    }
    const RowWork<In, StagedVectors, ClusterReduce<Acc>> w{
        prm, r, row, StagedVectors{stage_s, stage_t, first}, first, last,
        static_cast<int32_t>(rank) * threads + tid, csize * threads, rank == 0 && tid == 0, reduce};
    if (masked) {
      zero_row<In>(w);
      continue;
    }
    cp_async_wait_all();  // this thread's copies landed; it reads only those
    process_row<1, In>(w);
  }
  // Other blocks may still be reading this block's last exchange slots.
  if (csize > 1) cluster_sync_exit();
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

struct StagedSupport {
  int max_cluster = 1;  // largest cluster (1, 8 or 16 blocks) the device schedules for this kernel
};

// A 1-D launch of `grid` blocks in clusters of `cluster` (no cluster attribute for 1); the
// attribute lives in the caller's storage, which the returned config points to.
cudaLaunchConfig_t cluster_launch_config(int64_t grid, int threads, size_t smem_bytes, int cluster,
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

// Per device and dtype, once: allow kStageBytes of dynamic shared memory and find the largest
// cluster of such blocks the device can schedule (sm_90 code and device; 16 is a non-portable
// size that H100/H200 accept; under MIG or on other parts the occupancy query decides).
template <typename In>
const StagedSupport& staged_support(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, StagedSupport> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  if (found != cache.end()) return found->second;

  StagedSupport support;
  const auto kernel = divergence_staged_kernel<In>;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  int major = 0;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (static_cast<int64_t>(attr.sharedSizeBytes) + kStageBytes > optin) {
    support.max_cluster = 0;  // the staged kernel does not fit this device at all
    return cache.emplace(device, support).first->second;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(kStageBytes)));
  // The largest shared-memory carveout: this kernel's occupancy is set by shared memory.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           static_cast<int>(cudaSharedmemCarveoutMaxShared)) != cudaSuccess) {
    (void)cudaGetLastError();  // a hint only
  }
  if (major >= 9 && attr.ptxVersion >= 90) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
      (void)cudaGetLastError();
    }
    for (const int c : {kMaxCluster, 8}) {
      cudaLaunchAttribute attribute;
      const cudaLaunchConfig_t config = cluster_launch_config(
          c, kStagedMaxThreads, static_cast<size_t>(kStageBytes), c, nullptr, attribute);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) {
        support.max_cluster = c;
        break;
      }
      (void)cudaGetLastError();  // not fatal: smaller clusters or the plain kernel serve
    }
  }
  return cache.emplace(device, support).first->second;
}

int round_up_warp(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

template <typename In>
void launch_plain(const DivergenceParams& prm, cudaStream_t stream) {
  constexpr int kVec = Storage<In>::kVec;
  // about kPlainUnroll vectors per thread and sweep, within [32, kPlainMaxThreads]
  const int64_t work = (prm.vocab + kVec * kPlainUnroll - 1) / (kVec * kPlainUnroll);
  const int threads = round_up_warp(std::clamp<int64_t>(work, 32, kPlainMaxThreads));
  const int64_t blocks = std::min<int64_t>(prm.rows, std::numeric_limits<int32_t>::max());
  divergence_plain_kernel<In><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the staged kernel with the smallest cluster whose blocks' slices fit kStageBytes;
// returns false (nothing launched) when none does.
template <typename In>
bool launch_staged(const DivergenceParams& prm, int device, cudaStream_t stream) {
  constexpr int kVec = Storage<In>::kVec;
  const int64_t vectors = prm.vocab / kVec;  // upper bound on any row's vector count
  if (vectors == 0) return false;
  const StagedSupport& support = staged_support<In>(device);
  const auto slice_bytes = [&](int64_t c) { return 2 * 16 * ((vectors + c - 1) / c); };
  int csize = 0;
  for (int c = 1; c <= support.max_cluster; c *= 2) {
    if (slice_bytes(c) <= kStageBytes) {
      csize = c;
      break;
    }
  }
  if (csize == 0) return false;

  const int32_t vpc = static_cast<int32_t>((vectors + csize - 1) / csize);
  const int threads = round_up_warp(std::clamp<int64_t>(vpc, kStagedMinThreads, kStagedMaxThreads));
  const int64_t max_clusters = std::numeric_limits<int32_t>::max() / csize;
  const int64_t grid = csize * std::min<int64_t>(prm.rows, max_clusters);

  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_launch_config(
      grid, threads, static_cast<size_t>(slice_bytes(csize)), csize, stream, attribute);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, divergence_staged_kernel<In>, prm, csize, vpc));
  return true;
}

template <typename In>
void launch(const DivergenceParams& prm, int device, cudaStream_t stream) {
  if constexpr (!std::is_same_v<In, double>) {
    if (!clusters_disabled() && launch_staged<In>(prm, device, stream)) return;
  }
  launch_plain<In>(prm, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& normalizer,
    c10::string_view divergence, double beta, double alpha, c10::string_view reduction,
    bool t2_scale, bool grad_student, bool grad_teacher, bool grad_temperature) {
  TORCH_CHECK_VALUE(student.is_cuda(), "kd_loss (cuda): student must be a CUDA tensor; got ",
                    student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  DivergenceLaunch launch_args = prepare_divergence(
      student, teacher, temperature, valid, normalizer, divergence, beta, alpha, reduction,
      t2_scale, grad_student, grad_teacher, grad_temperature);
  const DivergenceParams& prm = launch_args.params;
  TORCH_CHECK_VALUE(prm.vocab <= kMaxVocab, "kd_loss (cuda): vocab (last dim) must be at most ",
                    kMaxVocab, "; got ", prm.vocab);
  if (prm.rows > 0) {
    const int device = student.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    switch (student.scalar_type()) {
      case at::kFloat: launch<float>(prm, device, stream); break;
      case at::kDouble: launch<double>(prm, device, stream); break;
      case at::kBFloat16: launch<__nv_bfloat16>(prm, device, stream); break;
      case at::kHalf: launch<__half>(prm, device, stream); break;
      default: TORCH_CHECK(false, "kd_loss (cuda): unsupported dtype ", student.scalar_type());
    }
  }
  return finish_divergence(launch_args);
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("kd_loss", &kdops::cuda::kd_loss_cuda);
}
