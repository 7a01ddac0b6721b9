// CPU kernel entry points of relation_kd_loss. relation_cpu_kernel.cpp is compiled once per
// instruction set (see CMakeLists.txt); relation_cpu.cpp computes the relation strips with BLAS
// and hands each block of rows to the widest build the CPU runs.
#pragma once

#include <cstdint>

#include "../common/cpu_math.h"
#include "relation.h"

namespace kdops::cpu {

// Rows [row_begin, row_end) of group `group` and their strips: (rows x tokens) accumulate-type
// matrices, row stride ld, holding raw (unscaled, untempered) inner products. The kernels scale,
// temper and mask them in place and, in backward, overwrite them with the gradient weights W
// (relation.h) and write the rows' c into params.row_dots, so that
// dF[rows] = W @ F - rho F[rows].
struct RelationBlock {
  int64_t group = 0;
  int64_t row_begin = 0;
  int64_t row_end = 0;
  int64_t ld = 0;
  void* student_strip = nullptr;  // S_s rows (kl, mse); C rows, or C^T rows in the column pass
  void* teacher_strip = nullptr;  // S_t rows (kl, mse); unused for infonce
  // normalize: s = 1 / max(|F|, eps) of the group's N student and teacher tokens; nullptr: 1.
  const void* student_scale = nullptr;
  const void* teacher_scale = nullptr;
};

// What backward reads per column token, [G, N] accumulate type each, contiguous: the row weights
// w (grad_row_loss, 0 where a token does not count) and row_stats' four slots, one array each.
struct RelationColumns {
  const void* weight = nullptr;
  const void* stats[kRelationStats] = {};
};

// kSelf: kl / mse, M_s into student_strip when params.grad_student is set, M_t into
// teacher_strip when params.grad_teacher is. kInfonceRows: the block's rows are student tokens,
// M = dC / tau. kInfonceColumns: the block's rows are teacher tokens j and the strip holds
// C[:, j]^T; M = (dC / tau)^T.
enum class RelationPass : int32_t { kSelf, kInfonceRows, kInfonceColumns };

// Forward kernels need params.valid set (the CPU op passes an all-true mask when there is none).
#define KD_DECLARE_RELATION(isa)                                                              \
  namespace isa {                                                                             \
  void relation_forward_block(const RelationParams& params, Storage storage,                 \
                              const RelationBlock& block);                                    \
  void relation_backward_block(const RelationParams& params, Storage storage,                \
                               const RelationColumns& columns, const RelationBlock& block,    \
                               RelationPass pass);                                            \
  }

KD_DECLARE_RELATION(baseline)
#if defined(__x86_64__)
KD_DECLARE_RELATION(avx2)
KD_DECLARE_RELATION(avx512)
#endif

#undef KD_DECLARE_RELATION

}  // namespace kdops::cpu
