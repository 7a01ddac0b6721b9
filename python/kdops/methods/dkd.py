"""DKD: decoupled knowledge distillation.

Zhao, Cui, Song, Qiu, Liang. "Decoupled Knowledge Distillation". CVPR 2022 (arXiv:2203.08679).
Matches ``DKD`` / ``dkd_loss`` of the released mdistiller code
(github.com/megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``, defaults from
``mdistiller/engine/cfg.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..divergence import kd_loss
from .hinton import (check_class_logits, check_number, check_teacher, cross_entropy, labeled_rows,
                     safe_labels, target_mask)


def two_bin_logits(scaled_logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` logits whose softmax is the two-bin distribution [p_y, 1 - p_y] of
    softmax(``scaled_logits``): the target logit and the log-sum-exp of the others.

    kd_loss works on softmaxes of logits, so TCKD becomes a KL between two-column rows; building
    the bins in log space also avoids the code's log(sum of probabilities), which is -inf once
    the non-target mass underflows.
    """
    target_logit = scaled_logits.gather(1, labels[:, None])
    others = scaled_logits.masked_fill(target, float("-inf")).logsumexp(dim=1, keepdim=True)
    return torch.cat([target_logit, others], dim=1)


def push_out_target(scaled_logits: torch.Tensor, target: torch.Tensor, shift: float | None) -> torch.Tensor:
    """The logits with the target class pushed out of the softmax: lowered by ``shift`` (the
    code's 1000) or, with ``shift=None``, removed exactly (-inf: kd_loss takes 0 log 0 = 0)."""
    if shift is None:
        return scaled_logits.masked_fill(target, float("-inf"))
    return torch.where(target, scaled_logits - shift, scaled_logits)


class DKD(nn.Module):
    r"""Decoupled KD with the cross-entropy term::

        L = w_ce * CE(z_s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

    with a = z / tau for student and teacher:

    * TCKD = tau^2 KL([p_t,y, 1 - p_t,y] || [p_s,y, 1 - p_s,y]), the two bins of softmax(a);
    * NCKD = tau^2 KL(softmax(a_t - 1000 e_y) || softmax(a_s - 1000 e_y)): the non-target
      classes, the target pushed out of both softmaxes by subtracting 1000 after dividing by tau.

    Both are means over labeled rows, each one fused :func:`kdops.kd_loss` call: NCKD on the
    shifted ``[N, C]`` logits, TCKD on ``[N, 2]`` two-bin logits ``[a_y, logsumexp_{k!=y} a_k]``
    (their softmax is exactly [p_y, 1 - p_y]). The teacher is frozen (detached).

    ``epoch`` is the training loop's epoch counter as mdistiller passes it (its loop starts at 1,
    so the first epoch gets 1 / warmup of the distillation term); it may be fractional for a
    per-step ramp.

    Defaults are mdistiller's CIFAR-100 values (alpha=1, beta=8, tau=4, warmup=20, w_ce=1); its
    ImageNet ResNet-34 -> ResNet-18 run uses beta=0.5, tau=1, warmup=1.

    Differences from the code, each behind an argument:

    * ``target_shift`` (default 1000, the code's): ``None`` removes the target class exactly,
      the paper's NCKD over the renormalized non-target classes. The two differ only when a
      row's tempered target logit exceeds the others by nearly 1000.
    * TCKD's non-target bin is taken as a log-sum-exp, not log(sum of probabilities): the same
      value, finite where the code's log gives -inf.
    * Rows whose label is ``ignore_index`` drop out of every term (the code has every row
      labeled); means are over the labeled rows, 0 when none are.

    Args:
        alpha: weight of TCKD (>= 0).
        beta: weight of NCKD (>= 0).
        temperature: tau > 0.
        warmup: epochs over which the distillation weight ramps from 0 to 1 (> 0).
        w_ce: weight of the cross-entropy term (>= 0).
        target_shift: amount subtracted from the tempered target logit in NCKD, or None.
        ignore_index: label of unlabeled rows.

    ``forward(student_logits [N, C], teacher_logits [N, C], labels [N], *, epoch)`` with C >= 2
    returns the 0-d loss; ``decoupled_terms`` gives TCKD and NCKD alone (e.g. for logging).
    """

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: float = 20.0, w_ce: float = 1.0, target_shift: float | None = 1000.0,
                 ignore_index: int = -100):
        super().__init__()
        self.alpha = check_number("alpha", alpha)
        self.beta = check_number("beta", beta)
        self.temperature = check_number("temperature", temperature, positive=True)
        self.warmup = check_number("warmup", warmup, positive=True)
        self.w_ce = check_number("w_ce", w_ce)
        self.target_shift = None if target_shift is None else check_number("target_shift", target_shift)
        self.ignore_index = ignore_index

    def warmup_factor(self, epoch: float) -> float:
        """min(epoch / warmup, 1)."""
        return min(check_number("epoch", epoch) / self.warmup, 1.0)

    def decoupled_terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        labels: torch.Tensor, labeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(TCKD, NCKD), each with its tau^2 factor, means over the labeled rows."""
        tau = self.temperature
        acc = _checks.acc_dtype(student_logits.dtype)
        a_s = student_logits.to(acc) / tau
        a_t = teacher_logits.detach().to(acc) / tau
        index = safe_labels(labels, labeled)
        target = target_mask(a_s, index)
        # both terms divide by tau before the target is handled (as the code does), so kd_loss
        # runs at temperature 1 and the tau^2 factor is applied here
        tckd = kd_loss(two_bin_logits(a_s, index, target), two_bin_logits(a_t, index, target),
                       mask=labeled)
        nckd = kd_loss(push_out_target(a_s, target, self.target_shift),
                       push_out_target(a_t, target, self.target_shift), mask=labeled)
        return tau * tau * tckd, tau * tau * nckd

    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          labels: torch.Tensor, labeled: torch.Tensor, *, epoch: float) -> torch.Tensor:
        """min(epoch / warmup, 1) (alpha TCKD + beta NCKD), without the CE term."""
        ramp = self.warmup_factor(epoch)
        tckd, nckd = self.decoupled_terms(student_logits, teacher_logits, labels, labeled)
        return ramp * (self.alpha * tckd + self.beta * nckd)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, *, epoch: float) -> torch.Tensor:
        check_class_logits("student_logits", student_logits, min_classes=2)
        check_teacher(student_logits, teacher_logits)
        self.warmup_factor(epoch)  # check epoch before any work
        labeled = labeled_rows(labels, student_logits, self.ignore_index)
        return (self.w_ce * cross_entropy(student_logits, labels, labeled)
                + self.distillation_loss(student_logits, teacher_logits, labels, labeled, epoch=epoch))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"warmup={self.warmup}, w_ce={self.w_ce}, target_shift={self.target_shift}")
