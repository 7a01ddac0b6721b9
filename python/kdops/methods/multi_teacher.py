"""Multi-teacher KD: a weighted sum of Hinton KD terms, one per teacher.

The weighting follows the common pattern of weighted multi-teacher distillation (fixed or
per-batch teacher weights, e.g. DistillWeighted) and of routed multi-teacher methods that weight
teachers per instance with a router's softmax (e.g. MST-Distill: Li, Yang, Chen, Dong, Chen, Wang,
"MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025, arXiv:2507.07015, whose gate network's softmax weights its teachers per sample). It is the
shared core only: no released code is matched; routers, top-k routing, load balancing and the
teacher-specific parts of those methods are the caller's; the defaults are ours.
"""

from __future__ import annotations

import torch
from torch import nn

from ..divergence import kd_loss
from .hinton import check_class_logits, check_number, check_teacher, cross_entropy, labeled_rows


class MultiTeacherKD(nn.Module):
    r"""Cross-entropy plus a weighted sum of per-teacher KD terms::

        L = w_ce * CE(z_s, y) + w_kd * mean_rows sum_m w_{n,m} tau^2 KL(softmax(z_m / tau) || softmax(z_s / tau))

    Teacher weights, for M teachers:

    * ``weights=None``: the constructor's ``teacher_weights``, or 1 / M each (plain averaging);
    * a tensor ``[M]``: one weight per teacher for the whole batch;
    * a tensor ``[N, M]``: weights per instance, e.g. ``router(x).softmax(-1)``.

    Each teacher's KD is one fused :func:`kdops.kd_loss` with ``reduction="none"`` (the per-row
    loss, tau^2 included), weighted per row and teacher. The weights are used as given (not
    renormalized or checked for sign, which would need a device synchronisation); a weights
    tensor that requires grad receives its gradient, so a router can be trained through the
    loss. The teachers are frozen (detached).

    Rows whose label is ``ignore_index`` are unlabeled: they get the KD terms but not CE.

    Defaults are ours (no authors' default applies): Hinton's CIFAR values tau=4, w_ce=0.1,
    w_kd=0.9.

    Args:
        temperature: tau > 0, shared by all teachers.
        w_ce, w_kd: weights of the cross-entropy and of the KD sum (>= 0).
        teacher_weights: fixed per-teacher weights (>= 0) used when ``forward`` gets none.
        ignore_index: label of unlabeled rows.

    ``forward(student_logits [N, C], teacher_logits (list of M tensors [N, C]), labels [N],
    weights=None)`` returns the 0-d loss.
    """

    def __init__(self, *, temperature: float = 4.0, w_ce: float = 0.1, w_kd: float = 0.9,
                 teacher_weights: list[float] | None = None, ignore_index: int = -100):
        super().__init__()
        self.temperature = check_number("temperature", temperature, positive=True)
        self.w_ce = check_number("w_ce", w_ce)
        self.w_kd = check_number("w_kd", w_kd)
        if teacher_weights is not None:
            if len(teacher_weights) == 0:
                raise ValueError("teacher_weights must hold one weight per teacher; got an empty list")
            teacher_weights = [check_number(f"teacher_weights[{i}]", w) for i, w in enumerate(teacher_weights)]
        self.teacher_weights = teacher_weights
        self.ignore_index = ignore_index

    def teacher_losses(self, student_logits: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
        """Per-row, per-teacher tau^2 KL, ``[N, M]``."""
        return torch.stack([
            kd_loss(student_logits, t.detach(), divergence="fkl", temperature=self.temperature,
                    t2_scale=True, reduction="none")
            for t in teachers], dim=1)

    def _weights(self, weights: torch.Tensor | None, rows: int, teachers: int, like: torch.Tensor) -> torch.Tensor:
        if weights is None:
            if self.teacher_weights is None:
                return like.new_full((teachers,), 1.0 / teachers)
            if len(self.teacher_weights) != teachers:
                raise ValueError(f"teacher_weights has {len(self.teacher_weights)} entries for {teachers} teachers")
            return like.new_tensor(self.teacher_weights)
        if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
            raise ValueError(f"weights must be a floating-point tensor [M] or [N, M]; "
                             f"got {getattr(weights, 'dtype', type(weights).__name__)}")
        if weights.shape not in ((teachers,), (rows, teachers)):
            raise ValueError(f"weights must have shape [{teachers}] (per batch) or [{rows}, {teachers}] "
                             f"(per instance); got {tuple(weights.shape)}")
        if weights.device != like.device:
            raise ValueError(f"weights is on {weights.device} but the logits are on {like.device}")
        return weights.to(like.dtype)

    def forward(self, student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        check_class_logits("student_logits", student_logits)
        teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
        if not teachers:
            raise ValueError("teacher_logits must hold at least one teacher")
        for i, t in enumerate(teachers):
            check_teacher(student_logits, t, f"teacher_logits[{i}]")
        labeled = labeled_rows(labels, student_logits, self.ignore_index)
        per_teacher = self.teacher_losses(student_logits, teachers)  # [N, M]
        w = self._weights(weights, student_logits.shape[0], len(teachers), per_teacher)
        kd = (per_teacher * w).sum(dim=1).mean()
        return self.w_ce * cross_entropy(student_logits, labels, labeled) + self.w_kd * kd

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, w_ce={self.w_ce}, w_kd={self.w_kd}, "
                f"teacher_weights={self.teacher_weights}")
