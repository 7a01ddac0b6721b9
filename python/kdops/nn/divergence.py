from __future__ import annotations

import torch

from ..divergence import kd_loss


class KDLoss(torch.nn.Module):
    """Module form of :func:`kdops.kd_loss`; the constructor takes the same options.

    ``temperature`` may be an ``nn.Parameter`` (0-d) to learn it, as CTKD does.
    ``forward(student_logits, teacher_logits, labels=None, mask=None, normalizer=None)``.
    """

    def __init__(
        self,
        divergence: str = "fkl",
        *,
        temperature: float | torch.Tensor = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        ignore_index: int = -100,
        reduction: str = "mean",
        t2_scale: bool = False,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.temperature = temperature
        self.beta = beta
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.t2_scale = t2_scale

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits, teacher_logits, divergence=self.divergence,
            temperature=self.temperature, beta=self.beta, alpha=self.alpha, labels=labels,
            ignore_index=self.ignore_index, mask=mask, reduction=self.reduction,
            normalizer=normalizer, t2_scale=self.t2_scale,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, t2_scale={self.t2_scale}")
