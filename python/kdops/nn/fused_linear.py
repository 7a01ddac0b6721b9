from __future__ import annotations

import torch

from ..fused_linear import fused_linear_kd_loss


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`kdops.fused_linear_kd_loss`; the constructor takes its options.

    The LM-head weights are arguments of ``forward`` (they belong to the models, not to the loss):
    ``forward(student_hidden, student_weight, student_bias=None, *, teacher_logits=None,
    teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_ids=None,
    teacher_logprobs=None, labels=None, mask=None, normalizer=None)`` with exactly one teacher
    form. ``temperature`` may be an ``nn.Parameter`` (0-d) to learn it.
    """

    def __init__(
        self,
        divergence: str = "fkl",
        *,
        temperature: float | torch.Tensor = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        renormalize: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        t2_scale: bool = False,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha
        self.renormalize = renormalize
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.t2_scale = t2_scale
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, student_bias=student_bias, teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, divergence=self.divergence,
            temperature=self.temperature, beta=self.beta, alpha=self.alpha,
            renormalize=self.renormalize, labels=labels, ignore_index=self.ignore_index, mask=mask,
            reduction=self.reduction, normalizer=normalizer, t2_scale=self.t2_scale,
            softcap=self.softcap, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, t2_scale={self.t2_scale}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}")
