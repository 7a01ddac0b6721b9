"""Float64 oracle of ``kdops.fused_linear_kd_loss`` (DESIGN.md 3.3): the logits materialized in
float64, then the kd_loss / topk_kd_loss oracles."""

from __future__ import annotations

import torch
from torch import Tensor

from .divergence import kd_loss
from .topk import topk_kd_loss


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """hidden @ weight.T (+ bias), softcapped, in float64 (differentiable w.r.t. all three)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    divergence: str = "fkl",
    temperature: float | Tensor = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    renormalize: bool = True,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    t2_scale: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """The float64 oracle of ``kdops.fused_linear_kd_loss``.

    Student logits = softcap(student_hidden @ student_weight.T + student_bias) in float64 (softcap
    None or 0: off); the teacher is ``teacher_logits`` as given, or its logits formed the same way
    from ``teacher_hidden`` / ``teacher_weight`` / ``teacher_bias``, or the top-k
    ``teacher_ids`` / ``teacher_logprobs``. The loss is then ``reference.kd_loss`` or
    ``reference.topk_kd_loss`` with the same options; the float64 loss is returned. Autograd
    flows to every tensor input, in its own dtype.
    """
    student = _logits(student_hidden, student_weight, student_bias, softcap)
    options = dict(divergence=divergence, temperature=temperature, beta=beta, alpha=alpha, labels=labels,
                   ignore_index=ignore_index, mask=mask, reduction=reduction, normalizer=normalizer,
                   t2_scale=t2_scale)
    if teacher_ids is not None:
        return topk_kd_loss(student, teacher_ids, teacher_logprobs, renormalize=renormalize, **options)
    if teacher_logits is None:
        teacher_logits = _logits(teacher_hidden, teacher_weight, teacher_bias, softcap)
    return kd_loss(student, teacher_logits.double(), **options)
