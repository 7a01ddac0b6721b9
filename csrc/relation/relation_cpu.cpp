// relation_kd_loss on the CPU, tiled like flash attention: blocks of rows of one group at a time,
// each block's relation strips (block x N) formed by BLAS into a per-task buffer, the elementwise
// math done by the widest instruction-set build of relation_cpu_kernel.cpp, then (backward)
// dF[block] = W @ F - rho F[block] by BLAS. No N x N matrix exists and normalize makes no
// normalized copy (the kernels scale the strips by the tokens' 1 / |F|): extra memory is the strips
// (two per thread) plus O(G N) per-token arrays.
//
// Blocks are split across threads with at::parallel_for; each block's work (its GEMMs, run
// single-threaded, and its rows) is the same whichever thread runs it and however many there are,
// so results do not depend on the thread count. Backward needs no atomics and no column pass for
// kl / mse (both terms of an entry come from one tile, relation.h); infonce's teacher gradient is
// a second walk over blocks of teacher tokens. bf16 / fp16 features are converted to float32 once
// per call (the GEMMs need them whole).
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "../common/cpu_dispatch.h"
#include "relation_cpu.h"
#include "relation_op.h"

// MKL's service call, exported by a torch built with MKL; weak, so null elsewhere.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace kdops::cpu {
namespace {

// Keeps the BLAS calls of one task on its own thread. MKL called inside an OpenMP parallel region
// otherwise still synchronizes with a team it does not get: the block GEMMs ran 5-30x slower with
// two threads than with one on this project's 2-vCPU machine. Other BLAS libraries run
// sequentially inside a parallel region by themselves.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: the global setting
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

using ForwardFn = void (*)(const RelationParams&, Storage, const RelationBlock&);
using BackwardFn = void (*)(const RelationParams&, Storage, const RelationColumns&,
                            const RelationBlock&, RelationPass);

struct RelationKernels {
  ForwardFn forward;
  BackwardFn backward;
};

RelationKernels pick_kernels() {
  switch (cpu_isa()) {
#if defined(__x86_64__)
    case Isa::kAvx512: return {avx512::relation_forward_block, avx512::relation_backward_block};
    case Isa::kAvx2: return {avx2::relation_forward_block, avx2::relation_backward_block};
#endif
    default: return {baseline::relation_forward_block, baseline::relation_backward_block};
  }
}

// Rows per block: a strip of about 512 KiB (two of them stay in L2 between the GEMM that writes
// them and the sweeps that read them), but never thinner than 16 rows nor wider than 256, where
// the GEMMs lose efficiency or the buffer grows for nothing. Depends on N only, never on threads.
int64_t block_rows(int64_t tokens, int64_t element_size) {
  const int64_t target = (int64_t(1) << 19) / (std::max<int64_t>(tokens, 1) * element_size);
  return std::clamp<int64_t>(target / 16 * 16, 16, 256);
}

// The CPU kernels read params.valid unconditionally: an all-true mask stands in for None.
at::Tensor valid_or_all(RelationLaunch& launch, const std::optional<at::Tensor>& valid) {
  at::Tensor mask = valid ? launch.keepalive[1]
                          : at::ones({launch.params.groups, launch.params.tokens},
                                     launch.student.options().dtype(at::kBool));
  launch.params.valid = mask.data_ptr<bool>();
  return mask;
}

void check_temperature(const at::Tensor& temperature, std::string_view op) {
  const double tau = temperature.item<double>();
  TORCH_CHECK_VALUE(tau > 0, op, ": temperature must be > 0; got ", tau);
}

// Calls body(group, row_begin, row_end, strips) for every block of rows of every group, blocks
// split across threads; strips is the task's buffer [count, rows, N] in the accumulate type.
template <typename Body>
void for_each_block(const RelationParams& prm, int64_t rows, int64_t count,
                    const at::TensorOptions& options, const Body& body) {
  const int64_t per_group = (prm.tokens + rows - 1) / rows;
  // The block GEMMs are dispatched ops: worker threads run them with the caller's dispatcher state
  // (below autograd), not their own defaults.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, prm.groups * per_group, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard caller_state_guard(caller_state);
    const SequentialBlas sequential;
    const at::Tensor strips = at::empty({count, rows, prm.tokens}, options);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t group = block / per_group;
      const int64_t row_begin = block % per_group * rows;
      const int64_t row_end = std::min(prm.tokens, row_begin + rows);
      body(group, row_begin, row_end, strips.narrow(1, 0, row_end - row_begin));
    }
  });
}

// The kernels' per-token scales s [2, G, N] (student, teacher): 1 / max(|F|, eps) with
// normalize, ones without.
at::Tensor token_scales(const RelationLaunch& launch, const at::TensorOptions& acc_options) {
  const RelationParams& prm = launch.params;
  if (!prm.student_norm) return at::ones({2, prm.groups, prm.tokens}, acc_options);
  return at::stack({launch.norms[0], launch.norms[1]}).clamp_min(kRelationNormEps).reciprocal();
}

RelationBlock make_block(int64_t group, int64_t row_begin, int64_t row_end,
                         const at::Tensor& strips, const at::Tensor& scales) {
  RelationBlock block;
  block.student_scale = scales[0][group].data_ptr();
  block.teacher_scale = scales[1][group].data_ptr();
  block.group = group;
  block.row_begin = row_begin;
  block.row_end = row_end;
  block.ld = strips.stride(1);
  block.student_strip = strips[0].data_ptr();
  block.teacher_strip = strips.size(0) > 1 ? strips[1].data_ptr() : nullptr;
  return block;
}

// rows of a [G, N, D] tensor: group g, tokens [row_begin, row_end)
at::Tensor rows_of(const at::Tensor& features, int64_t group, int64_t row_begin, int64_t row_end) {
  return features[group].narrow(0, row_begin, row_end - row_begin);
}

// rho [rows, 1] of relation.h's backward for rows [row_begin, row_end) of `side`
// (kDotStudent, kDotTeacher), from the token norms and the c the kernel has just written.
template <typename Acc>
at::Tensor radial_rows(const RelationParams& prm, RelationDot side, int64_t group,
                       int64_t row_begin, int64_t row_end, const at::TensorOptions& acc_options) {
  at::Tensor rho = at::empty({row_end - row_begin, 1}, acc_options);
  const auto* norm = static_cast<const Acc*>(side == kDotStudent ? prm.student_norm
                                                                 : prm.teacher_norm) +
                     group * prm.tokens;
  const auto* dots = static_cast<const Acc*>(prm.row_dots) + group * prm.tokens * kRelationDots;
  auto* out = rho.data_ptr<Acc>();
  for (int64_t i = row_begin; i < row_end; ++i) {
    out[i - row_begin] = relation_radial(norm, i, dots[i * kRelationDots + side]);
  }
  return rho;
}

// grad[g, rows] = weights @ columns[g] (- rho own[g, rows] with normalize), rounded once to the
// gradient's dtype. `own` holds the rows' features, `columns` those the weights multiply.
void write_gradient(const RelationParams& prm, RelationDot side, const at::Tensor& grad,
                    const at::Tensor& weights, const at::Tensor& columns, const at::Tensor& own,
                    int64_t group, int64_t row_begin, int64_t row_end) {
  at::Tensor out = rows_of(grad, group, row_begin, row_end);
  const bool in_place = out.scalar_type() == weights.scalar_type();
  at::Tensor sum = in_place ? at::mm_out(out, weights, columns[group])
                            : at::mm(weights, columns[group]);
  if (prm.student_norm) {
    const auto options = weights.options();
    const at::Tensor rho =
        weights.scalar_type() == at::kDouble
            ? radial_rows<double>(prm, side, group, row_begin, row_end, options)
            : radial_rows<float>(prm, side, group, row_begin, row_end, options);
    sum.addcmul_(rows_of(own, group, row_begin, row_end), rho, -1);
  }
  if (!in_place) out.copy_(sum);
}

std::tuple<at::Tensor, at::Tensor> relation_kd_loss_cpu(const at::Tensor& student,
                                                        const at::Tensor& teacher,
                                                        const at::Tensor& temperature,
                                                        const std::optional<at::Tensor>& valid,
                                                        c10::string_view kind,
                                                        bool exclude_diagonal, bool normalize) {
  RelationLaunch launch =
      prepare_relation(student, teacher, temperature, valid, kind, exclude_diagonal, normalize);
  check_temperature(temperature, "relation_kd_loss");
  const at::Tensor mask = valid_or_all(launch, valid);
  const RelationParams& prm = launch.params;
  const auto acc_options = launch.row_loss.options();
  const at::Tensor fs = student.to(acc_options.dtype());
  const at::Tensor ft = teacher.to(acc_options.dtype());
  const at::Tensor scales = token_scales(launch, acc_options);
  const bool infonce = prm.kind == RelationKind::kInfonce;
  const ForwardFn forward = pick_kernels().forward;
  const Storage storage = storage_of(student.scalar_type());
  const int64_t rows = block_rows(prm.tokens, launch.row_loss.element_size());

  for_each_block(prm, rows, infonce ? 1 : 2, acc_options,
                 [&](int64_t g, int64_t r0, int64_t r1, const at::Tensor& strips) {
                   const at::Tensor student_rows = rows_of(fs, g, r0, r1);
                   at::Tensor first = strips[0];
                   at::mm_out(first, student_rows, (infonce ? ft : fs)[g].t());
                   if (!infonce) {
                     at::Tensor second = strips[1];
                     at::mm_out(second, rows_of(ft, g, r0, r1), ft[g].t());
                   }
                   forward(prm, storage, make_block(g, r0, r1, strips, scales));
                 });
  return {launch.row_loss, launch.row_stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_kd_loss_backward_cpu(
    const at::Tensor& grad_row_loss, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& temperature, const std::optional<at::Tensor>& valid,
    const at::Tensor& row_stats, c10::string_view kind, bool exclude_diagonal, bool normalize,
    bool student_grad, bool teacher_grad) {
  RelationLaunch launch = prepare_relation_backward(grad_row_loss, student, teacher, temperature,
                                                    valid, row_stats, kind, exclude_diagonal,
                                                    normalize, student_grad, teacher_grad);
  check_temperature(temperature, "relation_kd_loss_backward");
  if (!student_grad && !teacher_grad) {
    return {launch.grad_student, launch.grad_teacher, launch.row_dots};
  }
  const at::Tensor mask = valid_or_all(launch, valid);
  const RelationParams& prm = launch.params;
  const auto acc_options = launch.row_stats.options();
  const at::Tensor fs = student.to(acc_options.dtype());
  const at::Tensor ft = teacher.to(acc_options.dtype());
  const at::Tensor scales = token_scales(launch, acc_options);
  const BackwardFn backward = pick_kernels().backward;
  const Storage storage = storage_of(student.scalar_type());
  const int64_t rows = block_rows(prm.tokens, launch.row_stats.element_size());

  // Per-token arrays for the column side of every entry: w (0 off the valid rows) and the four
  // statistics slots, each [G, N] contiguous.
  const at::Tensor weight = at::where(mask, launch.keepalive[2], at::zeros({}, acc_options));
  const at::Tensor stats = launch.row_stats.permute({2, 0, 1}).contiguous();
  RelationColumns columns;
  columns.weight = weight.data_ptr();
  for (int64_t k = 0; k < kRelationStats; ++k) columns.stats[k] = stats[k].data_ptr();

  if (prm.kind != RelationKind::kInfonce) {
    for_each_block(prm, rows, 2, acc_options,
                   [&](int64_t g, int64_t r0, int64_t r1, const at::Tensor& strips) {
                     at::Tensor ms = strips[0];
                     at::Tensor mt = strips[1];
                     at::mm_out(ms, rows_of(fs, g, r0, r1), fs[g].t());
                     at::mm_out(mt, rows_of(ft, g, r0, r1), ft[g].t());
                     backward(prm, storage, columns, make_block(g, r0, r1, strips, scales),
                              RelationPass::kSelf);
                     if (student_grad) {
                       write_gradient(prm, kDotStudent, launch.grad_student, ms, fs, fs, g, r0, r1);
                     }
                     if (teacher_grad) {
                       write_gradient(prm, kDotTeacher, launch.grad_teacher, mt, ft, ft, g, r0, r1);
                     }
                   });
    return {launch.grad_student, launch.grad_teacher, launch.row_dots};
  }
  // infonce: the student's rows of C for dF_s, then the teacher's rows of C^T for dF_t.
  const auto pass = [&](RelationDot side, const at::Tensor& grad, const at::Tensor& own,
                        const at::Tensor& other) {
    const RelationPass kind_of_pass =
        side == kDotStudent ? RelationPass::kInfonceRows : RelationPass::kInfonceColumns;
    for_each_block(prm, rows, 1, acc_options,
                   [&](int64_t g, int64_t r0, int64_t r1, const at::Tensor& strips) {
                     at::Tensor m = strips[0];
                     at::mm_out(m, rows_of(own, g, r0, r1), other[g].t());
                     backward(prm, storage, columns, make_block(g, r0, r1, strips, scales),
                              kind_of_pass);
                     write_gradient(prm, side, grad, m, other, own, g, r0, r1);
                   });
  };
  if (student_grad) pass(kDotStudent, launch.grad_student, fs, ft);
  if (teacher_grad) pass(kDotTeacher, launch.grad_teacher, ft, fs);
  return {launch.grad_student, launch.grad_teacher, launch.row_dots};
}

}  // namespace
}  // namespace kdops::cpu

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("relation_kd_loss", &kdops::cpu::relation_kd_loss_cpu);
  m.impl("relation_kd_loss_backward", &kdops::cpu::relation_kd_loss_backward_cpu);
}
