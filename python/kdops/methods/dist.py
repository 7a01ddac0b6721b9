"""DIST: knowledge distillation from a stronger teacher by Pearson correlation of predictions.

Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger Teacher". NeurIPS 2022
(arXiv:2205.10536). Matches ``DIST`` of the released code (github.com/hunto/DIST_KD; the
classification training code is github.com/hunto/image_classification_sota,
``lib/models/losses/dist_kd.py`` and ``kd_loss.py``, weights from
``configs/strategies/distill/resnet_dist.yaml``).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .hinton import check_class_logits, check_number, check_teacher, cross_entropy, labeled_rows

PEARSON_EPS = 1e-8  # the code's eps, added to the product of the norms


def mean_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Pearson correlation between x[i] and y[i] (the code's form: the
    cosine of the centred rows, eps added to the product of their norms)."""
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return ((x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1) + PEARSON_EPS)).mean()


class DIST(nn.Module):
    r"""DIST with the cross-entropy term::

        L = w_ce * CE(z_s, y) + w_kd * tau^2 * (beta * (1 - mean_rows pearson(p_s, p_t))
                                               + gamma * (1 - mean_cols pearson(p_s, p_t)))

    p = softmax(z / tau) of the whole batch ``[N, C]``. The inter-class term correlates each
    sample's class probabilities, the intra-class term each class's probabilities across the
    batch, so the loss couples the rows of a batch: it is not a mean of per-row losses (a batch
    of one row gives a constant intra-class term of 1, as in the code). That, and the need for
    the probabilities themselves, is why the KD term is written in torch (in float32, float64
    for float64 logits) rather than with a kdops kernel, which returns per-row divergences only.
    The teacher is frozen (detached).

    Defaults are the authors' ImageNet settings: tau=1, beta=gamma=1, and the training code's
    loss weights 1 (CE) and 2 (DIST); their CIFAR-100 configuration uses tau=4.

    Rows whose label is ``ignore_index`` are unlabeled: they count in the DIST term (which needs
    no labels) but not in CE. This is an addition; there is no other difference from the code.

    Args:
        temperature: tau > 0.
        beta: weight of the inter-class (per-row) relation (>= 0).
        gamma: weight of the intra-class (per-column) relation (>= 0).
        w_ce: weight of the cross-entropy term (>= 0).
        w_kd: weight of the DIST term (>= 0).
        ignore_index: label of unlabeled rows.

    ``forward(student_logits [N, C], teacher_logits [N, C], labels [N], return_components=False)``
    returns the 0-d loss, or with ``return_components`` a dict of
    ``loss``, ``ce``, ``inter`` and ``intra`` (the last two ``1 - mean pearson``, without tau^2
    or weights).
    """

    def __init__(self, *, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 w_ce: float = 1.0, w_kd: float = 2.0, ignore_index: int = -100):
        super().__init__()
        self.temperature = check_number("temperature", temperature, positive=True)
        self.beta = check_number("beta", beta)
        self.gamma = check_number("gamma", gamma)
        self.w_ce = check_number("w_ce", w_ce)
        self.w_kd = check_number("w_kd", w_kd)
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, return_components: bool = False):
        check_class_logits("student_logits", student_logits)
        check_teacher(student_logits, teacher_logits)
        labeled = labeled_rows(labels, student_logits, self.ignore_index)
        tau = self.temperature
        acc = _checks.acc_dtype(student_logits.dtype)
        p_s = torch.softmax(student_logits.to(acc) / tau, dim=1)
        p_t = torch.softmax(teacher_logits.detach().to(acc) / tau, dim=1)
        inter = 1 - mean_pearson(p_s, p_t)
        intra = 1 - mean_pearson(p_s.T, p_t.T)
        ce = cross_entropy(student_logits, labels, labeled)
        loss = self.w_ce * ce + self.w_kd * tau * tau * (self.beta * inter + self.gamma * intra)
        if not return_components:
            return loss
        return {"loss": loss, "ce": ce, "inter": inter, "intra": intra}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, beta={self.beta}, gamma={self.gamma}, "
                f"w_ce={self.w_ce}, w_kd={self.w_kd}")
