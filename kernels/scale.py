"""Scales of the fused-gradient ops: the reduction's factor folded in by forward, and backward's
scaling of a fused gradient buffer by grad_output, skipped on the device when the factor is 1.

A fused kd op stores dL/dlogits in forward; backward must multiply it by grad_output. For the
usual ``loss.backward()`` that factor is exactly 1, but reading it on the host would be a sync.
Here every program reads the factor itself and returns at once when it is 1, so the common case
costs a launch instead of a read and a write of the whole buffer (4 GB at 8192 x 128256 bf16).
Used by the eager backward only (a traced backward stays functional and multiplies out of place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _scale_rows_unless_one(x_ptr, factor_ptr, factor_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(factor_ptr + row * factor_stride)
    if factor != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < n_cols
        ptrs = x_ptr + row * n_cols + cols
        x = tl.load(ptrs, mask=live, other=0.0).to(tl.float32)
        tl.store(ptrs, (x * factor).to(x_ptr.dtype.element_ty), mask=live)


def scale_rows_unless_one_(buffer: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """buffer [N, V] (contiguous) *= factor (0-d, or [N] one per row), in place; rows whose factor
    is 1 are not touched."""
    rows, cols = buffer.shape
    if buffer.numel() == 0:
        return buffer
    factor = factor.to(torch.float32).contiguous()
    stride = 0 if factor.dim() == 0 else 1
    grid = (rows, triton.cdiv(cols, BLOCK))
    _scale_rows_unless_one[grid](buffer, factor, stride, cols, BLOCK=BLOCK, num_warps=8)
    return buffer


def reduction_scale(reduction: str, valid, normalizer, rows: int, device) -> torch.Tensor:
    """The factor a loss op folds into its per-row losses and fused gradients, 0-d float32 on the
    device (no host sync): mean -> 1 / normalizer, or 1 / number of valid rows (0 when none);
    sum / none -> 1. The Triton twin of reduction_scale in csrc/common/reduction_op.cpp."""
    acc = torch.float32
    if reduction == "mean" and normalizer is not None:
        return normalizer.to(device=device, dtype=acc).reciprocal()
    if reduction == "mean":
        if valid is not None:
            count = valid.sum().to(acc)
        else:
            count = torch.full((), rows, dtype=acc, device=device)
        return torch.where(count > 0, count.reciprocal(), torch.zeros_like(count))
    return torch.ones((), dtype=acc, device=device)
