"""Triton kernels of kd_loss (DESIGN.md 3.1): the op ``kdops::kd_loss_triton``.

Same schema and output contract as the C++ op ``kdops::kd_loss`` (csrc/registration.cpp,
csrc/divergence/divergence_op.cpp) and the same per-element math (csrc/divergence/divergence.h):

    loss_k, u_k = q_k dL/dq_k, v_k = p_k dL/dp_k;   U = sum u, W = sum v
    dL/da_k = u_k - q_k U        dL/db_k = v_k - p_k W        (a = z_s / tau, b = z_t / tau)
    dL/dtau = -(1/tau) sum_k (dL/da_k lq_k + dL/db_k lp_k)

Kernel layout. A program owns BLOCK_N rows (1 for long rows) and walks the vocabulary in BLOCK_V
tiles; arithmetic in float32, row offsets in int64 (N * V > 2^31 works).

* Sweep 1 (statistics): online max / sum of exp of both rows. For fkl and rkl the loss is folded
  into it: with x the side that weighs the KL (teacher b for fkl, student a for rkl) and y the
  other, KL = T / s_x - log s_x + log s_y, s_x = sum exp(x - m_x) and
  T = sum exp(x - m_x) ((x - m_x) - (y - m_y)), both rescaled whenever a running maximum moves.
* fkl / rkl: the side sums follow in closed form (fkl: U = -1, W = L + 1; rkl: U = L + 1,
  W = -1), so the gradient sweep comes next: 1 sweep forward-only, 2 with any gradient.
* jsd, skew_fkl, skew_rkl, tvd: sweep 2 sums loss, U and W; sweep 3 writes the gradients and the
  temperature's sum. 2 sweeps forward-only, 3 with any gradient.
* Log-probabilities are (x - m) - log s (never x - lse with lse formed as one float32 number,
  whose rounding of ~eps |m| would be a relative error shared by the whole row).
* Short rows (next_power_of_2(V) <= SINGLE_MAX_V) are loaded once and every sweep works on
  registers, several rows per program. Long rows: the tile loops load the next tile before the
  arithmetic on the current one (its loads are in flight meanwhile); the later sweeps re-read
  the row, mostly from L2 when few rows are in flight (one program per SM for fkl / rkl).

Bytes moved per logit element, with e the element size (2 for bf16/fp16) and g the number of
logit gradients requested (0, 1 or 2): short rows 2e + g e for every divergence. Long rows: fkl /
rkl 2e (forward) or 2 * 2e + g e (the second read of 2e from L2 when it hits); the others
2 * 2e (forward) or 3 * 2e + g e.

Masked rows (valid == False) are never read: their loss, temperature gradient and gradient rows are
written as zeros. The reduction's scale (mean: 1 / number of valid rows, 0 if none, computed on
the device; normalizer: 1 / normalizer; sum / none: 1) is folded into the gradients, with tau^2
(t2_scale) and 1 / tau, as in the C++ kernels. Rows whose loss is truly infinite (a probability
> 0 against one that is 0) give +inf; their gradients are not meaningful (they may differ from
the C++ kernels' there).

Float64 logits are not supported by the Triton backend (use the cpu or cuda backend).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .scale import reduction_scale

# Divergence ids: the same numbering as kdops::Divergence in csrc/divergence/divergence.h.
FKL, RKL, JSD, SKEW_FKL, SKEW_RKL, TVD = 0, 1, 2, 3, 4, 5
_DIVERGENCE_NAMES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
_REDUCTIONS = ("mean", "sum", "none")

# Launch heuristic (see _launch_config). Module-level so that tests can force the multi-tile path
# on small vocabularies (they monkeypatch SINGLE_MAX_V / MULTI_TILE).
SINGLE_MAX_V = 8192  # largest padded row kept in registers for all sweeps
ROW_TILE = 4096  # elements per program when several short rows share one
MAX_ROWS = 256  # rows per program at most (tiny V: per-row values are replicated per thread)
# (tile width, warps) when a row needs several tiles. From KDOPS_TRITON_AUTOTUNE on an H200
# (bench/results/h200/profile_run2.txt, 8192 x 128256 bf16): fkl/rkl 4096 / 8 warps (op with the
# student gradient 3.34 ms against 4.25 for 8192 / 32), the others 2048 / 8 (jsd 7.56 ms against
# 9.24 for 4096 / 16): narrow tiles and several programs per SM beat one wide program.
MULTI_TILE = {"kl": (4096, 8), "other": (2048, 8)}
AUTOTUNE_ENV = "KDOPS_TRITON_AUTOTUNE"  # "1": autotune the multi-tile launch (GPU runs only)


# ------------------------------------------------------------------------------------------
# Per-element math (divergence.h), on [BLOCK_N, BLOCK_V] tiles
# ------------------------------------------------------------------------------------------


@triton.jit
def _xlogratio(x, lx, ly):
    # x (lx - ly) with 0 log 0 = 0; x > 0 against ly = -inf stays +inf; a NaN x stays NaN (the
    # guard tests x == 0, not x > 0)
    return tl.where(x == 0.0, 0.0, x * (lx - ly))


@triton.jit
def _skew_terms(x, y, lx, lam):
    # KL(x || lam x + (1 - lam) y): (loss, x dL/dx, y dL/dy)
    mix = lam * x + (1.0 - lam) * y
    live = x != 0.0  # x == 0 adds nothing to L nor to its derivatives; NaN is live
    safe_mix = tl.where(live, mix, 1.0)
    lmix = tl.log(safe_mix)
    ratio = x / safe_mix
    loss = tl.where(live, x * (lx - lmix), 0.0)
    side_x = tl.where(live, x * (lx - lmix + 1.0 - lam * ratio), 0.0)
    side_y = tl.where(live, -(1.0 - lam) * ratio * y, 0.0)
    return loss, side_x, side_y


@triton.jit
def _element_terms(q, p, lq, lp, coef, DIV: tl.constexpr):
    # (loss, u = q dL/dq, v = p dL/dp) of one element for divergence DIV
    if DIV == 0:  # fkl
        loss = _xlogratio(p, lp, lq)
        u = -p
        v = tl.where(p == 0.0, 0.0, p * (lp - lq + 1.0))
    elif DIV == 1:  # rkl
        loss = _xlogratio(q, lq, lp)
        u = tl.where(q == 0.0, 0.0, q * (lq - lp + 1.0))
        v = -q
    elif DIV == 2:  # jsd, 0 < beta < 1
        m = coef * p + (1.0 - coef) * q
        lm = tl.log(tl.where(m == 0.0, 1.0, m))  # m == 0 only where q == p == 0: unused
        u = (1.0 - coef) * _xlogratio(q, lq, lm)
        v = coef * _xlogratio(p, lp, lm)
        loss = u + v
    elif DIV == 3:  # skew_fkl: KL(p || alpha p + (1 - alpha) q)
        loss, v, u = _skew_terms(p, q, lp, coef)
    elif DIV == 4:  # skew_rkl: KL(q || (1 - alpha) p + alpha q)
        loss, u, v = _skew_terms(q, p, lq, coef)
    else:  # tvd
        diff = q - p
        half_sign = tl.where(diff > 0.0, 0.5, tl.where(diff < 0.0, -0.5, 0.0))
        loss = tl.where(diff > 0.0, 0.5 * diff, -0.5 * diff)
        u = half_sign * q
        v = -half_sign * p
    return loss, u, v


@triton.jit
def _load_raw(s_rows, t_rows, cols, live, V):
    # one tile of both rows in the input dtype; lanes past V (and all lanes of dead rows) are
    # masked off (no memory traffic) and read as -inf
    ld_mask = live[:, None] & (cols < V)[None, :]
    zs = tl.load(s_rows[:, None] + cols[None, :], mask=ld_mask, other=float("-inf"))
    zt = tl.load(t_rows[:, None] + cols[None, :], mask=ld_mask, other=float("-inf"))
    return zs, zt


@triton.jit
def _scaled(zs, zt, inv_tau):
    # a = z_s / tau, b = z_t / tau in float32 (the product by 1 / tau, as the C++ kernels do)
    return zs.to(tl.float32) * inv_tau[:, None], zt.to(tl.float32) * inv_tau[:, None]


@triton.jit
def _online_stats(a, b, ma, sa, mb, sb, fold_t, FOLD: tl.constexpr, DIV: tl.constexpr):
    # One tile of the online max / sum-of-exp of both rows; for fkl / rkl (FOLD) also the
    # KL numerator T relative to the running maxima (safe maxima: 0 while a row is all -inf).
    ma_new = tl.maximum(ma, tl.max(a, axis=1))
    mb_new = tl.maximum(mb, tl.max(b, axis=1))
    ma_safe = tl.where(ma_new == float("-inf"), 0.0, ma_new)
    mb_safe = tl.where(mb_new == float("-inf"), 0.0, mb_new)
    a_sh = a - ma_safe[:, None]
    b_sh = b - mb_safe[:, None]
    ea = tl.exp(a_sh)
    eb = tl.exp(b_sh)
    # exp(m_old - m_new) is 0 when the old max was -inf (nothing accumulated yet), <= 1 otherwise
    ra = tl.exp(ma - ma_safe)
    rb = tl.exp(mb - mb_safe)
    sa_new = sa * ra + tl.sum(ea, axis=1)
    sb_new = sb * rb + tl.sum(eb, axis=1)
    if FOLD:
        ma_old_safe = tl.where(ma == float("-inf"), 0.0, ma)
        mb_old_safe = tl.where(mb == float("-inf"), 0.0, mb)
        if DIV == 0:  # fkl: x = b (teacher weighs), y = a
            shift = (mb_old_safe - mb_safe) - (ma_old_safe - ma_safe)
            t_old = rb * (fold_t + sb * shift)
            contrib = _xlogratio(eb, b_sh, a_sh)
        else:  # rkl: x = a, y = b
            shift = (ma_old_safe - ma_safe) - (mb_old_safe - mb_safe)
            t_old = ra * (fold_t + sa * shift)
            contrib = _xlogratio(ea, a_sh, b_sh)
        # A rescale factor that underflows to 0 zeroes the old terms, as float32 exponentials
        # taken against the final maximum would (their weights underflow too); this also keeps an
        # infinite old term from turning into 0 * inf = NaN. NaN input still gives NaN: s is NaN.
        if DIV == 0:
            t_old = tl.where(rb == 0.0, 0.0, t_old)
        else:
            t_old = tl.where(ra == 0.0, 0.0, t_old)
        fold_t = t_old + tl.sum(contrib, axis=1)
    return ma_new, sa_new, mb_new, sb_new, fold_t


@triton.jit
def _log_probs(a, b, ma, log_sa, mb, log_sb):
    # log-softmax as (x - max) - log(sum): the max-shifted logit is exact and the per-row
    # log-sum-exp is never formed as one number (its rounding, ~eps |max|, would be a relative
    # error shared by the whole row of probabilities)
    return (a - ma[:, None]) - log_sa[:, None], (b - mb[:, None]) - log_sb[:, None]


@triton.jit
def _tile_sums(a, b, ma, log_sa, mb, log_sb, coef, DIV: tl.constexpr):
    # row sums of loss, u and v over one tile
    lq, lp = _log_probs(a, b, ma, log_sa, mb, log_sb)
    q = tl.exp(lq)
    p = tl.exp(lp)
    loss, u, v = _element_terms(q, p, lq, lp, coef, DIV)
    return tl.sum(loss, axis=1), tl.sum(u, axis=1), tl.sum(v, axis=1)


@triton.jit
def _tile_grads(
    a, b, ma, log_sa, mb, log_sb, row_loss, side_s, side_t, coef, grad_scale, live, cols,
    col_mask, row_mask, gs_rows, gt_rows,
    DIV: tl.constexpr, FOLD: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, GRAD_TAU: tl.constexpr,
):
    # writes one tile of the gradients; returns the tile's share of sum da lq + db lp
    lq, lp = _log_probs(a, b, ma, log_sa, mb, log_sb)
    q = tl.exp(lq)
    p = tl.exp(lp)
    if FOLD:
        if DIV == 0:  # fkl: U = -1, W = L + 1
            da = q - p
            db = tl.where(p == 0.0, 0.0, p * (lp - lq - row_loss[:, None]))
        else:  # rkl: U = L + 1, W = -1
            da = tl.where(q == 0.0, 0.0, q * (lq - lp - row_loss[:, None]))
            db = p - q
    else:
        _, u, v = _element_terms(q, p, lq, lp, coef, DIV)
        da = u - q * side_s[:, None]
        db = v - p * side_t[:, None]
    st_mask = row_mask[:, None] & col_mask[None, :]
    keep = live[:, None]
    if GRAD_S:
        g = tl.where(keep, da * grad_scale[:, None], 0.0)
        tl.store(gs_rows[:, None] + cols[None, :], g.to(gs_rows.dtype.element_ty), mask=st_mask)
    if GRAD_T:
        g = tl.where(keep, db * grad_scale[:, None], 0.0)
        tl.store(gt_rows[:, None] + cols[None, :], g.to(gt_rows.dtype.element_ty), mask=st_mask)
    tau_part = tl.zeros_like(log_sa)
    if GRAD_TAU:
        in_row = col_mask[None, :]
        term = tl.where(in_row & (da != 0.0), da * lq, 0.0) + tl.where(in_row & (db != 0.0), db * lp, 0.0)
        tau_part = tl.sum(term, axis=1)
    return tau_part


# N and the 0/1 flags are plain runtime arguments (no specialization on their values): fewer
# compiled variants per divergence, gradient set and tile shape.
@triton.jit(do_not_specialize=["tau_stride", "has_valid", "t2_scale", "N"])
def _kd_loss_kernel(
    s_ptr, t_ptr, s_stride, t_stride,
    tau_ptr, tau_stride, valid_ptr, has_valid, scale_ptr,
    loss_ptr, gs_ptr, gt_ptr, gtau_ptr,
    N, V, coef, t2_scale,
    DIV: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, GRAD_TAU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE: tl.constexpr,
):
    FOLD: tl.constexpr = DIV <= 1
    ANY_GRAD: tl.constexpr = GRAD_S or GRAD_T or GRAD_TAU

    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if has_valid != 0:
        live = row_mask & (tl.load(valid_ptr + rows, mask=row_mask, other=0) != 0)
    else:
        live = row_mask
    rows64 = rows.to(tl.int64)
    s_rows = s_ptr + rows64 * s_stride
    t_rows = t_ptr + rows64 * t_stride
    out_off = rows64 * V
    gs_rows = gs_ptr + out_off
    gt_rows = gt_ptr + out_off
    cols0 = tl.arange(0, BLOCK_V)

    if tl.max(live.to(tl.int32), axis=0) > 0:
        tau = tl.load(tau_ptr + rows * tau_stride, mask=live, other=1.0).to(tl.float32)
        tau = tl.where(live, tau, 1.0)
        inv_tau = 1.0 / tau

        # sweep 1: statistics (and the fkl / rkl loss). The multi-tile loops load the next tile
        # before working on the current one, so its loads are in flight during the arithmetic.
        ma = tl.full([BLOCK_N], float("-inf"), tl.float32)
        mb = tl.full([BLOCK_N], float("-inf"), tl.float32)
        sa = tl.zeros([BLOCK_N], tl.float32)
        sb = tl.zeros([BLOCK_N], tl.float32)
        fold_t = tl.zeros([BLOCK_N], tl.float32)
        if SINGLE:
            col_mask = cols0 < V
            zs, zt = _load_raw(s_rows, t_rows, cols0, live, V)
            a, b = _scaled(zs, zt, inv_tau)
            ma, sa, mb, sb, fold_t = _online_stats(a, b, ma, sa, mb, sb, fold_t, FOLD, DIV)
        else:
            zs_next, zt_next = _load_raw(s_rows, t_rows, cols0, live, V)
            for start in range(0, V, BLOCK_V):
                a_t, b_t = _scaled(zs_next, zt_next, inv_tau)
                zs_next, zt_next = _load_raw(s_rows, t_rows, start + BLOCK_V + cols0, live, V)
                ma, sa, mb, sb, fold_t = _online_stats(a_t, b_t, ma, sa, mb, sb, fold_t, FOLD, DIV)
        # the log-softmax is (x - m) - log s with the safe maxima (0 for an all -inf row)
        ma = tl.where(ma == float("-inf"), 0.0, ma)
        mb = tl.where(mb == float("-inf"), 0.0, mb)
        log_sa = tl.log(sa)
        log_sb = tl.log(sb)

        # sweep 2 (not fkl / rkl): loss and the side sums U, W
        side_s = tl.zeros([BLOCK_N], tl.float32)
        side_t = tl.zeros([BLOCK_N], tl.float32)
        if FOLD:
            if DIV == 0:
                row_loss = fold_t / sb - log_sb + log_sa
            else:
                row_loss = fold_t / sa - log_sa + log_sb
        else:
            row_loss = tl.zeros([BLOCK_N], tl.float32)
            if SINGLE:
                row_loss, side_s, side_t = _tile_sums(a, b, ma, log_sa, mb, log_sb, coef, DIV)
            else:
                zs_next, zt_next = _load_raw(s_rows, t_rows, cols0, live, V)
                for start in range(0, V, BLOCK_V):
                    a_t, b_t = _scaled(zs_next, zt_next, inv_tau)
                    zs_next, zt_next = _load_raw(s_rows, t_rows, start + BLOCK_V + cols0, live, V)
                    l_part, u_part, v_part = _tile_sums(a_t, b_t, ma, log_sa, mb, log_sb, coef, DIV)
                    row_loss += l_part
                    side_s += u_part
                    side_t += v_part

        t2 = tl.where(t2_scale != 0, tau * tau, 1.0)
        tl.store(loss_ptr + rows, tl.where(live, row_loss * t2, 0.0), mask=row_mask)

        # last sweep: gradients (and the temperature's sum)
        if ANY_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            grad_scale = scale * t2 * inv_tau
            tau_sum = tl.zeros([BLOCK_N], tl.float32)
            if SINGLE:
                tau_sum = _tile_grads(
                    a, b, ma, log_sa, mb, log_sb, row_loss, side_s, side_t, coef, grad_scale, live,
                    cols0, col_mask, row_mask, gs_rows, gt_rows, DIV, FOLD, GRAD_S, GRAD_T, GRAD_TAU,
                )
            else:
                zs_next, zt_next = _load_raw(s_rows, t_rows, cols0, live, V)
                for start in range(0, V, BLOCK_V):
                    a_t, b_t = _scaled(zs_next, zt_next, inv_tau)
                    zs_next, zt_next = _load_raw(s_rows, t_rows, start + BLOCK_V + cols0, live, V)
                    cols = start + cols0
                    tau_sum += _tile_grads(
                        a_t, b_t, ma, log_sa, mb, log_sb, row_loss, side_s, side_t, coef,
                        grad_scale, live, cols, cols < V, row_mask, gs_rows, gt_rows, DIV, FOLD,
                        GRAD_S, GRAD_T, GRAD_TAU,
                    )
            if GRAD_TAU:
                # d(t2 L)/dtau = t2' L + t2 dL/dtau with dL/dtau = -tau_sum / tau
                dt2 = tl.where(t2_scale != 0, 2.0 * tau, 0.0)
                g_tau = scale * (dt2 * row_loss + t2 * (-tau_sum * inv_tau))
                tl.store(gtau_ptr + rows, tl.where(live, g_tau, 0.0), mask=row_mask)
    else:
        # no row of this program counts: zeros, and the logits are never read
        tl.store(loss_ptr + rows, tl.zeros([BLOCK_N], tl.float32), mask=row_mask)
        if GRAD_TAU:
            tl.store(gtau_ptr + rows, tl.zeros([BLOCK_N], tl.float32), mask=row_mask)
        if GRAD_S or GRAD_T:
            for start in range(0, V, BLOCK_V):
                cols = start + cols0
                st_mask = row_mask[:, None] & (cols < V)[None, :]
                zero = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
                if GRAD_S:
                    tl.store(gs_rows[:, None] + cols[None, :], zero.to(gs_ptr.dtype.element_ty), mask=st_mask)
                if GRAD_T:
                    tl.store(gt_rows[:, None] + cols[None, :], zero.to(gt_ptr.dtype.element_ty), mask=st_mask)


# ------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------


def _launch_config(vocab: int, div_id: int) -> tuple[int, int, bool, int]:
    """(BLOCK_N, BLOCK_V, SINGLE, num_warps) for rows of `vocab` logits.

    Short rows (padded width <= SINGLE_MAX_V) are loaded once and kept in registers, several rows
    per program up to ROW_TILE elements, 8 elements per thread (the jsd / skew sweeps keep ~10
    tile-sized float32 values alive; ptxas for sm_90 reports at most a few bytes of stack).
    Long rows: one row per program in MULTI_TILE tiles. Depends on V (and the divergence) only,
    not on N, so torch.compile with dynamic shapes guards on V alone.
    """
    vocab = int(vocab)
    padded = triton.next_power_of_2(vocab)
    if padded <= SINGLE_MAX_V:
        block_n = max(1, min(MAX_ROWS, ROW_TILE // padded))
        num_warps = max(1, min(32, block_n * padded // 256))
        return block_n, padded, True, num_warps
    block_v, num_warps = MULTI_TILE["kl" if div_id <= RKL else "other"]
    return 1, block_v, False, num_warps


def _autotune_configs() -> list:
    # For the GPU check (KDOPS_TRITON_AUTOTUNE=1): the multi-tile launch's tile width, warps
    # and pipelining depth. Every output element is overwritten on each launch, so re-running
    # configurations during tuning is harmless.
    # (16384, 32) spills (ptxas, sm_90): not listed.
    configs = []
    for block_v, warps in ((2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32)):
        for stages in (1, 3):
            configs.append(
                triton.Config({"BLOCK_N": 1, "BLOCK_V": block_v, "SINGLE": False},
                              num_warps=warps, num_stages=stages)
            )
    return configs


_kd_loss_kernel_autotuned = triton.autotune(
    configs=_autotune_configs(),
    key=["V", "DIV", "GRAD_S", "GRAD_T", "GRAD_TAU"],
)(_kd_loss_kernel)


def _use_autotune(vocab: int) -> bool:
    vocab = int(vocab)
    return (
        os.environ.get(AUTOTUNE_ENV) == "1"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and triton.next_power_of_2(vocab) > SINGLE_MAX_V
    )


# ------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------


def _divergence_id(name: str, beta: float, alpha: float) -> int:
    # The exact endpoints are the plain KLs (jsd: TRL's GKD convention; skews mix nothing in).
    if name == "fkl":
        return FKL
    if name == "rkl":
        return RKL
    if name == "jsd":
        return FKL if beta == 0.0 else RKL if beta == 1.0 else JSD
    if name == "skew_fkl":
        return FKL if alpha == 0.0 else SKEW_FKL
    if name == "skew_rkl":
        return RKL if alpha == 0.0 else SKEW_RKL
    if name == "tvd":
        return TVD
    raise ValueError(
        f"kd_loss: divergence must be one of {', '.join(_DIVERGENCE_NAMES)}; got {name!r}"
    )


def _check_args(student, teacher, temperature, valid, normalizer, beta, alpha, reduction):
    # The checks of csrc/divergence/divergence_op.cpp, in the same order, before any launch.
    if student.dim() != 2:
        raise ValueError(f"kd_loss: student must be 2-D [rows, vocab]; got {student.dim()} dims")
    if teacher.shape != student.shape:
        raise ValueError(
            f"kd_loss: teacher must have the student's shape {list(student.shape)}; "
            f"got {list(teacher.shape)}"
        )
    if teacher.dtype != student.dtype:
        raise ValueError(
            f"kd_loss: teacher dtype {teacher.dtype} differs from student dtype {student.dtype}"
        )
    if teacher.device != student.device:
        raise ValueError(f"kd_loss: teacher is on {teacher.device} but student is on {student.device}")
    if student.dtype == torch.float64:
        raise ValueError(
            "kd_loss: the triton backend does not support float64 logits (float32, bfloat16 or "
            "float16 only); use the cpu or cuda backend for float64"
        )
    if student.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"kd_loss: student must be float32, bfloat16 or float16 on the triton backend; "
            f"got {student.dtype}"
        )
    if student.shape[1] <= 0:
        raise ValueError("kd_loss: vocab (last dim) must be at least 1")
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError("kd_loss: the last dim of student and teacher must be contiguous")
    check_loss_options("kd_loss", student, temperature, valid, normalizer, beta, alpha, reduction)


def check_loss_options(op, student, temperature, valid, normalizer, beta, alpha, reduction):
    """The option checks every Triton loss op shares with its C++ twin (after the op's own input
    checks, in the C++ order): beta, alpha, temperature, valid, normalizer, reduction."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{op}: beta must be in [0, 1]; got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: alpha must be in [0, 1]; got {alpha}")
    rows = student.shape[0]
    if not (temperature.dim() == 0 or (temperature.dim() == 1 and temperature.shape[0] == rows)):
        raise ValueError(
            f"{op}: temperature must be 0-d or have shape [{rows}]; got {list(temperature.shape)}"
        )
    if temperature.dtype != torch.float32:
        raise ValueError(
            f"{op}: temperature must be float32 for {student.dtype} logits; got {temperature.dtype}"
        )
    if valid is not None:
        if valid.dtype != torch.bool or valid.dim() != 1 or valid.shape[0] != rows:
            raise ValueError(f"{op}: valid must be a bool tensor of shape [{rows}]")
        if valid.device != student.device:
            raise ValueError(f"{op}: valid is on {valid.device} but student is on {student.device}")
    if normalizer is not None and normalizer.dim() != 0:
        raise ValueError(f"{op}: normalizer must be a 0-d tensor")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def _shape_only(student: torch.Tensor) -> bool:
    """True for fake tensors under TRITON_INTERPRET=1: the interpreter runs kernels eagerly (wrap_triton
    cannot trace them), so shape propagation (FakeTensorMode) skips the launch there. On a GPU the
    launch is traced through wrap_triton as usual."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(student, FakeTensor)


@triton_op("kdops::kd_loss_triton", mutates_args=())
def kd_loss_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: torch.Tensor,
    valid: Optional[torch.Tensor],
    normalizer: Optional[torch.Tensor],
    divergence: str,
    beta: float,
    alpha: float,
    reduction: str,
    t2_scale: bool,
    grad_student: bool,
    grad_teacher: bool,
    grad_temperature: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kd_loss on Triton: the schema and outputs of ``kdops::kd_loss`` (see the module docstring).

    Returns (loss, grad_student, grad_teacher, grad_temperature): the float32 loss (0-d, or [N]
    for reduction="none"), the requested gradients already scaled by the reduction (student and
    teacher [N, V] in the logits' dtype, temperature [N] float32), and fresh empty [0] tensors for
    the gradients not requested.
    """
    _check_args(student, teacher, temperature, valid, normalizer, beta, alpha, reduction)
    div_id = _divergence_id(divergence, beta, alpha)
    coef = beta if div_id == JSD else alpha
    rows, vocab = student.shape
    device = student.device
    acc = torch.float32

    # A CPU scalar temperature may accompany device logits (a Python float): move it once.
    tau = temperature.to(device).contiguous()

    scale = reduction_scale(reduction, valid, normalizer, rows, device)

    loss_rows = torch.empty((rows,), dtype=acc, device=device)
    g_student = torch.empty((rows, vocab) if grad_student else (0,), dtype=student.dtype, device=device)
    g_teacher = torch.empty((rows, vocab) if grad_teacher else (0,), dtype=student.dtype, device=device)
    g_tau = torch.empty((rows,) if grad_temperature else (0,), dtype=acc, device=device)

    if rows > 0 and not _shape_only(student):
        # without a mask the kernel never reads valid_ptr: any pointer will do (the read-only
        # scale, so that no output is aliased). The bool mask goes in as is: a dtype view of it
        # would not lower under torch.compile (inductor has no bitcast for bool).
        valid_arg = valid.contiguous() if valid is not None else scale
        common = dict(
            DIV=div_id, GRAD_S=bool(grad_student), GRAD_T=bool(grad_teacher),
            GRAD_TAU=bool(grad_temperature),
        )
        args = (
            student, teacher, student.stride(0), teacher.stride(0),
            tau, 0 if tau.dim() == 0 else 1, valid_arg, int(valid is not None), scale,
            loss_rows, g_student, g_teacher, g_tau,
            rows, vocab, float(coef), int(bool(t2_scale)),
        )
        if _use_autotune(vocab):
            kernel = _kd_loss_kernel_autotuned
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]),)  # noqa: E731
            wrap_triton(kernel)[grid](*args, **common)
        else:
            block_n, block_v, single, num_warps = _launch_config(vocab, div_id)
            kernel = _kd_loss_kernel
            grid = (triton.cdiv(rows, block_n),)
            wrap_triton(kernel)[grid](
                *args, **common, BLOCK_N=block_n, BLOCK_V=block_v, SINGLE=single,
                num_warps=num_warps,
            )

    loss = loss_rows if reduction == "none" else loss_rows.sum() * scale
    return loss, g_student, g_teacher, g_tau
