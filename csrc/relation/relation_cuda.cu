// relation_kd_loss on CUDA devices (DESIGN.md 3.6), tiled like flash attention. The per-entry
// algebra is relation.h's (shared with the CPU kernels); host checks and output allocation are
// relation_op.cpp's. Outputs, including the row_stats layout, are the CPU op's, so a forward of one
// backend and a backward of the other agree.
//
// One block of 128 threads per (group, tile of 64 rows) walks the group's tiles of 64 columns
// (skipping a tile without a valid token) and holds one 64 x 64 tile per relation at a time: no
// N x N buffer anywhere; forward's extra memory is O(G N) (the outputs, and with normalize the
// token norms the host computes).
//   relation tile  S = F[rows] F[cols]^T over the width, in chunks staged in shared memory
//                  (kl / mse: S_s and S_t; infonce: C = F_s[rows] F_t[cols]^T), into a shared
//                  accumulate-type tile. bf16 / fp16 features: tensor cores (nvcuda::wmma
//                  m16n16k16, operands copied by cp.async), whose products of 16-bit values are
//                  exact, accumulated in fp32. fp32 / fp64 features: FMA, 4 x 8 outputs per
//                  thread; tf32 tensor cores would round fp32 features to 10 bits, and DESIGN.md 2
//                  asks for fp32 arithmetic.
//   elementwise    thread t walks row t % 64 and half t / 64 of every tile's columns, in an order
//                  rotated by the row (conflict-free in shared memory); the halves merge once per
//                  row at the end, in a fixed order.
//   scales         normalize is fused (relation.h): a raw tile entry x_ij becomes x_ij (s_i / tau)
//                  s_j, s = 1 / max(|F|, eps) from the norms (1 without normalize). s_i / tau of
//                  the block's rows is set once in shared memory, s_j with each tile's column
//                  arrays; the features are never copied.
// Forward: one sweep keeps each row's online softmax statistics (max, sum exp) of a and b and, for
// kl, relation.h's weighted sum of shifted entries, moved along with the running maxima; kl and
// infonce finish there. mse takes a second sweep (tiles recomputed) for d = p - q against the
// known lse: the one-pass sum p^2 - 2 pq + q^2 would cancel catastrophically when p ~ q.
// Backward recomputes the tiles, overwrites them in place with the gradient weights
// W_ij = s_i s_j M_ij (relation.h: both terms of a self-relation entry come from the one tile
// entry, row j's with the column's saved statistics) and accumulates dF[rows] += W F[cols] chunk
// by chunk of the width. Each thread also sums its half of the row dot c_i = sum_j W_ij x_ij; after
// the last tile the halves merge in a fixed order, c_i goes to row_dots and the radial term
// rho_i F_i is subtracted from the accumulated rows. Each block owns its rows of the gradient: no
// atomics, deterministic, no column pass for kl / mse; infonce's teacher gradient is a second
// launch whose blocks own tiles of teacher tokens (rows of C^T).
//   The accumulator lives in global memory (the width is unbounded): fp32 / fp64 features
//   accumulate in the gradient itself; bf16 / fp16 ones in an fp32 workspace [G, N rounded up to
//   64, D rounded up to 64] (the gradient's size in fp32, for the duration of the op), read and
//   written as wmma accumulator fragments and rounded once to the input dtype at the end (after
//   the radial term, in fp32). W F runs on tf32 tensor cores: F (16-bit) is exact in tf32 and W is
//   split as hi + lo (two products), about 21 bits of W, so the result is fp32 arithmetic up to
//   summation order.
// Offsets are 64-bit. Exponentials are CudaMath's (__expf under --use_fast_math), logs its
// accurate log. The op does not check the temperature's sign (that would be a host sync): the
// Python wrapper asserts it on the device.
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_math.cuh"
#include "relation.h"
#include "relation_op.h"

namespace kdops::cuda {

// The kernels' dynamic shared memory (layout: Config below).
extern __shared__ __align__(128) unsigned char relation_shared[];

namespace {

constexpr int kTile = 64;           // rows and columns of a relation tile
constexpr int kHalf = kTile / 2;    // columns of a tile one thread walks
constexpr int kThreads = 2 * kTile;  // 4 warps: one thread per (row, half)
constexpr int kTileLd = kTile + 4;  // tile row stride: a multiple of 4 (wmma), rotates the banks
constexpr int kOutChunk = 64;       // gradient columns per step of dF += W F
constexpr int kOutLd = kOutChunk + 4;
// Per column j of a tile, in shared memory: whether it counts, and these fields. The scales are
// s_j of the column's token in tile_s and in tile_t (relation.h; 1 without normalize); backward
// adds the column's w and its row_stats (slot s at kColumnStats + s).
enum ColumnField : int { kColumnScaleS = 0, kColumnScaleT = 1, kColumnWeight = 2, kColumnStats = 3 };
constexpr int kColumnFields = kColumnStats + kRelationStats;
constexpr int kMergeFields = 6;     // per row, what forward's two halves merge

template <typename In>
using AccOf = typename Storage<In>::Acc;

// Blocks per SM the register allocation must allow: fp64 two (<= 255 registers), the others four
// (<= 128; four blocks of about 56 KiB also fit in sm_90's shared memory, two in sm_80's). The
// 16-bit kernels sit at that cap, and row values held through the sweeps have spilled: check the
// ptxas report (KDOPS_PTXAS_VERBOSE=1 .ci/build_cuda_wheel.sh) after an edit, for sm_80 and sm_90.
template <typename In>
constexpr int kMinBlocks = std::is_same_v<In, double> ? 2 : 4;

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// How a block multiplies, and its dynamic shared memory: two relation tiles (accumulate type),
// one staging area (chunks of the relation GEMM's operands, or one chunk of F for dF += W F), the
// column arrays and the scales of the block's rows in tile_s and tile_t.
template <typename In>
struct Config {
  using Acc = AccOf<In>;
  static constexpr bool kTensorCores = sizeof(In) == 2;
  using Stage = std::conditional_t<kTensorCores, In, Acc>;       // relation GEMM operands
  using OutStage = std::conditional_t<kTensorCores, float, Acc>;  // F of dF += W F (tf32 or FMA)
  static constexpr int kChunk = 128 / sizeof(Stage);             // width per staged chunk
  // wmma wants a multiple of 8 16-bit elements (16 bytes); FMA reads rows at one k, odd is
  // conflict-free
  static constexpr int kStageLd = kTensorCores ? kChunk + 8 : kChunk + 1;
  static constexpr size_t kTileBytes = align128(sizeof(Acc) * kTile * kTileLd);
  static constexpr size_t kStageBytes = align128(std::max(sizeof(Stage) * 2 * kTile * kStageLd,
                                                          sizeof(OutStage) * kTile * kOutLd));
  static constexpr size_t kColumnBytes = align128(kTile * (sizeof(int) + kColumnFields * sizeof(Acc)));
  static constexpr size_t kTileS = 0;
  static constexpr size_t kTileT = kTileBytes;
  static constexpr size_t kStage = 2 * kTileBytes;
  static constexpr size_t kColumns = kStage + kStageBytes;
  static constexpr size_t kRowScales = kColumns + kColumnBytes;
  static constexpr size_t kSharedBytes = kRowScales + align128(2 * kTile * sizeof(Acc));
  static_assert(kChunk % Storage<In>::kVec == 0 && kOutChunk % Storage<In>::kVec == 0);
  static_assert(kTile * kMergeFields * sizeof(Acc) <= kTileBytes, "the halves merge in a tile");
};

// One feature tensor [G, N, width] as the kernels read it.
template <typename In>
struct Features {
  const In* data;
  int64_t group_stride;
  int64_t token_stride;
  int64_t width;
  bool vectors;  // 16-byte loads allowed: aligned base and strides

  __device__ Features(const void* base, int64_t group_stride_, int64_t token_stride_, int64_t width_)
      : data(static_cast<const In*>(base)),
        group_stride(group_stride_),
        token_stride(token_stride_),
        width(width_),
        vectors(reinterpret_cast<uintptr_t>(base) % 16 == 0 &&
                group_stride_ % Storage<In>::kVec == 0 && token_stride_ % Storage<In>::kVec == 0) {}
};

enum class Side : int32_t { kStudent, kTeacher };

// The student's or the teacher's features, built where they are needed from the kernel
// parameters (constant memory): holding all of them in registers through a sweep costs spills.
template <typename In>
__device__ __forceinline__ Features<In> features(const RelationParams& prm, Side side) {
  const bool student = side == Side::kStudent;
  return {student ? prm.student : prm.teacher,
          student ? prm.student_group_stride : prm.teacher_group_stride,
          student ? prm.student_token_stride : prm.teacher_token_stride,
          student ? prm.student_width : prm.teacher_width};
}

// An accumulate-type value as a staged operand (bf16 / fp16: exact, the value came from one).
template <typename T, typename Acc>
__device__ __forceinline__ T stage_value(Acc v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

// dst[t][e] = x[g, t0 + t, d0 + e] for t < kTile, e < kChunk, converted to T; zero outside the
// group's tokens and the width. 16-byte loads along the width (consecutive threads, consecutive
// vectors), element loads where a vector would be misaligned or cross the end of the width. The
// tensor-core operands (T = In) are copied with cp.async, which holds no registers: the caller
// waits with cp_async_wait_all() before its barrier.
template <typename In, typename T, int kChunk>
__device__ void stage_chunk(T* dst, int ld, const Features<In>& x, int64_t g, int64_t t0,
                            int64_t tokens, int64_t d0) {
  using Acc = AccOf<In>;
  constexpr int kVec = Storage<In>::kVec;
  constexpr int kVectorsPerRow = kChunk / kVec;
  for (int v = threadIdx.x; v < kTile * kVectorsPerRow; v += kThreads) {
    const int t = v / kVectorsPerRow;
    const int e0 = v % kVectorsPerRow * kVec;
    const int64_t token = t0 + t;
    const int64_t d = d0 + e0;
    T* out = dst + t * ld + e0;
    if (token >= tokens || d >= x.width) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) out[e] = stage_value<T>(Acc(0));
      continue;
    }
    const In* src = x.data + g * x.group_stride + token * x.token_stride + d;
    if (x.vectors && d + kVec <= x.width) {
      if constexpr (Config<In>::kTensorCores && std::is_same_v<T, In>) {
        cp_async16(out, src);  // kStageLd and e0 keep 16-byte alignment; the caller waits
      } else {
        Acc values[kVec];
        Storage<In>::unpack(load16(src), values);
#pragma unroll
        for (int e = 0; e < kVec; ++e) out[e] = stage_value<T>(values[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        out[e] = stage_value<T>(d + e < x.width ? Storage<In>::load(src + e) : Acc(0));
      }
    }
  }
}

// tile[r][c] = <x[g, row0 + r], y[g, col0 + c]> for r, c < kTile (0 outside the tokens), on tensor
// cores. Each warp owns a 32 x 32 quadrant (2 x 2 fragments). The caller synchronizes before
// reading the tile; the first barrier here makes the stage free.
template <typename In>
__device__ void relation_tile_tensor_cores(float* tile, const Features<In>& x, const Features<In>& y,
                                           int64_t g, int64_t row0, int64_t col0, int64_t tokens,
                                           In* stage) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma needs sm_80; the host refuses older devices
#else
  namespace wmma = nvcuda::wmma;
  constexpr int kChunk = Config<In>::kChunk;
  constexpr int kLd = Config<In>::kStageLd;
  In* xs = stage;
  In* ys = stage + kTile * kLd;
  const int warp = threadIdx.x / 32;
  const int wm = warp / 2 * 32;
  const int wn = warp % 2 * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t d0 = 0; d0 < x.width; d0 += kChunk) {
    __syncthreads();  // the stage's previous readers are done
    stage_chunk<In, In, kChunk>(xs, kLd, x, g, row0, tokens, d0);
    stage_chunk<In, In, kChunk>(ys, kLd, y, g, col0, tokens, d0);
    cp_async_wait_all();
    __syncthreads();
    const int steps = static_cast<int>(std::min<int64_t>(kChunk, x.width - d0) + 15) / 16;
    for (int s = 0; s < steps; ++s) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, In, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, In, wmma::col_major> b[2];  // b(k, n) = y[n][k]
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm + 16 * i) * kLd + 16 * s, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ys + (wn + 16 * j) * kLd + 16 * s, kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(tile + (wm + 16 * i) * kTileLd + wn + 16 * j, acc[i][j], kTileLd,
                              wmma::mem_row_major);
    }
#endif
}

// Thread t's 4 x 8 block of a 64 x 64 FMA product: rows t / 8 + 16 i, columns t % 8 + 8 j.
struct FmaPlace {
  int row;
  int col;
  __device__ FmaPlace() : row(threadIdx.x / 8), col(threadIdx.x % 8) {}
};

// The same with FMA (fp32 / fp64 features).
template <typename In>
__device__ void relation_tile_fma(AccOf<In>* tile, const Features<In>& x, const Features<In>& y,
                                  int64_t g, int64_t row0, int64_t col0, int64_t tokens,
                                  AccOf<In>* stage) {
  using Acc = AccOf<In>;
  constexpr int kChunk = Config<In>::kChunk;
  constexpr int kLd = Config<In>::kStageLd;
  Acc* xs = stage;
  Acc* ys = stage + kTile * kLd;
  const FmaPlace at;
  Acc acc[4][8] = {};
  for (int64_t d0 = 0; d0 < x.width; d0 += kChunk) {
    __syncthreads();  // the stage's previous readers are done
    stage_chunk<In, Acc, kChunk>(xs, kLd, x, g, row0, tokens, d0);
    stage_chunk<In, Acc, kChunk>(ys, kLd, y, g, col0, tokens, d0);
    __syncthreads();
    const int depth = static_cast<int>(std::min<int64_t>(kChunk, x.width - d0));
    for (int k = 0; k < depth; ++k) {
      Acc a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[(at.row + 16 * i) * kLd + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = ys[(at.col + 8 * j) * kLd + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) tile[(at.row + 16 * i) * kTileLd + at.col + 8 * j] = acc[i][j];
}

// Where backward accumulates one feature gradient.
struct GradientTarget {
  void* out = nullptr;          // [G, N, width] input dtype, contiguous; nullptr: not asked
  float* workspace = nullptr;   // bf16 / fp16: fp32 accumulator [G, padded_tokens, padded_width]
  int64_t width = 0;
  int64_t padded_tokens = 0;
  int64_t padded_width = 0;
};

// Rows [row0, row0 + 64) of the target += m y[g, col0 : col0 + 64, :] (m: the shared 64 x 64
// weight tile, zero where an entry does not count); `first` starts the accumulator instead.
// Tensor cores: tf32 m16n16k8 with m split as hi + lo; the accumulator fragments go straight to
// and from the padded workspace, each warp its 32 x 32 quadrant of every chunk.
template <typename In>
__device__ void accumulate_tensor_cores(const GradientTarget& target, int64_t g, int64_t row0,
                                        const float* m, const Features<In>& y, int64_t col0,
                                        int64_t tokens, bool first, float* stage) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // tf32 wmma needs sm_80; the host refuses older devices
#else
  namespace wmma = nvcuda::wmma;
  using Tf32 = wmma::precision::tf32;
  const int warp = threadIdx.x / 32;
  const int wm = warp / 2 * 32;
  const int wn = warp % 2 * 32;
  const int64_t ld = target.padded_width;
  float* rows = target.workspace + (g * target.padded_tokens + row0) * ld;
  const int steps = static_cast<int>(std::min<int64_t>(kTile, tokens - col0) + 7) / 8;
  for (int64_t d0 = 0; d0 < target.width; d0 += kOutChunk) {
    __syncthreads();  // m is complete; the stage's previous readers are done
    stage_chunk<In, float, kOutChunk>(stage, kOutLd, y, g, col0, tokens, d0);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
    float* out = rows + wm * ld + d0 + wn;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (first) {
          wmma::fill_fragment(acc[i][j], 0.0f);
        } else {
          wmma::load_matrix_sync(acc[i][j], out + 16 * i * ld + 16 * j, ld, wmma::mem_row_major);
        }
      }
    for (int s = 0; s < steps; ++s) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, Tf32, wmma::row_major> hi[2], lo[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, Tf32, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(hi[i], m + (wm + 16 * i) * kTileLd + 8 * s, kTileLd);
#pragma unroll
        for (int e = 0; e < hi[i].num_elements; ++e) {
          const float v = hi[i].x[e];
          const float h = wmma::__float_to_tf32(v);
          hi[i].x[e] = h;
          lo[i].x[e] = wmma::__float_to_tf32(v - h);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b[j], stage + 8 * s * kOutLd + wn + 16 * j, kOutLd);
#pragma unroll
        for (int e = 0; e < b[j].num_elements; ++e) b[j].x[e] = wmma::__float_to_tf32(b[j].x[e]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc[i][j], lo[i], b[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], hi[i], b[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(out + 16 * i * ld + 16 * j, acc[i][j], ld, wmma::mem_row_major);
      }
  }
#endif
}

// The same with FMA, accumulating in the gradient itself (fp32 / fp64 features).
template <typename In>
__device__ void accumulate_fma(const GradientTarget& target, int64_t g, int64_t row0,
                               const AccOf<In>* m, const Features<In>& y, int64_t col0,
                               int64_t tokens, bool first, AccOf<In>* stage) {
  using Acc = AccOf<In>;
  const int64_t width = target.width;
  const int rows_here = static_cast<int>(std::min<int64_t>(kTile, tokens - row0));
  const int depth = static_cast<int>(std::min<int64_t>(kTile, tokens - col0));
  Acc* rows = static_cast<Acc*>(target.out) + (g * tokens + row0) * width;
  const FmaPlace at;
  for (int64_t d0 = 0; d0 < width; d0 += kOutChunk) {
    __syncthreads();  // m is complete; the stage's previous readers are done
    stage_chunk<In, Acc, kOutChunk>(stage, kOutLd, y, g, col0, tokens, d0);
    __syncthreads();
    Acc acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = at.row + 16 * i;
        const int64_t d = d0 + at.col + 8 * j;
        acc[i][j] = !first && r < rows_here && d < width ? rows[r * width + d] : Acc(0);
      }
    for (int k = 0; k < depth; ++k) {
      Acc a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = m[(at.row + 16 * i) * kTileLd + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = stage[k * kOutLd + at.col + 8 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = at.row + 16 * i;
        const int64_t d = d0 + at.col + 8 * j;
        if (r < rows_here && d < width) rows[r * width + d] = acc[i][j];
      }
  }
}

// The block's rows of the gradient in the input dtype: the accumulated sum_j W_ij F_j less
// rho_i F_i (relation.h; x: the rows' features, `radial`: their rho in shared memory, 0 without
// normalize), from the workspace rounded once (16-bit) or in place (fp32 / fp64); zeros where
// nothing was accumulated (no column tile with a valid token, or no valid row), and then
// `radial` is not read. The caller synchronizes after the last accumulate.
template <typename In>
__device__ void finish_gradient(const GradientTarget& target, const Features<In>& x, int64_t g,
                                int64_t row0, int64_t tokens, bool started,
                                const AccOf<In>* radial) {
  using Acc = AccOf<In>;
  if (target.out == nullptr) return;
  const int64_t width = target.width;
  const int rows_here = static_cast<int>(std::min<int64_t>(kTile, tokens - row0));
  In* out = static_cast<In*>(target.out) + (g * tokens + row0) * width;
  if (!started) {
    for (int64_t e = threadIdx.x; e < rows_here * width; e += kThreads) {
      Storage<In>::store(out + e, Acc(0));
    }
    return;
  }
  for (int r = 0; r < rows_here; ++r) {
    const Acc rho = radial[r];
    const In* features = x.data + g * x.group_stride + (row0 + r) * x.token_stride;
    if constexpr (Config<In>::kTensorCores) {
      const float* sums =
          target.workspace + (g * target.padded_tokens + row0 + r) * target.padded_width;
      for (int64_t d = threadIdx.x; d < width; d += kThreads) {
        const float radial_term = rho != 0 ? rho * Storage<In>::load(features + d) : 0.0f;
        Storage<In>::store(out + r * width + d, sums[d] - radial_term);
      }
    } else if (rho != 0) {
      for (int64_t d = threadIdx.x; d < width; d += kThreads) {
        out[r * width + d] -= rho * Storage<In>::load(features + d);
      }
    }
  }
}

// n_i of the valid rows of group g (relation.h), for every thread and in shared memory.
__device__ int group_columns(const RelationParams& prm, int64_t g) {
  __shared__ int scratch[32];
  int count[1] = {static_cast<int>(prm.tokens)};
  if (prm.valid != nullptr) {
    count[0] = 0;
    for (int64_t j = threadIdx.x; j < prm.tokens; j += kThreads) count[0] += prm.valid[g * prm.tokens + j];
    block_allreduce<1>(count, scratch, SumOp{});
  }
  return static_cast<int>(relation_columns(count[0], prm.exclude_diagonal));
}

// A tempered entry: the raw product times its factor s_i s_j / tau, rounded on its own (never fused
// with the shift that follows), so that every sweep and backward form bitwise the same entries
// and, e.g., a row's only entry gets softmax exactly 1.
template <typename Acc>
__device__ __forceinline__ Acc tempered(Acc raw, Acc factor) {
  if constexpr (std::is_same_v<Acc, double>) {
    return __dmul_rn(raw, factor);
  } else {
    return __fmul_rn(raw, factor);
  }
}

template <typename Acc>
struct DeviceExp {
  KD_HOST_DEVICE Acc operator()(Acc x) const { return CudaMath<Acc>::exp(x); }
};

// The shift a row's exponentials use: its running max, or 0 while that is -inf (every entry
// seen so far is -inf or NaN, and exp(-inf - 0) = 0).
template <typename Acc>
__device__ __forceinline__ Acc shift_of(Acc max) {
  return max == neg_inf<Acc>() ? Acc(0) : max;
}

// The factor that moves sums taken relative to the running max `from` to a max `to` >= from.
// While a max is -inf its sums are 0 (or NaN) and stay so.
template <typename Acc>
__device__ __forceinline__ Acc rescale(Acc from, Acc to) {
  return from == neg_inf<Acc>() ? Acc(0) : CudaMath<Acc>::exp(from - to);
}

// Raises a running max to include `seen`; returns the factor for the sums taken so far.
template <typename Acc>
__device__ __forceinline__ Acc raise_max(Acc& max, Acc seen) {
  const Acc next = fmax(max, seen);
  const Acc factor = rescale(max, next);
  max = next;
  return factor;
}

// kl's weighted sum (relation.h: sum e^{y} (y - x), x = a - shift_s, y = b - shift_t) moved from
// the shifts of the maxima (max_s, max_t) to those of (next_s, next_t) >= them: every term's
// y - x changes by the same amount, e^{y} by the teacher's rescale factor. teacher_sum is the
// teacher's sum before the move.
template <typename Acc>
__device__ __forceinline__ Acc rebase_weighted(Acc weighted, Acc teacher_sum, Acc max_s, Acc max_t,
                                               Acc next_s, Acc next_t) {
  const Acc shift_change = (shift_of(next_s) - shift_of(max_s)) - (shift_of(next_t) - shift_of(max_t));
  return rescale(max_t, next_t) * (weighted + teacher_sum * shift_change);
}

// The block's place (group, first row; this thread's row and half of the columns) and its
// shared memory. Everything is recomputed from the indices, the kernel parameters (constant
// memory) and the shared-memory symbol where it is used: held in registers through a sweep it
// would cost spills.
template <typename In>
struct Block {
  using Acc = AccOf<In>;
  using C = Config<In>;
  const RelationParams& prm;
  int32_t g;     // group
  int32_t row0;  // first row (token) of the tile

  __device__ Block(const RelationParams& params, int32_t tiles_per_group)
      : prm(params),
        g(static_cast<int32_t>(blockIdx.x) / tiles_per_group),
        row0(static_cast<int32_t>(blockIdx.x) % tiles_per_group * kTile) {}

  __device__ int rl() const { return threadIdx.x % kTile; }     // this thread's row in the tile
  __device__ int half() const { return threadIdx.x / kTile; }   // its half of every tile's columns
  __device__ int64_t i() const { return row0 + rl(); }          // its row's token
  __device__ int64_t tokens() const { return prm.tokens; }
  __device__ bool row_counts() const { return i() < tokens() && prm.counts(g, i()); }

  __device__ Acc* tile_s() const { return reinterpret_cast<Acc*>(relation_shared + C::kTileS); }
  __device__ Acc* tile_t() const { return reinterpret_cast<Acc*>(relation_shared + C::kTileT); }
  __device__ void* stage() const { return relation_shared + C::kStage; }
  __device__ int* col_valid() const { return reinterpret_cast<int*>(relation_shared + C::kColumns); }
  __device__ Acc* col_field(int f) const {
    return reinterpret_cast<Acc*>(relation_shared + C::kColumns + kTile * sizeof(int)) + f * kTile;
  }

  // The token norms of group g on one side (normalize), or nullptr.
  __device__ const Acc* norms(Side side) const {
    const void* norm = side == Side::kStudent ? prm.student_norm : prm.teacher_norm;
    return norm ? static_cast<const Acc*>(norm) + g * prm.tokens : nullptr;
  }

  // s of a token of group g (relation.h), 1 without normalize.
  __device__ Acc token_scale(Side side, int64_t token) const {
    const Acc* norm = norms(side);
    return norm ? relation_scale(norm[token]) : Acc(1);
  }

  // s_i / tau of the block's rows in tile_s (side `rows`) and in tile_t (the teacher's): with the
  // column's s_j, the factor of a raw tile entry. Set once by set_row_scales; read where used, as
  // a register held through the sweeps they would cost spills.
  __device__ Acc* row_scales_s() const { return reinterpret_cast<Acc*>(relation_shared + C::kRowScales); }
  __device__ Acc* row_scales_t() const { return row_scales_s() + kTile; }
  __device__ void set_row_scales(Side rows, bool teacher_too, Acc inv_tau) const {
    const int r = threadIdx.x % kTile;
    if (row0 + r >= tokens() || (threadIdx.x >= kTile && !teacher_too)) return;
    const bool tile_s = threadIdx.x < kTile;
    (tile_s ? row_scales_s() : row_scales_t())[r] =
        token_scale(tile_s ? rows : Side::kTeacher, row0 + r) * inv_tau;
  }

  // The k-th column of this thread's half, rotated by the row so that the 32 rows of a warp hit
  // 32 different banks.
  __device__ int column(int k) const { return half() * kHalf + ((k + rl()) & (kHalf - 1)); }

  // This row's own column in the tile at col0, or -1.
  __device__ int own_column(int64_t col0) const {
    return i() >= col0 && i() < col0 + kTile ? static_cast<int>(i() - col0) : -1;
  }

  // tile = x[rows] y[cols]^T
  __device__ void relation_tile(Acc* tile, Side rows, Side cols, int64_t col0) const {
    const Features<In> x = features<In>(prm, rows);
    const Features<In> y = features<In>(prm, cols);
    if constexpr (C::kTensorCores) {
      relation_tile_tensor_cores<In>(tile, x, y, g, row0, col0, tokens(), static_cast<In*>(stage()));
    } else {
      relation_tile_fma<In>(tile, x, y, g, row0, col0, tokens(), static_cast<Acc*>(stage()));
    }
  }

  // dF[rows] (+)= m y[cols]
  __device__ void accumulate(const GradientTarget& target, const Acc* m, Side cols, int64_t col0,
                             bool first) const {
    const Features<In> y = features<In>(prm, cols);
    if constexpr (C::kTensorCores) {
      accumulate_tensor_cores<In>(target, g, row0, m, y, col0, tokens(), first, static_cast<float*>(stage()));
    } else {
      accumulate_fma<In>(target, g, row0, m, y, col0, tokens(), first, static_cast<Acc*>(stage()));
    }
  }

  // For every column tile of the group with a valid token: the column arrays (thread c < kTile
  // fills column c: whether it counts and, if it does, its scale in tile_s and load(c, j) for the
  // other fields of token j; thread kTile + c its scale in tile_t), the relation tiles (rows x cols
  // into tile_s; with `teacher_too`, the teacher's self relation into tile_t), then work(col0).
  // Called by every thread.
  template <typename Load, typename Work>
  __device__ void sweep(Side rows, Side cols, bool teacher_too, Load&& load, Work&& work) const {
    for (int64_t col0 = 0; col0 < tokens(); col0 += kTile) {
      __syncthreads();  // the previous tile's readers are done with the tiles and column arrays
      const int c = threadIdx.x % kTile;
      const int64_t j = col0 + c;
      bool valid_column = false;
      if (threadIdx.x < kTile) {
        valid_column = j < tokens() && prm.counts(g, j);
        col_valid()[c] = valid_column;
        if (valid_column) {
          col_field(kColumnScaleS)[c] = token_scale(cols, j);
          load(c, j);
        }
      } else if (teacher_too && j < tokens()) {
        col_field(kColumnScaleT)[c] = token_scale(Side::kTeacher, j);
      }
      if (!__syncthreads_or(valid_column)) continue;
      relation_tile(tile_s(), rows, cols, col0);
      if (teacher_too) relation_tile(tile_t(), Side::kTeacher, Side::kTeacher, col0);
      __syncthreads();
      work(col0);
    }
  }
};

// Forward: row_loss and row_stats of the block's rows.
template <typename In>
__global__ void __launch_bounds__(kThreads, kMinBlocks<In>)
    relation_forward_kernel(const RelationParams prm, const int32_t tiles_per_group) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  const Block<In> blk(prm, tiles_per_group);
  const bool infonce = prm.kind == RelationKind::kInfonce;
  const bool kl = prm.kind == RelationKind::kKl;
  // the row's outputs, written by half 0 (pointers formed where used: see Block)
  const auto write_row = [&](Acc loss, Acc s0, Acc s1, Acc s2, Acc s3) {
    const int64_t row = blk.g * prm.tokens + blk.i();
    static_cast<Acc*>(prm.row_loss)[row] = loss;
    Acc* stats = static_cast<Acc*>(prm.row_stats) + row * kRelationStats;
    stats[kLseStudent] = s0;
    stats[kLseTeacher] = s1;
    stats[kRowStat0] = s2;
    stats[kRowStat1] = s3;
  };

  // n_i, kept in shared memory for mse's division at the very end
  __shared__ int columns;
  const int group_n = group_columns(prm, blk.g);
  if (threadIdx.x == 0) columns = group_n;
  if (!__syncthreads_or(blk.row_counts()) || group_n <= 0) {
    if (blk.half() == 0 && blk.i() < prm.tokens) write_row(0, 0, 0, 0, 0);
    return;
  }
  const bool row_counts = blk.row_counts();
  blk.set_row_scales(Side::kStudent, !infonce, Acc(1) / *static_cast<const Acc*>(prm.temperature));
  const auto no_fields = [](int, int64_t) {};
  // the row's tempered entry at column c of a tile row (`col_scale`: the tile's column scales,
  // `scale` the row's); -inf where the column does not count
  const auto entry = [&](const Acc* row, const Acc* col_scale, Acc scale, int c, int skip) {
    return blk.col_valid()[c] && c != skip ? tempered(row[c], scale * col_scale[c]) : neg_inf<Acc>();
  };

  // Sweep 1: online (max, sum exp) of a (infonce: c) and b; kl's weighted sum against the running
  // maxima; infonce's positive c_ii (held by the half whose columns include i).
  Acc max_s = neg_inf<Acc>(), sum_s = 0, max_t = neg_inf<Acc>(), sum_t = 0, weighted = 0, positive = 0;
  blk.sweep(Side::kStudent, infonce ? Side::kTeacher : Side::kStudent, !infonce, no_fields,
            [&](int64_t col0) {
              if (!row_counts) return;
              Acc* ra = blk.tile_s() + blk.rl() * kTileLd;
              Acc* rb = blk.tile_t() + blk.rl() * kTileLd;
              const Acc* col_scale_s = blk.col_field(kColumnScaleS);
              const Acc* col_scale_t = blk.col_field(kColumnScaleT);
              const Acc scale_s = blk.row_scales_s()[blk.rl()];
              const Acc scale_t = blk.row_scales_t()[blk.rl()];
              const int own = blk.own_column(col0);
              const int skip = prm.exclude_diagonal ? own : -1;
              // the row's entries tempered in place (each thread owns its half of the row), and
              // their maxima
              Acc seen_s = neg_inf<Acc>(), seen_t = neg_inf<Acc>();
              for (int k = 0; k < kHalf; ++k) {
                const int c = blk.column(k);
                ra[c] = entry(ra, col_scale_s, scale_s, c, skip);
                seen_s = fmax(seen_s, ra[c]);
                if (infonce) continue;
                rb[c] = entry(rb, col_scale_t, scale_t, c, skip);
                seen_t = fmax(seen_t, rb[c]);
              }
              if (kl) {
                weighted = rebase_weighted(weighted, sum_t, max_s, max_t, fmax(max_s, seen_s),
                                           fmax(max_t, seen_t));
              }
              sum_s *= raise_max(max_s, seen_s);
              if (!infonce) sum_t *= raise_max(max_t, seen_t);
              const Acc shift_s = shift_of(max_s), shift_t = shift_of(max_t);
              for (int k = 0; k < kHalf; ++k) {
                const int c = blk.column(k);
                const Acc a = ra[c];
                sum_s += M::exp(a - shift_s);
                if (infonce) {
                  if (c == own) positive = a;
                  continue;
                }
                const Acc y = rb[c] - shift_t;
                const Acc e = M::exp(y);
                sum_t += e;
                if (kl) weighted += kl_weighted_term(e, a - shift_s, y);
              }
            });

  // Merge the halves through the first tile (free now): half 1 publishes, half 0 folds it in.
  Acc* scratch = blk.tile_s() + blk.rl() * kMergeFields;
  __syncthreads();
  if (blk.half() == 1) {
    const Acc mine[kMergeFields] = {max_s, sum_s, max_t, sum_t, weighted, positive};
    for (int f = 0; f < kMergeFields; ++f) scratch[f] = mine[f];
  }
  __syncthreads();
  Acc lse_s = 0, lse_t = 0;
  if (blk.half() == 0 && blk.row_counts()) {
    // the other half's (max, sum) folded into this one's
    const auto merge = [](Acc& max, Acc& sum, Acc other_max, Acc other_sum) {
      const Acc next = fmax(max, other_max);
      sum = sum * rescale(max, next) + other_sum * rescale(other_max, next);
      max = next;
    };
    if (kl) {
      const Acc next_s = fmax(max_s, scratch[0]), next_t = fmax(max_t, scratch[2]);
      weighted = rebase_weighted(weighted, sum_t, max_s, max_t, next_s, next_t) +
                 rebase_weighted(scratch[4], scratch[3], scratch[0], scratch[2], next_s, next_t);
    }
    merge(max_s, sum_s, scratch[0], scratch[1]);
    const Acc log_sum_s = M::log(sum_s);
    lse_s = max_s + log_sum_s;
    if (infonce) {
      // the diagonal lies in the tile at col0 = row0, column rl: half 1 holds it for rl >= 32
      if (blk.rl() >= kHalf) positive = scratch[5];
      write_row(lse_s - positive, lse_s, 0, 0, 0);
    } else {
      merge(max_t, sum_t, scratch[2], scratch[3]);
      const Acc log_sum_t = M::log(sum_t);
      lse_t = max_t + log_sum_t;
      if (kl) {
        const Acc r = kl_row_value(weighted, sum_t, log_sum_s, log_sum_t);
        write_row(r, lse_s, lse_t, r, 0);
      }
    }
  } else if (blk.half() == 0 && blk.i() < prm.tokens) {
    write_row(0, 0, 0, 0, 0);
  }
  if (prm.kind != RelationKind::kMse) return;

  // mse, sweep 2 with the row's lse known to both halves: sum d^2, sigma_s, sigma_t.
  __syncthreads();
  if (blk.half() == 0) {
    scratch[0] = lse_s;
    scratch[1] = lse_t;
  }
  __syncthreads();
  lse_s = scratch[0];
  lse_t = scratch[1];
  Acc squares = 0, sigma_s = 0, sigma_t = 0;
  blk.sweep(Side::kStudent, Side::kStudent, true, no_fields, [&](int64_t col0) {
    if (!blk.row_counts()) return;
    const Acc* ra = blk.tile_s() + blk.rl() * kTileLd;
    const Acc* rb = blk.tile_t() + blk.rl() * kTileLd;
    const Acc* col_scale_s = blk.col_field(kColumnScaleS);
    const Acc* col_scale_t = blk.col_field(kColumnScaleT);
    const Acc scale_s = blk.row_scales_s()[blk.rl()];
    const Acc scale_t = blk.row_scales_t()[blk.rl()];
    const int skip = prm.exclude_diagonal ? blk.own_column(col0) : -1;
    for (int k = 0; k < kHalf; ++k) {
      const int c = blk.column(k);
      if (!blk.col_valid()[c] || c == skip) continue;
      const Acc q = M::exp(tempered(ra[c], scale_s * col_scale_s[c]) - lse_s);
      const Acc p = M::exp(tempered(rb[c], scale_t * col_scale_t[c]) - lse_t);
      const Acc d = p - q;
      squares += d * d;
      sigma_s += q * d;
      sigma_t += p * d;
    }
  });
  __syncthreads();
  if (blk.half() == 1) {
    scratch[0] = squares;
    scratch[1] = sigma_s;
    scratch[2] = sigma_t;
  }
  __syncthreads();
  if (blk.half() == 0 && blk.row_counts()) {  // re-read: a predicate held through sweep 2 spills
    write_row((squares + scratch[0]) / static_cast<Acc>(columns), lse_s, lse_t, sigma_s + scratch[1],
              sigma_t + scratch[2]);
  }
}

enum class BackwardPass : int32_t {
  kSelf,            // kl / mse: rows of S_s and S_t, both gradients from one block
  kInfonceRows,     // rows of C (student tokens): dF_s
  kInfonceColumns,  // rows of C^T (teacher tokens): dF_t
};

// Backward: the block's rows of the gradients (kSelf: `first` the student's, `second` the
// teacher's; infonce: `first` the pass's) and their row_dots.
template <typename In>
__global__ void __launch_bounds__(kThreads, kMinBlocks<In>)
    relation_backward_kernel(const RelationParams prm, const BackwardPass pass,
                             const GradientTarget first, const GradientTarget second,
                             const int32_t tiles_per_group) {
  using Acc = AccOf<In>;
  using M = CudaMath<Acc>;
  const Block<In> blk(prm, tiles_per_group);
  const bool self = pass == BackwardPass::kSelf;
  const bool row_counts = blk.row_counts();
  const int columns = group_columns(prm, blk.g);
  const Side rows = pass == BackwardPass::kInfonceColumns ? Side::kTeacher : Side::kStudent;
  const Side cols = pass == BackwardPass::kInfonceRows ? Side::kTeacher : Side::kStudent;

  bool started = false;  // block-uniform: a column tile has been accumulated
  // this thread's half of c_i (relation.h) for the row of `first` and of `second`
  Acc dot_first = 0, dot_second = 0;
  if (__syncthreads_or(row_counts) && columns > 0) {
    blk.set_row_scales(rows, self, Acc(1) / *static_cast<const Acc*>(prm.temperature));
    const Acc two_over_n = Acc(2) / static_cast<Acc>(columns);
    const Acc* grad_row_loss = static_cast<const Acc*>(prm.grad_row_loss) + blk.g * prm.tokens;
    const Acc* row_stats = static_cast<const Acc*>(prm.row_stats) + blk.g * prm.tokens * kRelationStats;
    const Acc w_i = row_counts ? grad_row_loss[blk.i()] : Acc(0);
    Acc stats_i[kRelationStats] = {};
    if (row_counts) {
      for (int s = 0; s < kRelationStats; ++s) stats_i[s] = row_stats[blk.i() * kRelationStats + s];
    }
    const auto load_fields = [&](int c, int64_t j) {
      blk.col_field(kColumnWeight)[c] = grad_row_loss[j];
      for (int s = 0; s < kRelationStats; ++s) {
        blk.col_field(kColumnStats + s)[c] = row_stats[j * kRelationStats + s];
      }
    };
    const DeviceExp<Acc> exp_fn;

    blk.sweep(rows, cols, self, load_fields, [&](int64_t col0) {
      // The weights W over the tiles in place (tile_s, and tile_t for kl / mse): an entry's
      // w dr/d(entry) times its factor s_i s_j / tau (relation.h's W_ij = s_i s_j M_ij), and
      // c_i += W_ij x_ij with the raw entry x_ij.
      Acc* ms = blk.tile_s() + blk.rl() * kTileLd;
      Acc* mt = blk.tile_t() + blk.rl() * kTileLd;
      const Acc* col_scale_s = blk.col_field(kColumnScaleS);
      const Acc* col_scale_t = blk.col_field(kColumnScaleT);
      const Acc scale_s = blk.row_scales_s()[blk.rl()];
      const Acc scale_t = blk.row_scales_t()[blk.rl()];
      const int own = blk.own_column(col0);
      const int skip = prm.exclude_diagonal ? own : -1;
      const Acc* col_w = blk.col_field(kColumnWeight);
      const Acc* col_lse_s = blk.col_field(kColumnStats + kLseStudent);
      const Acc* col_lse_t = blk.col_field(kColumnStats + kLseTeacher);
      const Acc* col_stat0 = blk.col_field(kColumnStats + kRowStat0);
      const Acc* col_stat1 = blk.col_field(kColumnStats + kRowStat1);
      for (int k = 0; k < kHalf; ++k) {
        const int c = blk.column(k);
        const bool keep = row_counts && blk.col_valid()[c] && c != skip;
        if (!self) {
          // infonce rows pass: dC_ij with row i's lse and weight. Columns pass: this row is a
          // teacher token j and column c a student token i, with column i's lse and weight.
          Acc weight = 0;
          if (keep) {
            const bool by_row = pass == BackwardPass::kInfonceRows;
            const Acc lse = by_row ? stats_i[kLseStudent] : col_lse_s[c];
            const Acc w = by_row ? w_i : col_w[c];
            const Acc raw = ms[c];
            const Acc factor = scale_s * col_scale_s[c];
            weight = infonce_entry_grad(M::exp(tempered(raw, factor) - lse), c == own, w) * factor;
            dot_first += weight * raw;
          }
          ms[c] = weight;
          continue;
        }
        // kl / mse: row i's share of entry (i, j) with its statistics, row j's with the column's
        Acc weight_s = 0, weight_t = 0;
        if (keep) {
          const Acc raw_s = ms[c];
          const Acc raw_t = mt[c];
          const Acc factor_s = scale_s * col_scale_s[c];
          const Acc factor_t = scale_t * col_scale_t[c];
          const Acc a = tempered(raw_s, factor_s);
          const Acc b = tempered(raw_t, factor_t);
          Acc ds_i, dt_i, ds_j, dt_j;
          if (prm.kind == RelationKind::kKl) {
            kl_entry_grads(a, b, stats_i[kLseStudent], stats_i[kLseTeacher], stats_i[kRowStat0], w_i,
                           exp_fn, ds_i, dt_i);
            kl_entry_grads(a, b, col_lse_s[c], col_lse_t[c], col_stat0[c], col_w[c], exp_fn, ds_j, dt_j);
          } else {
            mse_entry_grads(a, b, stats_i[kLseStudent], stats_i[kLseTeacher], stats_i[kRowStat0],
                            stats_i[kRowStat1], w_i * two_over_n, exp_fn, ds_i, dt_i);
            mse_entry_grads(a, b, col_lse_s[c], col_lse_t[c], col_stat0[c], col_stat1[c],
                            col_w[c] * two_over_n, exp_fn, ds_j, dt_j);
          }
          weight_s = (ds_i + ds_j) * factor_s;
          weight_t = (dt_i + dt_j) * factor_t;
          dot_first += weight_s * raw_s;
          dot_second += weight_t * raw_t;
        }
        ms[c] = weight_s;
        mt[c] = weight_t;
      }
      if (first.out) blk.accumulate(first, blk.tile_s(), cols, col0, !started);
      if (self && second.out) blk.accumulate(second, blk.tile_t(), Side::kTeacher, col0, !started);
      started = true;
    });
  }

  // c_i's halves merged in a fixed order (half 0's + half 1's) through the first tile, free once
  // every thread is past the last accumulate; half 0 writes row_dots and rho_i (relation.h) of
  // the gradients asked for, which finish_gradient applies.
  Acc* radial = blk.tile_s() + 2 * kTile;  // rho of the rows of `first`, then of `second`
  if (started) {
    Acc* other_half = blk.tile_s();  // half 1's dot_first, then its dot_second
    __syncthreads();
    if (blk.half() == 1) {
      other_half[blk.rl()] = dot_first;
      other_half[kTile + blk.rl()] = dot_second;
    }
    __syncthreads();
    if (blk.half() == 0 && blk.i() < prm.tokens) {
      Acc* row_dots = static_cast<Acc*>(prm.row_dots) + (blk.g * prm.tokens + blk.i()) * kRelationDots;
      const auto finish_row = [&](Side side, Acc dot, int slot) {
        row_dots[side == Side::kStudent ? kDotStudent : kDotTeacher] = dot;
        radial[slot * kTile + blk.rl()] = relation_radial(blk.norms(side), blk.i(), dot);
      };
      if (first.out) finish_row(rows, dot_first + other_half[blk.rl()], 0);
      if (self && second.out) finish_row(Side::kTeacher, dot_second + other_half[kTile + blk.rl()], 1);
    }
    __syncthreads();
  }
  finish_gradient<In>(first, features<In>(prm, rows), blk.g, blk.row0, prm.tokens, started, radial);
  if (self) {
    finish_gradient<In>(second, features<In>(prm, Side::kTeacher), blk.g, blk.row0, prm.tokens,
                        started, radial + kTile);
  }
}

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DeviceLimits {
  int major = 0;
  size_t shared_optin = 0;  // dynamic shared memory a block may opt into
};

const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  int major = 0;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return cache.emplace(device, DeviceLimits{major, static_cast<size_t>(optin)}).first->second;
}

// Checks that the device runs `kernel` (16-bit features need sm_80 tensor cores; the shared
// memory must fit) and, once per device, lets it use Config<In>'s dynamic shared memory, which is
// above the default 48 KiB.
template <typename In, typename Kernel>
void prepare_kernel(Kernel kernel, int device, const char* op) {
  static std::mutex mutex;
  static std::map<int, bool> prepared;
  const std::lock_guard<std::mutex> lock(mutex);
  if (prepared.count(device)) return;
  const DeviceLimits& limits = device_limits(device);
  TORCH_CHECK(!Config<In>::kTensorCores || limits.major >= 8, op,
              " (cuda): bfloat16 / float16 features need a GPU of compute capability 8.0 or newer");
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const size_t needed = Config<In>::kSharedBytes + attributes.sharedSizeBytes;
  TORCH_CHECK(needed <= limits.shared_optin, op, " (cuda): the kernel needs ", needed,
              " bytes of shared memory per block; this GPU offers ", limits.shared_optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Config<In>::kSharedBytes)));
  prepared.emplace(device, true);
}

// The grid: one block per (group, tile of 64 tokens).
int64_t grid_of(const RelationParams& prm, const char* op) {
  const int64_t grid = prm.groups * ceil_div(prm.tokens, kTile);
  TORCH_CHECK_VALUE(prm.tokens <= std::numeric_limits<int32_t>::max() - kTile &&
                        grid <= std::numeric_limits<int32_t>::max(),
                    op, " (cuda): too many tokens (groups x tokens = ", prm.groups, " x ",
                    prm.tokens, ")");
  return grid;
}

template <typename In>
void launch_forward(const RelationParams& prm, int device, cudaStream_t stream) {
  const int64_t grid = grid_of(prm, "relation_kd_loss");
  prepare_kernel<In>(relation_forward_kernel<In>, device, "relation_kd_loss");
  relation_forward_kernel<In><<<static_cast<unsigned>(grid), kThreads, Config<In>::kSharedBytes, stream>>>(
      prm, static_cast<int32_t>(ceil_div(prm.tokens, kTile)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In>
void launch_backward(const RelationLaunch& launch, bool student_grad, bool teacher_grad, int device,
                     cudaStream_t stream) {
  constexpr const char* op = "relation_kd_loss_backward";
  const RelationParams& prm = launch.params;
  const int64_t grid = grid_of(prm, op);
  const int32_t tiles = static_cast<int32_t>(ceil_div(prm.tokens, kTile));
  prepare_kernel<In>(relation_backward_kernel<In>, device, op);
  // 16-bit features accumulate in fp32, padded so that every wmma fragment lies inside
  at::Tensor workspaces[2];
  const auto target = [&](const at::Tensor& grad, int64_t width, at::Tensor& workspace) {
    GradientTarget t;
    t.out = grad.data_ptr();
    t.width = width;
    if constexpr (Config<In>::kTensorCores) {
      t.padded_tokens = tiles * kTile;
      t.padded_width = ceil_div(width, kOutChunk) * kOutChunk;
      workspace = at::empty({prm.groups, t.padded_tokens, t.padded_width}, grad.options().dtype(at::kFloat));
      t.workspace = workspace.data_ptr<float>();
    }
    return t;
  };
  const auto run = [&](BackwardPass pass, const GradientTarget& first, const GradientTarget& second) {
    relation_backward_kernel<In><<<static_cast<unsigned>(grid), kThreads, Config<In>::kSharedBytes, stream>>>(
        prm, pass, first, second, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const GradientTarget student = student_grad ? target(launch.grad_student, prm.student_width, workspaces[0])
                                              : GradientTarget{};
  const GradientTarget teacher = teacher_grad ? target(launch.grad_teacher, prm.teacher_width, workspaces[1])
                                              : GradientTarget{};
  if (prm.kind != RelationKind::kInfonce) {
    run(BackwardPass::kSelf, student, teacher);
    return;
  }
  if (student_grad) run(BackwardPass::kInfonceRows, student, GradientTarget{});
  if (teacher_grad) run(BackwardPass::kInfonceColumns, teacher, GradientTarget{});
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> relation_kd_loss_cuda(const at::Tensor& student,
                                                         const at::Tensor& teacher,
                                                         const at::Tensor& temperature,
                                                         const std::optional<at::Tensor>& valid,
                                                         c10::string_view kind,
                                                         bool exclude_diagonal, bool normalize) {
  TORCH_CHECK_VALUE(student.is_cuda(), "relation_kd_loss (cuda): student must be a CUDA tensor; got ",
                    student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const RelationLaunch launch =
      prepare_relation(student, teacher, temperature, valid, kind, exclude_diagonal, normalize);
  const RelationParams& prm = launch.params;
  if (prm.groups * prm.tokens > 0) {
    const int device = student.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    dispatch_dtype(student.scalar_type(), "relation_kd_loss",
                   [&](auto tag) { launch_forward<decltype(tag)>(prm, device, stream); });
  }
  return {launch.row_loss, launch.row_stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_kd_loss_backward_cuda(
    const at::Tensor& grad_row_loss, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& temperature, const std::optional<at::Tensor>& valid,
    const at::Tensor& row_stats, c10::string_view kind, bool exclude_diagonal, bool normalize,
    bool student_grad, bool teacher_grad) {
  TORCH_CHECK_VALUE(student.is_cuda(),
                    "relation_kd_loss_backward (cuda): student must be a CUDA tensor; got ",
                    student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const RelationLaunch launch = prepare_relation_backward(grad_row_loss, student, teacher, temperature,
                                                          valid, row_stats, kind, exclude_diagonal,
                                                          normalize, student_grad, teacher_grad);
  const RelationParams& prm = launch.params;
  if ((student_grad || teacher_grad) && prm.groups * prm.tokens > 0) {
    const int device = student.get_device();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    dispatch_dtype(student.scalar_type(), "relation_kd_loss_backward", [&](auto tag) {
      launch_backward<decltype(tag)>(launch, student_grad, teacher_grad, device, stream);
    });
  }
  return {launch.grad_student, launch.grad_teacher, launch.row_dots};
}

}  // namespace
}  // namespace kdops::cuda

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("relation_kd_loss", &kdops::cuda::relation_kd_loss_cuda);
  m.impl("relation_kd_loss_backward", &kdops::cuda::relation_kd_loss_backward_cuda);
}
