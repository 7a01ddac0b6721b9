"""An MLKD-style Gram relation term on the fused relation kernels.

Jin, Wang, Lin. "Multi-Level Logit Distillation" (CVPR 2023; code: github.com/Jin-Ying/Multi-Level-
Logit-Distillation). Besides instance-level KD, MLKD aligns two Gram matrices of the tempered
predictions P [B, C]: the batch-level P P^T (how samples relate) and the class-level P^T P (how
classes co-occur), by the squared error of the raw matrices.

This module keeps the two levels but compares the Gram matrices row-softmaxed, as relation KD does
everywhere else in kdops: the batch level treats each sample's prediction as a token of one set,
the class level each class's column of predictions, and both run on :func:`kdops.relation_kd_loss`
(kind "mse" by default, or "kl"), which never forms a B x B or C x C matrix.

Differences from MLKD's code (not a drop-in reproduction):

* row-softmaxed Gram matrices at ``gram_temperature`` instead of the raw Gram matrices;
* no confidence masking of the batch and no averaging over several temperatures (compose several
  instances for that);
* the instance-level KD is not included: add :class:`kdops.methods.HintonKD` beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..relation import KINDS, relation_kd_loss


class GramRelationKD(nn.Module):
    r"""Batch- and class-level relation of tempered predictions.

    Args:
        temperature: tau of the predictions p = softmax(z / tau) (MLKD's default 4).
        kind: ``"mse"`` (default) or ``"kl"`` between the row-softmaxed Gram matrices.
        gram_temperature: temperature of the Gram rows (ours: 0.1; p . p <= 1, so a small value
            keeps the row softmax from being nearly uniform).
        batch_weight, class_weight: weights of the two levels (MLKD weighs them 1 and 1).

    Call: ``loss = gram(student_logits, teacher_logits)`` with ``[B, C]`` logits; the teacher is a
    constant.
    """

    def __init__(self, *, temperature: float = 4.0, kind: str = "mse", gram_temperature: float = 0.1,
                 batch_weight: float = 1.0, class_weight: float = 1.0):
        super().__init__()
        if not temperature > 0 or not gram_temperature > 0:
            raise ValueError(f"temperature and gram_temperature must be > 0; got {temperature}, "
                             f"{gram_temperature}")
        if kind not in KINDS or kind == "infonce":
            raise ValueError(f"kind must be 'mse' or 'kl'; got {kind!r}")
        if batch_weight < 0 or class_weight < 0:
            raise ValueError("batch_weight and class_weight must be >= 0")
        self.temperature = temperature
        self.kind = kind
        self.gram_temperature = gram_temperature
        self.batch_weight = batch_weight
        self.class_weight = class_weight

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student and teacher logits must both be [B, C]; got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        p_s = (student_logits.float() / self.temperature).softmax(-1)
        p_t = (teacher_logits.detach().float() / self.temperature).softmax(-1)
        options = dict(kind=self.kind, temperature=self.gram_temperature, normalize=False)
        batch_level = relation_kd_loss(p_s[None], p_t[None], **options)
        class_level = relation_kd_loss(p_s.T[None], p_t.T[None], **options)
        return self.batch_weight * batch_level + self.class_weight * class_level
