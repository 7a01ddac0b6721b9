"""Oracle of select_top_fraction: torch.quantile itself.

Not float64 like the other oracles: the op is defined as torch.quantile's set, so the oracle
computes in the scores' dtype (float32 for bfloat16 / float16, which torch.quantile refuses).
Above 2^24 valid scores, where torch.quantile refuses, it sorts and applies the same arithmetic
with the rank in float64 (csrc/selection/selection.h).
"""

from __future__ import annotations

import math

import torch

TORCH_QUANTILE_MAX = 1 << 24


def select_top_fraction(scores: torch.Tensor, fraction: float, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mask & (scores >= torch.quantile(scores[mask], 1 - fraction))``; all False when no score
    counts. See :func:`kdops.select_top_fraction`."""
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.to(compute)
    counted = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    values = x[counted]
    if values.numel() == 0:
        return torch.zeros_like(counted)
    if values.numel() <= TORCH_QUANTILE_MAX:
        threshold = torch.quantile(values, 1.0 - fraction)
    else:
        threshold = _sorted_quantile(values, 1.0 - fraction)
    return counted & (x >= threshold)


def _sorted_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's arithmetic with the rank in float64 (for more than 2^24 values)."""
    if bool(values.isnan().any()):
        return values.new_tensor(float("nan"))
    ordered = values.sort().values
    q_rounded = float(torch.tensor(q, dtype=values.dtype))
    rank = q_rounded * (values.numel() - 1)
    lo, hi = int(rank), math.ceil(rank)
    weight = values.new_tensor(rank - lo)
    return torch.lerp(ordered[lo : lo + 1], ordered[hi : hi + 1], weight)[0]
