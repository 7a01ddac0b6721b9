"""NKD: normalized knowledge distillation.

Yang, Zeng, Yuan, Li. "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels". ICCV 2023 (arXiv:2303.13005).
Matches ``NKDLoss`` of the released code (github.com/yzd-v/cls_KD,
``mmcls/models/dis_losses/nkd.py`` after the October 2023 fix that removes the target class from
the non-target softmaxes) together with its ``ClassificationDistiller``, which adds the
student's own cross-entropy with weight 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .hinton import (check_class_logits, check_number, check_teacher, label_nll, labeled_mean,
                     labeled_rows, safe_labels, soft_cross_entropy, target_mask)


class NKD(nn.Module):
    r"""Normalized KD with the cross-entropy term::

        L = w_ce * CE(z_s, y) - mean_rows t_y log s_y
            - gamma * tau^2 * mean_rows sum_{k != y} T^_k log S^_k

    t, s: softmax(z_t), softmax(z_s) at temperature 1 (t_y is a constant: no gradient);
    T^, S^: softmax over the non-target logits at temperature tau.

    The non-target term is a cross-entropy, KL(T^ || S^) + H(T^): one fused :func:`kdops.kd_loss`
    on the logits with the target class set to -inf in both (kd_loss takes 0 log 0 = 0 and the
    masked entry gets no gradient, exactly as if it were removed), plus the teacher entropy, a
    constant for the student, so that the value is the code's and not only its gradient. The
    target term reuses the cross-entropy's -log s_y per row. The teacher is frozen (detached).

    Defaults are the authors' ImageNet values (tau=1, gamma=1.5); their CIFAR-100 configuration
    uses tau=3, gamma=3.5.

    Differences from the code: rows whose label is ``ignore_index`` drop out of every term
    (the code has every row labeled); the code also takes soft (mixup) labels by their argmax,
    which is left to the caller here. None otherwise.

    Args:
        temperature: tau > 0 of the non-target term.
        gamma: weight of the non-target term (>= 0).
        w_ce: weight of the cross-entropy term (>= 0; the code's distiller uses 1).
        ignore_index: label of unlabeled rows.

    ``forward(student_logits [N, C], teacher_logits [N, C], labels [N], return_components=False)``
    with C >= 2 returns the 0-d loss, or with ``return_components`` a dict of ``loss``, ``ce``,
    ``target`` and ``non_target`` (the last with its gamma tau^2 factor).
    """

    def __init__(self, *, temperature: float = 1.0, gamma: float = 1.5, w_ce: float = 1.0,
                 ignore_index: int = -100):
        super().__init__()
        self.temperature = check_number("temperature", temperature, positive=True)
        self.gamma = check_number("gamma", gamma)
        self.w_ce = check_number("w_ce", w_ce)
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, return_components: bool = False):
        check_class_logits("student_logits", student_logits, min_classes=2)
        check_teacher(student_logits, teacher_logits)
        labeled = labeled_rows(labels, student_logits, self.ignore_index)
        tau = self.temperature
        teacher = teacher_logits.detach()

        student_nll = label_nll(student_logits, labels, labeled)  # -log s_y
        with torch.no_grad():
            teacher_target_prob = torch.exp(-label_nll(teacher, labels, labeled))  # t_y
        ce = labeled_mean(student_nll, labeled)
        target_term = labeled_mean(teacher_target_prob * student_nll, labeled)

        # the target class set to -inf in both: removed from both softmaxes
        target = target_mask(student_logits, safe_labels(labels, labeled))
        s_non = student_logits.masked_fill(target, float("-inf"))
        t_non = teacher.masked_fill(target, float("-inf"))
        non_target_ce = soft_cross_entropy(s_non, t_non, temperature=tau, rows=labeled)
        non_target = self.gamma * tau * tau * non_target_ce

        loss = self.w_ce * ce + target_term + non_target
        if not return_components:
            return loss
        return {"loss": loss, "ce": ce, "target": target_term, "non_target": non_target}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}, w_ce={self.w_ce}"
