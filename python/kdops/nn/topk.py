from __future__ import annotations

import torch

from ..topk import topk_kd_loss


class TopKKDLoss(torch.nn.Module):
    """Module form of :func:`kdops.topk_kd_loss`; the constructor takes the same options.

    ``forward(student_logits, teacher_ids, teacher_logprobs, labels=None, mask=None,
    normalizer=None)``.
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

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return topk_kd_loss(
            student_logits, teacher_ids, teacher_logprobs, divergence=self.divergence,
            temperature=self.temperature, beta=self.beta, alpha=self.alpha,
            renormalize=self.renormalize, labels=labels, ignore_index=self.ignore_index, mask=mask,
            reduction=self.reduction, normalizer=normalizer, t2_scale=self.t2_scale,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, "
                f"renormalize={self.renormalize}, reduction={self.reduction!r}")
