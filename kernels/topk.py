"""Triton kernel of topk_kd_loss (DESIGN.md 3.2): the op ``kdops::topk_kd_loss_triton``.

Same schema and output contract as the C++ op ``kdops::topk_kd_loss`` (csrc/registration.cpp,
csrc/topk/topk_op.cpp) and the same per-row algebra (csrc/topk/topk.h), with kd_loss's
per-element terms (``_element_terms`` of kernels/divergence.py):

    a = z / tau on the V logits, b_k = teacher_logprobs_k / tau on the K ids
    lp = log_softmax_K(b) (renormalize) or b as given;  p = exp(lp)
    lq_k = a[id_k] - logsumexp_V(a)  (exact fkl)  or  a[id_k] - logsumexp_K(a[ids])  (the others)
    loss_k, u_k = q_k dL/dq_k, v_k = p_k dL/dp_k;   U = sum u, W = sum v
    dL/da_j = dense_j + sum_{k: id_k = j} c_k
        exact fkl: dense_j = -q_j U, c_k = u_k        others: dense_j = 0, c_k = u_k - q_k U
    dL/db_k = v_k - p_k W (renormalize) or v_k
    dL/dtau = -(1/tau) (sum_j dL/da_j lq_j + sum_k dL/db_k lp_k), where the exact fkl's student
        sum is sum_k u_k lq_k - U sum_j q_j lq_j (the full row's sum q log q)

Kernel layout. One program per row; arithmetic in float32, offsets in int64 (N * V > 2^31 works).

* Sweep 1 (exact fkl only): online max / sum of exp(a - max) over BLOCK_V tiles, each tile
  loaded before the arithmetic on the previous one; with a temperature gradient also
  sum exp(a - max)(a - max), which gives the row's sum q log q.
* K phase, in BLOCK_K blocks of the entries: the teacher's log-sum-exp (renormalize) and the
  support's log-sum-exp of a[ids] (not exact fkl); then loss, U and W; then the teacher and
  temperature gradients. The first block (ids, gathered logits, log-probabilities) is loaded
  before sweep 1, which hides its latency; when K <= BLOCK_K (64: the usual top-k) it is the
  only block and every K pass works on registers. Larger K reload each block per pass
  (K * 8 to 12 bytes, and K gathered logits from cache).
* Sweep 2 (student gradient): the dense term of every logit (exact fkl q_j * sum_k p_k, the
  others 0). Its tiles go in reverse order: the tiles sweep 1 read last are re-read first,
  while they are most likely still in L2.
* After a barrier, the gradient at the K ids is overwritten with the exact float32
  dense_j + sum of c_k' over every k' with id_k' == j (blocked K x K id compares), so duplicate
  ids add up and the rounded value sweep 2 stored there is never read back.

Bytes moved per row, with e the logit size (2 for bf16 / fp16): exact fkl V e read (loss only),
or V e read + V e re-read (sweep 2, from L2 where it still holds the row) + V e written (student
gradient); the other divergences K e gathered, plus V e of zeros written with the student
gradient. Plus the K ids and log-probabilities, and the [K] teacher gradient in float32.

Masked rows (valid == False) are never read: loss, gradients and temperature gradient are zeros.
A counted row with an id outside [0, V) reads and writes nothing there; its loss and every
gradient of the row are NaN (the Python wrapper checks the ids first). The reduction's scale
(mean: 1 / number of valid rows, 0 if none, computed on the device; normalizer: 1 / normalizer;
sum / none: 1) is folded into the gradients, with tau^2 (t2_scale) and 1 / tau.

Float64 logits are not supported by the Triton backend (use the cpu or cuda backend).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .divergence import (
    AUTOTUNE_ENV, FKL, JSD, RKL, SKEW_FKL, SKEW_RKL, TVD, _element_terms, _shape_only,
    check_loss_options,
)
from .scale import reduction_scale

_DIVERGENCE_NAMES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
MAX_K = 4096  # kTopKMaxK in csrc/topk/topk.h

# Launch shape (see _launch_config). Module-level so that tests can force several vocabulary
# tiles and K blocks on small problems (they monkeypatch MAX_BLOCK_V / MAX_BLOCK_K).
MAX_BLOCK_V = 4096  # kernels/divergence.py's fkl tile: 4096 wide, 8 warps
NUM_WARPS = 8
MAX_BLOCK_K = 64  # the K x K id compare holds BLOCK_K^2 lanes


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


@triton.jit
def _online_logsumexp(x, run_max, run_sum, run_xlogx, WITH_XLOGX: tl.constexpr):
    # One 1-D block of an online max / sum exp(x - max), optionally also
    # sum exp(x - max) (x - max); all three are relative to the running maximum and rescaled when
    # it moves (safe maximum: 0 while everything so far is -inf).
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    shifted = x - safe_max
    e = tl.exp(shifted)
    rescale = tl.exp(run_max - safe_max)  # 0 while nothing has been accumulated
    new_sum = run_sum * rescale + tl.sum(e, axis=0)
    if WITH_XLOGX:
        # old terms e' = e * rescale, shifted' = shifted + (old max - new max); a rescale that
        # underflows to 0 drops them, as their float32 weights would against the final maximum
        old_safe = tl.where(run_max == float("-inf"), 0.0, run_max)
        old = rescale * (run_xlogx + run_sum * (old_safe - safe_max))
        run_xlogx = tl.where(rescale == 0.0, 0.0, old) + tl.sum(tl.where(e == 0.0, 0.0, e * shifted), axis=0)
    return new_max, new_sum, run_xlogx


@triton.jit
def _load_k_block(s_row, ids_row, lp_row, start, K, V, inv_tau, BLOCK_K: tl.constexpr):
    # One block of the K entries: (offsets, in K, ids, id usable, a[id], b). Lanes past K read
    # id -1 (never equal to a usable id) and a = b = -inf, so they add nothing to any sum. An id
    # outside [0, V) reads nothing and gives a = NaN.
    offs = start + tl.arange(0, BLOCK_K)
    in_k = offs < K
    ids = tl.load(ids_row + offs, mask=in_k, other=-1).to(tl.int64)
    id_ok = (ids >= 0) & (ids < V)
    z = tl.load(s_row + ids, mask=id_ok, other=float("-inf"))
    a = tl.where(in_k & ~id_ok, float("nan"), z.to(tl.float32) * inv_tau)
    b = tl.load(lp_row + offs, mask=in_k, other=float("-inf")) * inv_tau
    return offs, in_k, ids, id_ok, a, b


@triton.jit
def _k_block(s_row, ids_row, lp_row, start, K, V, inv_tau, first_block,
             BLOCK_K: tl.constexpr, ONE_K_BLOCK: tl.constexpr):
    # The K entries' block at `start`: the preloaded first block when it is the only one
    if ONE_K_BLOCK:
        return first_block
    return _load_k_block(s_row, ids_row, lp_row, start, K, V, inv_tau, BLOCK_K)


@triton.jit
def _k_block_terms(a, b, stu_max, stu_log_sum, tea_max, tea_log_sum, coef,
                   DIV: tl.constexpr, RENORMALIZE: tl.constexpr):
    # (q, p, lq, lp, loss, u, v) of one block. Log-probabilities are (x - max) - log(sum), never
    # x - lse with the lse rounded to one float32 number (a relative error shared by the row).
    lq = (a - stu_max) - stu_log_sum
    if RENORMALIZE:
        lp = (b - tea_max) - tea_log_sum
    else:
        lp = b
    q = tl.exp(lq)
    p = tl.exp(lp)
    loss, u, v = _element_terms(q, p, lq, lp, coef, DIV)
    return q, p, lq, lp, loss, u, v


@triton.jit
def _temperature_terms(grad, logprob):
    # sum_k grad_k * logprob_k, skipping grad == 0 (where logprob may be -inf)
    return tl.sum(tl.where(grad != 0.0, grad * logprob, 0.0), axis=0)


@triton.jit
def _fill(ptr, n, value, BLOCK: tl.constexpr):
    # ptr[0:n] = value (a float32 scalar), converted to ptr's element type
    offs = tl.arange(0, BLOCK)
    tile = (tl.zeros([BLOCK], tl.float32) + value).to(ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        tl.store(ptr + start + offs, tile, mask=start + offs < n)


# ------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------


# The 0/1 flags are plain runtime arguments (no specialization on their values): fewer compiled
# variants per divergence, gradient set and tile shape.
@triton.jit(do_not_specialize=["tau_stride", "has_valid", "t2_scale"])
def _topk_kd_loss_kernel(
    s_ptr, s_stride, ids_ptr, lp_ptr,
    tau_ptr, tau_stride, valid_ptr, has_valid, scale_ptr,
    loss_ptr, gs_ptr, gt_ptr, gtau_ptr,
    V, K, coef, t2_scale,
    DIV: tl.constexpr, FULL_VOCAB: tl.constexpr, RENORMALIZE: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, GRAD_TAU: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K_BLOCK: tl.constexpr,
):
    ANY_GRAD: tl.constexpr = GRAD_S or GRAD_T or GRAD_TAU
    NEG_INF: tl.constexpr = float("-inf")

    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    ids_row = ids_ptr + row * K
    lp_row = lp_ptr + row * K
    gs_row = gs_ptr + row * V
    gt_row = gt_ptr + row * K
    cols = tl.arange(0, BLOCK_V)

    live = True
    if has_valid != 0:
        live = tl.load(valid_ptr + row) != 0

    if live:
        tau = tl.load(tau_ptr + row * tau_stride).to(tl.float32)
        inv_tau = 1.0 / tau
        # The first block of the K entries is loaded now, so that sweep 1 hides its latency; with
        # ONE_K_BLOCK (K <= BLOCK_K, the common case) it is the only one, and every K pass below
        # works on registers.
        first_block = _load_k_block(s_row, ids_row, lp_row, 0, K, V, inv_tau, BLOCK_K)

        # student statistics: sweep 1 over the full row (exact fkl) or the support (the others)
        stu_max = tl.full([], NEG_INF, tl.float32)
        stu_sum = tl.zeros([], tl.float32)
        stu_xlogx = tl.zeros([], tl.float32)
        if FULL_VOCAB:
            z_next = tl.load(s_row + cols, mask=cols < V, other=NEG_INF)
            for start in range(0, V, BLOCK_V):
                a = z_next.to(tl.float32) * inv_tau
                next_cols = start + BLOCK_V + cols
                z_next = tl.load(s_row + next_cols, mask=next_cols < V, other=NEG_INF)
                stu_max, stu_sum, stu_xlogx = _online_logsumexp(a, stu_max, stu_sum, stu_xlogx, GRAD_TAU)
        tea_max = tl.full([], NEG_INF, tl.float32)
        tea_sum = tl.zeros([], tl.float32)
        if RENORMALIZE or not FULL_VOCAB:
            for start in range(0, K, BLOCK_K):
                _, _, _, _, a, b = _k_block(s_row, ids_row, lp_row, start, K, V, inv_tau, first_block,
                                            BLOCK_K, ONE_K_BLOCK)
                if RENORMALIZE:
                    tea_max, tea_sum, _ = _online_logsumexp(b, tea_max, tea_sum, 0.0, False)
                if not FULL_VOCAB:
                    stu_max, stu_sum, _ = _online_logsumexp(a, stu_max, stu_sum, 0.0, False)
        stu_max = tl.where(stu_max == NEG_INF, 0.0, stu_max)
        tea_max = tl.where(tea_max == NEG_INF, 0.0, tea_max)
        stu_log_sum = tl.log(stu_sum)
        tea_log_sum = tl.log(tea_sum)

        # loss and the side sums U, W (and the exact fkl's sum u lq for the temperature)
        row_loss = tl.zeros([], tl.float32)
        side_s = tl.zeros([], tl.float32)
        side_t = tl.zeros([], tl.float32)
        tau_sum = tl.zeros([], tl.float32)
        n_bad = tl.zeros([], tl.int32)
        for start in range(0, K, BLOCK_K):
            _, in_k, _, id_ok, a, b = _k_block(s_row, ids_row, lp_row, start, K, V, inv_tau, first_block,
                                               BLOCK_K, ONE_K_BLOCK)
            q, p, lq, lp, loss, u, v = _k_block_terms(
                a, b, stu_max, stu_log_sum, tea_max, tea_log_sum, coef, DIV, RENORMALIZE)
            row_loss += tl.sum(loss, axis=0)
            side_s += tl.sum(u, axis=0)
            side_t += tl.sum(v, axis=0)
            n_bad += tl.sum((in_k & ~id_ok).to(tl.int32), axis=0)
            if FULL_VOCAB and GRAD_TAU:
                tau_sum += _temperature_terms(u, lq)

        t2 = tl.where(t2_scale != 0, tau * tau, 1.0)
        bad_row = n_bad > 0
        row_loss = tl.where(bad_row, float("nan"), row_loss)
        tl.store(loss_ptr + row, row_loss * t2)

        if ANY_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            grad_scale = tl.where(bad_row, float("nan"), scale * t2 * inv_tau)

        # teacher gradient and the temperature's sums
        if GRAD_T or GRAD_TAU:
            for start in range(0, K, BLOCK_K):
                offs, in_k, _, _, a, b = _k_block(s_row, ids_row, lp_row, start, K, V, inv_tau, first_block,
                                                  BLOCK_K, ONE_K_BLOCK)
                q, p, lq, lp, loss, u, v = _k_block_terms(
                    a, b, stu_max, stu_log_sum, tea_max, tea_log_sum, coef, DIV, RENORMALIZE)
                if RENORMALIZE:
                    db = v - p * side_t
                else:
                    db = v
                if GRAD_T:
                    tl.store(gt_row + offs, db * grad_scale, mask=in_k)
                if GRAD_TAU:
                    tau_sum += _temperature_terms(db, lp)
                    if not FULL_VOCAB:
                        tau_sum += _temperature_terms(u - q * side_s, lq)
        if GRAD_TAU:
            if FULL_VOCAB:
                # the dense term's share, -U sum_j q_j lq_j, with sum q lq = xlogx / sum - log sum
                tau_sum -= side_s * (stu_xlogx / stu_sum - stu_log_sum)
            # d(t2 L)/dtau = t2' L + t2 dL/dtau with dL/dtau = -tau_sum / tau
            dt2 = tl.where(t2_scale != 0, 2.0 * tau, 0.0)
            g_tau = scale * (dt2 * row_loss - t2 * tau_sum * inv_tau)
            tl.store(gtau_ptr + row, tl.where(bad_row, float("nan"), g_tau))

        if GRAD_S:
            # sweep 2: the dense term of every logit, tiles in reverse order (see the docstring)
            if FULL_VOCAB:
                dense_scale = -side_s * grad_scale
                n_tiles = tl.cdiv(V, BLOCK_V)
                last = (n_tiles - 1) * BLOCK_V
                z_next = tl.load(s_row + last + cols, mask=last + cols < V, other=NEG_INF)
                for i in range(0, n_tiles):
                    start = last - i * BLOCK_V
                    a = z_next.to(tl.float32) * inv_tau
                    next_cols = start - BLOCK_V + cols
                    z_next = tl.load(s_row + next_cols, mask=next_cols >= 0, other=NEG_INF)
                    q = tl.exp((a - stu_max) - stu_log_sum)
                    tl.store(gs_row + start + cols, (q * dense_scale).to(gs_ptr.dtype.element_ty),
                             mask=start + cols < V)
            else:
                _fill(gs_row, V, tl.where(bad_row, float("nan"), 0.0), BLOCK_V)
            # every dense store of this program lands before the overwrites at the ids
            tl.debug_barrier()
            # the exact gradient at the ids: dense + the c of every entry with the same id
            for start_i in range(0, K, BLOCK_K):
                _, _, ids_i, ok_i, a, b = _k_block(s_row, ids_row, lp_row, start_i, K, V, inv_tau, first_block,
                                                   BLOCK_K, ONE_K_BLOCK)
                q, p, lq, lp, loss, u, v = _k_block_terms(
                    a, b, stu_max, stu_log_sum, tea_max, tea_log_sum, coef, DIV, RENORMALIZE)
                if FULL_VOCAB:
                    grad = -q * side_s
                else:
                    grad = tl.zeros([BLOCK_K], tl.float32)
                for start_j in range(0, K, BLOCK_K):
                    _, _, ids_j, _, a, b = _k_block(s_row, ids_row, lp_row, start_j, K, V, inv_tau,
                                                    first_block, BLOCK_K, ONE_K_BLOCK)
                    q, p, lq, lp, loss, u, v = _k_block_terms(
                        a, b, stu_max, stu_log_sum, tea_max, tea_log_sum, coef, DIV, RENORMALIZE)
                    if FULL_VOCAB:
                        c = u
                    else:
                        c = u - q * side_s
                    same_id = ids_i[:, None] == ids_j[None, :]
                    grad += tl.sum(tl.where(same_id, c[None, :], 0.0), axis=1)
                tl.store(gs_row + ids_i, (grad * grad_scale).to(gs_ptr.dtype.element_ty), mask=ok_i)
    else:
        # a row that does not count: zeros, and its logits, ids and temperature are never read
        tl.store(loss_ptr + row, 0.0)
        if GRAD_TAU:
            tl.store(gtau_ptr + row, 0.0)
        if GRAD_T:
            _fill(gt_row, K, 0.0, BLOCK_K)
        if GRAD_S:
            _fill(gs_row, V, 0.0, BLOCK_V)


# ------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------


def _launch_config(vocab: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_K, num_warps). Depends on V and K only, not on N, so torch.compile with
    dynamic shapes guards on V and K alone."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(int(vocab)))
    block_k = min(MAX_BLOCK_K, max(16, triton.next_power_of_2(int(k))))
    num_warps = max(1, min(NUM_WARPS, block_v // 256))  # at least 8 logits per thread
    return block_v, block_k, num_warps


def _autotune_configs() -> list:
    # For the GPU check (KDOPS_TRITON_AUTOTUNE=1): the vocabulary tile and warps of long rows.
    # They also set how many rows are in flight per SM, hence whether sweep 2's re-read of the
    # row still hits L2. Every output element is written on each launch, so re-running
    # configurations while tuning is harmless.
    return [
        triton.Config({"BLOCK_V": block_v}, num_warps=warps)
        for block_v, warps in ((2048, 4), (4096, 8), (4096, 16), (8192, 16), (8192, 32))
    ]


_topk_kd_loss_kernel_autotuned = triton.autotune(
    configs=_autotune_configs(),
    key=["V", "K", "DIV", "FULL_VOCAB", "RENORMALIZE", "GRAD_S", "GRAD_T", "GRAD_TAU"],
)(_topk_kd_loss_kernel)


def _use_autotune(vocab: int) -> bool:
    return (
        os.environ.get(AUTOTUNE_ENV) == "1"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and int(vocab) > MAX_BLOCK_V
    )


def _divergence_plan(name: str, beta: float, alpha: float) -> tuple[int, bool, float]:
    """(divergence id, exact full-vocabulary fkl, coef) as parse_topk_divergence in
    csrc/topk/topk_op.cpp: the jsd / skew endpoints become the plain KLs on the support; the exact
    fkl is only ever asked for by name."""
    if name == "fkl":
        return FKL, True, alpha
    if name == "rkl":
        return RKL, False, alpha
    if name == "jsd":
        div = FKL if beta == 0.0 else RKL if beta == 1.0 else JSD
        return div, False, beta
    if name == "skew_fkl":
        return (FKL if alpha == 0.0 else SKEW_FKL), False, alpha
    if name == "skew_rkl":
        return (RKL if alpha == 0.0 else SKEW_RKL), False, alpha
    if name == "tvd":
        return TVD, False, alpha
    raise ValueError(
        f"topk_kd_loss: divergence must be one of {', '.join(_DIVERGENCE_NAMES)}; got {name!r}"
    )


def _check_args(student, ids, logprobs, temperature, valid, normalizer, beta, alpha, reduction):
    # The checks of csrc/topk/topk_op.cpp, in the same order, before any launch.
    if student.dim() != 2:
        raise ValueError(f"topk_kd_loss: student must be 2-D [rows, vocab]; got {student.dim()} dims")
    if student.dtype == torch.float64:
        raise ValueError(
            "topk_kd_loss: the triton backend does not support float64 logits (float32, bfloat16 "
            "or float16 only); use the cpu or cuda backend for float64"
        )
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"topk_kd_loss: student must be float32, bfloat16 or float16 on the triton backend; "
            f"got {student.dtype}"
        )
    rows, vocab = student.shape
    if vocab <= 0:
        raise ValueError("topk_kd_loss: vocab (last dim) must be at least 1")
    if student.stride(1) != 1:
        raise ValueError("topk_kd_loss: the student's last dim must be contiguous")
    if ids.dim() != 2 or ids.shape[0] != rows:
        raise ValueError(f"topk_kd_loss: teacher_ids must have shape [{rows}, K]; got {list(ids.shape)}")
    k = ids.shape[1]
    if not 1 <= k <= min(vocab, MAX_K):
        raise ValueError(
            f"topk_kd_loss: K (teacher_ids.size(-1)) must be in [1, min(V, {MAX_K})] = "
            f"[1, {min(vocab, MAX_K)}]; got {k}"
        )
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_kd_loss: teacher_ids must be int64 or int32; got {ids.dtype}")
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"topk_kd_loss: teacher_logprobs must have teacher_ids' shape {list(ids.shape)}; "
            f"got {list(logprobs.shape)}"
        )
    if logprobs.dtype != torch.float32:
        raise ValueError(
            f"topk_kd_loss: teacher_logprobs must be float32 for {student.dtype} logits; got {logprobs.dtype}"
        )
    if ids.device != student.device or logprobs.device != student.device:
        raise ValueError(
            f"topk_kd_loss: teacher_ids and teacher_logprobs must be on the student's device {student.device}"
        )
    check_loss_options("topk_kd_loss", student, temperature, valid, normalizer, beta, alpha,
                       reduction)


@triton_op("kdops::topk_kd_loss_triton", mutates_args=())
def topk_kd_loss_triton(
    student: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: torch.Tensor,
    valid: Optional[torch.Tensor],
    normalizer: Optional[torch.Tensor],
    divergence: str,
    beta: float,
    alpha: float,
    renormalize: bool,
    reduction: str,
    t2_scale: bool,
    grad_student: bool,
    grad_teacher: bool,
    grad_temperature: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_kd_loss on Triton: the schema and outputs of ``kdops::topk_kd_loss`` (see the module
    docstring).

    Returns (loss, grad_student, grad_teacher, grad_temperature): the float32 loss (0-d, or [N]
    for reduction="none") and the requested gradients already scaled by the reduction: student
    [N, V] in the logits' dtype, teacher log-probabilities [N, K] float32, temperature [N]
    float32; fresh empty [0] tensors for the gradients not requested.
    """
    _check_args(student, teacher_ids, teacher_logprobs, temperature, valid, normalizer, beta, alpha,
                reduction)
    div_id, full_vocab, coef = _divergence_plan(divergence, beta, alpha)
    rows, vocab = student.shape
    k = teacher_ids.shape[1]
    device = student.device
    acc = torch.float32

    ids = teacher_ids.contiguous()
    logprobs = teacher_logprobs.contiguous()
    # A CPU scalar temperature may accompany device logits (a Python float): move it once.
    tau = temperature.to(device).contiguous()
    scale = reduction_scale(reduction, valid, normalizer, rows, device)

    loss_rows = torch.empty((rows,), dtype=acc, device=device)
    g_student = torch.empty((rows, vocab) if grad_student else (0,), dtype=student.dtype, device=device)
    g_teacher = torch.empty((rows, k) if grad_teacher else (0,), dtype=acc, device=device)
    g_tau = torch.empty((rows,) if grad_temperature else (0,), dtype=acc, device=device)

    if rows > 0 and not _shape_only(student):
        # without a mask the kernel never reads valid_ptr: any pointer will do (the read-only
        # scale, so that no output is aliased)
        valid_arg = valid.contiguous() if valid is not None else scale
        block_v, block_k, num_warps = _launch_config(vocab, k)
        args = (
            student, student.stride(0), ids, logprobs,
            tau, 0 if tau.dim() == 0 else 1, valid_arg, int(valid is not None), scale,
            loss_rows, g_student, g_teacher, g_tau,
            vocab, k, float(coef), int(bool(t2_scale)),
        )
        common = dict(
            DIV=div_id, FULL_VOCAB=full_vocab, RENORMALIZE=bool(renormalize),
            GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher), GRAD_TAU=bool(grad_temperature),
            BLOCK_K=block_k, ONE_K_BLOCK=k <= block_k,
        )
        if _use_autotune(vocab):
            wrap_triton(_topk_kd_loss_kernel_autotuned)[(rows,)](*args, **common)
        else:
            wrap_triton(_topk_kd_loss_kernel)[(rows,)](*args, **common, BLOCK_V=block_v, num_warps=num_warps)

    loss = loss_rows if reduction == "none" else loss_rows.sum() * scale
    return loss, g_student, g_teacher, g_tau
