"""Triton kernels of select_top_fraction (DESIGN.md 3.7): the op ``kdops::select_top_fraction_triton``.

Same schema and result as the C++ op ``kdops::select_top_fraction`` (csrc/registration.cpp): a
bool mask over scores [N], true where the score is valid and >= t = torch.quantile(valid scores,
1 - fraction), with torch's own roundings (csrc/selection/selection.h states them).

Radix select on the 32-bit order-preserving image of the scores (float32, or bfloat16 / float16
widened exactly to float32): key = bits | sign for x >= 0, ~bits for x < 0, -0.0 as +0.0, so
that key order is float order and keys can be compared instead of floats.

    level 0   histogram of the top 11 key bits of the valid scores (+ their number and NaN count)
    pick      one program: the quantile ranks, the bucket holding the lower rank lo, the rank
              left inside it; the bucket becomes the prefix of the group the next level reads
    level 1   histogram of the next 11 bits of the group's keys, pick
    level 2   the last 10 bits, pick: the prefix is now the key of v[lo]
    above     min key > key(v[lo]) of the valid scores (v[hi] when hi = lo + 1 is not a tie)
    finish    one program: t = lerp(v[lo], v[hi], w) and its key (2^32: nothing kept)
    mask      key(x) >= key(t) for every valid score

Every level reads the whole input (the CUDA kernel compacts the candidates instead; this one
keeps to what the interpreter runs well). The histogram programs loop over the input with a
fixed grid and merge one block-local tl.histogram into the global one with atomics, so the
result is exact and deterministic. No host synchronisation: the picks read the histograms from
device memory. Float64 scores are not supported by the Triton backend (use cpu or cuda).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .divergence import _shape_only

# Slots of the int64 state vector shared by the kernels.
COUNT = 0  # valid non-NaN scores
NAN_COUNT = 1  # valid NaN scores (any: nothing is kept, as torch.quantile is NaN)
PREFIX = 2  # key bits of the group holding v[lo], above the current level's digit
RANK = 3  # rank of v[lo] inside that group
LE_COUNT = 4  # after the last level: number of valid scores <= v[lo]
KEY_ABOVE = 5  # min key > key(v[lo]) (2^32 when none)
THRESHOLD_KEY = 6  # key(t), or 2^32 when nothing is kept
STATE_SIZE = 8

NO_KEY = 1 << 32  # above every 32-bit key
TORCH_MAX_COUNT = 1 << 24  # torch.quantile's limit; above it the rank is taken in float64

# (shift, width) of each level's digit: 11 + 11 + 10 bits
LEVELS = ((21, 11), (10, 11), (0, 10))
BLOCK = 1024
GRID_PER_SM = 4  # histogram programs per SM on a GPU; the interpreter takes one per block


@triton.jit
def _order_key(x):
    """int64 in [0, 2^32): the order-preserving image of float32 x (-0.0 as +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits).to(tl.int64)
    return tl.where(bits < 0, -1 - bits, bits + 2147483648)


@triton.jit
def _from_order_key(key):
    bits = tl.where(key >= 2147483648, key - 2147483648, 4294967295 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(scores_ptr, valid_ptr, offs, n, HAS_VALID: tl.constexpr):
    """Scores of one tile as float32 and whether each counts (in range and valid)."""
    in_range = offs < n
    x = tl.load(scores_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    counted = in_range
    if HAS_VALID:
        counted = counted & (tl.load(valid_ptr + offs, mask=in_range, other=0) != 0)
    return x, counted


@triton.jit
def _quantile_ranks(q, count):
    """torch.quantile's (lo, hi, weight) for `count` values: the rank q * (count - 1) in float32
    (float64 above 2^24 values, where torch refuses), lo = floor, hi = ceil, weight in float32."""
    last = count - 1
    rank32 = q * last.to(tl.float32)
    rank64 = q.to(tl.float64) * last.to(tl.float64)
    lo32 = rank32.to(tl.int64)
    lo64 = rank64.to(tl.int64)
    big = count > TORCH_MAX_COUNT
    lo = tl.where(big, lo64, lo32)
    frac32 = rank32 - lo32.to(tl.float32)
    frac64 = (rank64 - lo64.to(tl.float64)).to(tl.float32)
    weight = tl.where(big, frac64, frac32)
    hi = tl.where(weight > 0, lo + 1, lo)
    return lo, hi, weight


@triton.jit
def _histogram_kernel(scores_ptr, valid_ptr, state_ptr, hist_ptr, n,
                      SHIFT: tl.constexpr, WIDTH: tl.constexpr, FIRST: tl.constexpr,
                      HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the digit (key >> SHIFT) & (2^WIDTH - 1) of the valid keys in the current
    group (every valid key at the first level, which also counts the NaNs)."""
    BINS: tl.constexpr = 1 << WIDTH
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], dtype=tl.int32)
    nans = tl.zeros([BLOCK], dtype=tl.int32)
    if not FIRST:
        prefix = tl.load(state_ptr + PREFIX)
    for start in range(pid * BLOCK, n, step):
        x, counted = _load_tile(scores_ptr, valid_ptr, start + lanes, n, HAS_VALID)
        is_nan = x != x
        key = _order_key(x)
        keep = counted & ~is_nan
        if FIRST:
            nans += (counted & is_nan).to(tl.int32)
        else:
            keep = keep & ((key >> (SHIFT + WIDTH)) == prefix)
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        counts += tl.histogram(digit, BINS, mask=keep)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, counts.to(tl.int64), mask=counts > 0)
    if FIRST:
        tl.atomic_add(state_ptr + NAN_COUNT, tl.sum(nans).to(tl.int64))


@triton.jit
def _pick_kernel(hist_ptr, state_ptr, q_ptr, WIDTH: tl.constexpr, FIRST: tl.constexpr,
                 LAST: tl.constexpr):
    """One program: the bucket of this level holding v[lo]; the prefix and rank move into it."""
    BINS: tl.constexpr = 1 << WIDTH
    bins = tl.arange(0, BINS)
    counts = tl.load(hist_ptr + bins)
    q = tl.load(q_ptr)
    if FIRST:
        count = tl.sum(counts)
        lo, hi, weight = _quantile_ranks(q, count)
        tl.store(state_ptr + COUNT, count)
        rank = lo
        prefix = 0
        tl.store(state_ptr + KEY_ABOVE, NO_KEY)
    else:
        rank = tl.load(state_ptr + RANK)
        prefix = tl.load(state_ptr + PREFIX)
    inclusive = tl.cumsum(counts, 0)
    before = inclusive <= rank  # buckets entirely below the rank
    bucket = tl.sum(before.to(tl.int64))
    rank_inside = rank - tl.sum(tl.where(before, counts, 0))
    tl.store(state_ptr + PREFIX, (prefix << WIDTH) | bucket)
    tl.store(state_ptr + RANK, rank_inside)
    if LAST:
        # every key of the final bucket equals key(v[lo]); lo - rank_inside of them lie below it
        lo, hi, weight = _quantile_ranks(q, tl.load(state_ptr + COUNT))
        ties = tl.sum(tl.where(bins == bucket, counts, 0))
        tl.store(state_ptr + LE_COUNT, lo - rank_inside + ties)


@triton.jit
def _key_above_kernel(scores_ptr, valid_ptr, state_ptr, n, HAS_VALID: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Min key above key(v[lo]) among the valid non-NaN scores (atomic min: exact, any order)."""
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    key_lo = tl.load(state_ptr + PREFIX)
    smallest = tl.full([BLOCK], NO_KEY, dtype=tl.int64)
    for start in range(pid * BLOCK, n, step):
        x, counted = _load_tile(scores_ptr, valid_ptr, start + lanes, n, HAS_VALID)
        key = _order_key(x)
        above = counted & (x == x) & (key > key_lo)
        smallest = tl.minimum(smallest, tl.where(above, key, NO_KEY))
    tl.atomic_min(state_ptr + KEY_ABOVE, tl.min(smallest, axis=0))


@triton.jit
def _finish_kernel(state_ptr, q_ptr):
    """One program: t = lerp(v[lo], v[hi], w) with torch's fused multiply-adds, and its key."""
    q = tl.load(q_ptr)
    count = tl.load(state_ptr + COUNT)
    lo, hi, weight = _quantile_ranks(q, count)
    v_lo = _from_order_key(tl.load(state_ptr + PREFIX))
    v_hi = tl.where(hi < tl.load(state_ptr + LE_COUNT), v_lo,
                    _from_order_key(tl.load(state_ptr + KEY_ABOVE)))
    diff = v_hi - v_lo
    t = tl.where(weight < 0.5, tl.fma(weight, diff, v_lo), tl.fma(diff, weight - 1.0, v_hi))
    nothing = (count == 0) | (tl.load(state_ptr + NAN_COUNT) > 0) | (t != t)
    tl.store(state_ptr + THRESHOLD_KEY, tl.where(nothing, NO_KEY, _order_key(t)))


@triton.jit
def _mask_kernel(scores_ptr, valid_ptr, state_ptr, mask_ptr, n, HAS_VALID: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x, counted = _load_tile(scores_ptr, valid_ptr, offs, n, HAS_VALID)
    keep = counted & (x == x) & (_order_key(x) >= tl.load(state_ptr + THRESHOLD_KEY))
    tl.store(mask_ptr + offs, keep, mask=offs < n)


def _histogram_grid(n: int, device: torch.device) -> int:
    blocks = triton.cdiv(n, BLOCK)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(blocks, GRID_PER_SM * sms))
    return max(1, blocks)


def _check_args(scores: torch.Tensor, fraction: float, valid: Optional[torch.Tensor]) -> None:
    if scores.dim() != 1:
        raise ValueError(f"select_top_fraction_triton: scores must be 1-D [N]; got {scores.dim()} dims")
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            "select_top_fraction_triton: scores must be float32, bfloat16 or float16 (float64: use "
            f"the cpu or cuda backend); got {scores.dtype}"
        )
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"select_top_fraction_triton: fraction must be in (0, 1]; got {fraction}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != scores.shape
                              or valid.device != scores.device):
        raise ValueError(
            f"select_top_fraction_triton: valid must be a bool tensor of shape {tuple(scores.shape)} "
            f"on {scores.device}; got {valid.dtype} {tuple(valid.shape)} on {valid.device}"
        )


@triton_op("kdops::select_top_fraction_triton", mutates_args=())
def select_top_fraction_triton(scores: torch.Tensor, fraction: float,
                               valid: Optional[torch.Tensor]) -> torch.Tensor:
    """select_top_fraction on Triton: the schema and result of ``kdops::select_top_fraction``
    (see the module docstring)."""
    _check_args(scores, fraction, valid)
    n = scores.shape[0]
    device = scores.device
    mask = torch.empty((n,), dtype=torch.bool, device=device)
    if n == 0 or _shape_only(scores):
        return mask
    x = scores.contiguous()
    has_valid = valid is not None
    # without a mask the kernels never read valid_ptr: any pointer will do
    valid_arg = valid.contiguous() if has_valid else x
    # q = 1 - fraction in double, rounded once to float32 as torch.quantile does (a fill: no copy)
    q = torch.full((1,), 1.0 - fraction, dtype=torch.float32, device=device)
    state = torch.zeros((STATE_SIZE,), dtype=torch.int64, device=device)
    hists = torch.zeros((len(LEVELS), 1 << max(w for _, w in LEVELS)), dtype=torch.int64, device=device)
    grid = (_histogram_grid(n, device),)
    for level, (shift, width) in enumerate(LEVELS):
        first, last = level == 0, level == len(LEVELS) - 1
        wrap_triton(_histogram_kernel)[grid](
            x, valid_arg, state, hists[level], n,
            SHIFT=shift, WIDTH=width, FIRST=first, HAS_VALID=has_valid, BLOCK=BLOCK)
        wrap_triton(_pick_kernel)[(1,)](hists[level], state, q, WIDTH=width, FIRST=first, LAST=last)
    wrap_triton(_key_above_kernel)[grid](x, valid_arg, state, n, HAS_VALID=has_valid, BLOCK=BLOCK)
    wrap_triton(_finish_kernel)[(1,)](state, q)
    wrap_triton(_mask_kernel)[(triton.cdiv(n, BLOCK),)](
        x, valid_arg, state, mask, n, HAS_VALID=has_valid, BLOCK=BLOCK)
    return mask
