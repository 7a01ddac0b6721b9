"""Float64 oracle of ``kdops.sequence_logprob`` (DESIGN.md 3.8): log-probabilities of label
sequences, by materializing log_softmax and gathering."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def sequence_logprob(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """log_softmax(logits)[label] per position in float64 (0 where label == ignore_index), then
    per sequence (the last axis of ``labels``) the mean over valid positions (0 when there are
    none), the sum, or, for ``"none"``, the per-position values. Labels must lie in [0, V) or
    equal ignore_index."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    token = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    token = torch.where(valid, token, torch.zeros_like(token))
    if reduction == "none":
        return token
    total = token.sum(-1)
    if reduction == "sum":
        return total
    return total / valid.sum(-1).clamp_min(1).double()
