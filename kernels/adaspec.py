"""Triton kernel of AdaSPEC's statistics (DESIGN.md 3.7): the op ``kdops::adaspec_token_kl_triton``.

Same schema and outputs as the C++ op ``kdops::adaspec_token_kl`` (csrc/registration.cpp) and the
same algebra (csrc/adaspec/adaspec.h): per valid row, with p = softmax(b), q_s = softmax(a_s)
(b = target / tau, a_s = logits_s / tau for the draft and the reference),

    KL(p || q_s) = C_s / S_t - log S_t + log S_s,   S_x = sum exp(x - base_x),
    C_s = sum exp(b - base_t) ((b - base_t) - (a_s - base_s)),

accumulated online over BLOCK_V tiles of the three rows against their running maxima (one read of
the logits), the sums and cross terms moved whenever a maximum grows. Short rows (padded width
<= SINGLE_MAX_V) are one tile, several rows per program; long rows one row per program. Masked
rows are never read and get 0. Arithmetic in float32; float64 logits are not supported here (use
the cpu or cuda backend).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .divergence import _shape_only, _xlogratio

SINGLE_MAX_V = 8192  # largest padded row handled as one tile
ROW_TILE = 4096  # elements per program when several short rows share one
MAX_ROWS = 128
MULTI_TILE = (4096, 8)  # (tile width, warps) for long rows: three float32 tiles in registers


@triton.jit
def _raise(m, s, tile_max, inv_tau):
    # moves a running (max, sum of exp((z - base) / tau)) of raw logits onto the larger max;
    # returns (max, base, sum, factor, shift): the base is the max (0 while it is -inf), shift =
    # (old base - new base) / tau and factor = exp((old max - new base) / tau), which is 0 while
    # nothing was summed. Subtracting before scaling keeps x = 0 exact at the max.
    new_m = tl.maximum(m, tile_max)
    new_base = tl.where(new_m == float("-inf"), 0.0, new_m)
    old_base = tl.where(m == float("-inf"), 0.0, m)
    factor = tl.exp((m - new_base) * inv_tau)
    return new_m, new_base, s * factor, factor, (old_base - new_base) * inv_tau


@triton.jit
def _rebase_cross(cross, sum_t, factor_t, shift_t, shift_s):
    # adaspec.h's rebase_cross
    return tl.where(factor_t == 0.0, 0.0, factor_t * (cross + sum_t * (shift_t - shift_s)))


@triton.jit(do_not_specialize=["tau_stride", "has_valid", "N"])
def _adaspec_kernel(
    d_ptr, r_ptr, t_ptr, d_stride, r_stride, t_stride,
    tau_ptr, tau_stride, valid_ptr, has_valid,
    dkl_ptr, rkl_ptr, N, V,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if has_valid != 0:
        live = row_mask & (tl.load(valid_ptr + rows, mask=row_mask, other=0) != 0)
    else:
        live = row_mask
    rows64 = rows.to(tl.int64)
    d_rows = d_ptr + rows64 * d_stride
    r_rows = r_ptr + rows64 * r_stride
    t_rows = t_ptr + rows64 * t_stride
    cols0 = tl.arange(0, BLOCK_V)
    kl_d = tl.zeros([BLOCK_N], tl.float32)
    kl_r = tl.zeros([BLOCK_N], tl.float32)

    if tl.max(live.to(tl.int32), axis=0) > 0:
        tau = tl.load(tau_ptr + rows * tau_stride, mask=live, other=1.0).to(tl.float32)
        inv_tau = 1.0 / tl.where(live, tau, 1.0)
        m_d = tl.full([BLOCK_N], float("-inf"), tl.float32)
        m_r = tl.full([BLOCK_N], float("-inf"), tl.float32)
        m_t = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s_d = tl.zeros([BLOCK_N], tl.float32)
        s_r = tl.zeros([BLOCK_N], tl.float32)
        s_t = tl.zeros([BLOCK_N], tl.float32)
        c_d = tl.zeros([BLOCK_N], tl.float32)
        c_r = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            ld = live[:, None] & (cols < V)[None, :]  # masked lanes read as -inf: no mass
            z_d = tl.load(d_rows[:, None] + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
            z_r = tl.load(r_rows[:, None] + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)
            z_t = tl.load(t_rows[:, None] + cols[None, :], mask=ld, other=float("-inf")).to(tl.float32)

            sum_t = s_t  # the cross terms move with the target's sum before its rescale
            m_t, base_t, s_t, factor_t, shift_t = _raise(m_t, s_t, tl.max(z_t, axis=1), inv_tau)
            m_d, base_d, s_d, _, shift_d = _raise(m_d, s_d, tl.max(z_d, axis=1), inv_tau)
            m_r, base_r, s_r, _, shift_r = _raise(m_r, s_r, tl.max(z_r, axis=1), inv_tau)
            c_d = _rebase_cross(c_d, sum_t, factor_t, shift_t, shift_d)
            c_r = _rebase_cross(c_r, sum_t, factor_t, shift_t, shift_r)

            x_d = (z_d - base_d[:, None]) * inv_tau[:, None]
            x_r = (z_r - base_r[:, None]) * inv_tau[:, None]
            x_t = (z_t - base_t[:, None]) * inv_tau[:, None]
            e_t = tl.exp(x_t)
            s_d += tl.sum(tl.exp(x_d), axis=1)
            s_r += tl.sum(tl.exp(x_r), axis=1)
            s_t += tl.sum(e_t, axis=1)
            c_d += tl.sum(_xlogratio(e_t, x_t, x_d), axis=1)
            c_r += tl.sum(_xlogratio(e_t, x_t, x_r), axis=1)
        log_s_t = tl.log(s_t)
        kl_d = tl.where(live, c_d / s_t - (log_s_t - tl.log(s_d)), 0.0)
        kl_r = tl.where(live, c_r / s_t - (log_s_t - tl.log(s_r)), 0.0)
    tl.store(dkl_ptr + rows, kl_d, mask=row_mask)
    tl.store(rkl_ptr + rows, kl_r, mask=row_mask)


def _launch_config(vocab: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps): short rows several per program in one tile, long rows one
    per program in MULTI_TILE tiles. Depends on V only (torch.compile guards on V alone)."""
    padded = triton.next_power_of_2(int(vocab))
    if padded <= SINGLE_MAX_V:
        block_n = max(1, min(MAX_ROWS, ROW_TILE // padded))
        return block_n, padded, max(1, min(16, block_n * padded // 512))
    block_v, num_warps = MULTI_TILE
    return 1, block_v, num_warps


def _check_args(draft, reference, target, temperature, valid):
    # The checks of csrc/adaspec/adaspec_op.cpp, in the same order, before any launch.
    if draft.dim() != 2:
        raise ValueError(f"adaspec_token_kl: draft must be 2-D [rows, vocab]; got {draft.dim()} dims")
    if draft.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"adaspec_token_kl: the triton backend takes float32, bfloat16 or float16 logits; got "
            f"{draft.dtype} (use the cpu or cuda backend for float64)"
        )
    for name, other in (("reference", reference), ("target", target)):
        if other.shape != draft.shape:
            raise ValueError(
                f"adaspec_token_kl: {name} must have the draft's shape {list(draft.shape)}; "
                f"got {list(other.shape)}"
            )
        if other.dtype != draft.dtype:
            raise ValueError(
                f"adaspec_token_kl: {name} dtype {other.dtype} differs from the draft's {draft.dtype}"
            )
        if other.device != draft.device:
            raise ValueError(
                f"adaspec_token_kl: {name} is on {other.device} but the draft is on {draft.device}"
            )
    if draft.shape[1] <= 0:
        raise ValueError("adaspec_token_kl: vocab (last dim) must be at least 1")
    if draft.stride(1) != 1 or reference.stride(1) != 1 or target.stride(1) != 1:
        raise ValueError("adaspec_token_kl: the last dim of draft, reference and target must be contiguous")
    rows = draft.shape[0]
    if not (temperature.dim() == 0 or (temperature.dim() == 1 and temperature.shape[0] == rows)):
        raise ValueError(
            f"adaspec_token_kl: temperature must be 0-d or have shape [{rows}]; got {list(temperature.shape)}"
        )
    if temperature.dtype != torch.float32:
        raise ValueError(
            f"adaspec_token_kl: temperature must be float32 for {draft.dtype} logits; got {temperature.dtype}"
        )
    if valid is not None:
        if valid.dtype != torch.bool or valid.dim() != 1 or valid.shape[0] != rows:
            raise ValueError(f"adaspec_token_kl: valid must be a bool tensor of shape [{rows}]")
        if valid.device != draft.device:
            raise ValueError(
                f"adaspec_token_kl: valid is on {valid.device} but the draft is on {draft.device}"
            )


@triton_op("kdops::adaspec_token_kl_triton", mutates_args=())
def adaspec_token_kl_triton(
    draft: torch.Tensor,
    reference: torch.Tensor,
    target: torch.Tensor,
    temperature: torch.Tensor,
    valid: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """adaspec_token_kl on Triton: (draft_kl, reference_kl), float32 [N], 0 for masked rows."""
    _check_args(draft, reference, target, temperature, valid)
    rows, vocab = draft.shape
    device = draft.device
    # A CPU scalar temperature may accompany device logits (a Python float): move it once.
    tau = temperature.to(device).contiguous()
    draft_kl = torch.empty((rows,), dtype=torch.float32, device=device)
    reference_kl = torch.empty((rows,), dtype=torch.float32, device=device)
    if rows > 0 and not _shape_only(draft):
        block_n, block_v, num_warps = _launch_config(vocab)
        # without a mask the kernel never reads valid_ptr: any pointer will do
        valid_arg = valid.contiguous() if valid is not None else tau
        wrap_triton(_adaspec_kernel)[(triton.cdiv(rows, block_n),)](
            draft, reference, target, draft.stride(0), reference.stride(0), target.stride(0),
            tau, 0 if tau.dim() == 0 else 1, valid_arg, int(valid is not None),
            draft_kl, reference_kl, rows, vocab,
            BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps,
        )
    return draft_kl, reference_kl
