"""Triton kernels of coactivation_features (DESIGN.md 3.4): the ops
``kdops::coactivation_features_triton`` and ``kdops::coactivation_features_backward_triton``.

Same schemas and outputs as the C++ ops ``kdops::coactivation_features`` and
``kdops::coactivation_features_backward`` (csrc/registration.cpp); csrc/coactivation/coactivation.h
states the tie rule (ranks_before: larger logit first, equal logits lower id first, NaN largest)
and the algebra:

    v_k = x[idx_k],  s = sum_k v_k,  f_b[idx_k] += c_b v_k s   over the valid positions, in order
    dv_k = c_b (g[idx_k] s + sum_k' g[idx_k'] v_k'),  D = sum_k v_k dv_k
    logits: dL/dz = dv at the kept ids;  softmax: dL/dz_j = -p_j D / tau, and v_k (dv_k - D) / tau
            at the kept ids,  p_j = exp((z_j - z[idx_0]) / tau - shifted_lse)

Arithmetic in float32 (float64 for float64 logits), offsets in int64.

Keys. A logit maps to an int64 whose signed order is ranks_before's order of values: the float's
bits, negatives' magnitude bits flipped, -0.0 as +0.0, every NaN above +inf. 32 significant bits
for float32 (bfloat16 and float16 widen to it exactly), 64 for float64. Equal keys are equal
logits (or two NaNs), so ties break on the id alone.

Forward: the select kernel, one program per position, then the scatter kernel.

* Sweep 0: histogram of the keys' top DIGIT_BITS bits (the sign bit flipped, so that negative
  keys sort low) and, for softmax, the online max m and sum of exp((z - m) / tau).
* Radix select of the k-th key: each level keeps the bucket holding it (the group) and the
  number of the group's keys still wanted; the next level histograms the next digit of the
  group's keys. It stops once the group holds exactly the keys still wanted, or after the last
  digit, when the group is one key value: at most 2 more sweeps for 32-bit keys, 5 for 64-bit.
* Collect: one sweep in id order keeps the keys above the group and the group's first `wanted`
  keys by id (a running count across tiles); the k kept ids are stashed, in id order, in the
  position's top_ids row.
* Order: after a barrier, each kept entry's rank is the number of kept entries that rank before
  it (RANK_BLOCK stashed entries at a time against all k, so at most RANK_BLOCK x K_BLOCK lanes);
  after another barrier the ids and values are written best first. The shift of the statistics
  is z[idx_0], as in the C++ kernels: shifted_lse = log(sum) + (m - z[idx_0]) / tau, which is
  log(sum) exactly when the row has no NaN (and NaN when it has, or is all -inf).
* Scatter: one program per (sequence, vocabulary chunk) walks the sequence's positions in order
  and adds v_k s c_b into its chunk of f_b (read, add, store, a barrier between positions; the k
  ids of a position are distinct). No atomics: the features are bitwise repeatable.

Bytes per position, e the logit size: the row is read 2 to 4 times (32-bit keys), plus k
gathered logits; the scatter reads each position's k ids and values once per vocabulary chunk.
A position that is not valid reads nothing and gets ids 0, values 0 and shifted_lse 0.

Backward, one program per position: the dense -p_j D / tau over the row (softmax) or zeros
(logits), then, after a barrier, the kept ids. A position that is not valid gets zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .divergence import _shape_only
from .topk import _fill

MAX_K = 256  # kCoactivationMaxK in csrc/coactivation/coactivation.h
TRANSFORMS = ("softmax", "logits")

DIGIT_BITS = 11  # radix select: 2048 buckets per level
# Launch shapes. Module-level so that tests can force several tiles, chunks and rank blocks on
# small problems (they monkeypatch them).
MAX_BLOCK_V = 4096
NUM_WARPS = 8
RANK_BLOCK = 16
SCATTER_CHUNK = 4096


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


@triton.jit
def _order_key(z, KEY_BITS: tl.constexpr):
    """int64 keys of logits z (the accumulate type) whose signed order is ranks_before's."""
    if KEY_BITS == 64:
        bits = z.to(tl.int64, bitcast=True)
        bits = tl.where(bits == -9223372036854775808, 0, bits)  # -0.0 as +0.0
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        return tl.where(z != z, 0x7FFFFFFFFFFFFFFF, key)
    else:
        bits = z.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return tl.where(z != z, 0x7FFFFFFF, key).to(tl.int64)


@triton.jit
def _pick_bucket(counts, wanted, BINS: tl.constexpr):
    """The bucket holding the group's wanted-th largest key (1-based), the number of the group's
    keys in buckets above it, and the number in it."""
    bins = tl.arange(0, BINS)
    at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
    bucket = tl.sum((at_or_above >= wanted).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(bins > bucket, counts, 0), 0)
    inside = tl.sum(tl.where(bins == bucket, counts, 0), 0)
    return bucket, above, inside


@triton.jit
def _group_histogram(z_row, V, group, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                     KEY_BITS: tl.constexpr, ACC: tl.constexpr, BINS: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """Histogram of the digit (bits [SHIFT, SHIFT + WIDTH)) of the keys whose bits above it
    equal `group`."""
    cols = tl.arange(0, BLOCK_V)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        key = _order_key(tl.load(z_row + start + cols, mask=in_row, other=0.0).to(ACC), KEY_BITS)
        member = in_row & ((key >> (SHIFT + WIDTH)) == group)
        digit = ((key >> SHIFT) & ((1 << WIDTH) - 1)).to(tl.int32)
        counts += tl.histogram(digit, BINS, mask=member)
    return counts


@triton.jit
def _online_sum_exp(z, run_max, run_sum, inv_tau):
    """One tile of the running max m of z and sum exp((z - m) / tau), rescaled when m moves
    (safe maximum: 0 while everything so far is -inf)."""
    new_max = tl.maximum(run_max, tl.max(z, 0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp((run_max - safe_max) * inv_tau)  # 0 while nothing has been accumulated
    return new_max, run_sum * rescale + tl.sum(tl.exp((z - safe_max) * inv_tau), 0)


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["has_valid"])
def _select_kernel(
    z_ptr, batch_stride, seq_stride, seq, V, k, tau_ptr, valid_ptr, has_valid,
    ids_ptr, values_ptr, lse_ptr,
    SOFTMAX: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
    K_BLOCK: tl.constexpr, RANK_BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = values_ptr.dtype.element_ty
    BINS: tl.constexpr = 1 << DIGIT_BITS
    LEVELS: tl.constexpr = (KEY_BITS + DIGIT_BITS - 1) // DIGIT_BITS
    TOP_SHIFT: tl.constexpr = KEY_BITS - DIGIT_BITS
    pos = tl.program_id(0).to(tl.int64)
    ids_row = ids_ptr + pos * k
    values_row = values_ptr + pos * k
    slots = tl.arange(0, K_BLOCK)
    in_k = slots < k

    live = True
    if has_valid != 0:
        live = tl.load(valid_ptr + pos) != 0
    if not live:
        tl.store(ids_row + slots, tl.zeros([K_BLOCK], tl.int64), mask=in_k)
        tl.store(values_row + slots, tl.zeros([K_BLOCK], ACC), mask=in_k)
        tl.store(lse_ptr + pos, tl.zeros([], ACC))
    else:
        z_row = z_ptr + (pos // seq) * batch_stride + (pos % seq) * seq_stride
        cols = tl.arange(0, BLOCK_V)
        inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)

        # sweep 0: the top digit of every key, and the softmax statistics
        counts = tl.zeros([BINS], dtype=tl.int32)
        run_max = tl.full([], float("-inf"), ACC)
        run_sum = tl.zeros([], ACC)
        for start in range(0, V, BLOCK_V):
            in_row = start + cols < V
            z = tl.load(z_row + start + cols, mask=in_row, other=float("-inf")).to(ACC)
            # the top digit holds the sign bit: flipped, buckets follow the signed order
            digit = ((_order_key(z, KEY_BITS) >> TOP_SHIFT) & (BINS - 1)) ^ (BINS // 2)
            counts += tl.histogram(digit.to(tl.int32), BINS, mask=in_row)
            if SOFTMAX:
                run_max, run_sum = _online_sum_exp(z, run_max, run_sum, inv_tau)
        bucket, above, inside = _pick_bucket(counts, k, BINS)
        # the group: keys whose bits above group_shift equal `group` (the signed value of the
        # top digit, which undoes the flip)
        group = bucket.to(tl.int64) - BINS // 2
        group_shift = tl.full([], TOP_SHIFT, tl.int32)
        wanted = k - above
        unresolved = inside != wanted

        # the lower digits, while the group holds more keys than are wanted
        for level in tl.static_range(1, LEVELS):
            shift = max(KEY_BITS - (level + 1) * DIGIT_BITS, 0)
            width = KEY_BITS - level * DIGIT_BITS - shift
            if unresolved:
                counts = _group_histogram(z_row, V, group, shift, width, KEY_BITS, ACC, BINS, BLOCK_V)
                bucket, above, inside = _pick_bucket(counts, wanted, BINS)
                group = (group << width) | bucket.to(tl.int64)
                group_shift = tl.full([], shift, tl.int32)
                wanted -= above
                unresolved = inside != wanted

        # collect, in id order: every key above the group, the group's first `wanted` keys
        kept = tl.zeros([], tl.int32)
        members_seen = tl.zeros([], tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            in_row = offs < V
            key = _order_key(tl.load(z_row + offs, mask=in_row, other=0.0).to(ACC), KEY_BITS)
            high = key >> group_shift
            member = (in_row & (high == group)).to(tl.int32)
            member_rank = members_seen + tl.cumsum(member, 0) - member
            keep = (in_row & ((high > group) | ((member != 0) & (member_rank < wanted)))).to(tl.int32)
            slot = kept + tl.cumsum(keep, 0) - keep
            tl.store(ids_row + slot, offs.to(tl.int64), mask=(keep != 0) & (slot < k))
            kept += tl.sum(keep, 0)
            members_seen += tl.sum(member, 0)
        tl.debug_barrier()

        # order: rank of each kept entry = kept entries before it by (key descending, id ascending)
        ids = tl.load(ids_row + slots, mask=in_k, other=0)
        z = tl.load(z_row + ids, mask=in_k, other=0.0).to(ACC)
        key = _order_key(z, KEY_BITS)
        rank = tl.zeros([K_BLOCK], dtype=tl.int32)
        for first in range(0, k, RANK_BLOCK):
            others = first + tl.arange(0, RANK_BLOCK)
            in_others = others < k
            other_ids = tl.load(ids_row + others, mask=in_others, other=0)
            other_key = _order_key(tl.load(z_row + other_ids, mask=in_others, other=0.0).to(ACC), KEY_BITS)
            before = (other_key[:, None] > key[None, :]) | (
                (other_key[:, None] == key[None, :]) & (other_ids[:, None] < ids[None, :]))
            rank += tl.sum((before & in_others[:, None]).to(tl.int32), 0)
        if SOFTMAX:
            best = tl.sum(tl.where(in_k & (rank == 0), z, 0.0), 0)  # z[idx_0], the shift
            log_sum = tl.log(run_sum) + (run_max - best) * inv_tau
            values = tl.exp((z - best) * inv_tau - log_sum)
        else:
            log_sum = tl.zeros([], ACC)
            values = z
        tl.debug_barrier()  # every stashed id has been read
        tl.store(ids_row + rank, ids, mask=in_k)
        tl.store(values_row + rank, values, mask=in_k)
        tl.store(lse_ptr + pos, log_sum)


@triton.jit(do_not_specialize=["has_valid"])
def _scatter_kernel(ids_ptr, values_ptr, valid_ptr, has_valid, scale_ptr, features_ptr, seq, V, k,
                    K_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    ACC: tl.constexpr = features_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    chunk_start = tl.program_id(1).to(tl.int64) * CHUNK
    f_row = features_ptr + b * V
    cols = chunk_start + tl.arange(0, CHUNK)
    tl.store(f_row + cols, tl.zeros([CHUNK], ACC), mask=cols < V)
    scale = tl.load(scale_ptr + b)
    slots = tl.arange(0, K_BLOCK)
    in_k = slots < k
    for t in range(0, seq):
        pos = b * seq + t
        live = True
        if has_valid != 0:
            live = tl.load(valid_ptr + pos) != 0
        if live:
            ids = tl.load(ids_ptr + pos * k + slots, mask=in_k, other=0)
            values = tl.load(values_ptr + pos * k + slots, mask=in_k, other=0.0)
            weight = tl.sum(values, 0) * scale
            mine = in_k & (ids >= chunk_start) & (ids < chunk_start + CHUNK)
            tl.debug_barrier()  # the previous position's stores (or the zeros) are visible
            f = tl.load(f_row + ids, mask=mine, other=0.0)
            tl.store(f_row + ids, f + values * weight, mask=mine)


# ------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["has_valid"])
def _backward_kernel(
    z_ptr, batch_stride, seq_stride, seq, V, k, tau_ptr, valid_ptr, has_valid, scale_ptr,
    ids_ptr, values_ptr, lse_ptr, grad_f_ptr, grad_z_ptr,
    SOFTMAX: tl.constexpr, BLOCK_V: tl.constexpr, K_BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = values_ptr.dtype.element_ty
    OUT: tl.constexpr = grad_z_ptr.dtype.element_ty
    pos = tl.program_id(0).to(tl.int64)
    grad_row = grad_z_ptr + pos * V

    live = True
    if has_valid != 0:
        live = tl.load(valid_ptr + pos) != 0
    if not live:
        _fill(grad_row, V, 0.0, BLOCK_V)
    else:
        b = pos // seq
        slots = tl.arange(0, K_BLOCK)
        in_k = slots < k
        ids = tl.load(ids_ptr + pos * k + slots, mask=in_k, other=0)
        values = tl.load(values_ptr + pos * k + slots, mask=in_k, other=0.0)
        g = tl.load(grad_f_ptr + b * V + ids, mask=in_k, other=0.0)
        scale = tl.load(scale_ptr + b)
        # dv_k = c (g[id_k] s + sum_k' g[id_k'] v_k')
        s = tl.sum(values, 0)
        gv = tl.sum(g * values, 0)
        dv = tl.where(in_k, scale * (g * s + gv), 0.0)
        if SOFTMAX:
            inv_tau = 1.0 / tl.load(tau_ptr).to(ACC)
            D = tl.sum(values * dv, 0)
            z_row = z_ptr + b * batch_stride + (pos % seq) * seq_stride
            best = tl.load(z_row + tl.load(ids_ptr + pos * k)).to(ACC)  # forward's shift
            log_sum = tl.load(lse_ptr + pos)
            dense_scale = -D * inv_tau
            cols = tl.arange(0, BLOCK_V)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(ACC)
                p = tl.exp((z - best) * inv_tau - log_sum)
                tl.store(grad_row + offs, (p * dense_scale).to(OUT), mask=offs < V)
            kept = values * (dv - D) * inv_tau
        else:
            _fill(grad_row, V, 0.0, BLOCK_V)
            kept = dv
        tl.debug_barrier()  # the kept ids overwrite the dense term stored there
        tl.store(grad_row + ids, kept.to(OUT), mask=in_k)


# ------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_v(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the per-position kernels."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(int(vocab)))
    return block_v, max(1, min(NUM_WARPS, block_v // 256))  # at least 8 logits per thread


def _check_input(op: str, logits: torch.Tensor, k: int, temperature: torch.Tensor,
                 valid: Optional[torch.Tensor], transform: str) -> None:
    # The checks of csrc/coactivation/coactivation_op.cpp (describe_input), in the same order.
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be 3-D [batch, seq, vocab]; got {logits.dim()} dims")
    if logits.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: logits must be float32, float64, bfloat16 or float16; got {logits.dtype}")
    if logits.stride(2) != 1:
        raise ValueError(f"{op}: the logits' last dim must be contiguous")
    batch, seq, vocab = logits.shape
    if vocab < 1:
        raise ValueError(f"{op}: vocab (last dim) must be at least 1")
    if not 1 <= k <= min(vocab, MAX_K):
        raise ValueError(f"{op}: k must be in [1, min(V, {MAX_K})] = [1, {min(vocab, MAX_K)}]; got {k}")
    acc = _acc_dtype(logits.dtype)
    if temperature.dim() != 0 or temperature.dtype != acc:
        raise ValueError(f"{op}: temperature must be a 0-d {acc} tensor; got {temperature.dtype} of "
                         f"shape {tuple(temperature.shape)}")
    if transform not in TRANSFORMS:
        raise ValueError(f"{op}: transform must be softmax or logits; got {transform!r}")
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != (batch, seq):
            raise ValueError(f"{op}: valid must be a bool tensor of shape [{batch}, {seq}]")
        if valid.device != logits.device:
            raise ValueError(f"{op}: valid is on {valid.device} but logits are on {logits.device}")


def _sequence_scale(valid: Optional[torch.Tensor], normalize: bool, batch: int, seq: int,
                    acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """c_b [batch]: 1 / (valid positions of b) when normalizing (any value serves when there are
    none: nothing of b is scattered), else 1; on the device, no host sync."""
    if not normalize:
        return torch.ones((batch,), dtype=acc, device=device)
    if valid is not None:
        return valid.sum(1).to(acc).clamp_min(1).reciprocal()
    return torch.full((batch,), 1.0 / max(seq, 1), dtype=acc, device=device)


@triton_op("kdops::coactivation_features_triton", mutates_args=())
def coactivation_features_triton(
    logits: torch.Tensor, k: int, temperature: torch.Tensor, valid: Optional[torch.Tensor],
    transform: str, normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """coactivation_features on Triton: the schema and outputs of ``kdops::coactivation_features``
    (see the module docstring). Returns (features [B, V], top_ids int64 [B, T, k] best first,
    top_values [B, T, k], shifted_lse [B, T]), all but the ids in the accumulate type."""
    _check_input("coactivation_features", logits, k, temperature, valid, transform)
    batch, seq, vocab = logits.shape
    device = logits.device
    acc = _acc_dtype(logits.dtype)
    features = torch.empty((batch, vocab), dtype=acc, device=device)
    top_ids = torch.empty((batch, seq, k), dtype=torch.int64, device=device)
    top_values = torch.empty((batch, seq, k), dtype=acc, device=device)
    shifted_lse = torch.empty((batch, seq), dtype=acc, device=device)
    if batch == 0 or _shape_only(logits):
        return features, top_ids, top_values, shifted_lse

    # A CPU scalar temperature may accompany device logits (a Python float): move it once.
    tau = temperature.to(device).contiguous()
    scale = _sequence_scale(valid, normalize, batch, seq, acc, device)
    # without a mask the kernels never read valid_ptr: any pointer will do
    valid_arg = valid.contiguous() if valid is not None else scale
    k_block = triton.next_power_of_2(k)
    if seq > 0:
        block_v, num_warps = _block_v(vocab)
        wrap_triton(_select_kernel)[(batch * seq,)](
            logits, logits.stride(0), logits.stride(1), seq, vocab, k, tau, valid_arg,
            int(valid is not None), top_ids, top_values, shifted_lse,
            SOFTMAX=transform == "softmax", KEY_BITS=64 if acc == torch.float64 else 32,
            DIGIT_BITS=DIGIT_BITS, BLOCK_V=block_v, K_BLOCK=k_block, RANK_BLOCK=min(RANK_BLOCK, k_block),
            num_warps=num_warps,
        )
    chunk = min(SCATTER_CHUNK, triton.next_power_of_2(vocab))
    wrap_triton(_scatter_kernel)[(batch, triton.cdiv(vocab, chunk))](
        top_ids, top_values, valid_arg, int(valid is not None), scale, features, seq, vocab, k,
        K_BLOCK=k_block, CHUNK=chunk, num_warps=max(1, min(NUM_WARPS, k_block // 32)),
    )
    return features, top_ids, top_values, shifted_lse


@triton_op("kdops::coactivation_features_backward_triton", mutates_args=())
def coactivation_features_backward_triton(
    grad_features: torch.Tensor, logits: torch.Tensor, top_ids: torch.Tensor,
    top_values: torch.Tensor, shifted_lse: torch.Tensor, temperature: torch.Tensor,
    valid: Optional[torch.Tensor], transform: str, normalize: bool,
) -> torch.Tensor:
    """The logit gradient [B, T, V] (the logits' dtype) of coactivation_features on Triton: the
    schema and result of ``kdops::coactivation_features_backward``."""
    op = "coactivation_features_backward"
    if top_ids.dim() != 3:
        raise ValueError(f"{op}: top_ids must be [batch, seq, k]; got {tuple(top_ids.shape)}")
    k = top_ids.shape[2]
    _check_input(op, logits, k, temperature, valid, transform)
    batch, seq, vocab = logits.shape
    acc = _acc_dtype(logits.dtype)
    if top_ids.shape[:2] != (batch, seq) or top_ids.dtype != torch.int64:
        raise ValueError(f"{op}: top_ids must be int64 [{batch}, {seq}, k]")
    if top_values.shape != top_ids.shape or top_values.dtype != acc:
        raise ValueError(f"{op}: top_values must be {acc} of top_ids' shape {tuple(top_ids.shape)}")
    if shifted_lse.shape != (batch, seq) or shifted_lse.dtype != acc:
        raise ValueError(f"{op}: shifted_lse must be {acc} [{batch}, {seq}]")
    if grad_features.shape != (batch, vocab) or grad_features.dtype != acc:
        raise ValueError(f"{op}: grad_features must be {acc} [{batch}, {vocab}]")
    for tensor in (grad_features, top_ids, top_values, shifted_lse):
        if tensor.device != logits.device:
            raise ValueError(f"{op}: every tensor must be on the logits' device {logits.device}")

    device = logits.device
    grad_logits = torch.empty((batch, seq, vocab), dtype=logits.dtype, device=device)
    if batch * seq == 0 or _shape_only(logits):
        return grad_logits
    tau = temperature.to(device).contiguous()
    scale = _sequence_scale(valid, normalize, batch, seq, acc, device)
    valid_arg = valid.contiguous() if valid is not None else scale
    block_v, num_warps = _block_v(vocab)
    # saved tensors may arrive non-contiguous (e.g. from a traced graph): the kernel indexes densely
    wrap_triton(_backward_kernel)[(batch * seq,)](
        logits, logits.stride(0), logits.stride(1), seq, vocab, k, tau, valid_arg,
        int(valid is not None), scale, top_ids.contiguous(), top_values.contiguous(),
        shifted_lse.contiguous(), grad_features.contiguous(), grad_logits,
        SOFTMAX=transform == "softmax", BLOCK_V=block_v, K_BLOCK=triton.next_power_of_2(k),
        num_warps=num_warps,
    )
    return grad_logits
