"""Triton kernels of relation_kd_loss (DESIGN.md 3.6): the ops ``kdops::relation_kd_loss_triton``
and ``kdops::relation_kd_loss_backward_triton``.

Same schemas and outputs as the C++ ops ``kdops::relation_kd_loss`` and
``kdops::relation_kd_loss_backward`` (csrc/registration.cpp), with the per-entry algebra of
csrc/relation/relation.h and the same row_stats and row_dots layouts, so that a forward of one
backend and a backward of another agree. For a row i of group g and its columns j (the valid
tokens of g, less i when exclude_diagonal), with x_ij the raw inner products of the features and
s_i the token scales (below):

    kl, mse:  a_ij = x_ij s_i s_j / tau on F_s,  b_ij the same on F_t,  q = softmax_j(a),
              p = softmax_j(b)
    infonce:  c_ij = <F_s[i], F_t[j]> s_s[i] s_t[j] / tau
    row_stats[i] = kl (lse_s, lse_t, r_i, 0)   mse (lse_s, lse_t, sigma_s, sigma_t)
                   infonce (lse_c, 0, 0, 0)

Fused normalization. With normalize the relations are those of the unit tokens u_i = s_i F_i,
s_i = 1 / max(|F_i|, 1e-12) (F.normalize's rule); without it s = 1. The op computes the norms
|F_i| once ([G, N] per side, accumulate type, torch.linalg.vector_norm) and the kernels scale each
tile of raw inner products by s_i s_j: no normalized copy of the features exists.

Tiling, as flash attention tiles its scores: a program owns BLOCK_M rows of one group and sweeps
the group's columns in blocks of BLOCK_N; each [BLOCK_M, BLOCK_N] tile of inner products is formed
with tl.dot over the feature width, BLOCK_D features at a time, accumulated in the accumulate type
(any width). A column is masked by setting its tile entry to -inf (exp gives 0) when its token is
not valid or past N, when the row's token is not valid, or when it is the row's own token
(exclude_diagonal). A row that ends with no column (not valid, or exclude_diagonal with a single
valid token) gets r_i = 0, zero statistics and a zero gradient. No N x N matrix exists: the extra
memory is O(G N): the token norms (normalize), the backward's weights and row_dots.

Forward, one program per (group, block of rows):
* kl, one sweep: online max / sum exp for both rows and, rescaled with the teacher's, the sum
  sum_j exp(b_j - m_t) (b_j - a_j); then r = that / l_t + lse_s - lse_t (relation.h's
  kl_row_value).
* mse, two sweeps: the two lse and n_i first; the second recomputes both tiles for d = p - q
  (sum d^2 / n_i, sigma_s, sigma_t).
* infonce, one sweep of C tiles: online lse and the positive c_ii, taken from the tile itself.

Backward, one program per (group, block of rows, chunk of BLOCK_DOUT gradient features). Each
program accumulates, for its rows, g_i = sum_j M_ij u_j (M as in relation.h: what multiplies the
relation tokens, 1/tau included) and the row dot c_i = <g_i, u_i> = sum_j W_ij x_ij, W_ij =
s_i s_j M_ij, taken from the same tile as sum_j d_ij e_ij (d = tau M the entry gradients, e the
entries: the same products). Then it finishes the rows: dF_i = s_i g_i - rho_i F_i, rho_i =
s_i^2 c_i (0 without normalize or for a token of norm <= 1e-12, whose Jacobian is I / eps). c_i is
the same in every chunk's program, so each applies the radial term to its own columns of F_i and
the first chunk's program stores c_i in row_dots (slot 0 student, 1 teacher), from which the
Python side takes the temperature's gradient.
* kl, mse: recompute both tiles; M_ij = (dA_ij + dA_ji) / tau, where dA_ji uses column j's saved
  statistics (S is symmetric, relation.h), then g_s[rows] += M @ U_s[cols] with tl.dot (the
  teacher likewise with dB). No atomics and no column pass: deterministic.
* infonce: the row pass (student) g_s[i] += (dC_ij / tau) @ U_t[cols] with row i's lse; the
  column pass (teacher) is the same kernel over blocks of teacher tokens j, its columns the student
  tokens i, each entry with column i's lse and weight. The positive's term is w (s - 1) in one
  step (s w - w would lose the low bits when s is near 1).
* The row's s_i is applied once at the end; the columns' s_j scale M's columns before the dot,
  except in float16, whose range cannot hold s_j M for tokens far from unit norm (1e12 for a zero
  token): there the dot takes the unit tokens s_j F_j, formed from the loaded features (which
  costs registers: spills in the loop at the default blocks, sm_90).
* The gradient accumulators stay in registers, [BLOCK_M, BLOCK_DOUT] each: a width above
  BLOCK_DOUT takes several programs per block of rows, each recomputing the tiles. That costs
  tile FLOPs for wide features but needs no scratch and no read-modify-write of partial sums.

Precision. Arithmetic in float32 (float64 for float64 features); offsets in int64.
* bfloat16 / float16 features go to tl.dot as they are (tensor cores, float32 accumulate), raw:
  the scales apply to the float32 products. The backward's M tile (and, normalizing, the unit
  tokens U) is rounded to the feature dtype before its dot, as flash attention rounds P (a
  relative 2^-9 per term for bfloat16, the size of the gradient's own final rounding).
* float32 features: the dot precision follows torch.get_float32_matmul_precision(), as PyTorch's
  own float32 matmuls do. "highest" (PyTorch's default) gives IEEE float32 products, no TF32:
  TF32 keeps 10 mantissa bits of each feature, so an entry of size 1/tau (unit tokens) is off by
  about 1e-3 / tau and every probability moves by about as much in relative terms, far beyond
  the float32 tolerance the CPU op meets. "high" / "medium" opt in to TF32. The interpreter
  (numpy) ignores the precision.
* float64 features: float64 tl.dot.

Launch shapes are the module constants below, cut down to the problem for tiny N and D. The
temperature's value is not read on the host (no sync for a device tensor): kdops.relation_kd_loss
checks it (> 0) before calling the op.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .divergence import _shape_only

KINDS = ("kl", "mse", "infonce")  # ids 0, 1, 2: RelationKind in csrc/relation/relation.h
_KL = tl.constexpr(0)
_MSE = tl.constexpr(1)
_INFONCE = tl.constexpr(2)
NUM_ROW_STATS = 4  # kRelationStats
NUM_ROW_DOTS = 2  # kRelationDots: (student, teacher)
_NORM_EPS = tl.constexpr(1e-12)  # kRelationNormEps, F.normalize's eps

# Launch shapes (see _launch_config), chosen among those that compile for sm_90 without register
# spills in bfloat16 (ptxas -v; float32's FMA products spill a few bytes). normalize adds spills
# to the kl / mse backward: in its epilogue (the radial term, outside the column loop) in
# bfloat16, inside the loop in float16 (the unit tokens) and float32. Not timed on a GPU yet.
# Module-level so that tests can force several row, column, feature and gradient blocks.
FORWARD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32)
BACKWARD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, BLOCK_DOUT=128)
NUM_WARPS = 8
# float64 blocks at most this wide, which keeps the float64 accumulators in registers
FLOAT64_CAPS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, BLOCK_DOUT=64)


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


@triton.jit
def _token_ok(valid_ptr, tokens_idx, n_tokens, HAS_VALID: tl.constexpr):
    # Which of the group's token indices exist and count (valid_ptr: the group's [N] bools).
    ok = tokens_idx < n_tokens
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + tokens_idx, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _token_scales(norm_ptr, tokens_idx, n_tokens, HAS_NORM: tl.constexpr):
    # s of the group's token indices (relation.h relation_scale): 1 / max(|F|, eps) when
    # normalizing, else 1. norm_ptr: the group's [N] norms, accumulate type (without HAS_NORM any
    # accumulate-type pointer: only its type is read).
    if HAS_NORM:
        norm = tl.load(norm_ptr + tokens_idx, mask=tokens_idx < n_tokens, other=1.0)
        scale = 1.0 / tl.maximum(norm, _NORM_EPS)
    else:
        scale = tl.full(tokens_idx.shape, 1.0, norm_ptr.dtype.element_ty)
    return scale


@triton.jit
def _entries(row_ok, rows, col_ok, cols, EXCLUDE_DIAGONAL: tl.constexpr):
    # [BLOCK_M, BLOCK_N]: whether column j is one of row i's columns.
    keep = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_DIAGONAL:
        keep = keep & (rows[:, None] != cols[None, :])
    return keep


@triton.jit
def _relation_tile(x_ptr, x_stride, rows, row_scale, y_ptr, y_stride, y_norm_ptr, cols, keep,
                   n_tokens, width, HAS_NORM: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows i of x against columns j of y (int64 token indices into the group's tokens; past N
    # they read 0), row_scale = s_i / tau. Returns the columns' s_j and the relation entries
    # <x_i, y_j> s_i s_j / tau, [BLOCK_M, BLOCK_N] in row_scale's type, -inf off `keep`. The
    # inner products BLOCK_D features at a time.
    dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=row_scale.dtype)
    row_in = rows < n_tokens
    col_in = cols < n_tokens
    for start in range(0, width, BLOCK_D):
        feats = start + tl.arange(0, BLOCK_D)
        feat_in = feats < width
        x = tl.load(x_ptr + rows[:, None] * x_stride + feats[None, :],
                    mask=row_in[:, None] & feat_in[None, :], other=0.0)
        y = tl.load(y_ptr + cols[:, None] * y_stride + feats[None, :],
                    mask=col_in[:, None] & feat_in[None, :], other=0.0)
        dots = tl.dot(x, tl.trans(y), dots, input_precision=PRECISION)
    col_scale = _token_scales(y_norm_ptr, cols, n_tokens, HAS_NORM)
    if HAS_NORM:
        dots = dots * col_scale[None, :]
    return col_scale, tl.where(keep, dots * row_scale[:, None], float("-inf"))


@triton.jit
def _self_tiles(fs, student_stride, student_width, student_norm, row_scale_s, ft, teacher_stride,
                teacher_width, teacher_norm, row_scale_t, valid, rows, row_ok, cols, n_tokens,
                HAS_VALID: tl.constexpr, HAS_NORM: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    # kl / mse: (keep, a, b) of a block of rows and columns, a and b -inf off the columns.
    keep = _entries(row_ok, rows, _token_ok(valid, cols, n_tokens, HAS_VALID), cols, EXCLUDE_DIAGONAL)
    _, a = _relation_tile(fs, student_stride, rows, row_scale_s, fs, student_stride, student_norm,
                          cols, keep, n_tokens, student_width, HAS_NORM, PRECISION, BLOCK_M,
                          BLOCK_N, BLOCK_D)
    _, b = _relation_tile(ft, teacher_stride, rows, row_scale_t, ft, teacher_stride, teacher_norm,
                          cols, keep, n_tokens, teacher_width, HAS_NORM, PRECISION, BLOCK_M,
                          BLOCK_N, BLOCK_D)
    return keep, a, b


@triton.jit
def _online_rows(x, run_max, run_sum):
    # One tile into each row's running max and sum of exp(x - max), masked entries -inf (safe
    # maximum 0 while a row has seen only those). Returns the new max and sum, the tile's
    # exp(x - max) and the factor the earlier sums were rescaled by (0 while they were empty).
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    e = tl.exp(x - safe_max[:, None])
    rescale = tl.exp(run_max - safe_max)
    return new_max, run_sum * rescale + tl.sum(e, axis=1), e, rescale


@triton.jit
def _row_values(weight_ptr, stats_ptr, idx, n_tokens):
    # The backward's per-token values of the group's tokens idx: (w, lse_s, lse_t, stat0, stat1)
    # (0 past N).
    ok = idx < n_tokens
    stats = stats_ptr + idx * 4
    return (tl.load(weight_ptr + idx, mask=ok, other=0.0), tl.load(stats, mask=ok, other=0.0),
            tl.load(stats + 1, mask=ok, other=0.0), tl.load(stats + 2, mask=ok, other=0.0),
            tl.load(stats + 3, mask=ok, other=0.0))


@triton.jit
def _kl_entry_grads(a, b, lse_s, lse_t, r, w):
    # relation.h kl_entry_grads: (w dr/da, w dr/db); a masked entry (a = b = -inf) gives 0, 0.
    log_q = a - lse_s
    log_p = b - lse_t
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    return w * (q - p), tl.where(p > 0, w * p * ((log_p - log_q) - r), 0.0)


@triton.jit
def _mse_entry_grads(a, b, lse_s, lse_t, sigma_s, sigma_t, w2n):
    # relation.h mse_entry_grads, w2n = 2 w / n: (-w2n q (d - sigma_s), w2n p (d - sigma_t)).
    q = tl.exp(a - lse_s)
    p = tl.exp(b - lse_t)
    d = p - q
    return -w2n * q * (d - sigma_s), w2n * p * (d - sigma_t)


@triton.jit
def _row_dot_terms(d, entries):
    # Each row's share of relation.h's c_i = sum_j W_ij x_ij from a tile: W_ij x_ij = d_ij e_ij,
    # d = tau M the entry gradients and e = x_ij s_i s_j / tau the entries (-inf off the columns,
    # where d = 0).
    return tl.sum(tl.where(entries == float("-inf"), 0.0, d * entries), axis=1)


@triton.jit
def _accumulate(acc, m, f_ptr, f_stride, cols, col_scale, n_tokens, out_feats, width,
                HAS_NORM: tl.constexpr, PRECISION: tl.constexpr):
    # acc += m @ U[cols, out_feats], U the columns' relation tokens (s_j F_j normalizing, else F),
    # rounded to F's dtype (tensor cores for bf16 / fp16): as (m s_j) @ F, except in float16.
    f = tl.load(f_ptr + cols[:, None] * f_stride + out_feats[None, :],
                mask=(cols < n_tokens)[:, None] & (out_feats < width)[None, :], other=0.0)
    if HAS_NORM:
        if f.dtype == tl.float16:
            # float16's range cannot hold m s_j for tokens far from unit norm
            f = (f.to(col_scale.dtype) * col_scale[:, None]).to(f.dtype)
        else:
            m = m * col_scale[None, :]
    return tl.dot(m.to(f.dtype), f, acc, input_precision=PRECISION)


@triton.jit
def _finish_rows(grad_ptr, f_ptr, f_stride, norm_ptr, scale, rows, n_tokens, out_feats, width,
                 acc, row_dot, dots_ptr, HAS_NORM: tl.constexpr):
    # A block of rows after all their columns, acc = sum_j M_ij U_j, row_dot = c_i and scale the
    # rows' s_i: c_i stored by the first chunk's program at dots_ptr (the group's row_dots, at the
    # side's slot); dF_i = s_i acc_i - rho_i F_i, rho_i = s_i^2 c_i (relation.h relation_radial),
    # rounded once into grad_ptr (the group's contiguous [N, width] gradient).
    row_in = rows < n_tokens
    feat_in = out_feats < width
    if HAS_NORM:
        norm = tl.load(norm_ptr + rows, mask=row_in, other=0.0)
        # a clamped token (|F| <= eps) has u = F / eps: no radial term
        radial = tl.where(norm > _NORM_EPS, scale * scale * row_dot, 0.0)
        f = tl.load(f_ptr + rows[:, None] * f_stride + out_feats[None, :],
                    mask=row_in[:, None] & feat_in[None, :], other=0.0)
        acc = scale[:, None] * acc - radial[:, None] * f.to(acc.dtype)
    if tl.program_id(1) == 0:
        tl.store(dots_ptr + rows * 2, row_dot, mask=row_in)
    tl.store(grad_ptr + rows[:, None] * width + out_feats[None, :], acc.to(grad_ptr.dtype.element_ty),
             mask=row_in[:, None] & feat_in[None, :])


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    student_ptr, student_group_stride, student_token_stride, student_width,
    teacher_ptr, teacher_group_stride, teacher_token_stride, teacher_width,
    tau_ptr, valid_ptr, student_norm_ptr, teacher_norm_ptr, n_tokens, row_blocks, row_loss_ptr,
    row_stats_ptr,
    KIND: tl.constexpr, HAS_VALID: tl.constexpr, HAS_NORM: tl.constexpr,
    EXCLUDE_DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_dtype = row_loss_ptr.dtype.element_ty
    pid = tl.program_id(0)
    group = (pid // row_blocks).to(tl.int64)
    rows = (pid % row_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    fs = student_ptr + group * student_group_stride
    ft = teacher_ptr + group * teacher_group_stride
    valid = valid_ptr + group * n_tokens
    student_norm = student_norm_ptr + group * n_tokens
    teacher_norm = teacher_norm_ptr + group * n_tokens
    inv_tau = 1.0 / tl.load(tau_ptr)
    row_ok = _token_ok(valid, rows, n_tokens, HAS_VALID)
    row_scale_s = _token_scales(student_norm, rows, n_tokens, HAS_NORM) * inv_tau
    row_scale_t = _token_scales(teacher_norm, rows, n_tokens, HAS_NORM) * inv_tau

    max_s = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    sum_s = tl.zeros([BLOCK_M], acc_dtype)
    max_t = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    sum_t = tl.zeros([BLOCK_M], acc_dtype)
    extra = tl.zeros([BLOCK_M], acc_dtype)  # kl: sum e^{b - max_t} (b - a); mse: n_i; infonce: c_ii
    for start in range(0, n_tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        if KIND == _INFONCE:
            keep = _entries(row_ok, rows, _token_ok(valid, cols, n_tokens, HAS_VALID), cols, False)
            _, c = _relation_tile(fs, student_token_stride, rows, row_scale_s, ft,
                                  teacher_token_stride, teacher_norm, cols, keep, n_tokens,
                                  student_width, HAS_NORM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            positive = (rows[:, None] == cols[None, :]) & keep
            extra += tl.sum(tl.where(positive, c, 0.0), axis=1)
            max_s, sum_s, _, _ = _online_rows(c, max_s, sum_s)
        else:
            keep, a, b = _self_tiles(fs, student_token_stride, student_width, student_norm,
                                     row_scale_s, ft, teacher_token_stride, teacher_width,
                                     teacher_norm, row_scale_t, valid, rows, row_ok, cols, n_tokens,
                                     HAS_VALID, HAS_NORM, EXCLUDE_DIAGONAL, PRECISION, BLOCK_M,
                                     BLOCK_N, BLOCK_D)
            max_s, sum_s, _, _ = _online_rows(a, max_s, sum_s)
            max_t, sum_t, e_t, rescale_t = _online_rows(b, max_t, sum_t)
            if KIND == _KL:
                # relation.h kl_weighted_term: a masked column (e = 0, b - a = NaN) adds 0
                extra = extra * rescale_t + tl.sum(tl.where(e_t > 0, e_t * (b - a), 0.0), axis=1)
            else:
                extra += tl.sum(keep.to(acc_dtype), axis=1)

    has_columns = sum_s > 0
    lse_s = tl.where(has_columns, max_s + tl.log(sum_s), 0.0)
    lse_t = tl.zeros([BLOCK_M], acc_dtype)
    stat0 = tl.zeros([BLOCK_M], acc_dtype)
    stat1 = tl.zeros([BLOCK_M], acc_dtype)
    if KIND == _INFONCE:
        loss = lse_s - extra
    else:
        lse_t = tl.where(has_columns, max_t + tl.log(sum_t), 0.0)
        if KIND == _KL:
            loss = extra / sum_t + (lse_s - lse_t)
            stat0 = loss
        else:
            # mse: the second sweep, against the lse now known (exp gives 0 off the columns)
            squares = tl.zeros([BLOCK_M], acc_dtype)
            for start in range(0, n_tokens, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
                _, a, b = _self_tiles(fs, student_token_stride, student_width, student_norm,
                                      row_scale_s, ft, teacher_token_stride, teacher_width,
                                      teacher_norm, row_scale_t, valid, rows, row_ok, cols, n_tokens,
                                      HAS_VALID, HAS_NORM, EXCLUDE_DIAGONAL, PRECISION, BLOCK_M,
                                      BLOCK_N, BLOCK_D)
                q = tl.exp(a - lse_s[:, None])
                p = tl.exp(b - lse_t[:, None])
                d = p - q
                squares += tl.sum(d * d, axis=1)
                stat0 += tl.sum(q * d, axis=1)
                stat1 += tl.sum(p * d, axis=1)
            loss = squares / extra

    out = group * n_tokens + rows
    row_in = rows < n_tokens
    tl.store(row_loss_ptr + out, tl.where(has_columns, loss, 0.0), mask=row_in)
    stats = row_stats_ptr + out * 4
    tl.store(stats, lse_s, mask=row_in)
    tl.store(stats + 1, lse_t, mask=row_in)
    tl.store(stats + 2, tl.where(has_columns, stat0, 0.0), mask=row_in)
    tl.store(stats + 3, tl.where(has_columns, stat1, 0.0), mask=row_in)


@triton.jit
def _self_backward_kernel(
    student_ptr, student_group_stride, student_token_stride, student_width,
    teacher_ptr, teacher_group_stride, teacher_token_stride, teacher_width,
    tau_ptr, valid_ptr, student_norm_ptr, teacher_norm_ptr, n_tokens, row_blocks, weight_ptr,
    row_stats_ptr, grad_student_ptr, grad_teacher_ptr, row_dots_ptr,
    KL: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HAS_VALID: tl.constexpr,
    HAS_NORM: tl.constexpr, EXCLUDE_DIAGONAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    # kl / mse. weight: w (kl) or 2 w / n (mse) per token, 0 off the valid rows.
    acc_dtype = row_stats_ptr.dtype.element_ty
    pid = tl.program_id(0)
    group = (pid // row_blocks).to(tl.int64)
    rows = (pid % row_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_start = tl.program_id(1) * BLOCK_DOUT
    out_feats = out_start + tl.arange(0, BLOCK_DOUT)
    fs = student_ptr + group * student_group_stride
    ft = teacher_ptr + group * teacher_group_stride
    valid = valid_ptr + group * n_tokens
    student_norm = student_norm_ptr + group * n_tokens
    teacher_norm = teacher_norm_ptr + group * n_tokens
    weights = weight_ptr + group * n_tokens
    stats = row_stats_ptr + group * n_tokens * 4
    inv_tau = 1.0 / tl.load(tau_ptr)
    row_ok = _token_ok(valid, rows, n_tokens, HAS_VALID)
    scale_s_i = _token_scales(student_norm, rows, n_tokens, HAS_NORM)
    scale_t_i = _token_scales(teacher_norm, rows, n_tokens, HAS_NORM)
    row_scale_s = scale_s_i * inv_tau
    row_scale_t = scale_t_i * inv_tau
    w_i, lse_s_i, lse_t_i, stat0_i, stat1_i = _row_values(weights, stats, rows, n_tokens)
    # the widths may differ: a chunk past one of them has nothing to do on that side
    student_live = out_start < student_width
    teacher_live = out_start < teacher_width

    acc_s = tl.zeros([BLOCK_M, BLOCK_DOUT], acc_dtype)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DOUT], acc_dtype)
    row_dot_s = tl.zeros([BLOCK_M], acc_dtype)
    row_dot_t = tl.zeros([BLOCK_M], acc_dtype)
    for start in range(0, n_tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        keep = _entries(row_ok, rows, _token_ok(valid, cols, n_tokens, HAS_VALID), cols,
                        EXCLUDE_DIAGONAL)
        scale_s_j, a = _relation_tile(fs, student_token_stride, rows, row_scale_s, fs,
                                      student_token_stride, student_norm, cols, keep, n_tokens,
                                      student_width, HAS_NORM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        scale_t_j, b = _relation_tile(ft, teacher_token_stride, rows, row_scale_t, ft,
                                      teacher_token_stride, teacher_norm, cols, keep, n_tokens,
                                      teacher_width, HAS_NORM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        w_j, lse_s_j, lse_t_j, stat0_j, stat1_j = _row_values(weights, stats, cols, n_tokens)
        # entry (i, j) is entry (j, i): row i's share with its statistics, row j's with column j's
        if KL:
            ds_i, dt_i = _kl_entry_grads(a, b, lse_s_i[:, None], lse_t_i[:, None], stat0_i[:, None],
                                         w_i[:, None])
            ds_j, dt_j = _kl_entry_grads(a, b, lse_s_j[None, :], lse_t_j[None, :], stat0_j[None, :],
                                         w_j[None, :])
        else:
            ds_i, dt_i = _mse_entry_grads(a, b, lse_s_i[:, None], lse_t_i[:, None], stat0_i[:, None],
                                          stat1_i[:, None], w_i[:, None])
            ds_j, dt_j = _mse_entry_grads(a, b, lse_s_j[None, :], lse_t_j[None, :], stat0_j[None, :],
                                          stat1_j[None, :], w_j[None, :])
        if GRAD_S:
            if student_live:
                d_s = ds_i + ds_j
                acc_s = _accumulate(acc_s, d_s * inv_tau, fs, student_token_stride, cols, scale_s_j,
                                    n_tokens, out_feats, student_width, HAS_NORM, PRECISION)
                row_dot_s += _row_dot_terms(d_s, a)
        if GRAD_T:
            if teacher_live:
                d_t = dt_i + dt_j
                acc_t = _accumulate(acc_t, d_t * inv_tau, ft, teacher_token_stride, cols, scale_t_j,
                                    n_tokens, out_feats, teacher_width, HAS_NORM, PRECISION)
                row_dot_t += _row_dot_terms(d_t, b)

    row_dots = row_dots_ptr + group * n_tokens * 2
    if GRAD_S:
        _finish_rows(grad_student_ptr + group * n_tokens * student_width, fs, student_token_stride,
                     student_norm, scale_s_i, rows, n_tokens, out_feats, student_width, acc_s,
                     row_dot_s, row_dots, HAS_NORM)
    if GRAD_T:
        _finish_rows(grad_teacher_ptr + group * n_tokens * teacher_width, ft, teacher_token_stride,
                     teacher_norm, scale_t_i, rows, n_tokens, out_feats, teacher_width, acc_t,
                     row_dot_t, row_dots + 1, HAS_NORM)


@triton.jit
def _infonce_backward_kernel(
    own_ptr, own_group_stride, own_token_stride, own_norm_ptr, other_ptr, other_group_stride,
    other_token_stride, other_norm_ptr, width, tau_ptr, valid_ptr, n_tokens, row_blocks,
    weight_ptr, row_stats_ptr, grad_ptr, row_dots_ptr,
    COLUMN_PASS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_NORM: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    # The program's rows are tokens of `own`, its columns tokens of `other`, and its tiles
    # <own_r, other_k> s_r s_k / tau: C[r, k] in the row pass (own = student), C[k, r] in the
    # column pass (own = teacher), where each entry takes the lse and weight of its student token k.
    acc_dtype = row_stats_ptr.dtype.element_ty
    pid = tl.program_id(0)
    group = (pid // row_blocks).to(tl.int64)
    rows = (pid % row_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_feats = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    f_own = own_ptr + group * own_group_stride
    f_other = other_ptr + group * other_group_stride
    own_norm = own_norm_ptr + group * n_tokens
    other_norm = other_norm_ptr + group * n_tokens
    valid = valid_ptr + group * n_tokens
    weights = weight_ptr + group * n_tokens
    stats = row_stats_ptr + group * n_tokens * 4
    inv_tau = 1.0 / tl.load(tau_ptr)
    row_ok = _token_ok(valid, rows, n_tokens, HAS_VALID)
    row_in = rows < n_tokens
    scale_r = _token_scales(own_norm, rows, n_tokens, HAS_NORM)
    row_scale = scale_r * inv_tau
    w_r = tl.load(weights + rows, mask=row_in, other=0.0)
    lse_r = tl.load(stats + rows * 4, mask=row_in, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], acc_dtype)
    row_dot = tl.zeros([BLOCK_M], acc_dtype)
    for start in range(0, n_tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_in = cols < n_tokens
        keep = _entries(row_ok, rows, _token_ok(valid, cols, n_tokens, HAS_VALID), cols, False)
        scale_k, t = _relation_tile(f_own, own_token_stride, rows, row_scale, f_other,
                                    other_token_stride, other_norm, cols, keep, n_tokens, width,
                                    HAS_NORM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        positive = rows[:, None] == cols[None, :]
        if COLUMN_PASS:
            w = tl.load(weights + cols, mask=col_in, other=0.0)[None, :]
            softmax = tl.exp(t - tl.load(stats + cols * 4, mask=col_in, other=0.0)[None, :])
        else:
            w = w_r[:, None]
            softmax = tl.exp(t - lse_r[:, None])
        # relation.h infonce_entry_grad: w (softmax - [positive])
        d = tl.where(keep, w * tl.where(positive, softmax - 1.0, softmax), 0.0)
        acc = _accumulate(acc, d * inv_tau, f_other, other_token_stride, cols, scale_k, n_tokens,
                          out_feats, width, HAS_NORM, PRECISION)
        row_dot += _row_dot_terms(d, t)
    row_dots = row_dots_ptr + group * n_tokens * 2
    if COLUMN_PASS:
        row_dots += 1  # the teacher's slot
    _finish_rows(grad_ptr + group * n_tokens * width, f_own, own_token_stride, own_norm, scale_r,
                 rows, n_tokens, out_feats, width, acc, row_dot, row_dots, HAS_NORM)


# ------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: IEEE for float64, float32 IEEE unless torch's matmul setting
    allows TF32 (see the module docstring); bf16 / fp16 products are exact either way."""
    if dtype == torch.float64 or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _launch_config(blocks: dict, tokens: int, widths: tuple[int, int], dtype: torch.dtype) -> dict:
    """`blocks` cut down to small problems (tl.dot wants every side >= 16) and, for float64, to
    FLOAT64_CAPS."""
    sizes = dict(BLOCK_M=tokens, BLOCK_N=tokens, BLOCK_D=max(widths), BLOCK_DOUT=max(widths))
    config = {}
    for name, block in blocks.items():
        if dtype == torch.float64:
            block = min(block, FLOAT64_CAPS[name])
        config[name] = max(16, min(block, triton.next_power_of_2(max(sizes[name], 1))))
    return dict(config, num_warps=NUM_WARPS)


def _check_inputs(op: str, student, teacher, temperature, valid, kind, exclude_diagonal) -> None:
    # The checks of csrc/relation/relation_op.cpp (describe_inputs), in the same order.
    if student.dim() != 3:
        raise ValueError(f"{op}: student must be 3-D [groups, tokens, width]; got {student.dim()} dims")
    if teacher.dim() != 3:
        raise ValueError(f"{op}: teacher must be 3-D [groups, tokens, width]; got {teacher.dim()} dims")
    dtype = student.dtype
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: student must be float32, float64, bfloat16 or float16; got {dtype}")
    if teacher.dtype != dtype:
        raise ValueError(f"{op}: teacher dtype {teacher.dtype} differs from the student's {dtype}")
    if teacher.device != student.device:
        raise ValueError(f"{op}: teacher is on {teacher.device} but the student is on {student.device}")
    if teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"{op}: teacher must have the student's [groups, tokens] = "
                         f"{list(student.shape[:2])}; got {list(teacher.shape)}")
    if student.shape[2] < 1 or teacher.shape[2] < 1:
        raise ValueError(f"{op}: the feature widths must be at least 1; got {student.shape[2]} and "
                         f"{teacher.shape[2]}")
    if student.stride(2) != 1 and student.shape[2] != 1:
        raise ValueError(f"{op}: the student's last dim must be contiguous")
    if teacher.stride(2) != 1 and teacher.shape[2] != 1:
        raise ValueError(f"{op}: the teacher's last dim must be contiguous")
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be kl, mse or infonce; got {kind!r}")
    if kind == "infonce":
        if student.shape[2] != teacher.shape[2]:
            raise ValueError(f"{op}: infonce needs equal student and teacher widths (project one "
                             f"first); got {student.shape[2]} and {teacher.shape[2]}")
        if exclude_diagonal:
            raise ValueError(f"{op}: exclude_diagonal does not apply to infonce (the diagonal is the positive)")
    acc = _acc_dtype(dtype)
    if temperature.dim() != 0 or temperature.dtype != acc:
        raise ValueError(f"{op}: temperature must be a 0-d {acc} tensor; got {temperature.dtype} of "
                         f"shape {tuple(temperature.shape)}")
    if valid is not None:
        groups, tokens = student.shape[:2]
        if valid.dtype != torch.bool or valid.shape != (groups, tokens):
            raise ValueError(f"{op}: valid must be a bool tensor of shape [{groups}, {tokens}]")
        if valid.device != student.device:
            raise ValueError(f"{op}: valid is on {valid.device} but the student is on {student.device}")


def _feature_args(features: torch.Tensor) -> tuple:
    return features, features.stride(0), features.stride(1), features.shape[2]


def _token_norms(student: torch.Tensor, teacher: torch.Tensor, normalize: bool,
                 placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' norm arguments: with normalize each side's token norms |F_i|, [G, N] in the
    accumulate type (the fused normalization's only extra memory); else `placeholder`, an
    accumulate-type tensor the kernels never read."""
    if not normalize:
        return placeholder, placeholder
    acc = placeholder.dtype
    return tuple(torch.linalg.vector_norm(x, dim=-1, dtype=acc).contiguous() for x in (student, teacher))


@triton_op("kdops::relation_kd_loss_triton", mutates_args=())
def relation_kd_loss_triton(
    student: torch.Tensor, teacher: torch.Tensor, temperature: torch.Tensor,
    valid: Optional[torch.Tensor], kind: str, exclude_diagonal: bool, normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """relation_kd_loss on Triton: the schema and outputs of ``kdops::relation_kd_loss`` (see the
    module docstring). Returns (row_loss [G, N], row_stats [G, N, 4]) in the accumulate type."""
    op = "relation_kd_loss"
    _check_inputs(op, student, teacher, temperature, valid, kind, exclude_diagonal)
    groups, tokens = student.shape[:2]
    device = student.device
    acc = _acc_dtype(student.dtype)
    row_loss = torch.empty((groups, tokens), dtype=acc, device=device)
    row_stats = torch.empty((groups, tokens, NUM_ROW_STATS), dtype=acc, device=device)
    if groups * tokens == 0 or _shape_only(student):
        return row_loss, row_stats

    # A CPU scalar temperature may accompany device features (a Python float): move it once.
    tau = temperature.to(device).contiguous()
    # without a mask the kernel never reads valid_ptr: any read-only pointer will do
    valid_arg = valid.contiguous() if valid is not None else tau
    student_norm, teacher_norm = _token_norms(student, teacher, normalize, tau)
    config = _launch_config(FORWARD_BLOCKS, tokens, (student.shape[2], teacher.shape[2]), student.dtype)
    row_blocks = triton.cdiv(tokens, config["BLOCK_M"])
    wrap_triton(_forward_kernel)[(groups * row_blocks,)](
        *_feature_args(student), *_feature_args(teacher), tau, valid_arg, student_norm, teacher_norm,
        tokens, row_blocks, row_loss, row_stats, KIND=KINDS.index(kind), HAS_VALID=valid is not None,
        HAS_NORM=bool(normalize), EXCLUDE_DIAGONAL=bool(exclude_diagonal),
        PRECISION=_dot_precision(student.dtype), **config,
    )
    return row_loss, row_stats


def _row_weights(grad_row_loss: torch.Tensor, valid: Optional[torch.Tensor], kind: str,
                 exclude_diagonal: bool, tokens: int) -> torch.Tensor:
    """w per token, 0 off the valid rows; times 2 / n (n the group's columns per row) for mse."""
    weight = grad_row_loss if valid is None else torch.where(valid, grad_row_loss, 0.0)
    if kind == "mse":
        counts = (torch.full_like(weight[:, :1], tokens) if valid is None
                  else valid.sum(1, keepdim=True).to(weight.dtype))
        weight = weight * 2 / (counts - int(exclude_diagonal)).clamp_min(1)
    return weight.contiguous()


@triton_op("kdops::relation_kd_loss_backward_triton", mutates_args=())
def relation_kd_loss_backward_triton(
    grad_row_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
    temperature: torch.Tensor, valid: Optional[torch.Tensor], row_stats: torch.Tensor, kind: str,
    exclude_diagonal: bool, normalize: bool, student_grad: bool, teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The feature gradients of relation_kd_loss on Triton: the schema and results of
    ``kdops::relation_kd_loss_backward`` (the input dtypes and shapes; an unrequested one is an
    empty [0] tensor) and row_dots [G, N, 2] in the accumulate type (c_i of the student, of the
    teacher; 0 where not requested and at rows that do not count)."""
    op = "relation_kd_loss_backward"
    _check_inputs(op, student, teacher, temperature, valid, kind, exclude_diagonal)
    groups, tokens = student.shape[:2]
    acc = _acc_dtype(student.dtype)
    if grad_row_loss.shape != (groups, tokens) or grad_row_loss.dtype != acc:
        raise ValueError(f"{op}: grad_row_loss must be {acc} [{groups}, {tokens}]")
    if row_stats.shape != (groups, tokens, NUM_ROW_STATS) or row_stats.dtype != acc:
        raise ValueError(f"{op}: row_stats must be {acc} [{groups}, {tokens}, {NUM_ROW_STATS}]")
    device = student.device
    if grad_row_loss.device != device or row_stats.device != device:
        raise ValueError(f"{op}: grad_row_loss and row_stats must be on the student's device {device}")

    grad_student = torch.empty(student.shape if student_grad else (0,), dtype=student.dtype, device=device)
    grad_teacher = torch.empty(teacher.shape if teacher_grad else (0,), dtype=teacher.dtype, device=device)
    row_dots = torch.zeros((groups, tokens, NUM_ROW_DOTS), dtype=acc, device=device)
    if not (student_grad or teacher_grad) or groups * tokens == 0 or _shape_only(student):
        return grad_student, grad_teacher, row_dots

    tau = temperature.to(device).contiguous()
    weight = _row_weights(grad_row_loss, valid, kind, exclude_diagonal, tokens)
    # saved tensors may arrive non-contiguous (e.g. from a traced graph): the kernels index densely
    stats = row_stats.contiguous()
    valid_arg = valid.contiguous() if valid is not None else tau
    student_norm, teacher_norm = _token_norms(student, teacher, normalize, tau)
    widths = (student.shape[2], teacher.shape[2])
    config = _launch_config(BACKWARD_BLOCKS, tokens, widths, student.dtype)
    row_blocks = triton.cdiv(tokens, config["BLOCK_M"])
    common = dict(HAS_VALID=valid is not None, HAS_NORM=bool(normalize),
                  PRECISION=_dot_precision(student.dtype), **config)

    if kind != "infonce":
        chunks = triton.cdiv(max(widths), config["BLOCK_DOUT"])
        wrap_triton(_self_backward_kernel)[(groups * row_blocks, chunks)](
            *_feature_args(student), *_feature_args(teacher), tau, valid_arg, student_norm,
            teacher_norm, tokens, row_blocks, weight, stats, grad_student, grad_teacher, row_dots,
            KL=kind == "kl", GRAD_S=bool(student_grad), GRAD_T=bool(teacher_grad),
            EXCLUDE_DIAGONAL=bool(exclude_diagonal), **common,
        )
        return grad_student, grad_teacher, row_dots

    chunks = triton.cdiv(widths[0], config["BLOCK_DOUT"])
    # the row pass (own = student) and the column pass (own = teacher)
    passes = ((student_grad, grad_student, student, student_norm, teacher, teacher_norm, False),
              (teacher_grad, grad_teacher, teacher, teacher_norm, student, student_norm, True))
    for wanted, grad, own, own_norm, other, other_norm, column_pass in passes:
        if wanted:
            wrap_triton(_infonce_backward_kernel)[(groups * row_blocks, chunks)](
                own, own.stride(0), own.stride(1), own_norm, other, other.stride(0), other.stride(1),
                other_norm, widths[0], tau, valid_arg, tokens, row_blocks, weight, stats, grad,
                row_dots, COLUMN_PASS=column_pass, **common,
            )
    return grad_student, grad_teacher, row_dots
