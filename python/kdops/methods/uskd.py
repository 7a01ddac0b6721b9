"""USKD: universal self-knowledge distillation with customized soft labels (no teacher).

Yang, Zeng, Yuan, Li. "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels". ICCV 2023 (arXiv:2303.13005).
Matches ``USKDLoss`` of the released code (github.com/yzd-v/cls_KD,
``mmcls/models/dis_losses/uskd.py``) together with its ``ClassificationDistiller`` (self-KD
mode), which adds the model's own cross-entropy with weight 1.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .hinton import (check_class_logits, check_number, label_nll, labeled_rows, safe_labels,
                     soft_cross_entropy, target_mask)

WEAK_LABEL_SMOOTHING = 0.1  # the code's weak-head target: 0.9 onehot + 0.1 / C
RANK_EPS = 1e-6


class USKD(nn.Module):
    r"""USKD loss of a model against its own predictions and a weak auxiliary head::

        L = w_ce * CE(z, y) + alpha * L_target + beta * L_non_target + mu * L_weak

    * L_target = -mean_rows p_y log s_y with the soft target label
      p_y = s_y^2 + 1 - mean_batch(s_y^2) (s = softmax(z), detached);
    * L_weak = cross-entropy of the weak head's logits w = weak_head(mid_features) against the
      label smoothed by 0.1 (0.9 onehot + 0.1 / C);
    * L_non_target = -mean_rows sum_{k != y} n_k log S^_k, S^ the softmax over the non-target
      logits, n the Zipf soft label: the classes are ranked by
      r_k = softmax(w)_k / (1 - softmax(w)_y + 1e-6) + l_k / (1 - l_y + 1e-6) (all C classes,
      the target included), class k of rank i (0 = largest) gets 1 / (i + 1), and these are
      renormalized over the non-target classes.

    Which l the rank uses is the code-vs-paper difference: the released code passes the final
    logits' **log**-probabilities (``rank_log_probs=True``, the default); the paper's form ranks
    probabilities (``rank_log_probs=False``: l = softmax(z)).

    L_weak = ``F.cross_entropy(label_smoothing=0.1)``; L_non_target is one fused
    :func:`kdops.kd_loss` between the student's logits and the log-Zipf weights, the target class
    -inf in both (plus the Zipf entropy, so the value is the code's cross-entropy); the rank goes
    through a sort and carries no gradient. The weak head, an ``nn.Linear(in_features,
    num_classes)`` on mid-level features (the code's ``fc``; 256 channels for its ImageNet
    ResNet-18), belongs to this module: add ``uskd.parameters()`` to the optimizer.

    Defaults are the authors' ImageNet values: alpha=1, beta=0.1, mu=0.005, and CE weight 1.
    Other differences from the code: the code also takes soft (mixup) labels, keeping their two
    largest entries; only class indices are taken here.

    Args:
        in_features: width of the mid-level features fed to the weak head.
        num_classes: C (>= 2).
        alpha, beta, mu: weights of the target, non-target and weak terms (>= 0).
        w_ce: weight of the model's cross-entropy (>= 0).
        rank_log_probs: rank with log-probabilities (code) or probabilities (paper).

    ``forward(mid_features [N, in_features], logits [N, C], labels [N], return_components=False)``
    returns the 0-d loss, or with ``return_components`` a dict of ``loss``, ``ce``, ``target``,
    ``non_target`` and ``weak`` (unweighted).
    """

    def __init__(self, in_features: int, num_classes: int, *, alpha: float = 1.0, beta: float = 0.1,
                 mu: float = 0.005, w_ce: float = 1.0, rank_log_probs: bool = True):
        super().__init__()
        for name, value, least in (("in_features", in_features, 1), ("num_classes", num_classes, 2)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
        self.alpha = check_number("alpha", alpha)
        self.beta = check_number("beta", beta)
        self.mu = check_number("mu", mu)
        self.w_ce = check_number("w_ce", w_ce)
        self.rank_log_probs = bool(rank_log_probs)
        self.num_classes = int(num_classes)
        self.weak_head = nn.Linear(int(in_features), int(num_classes))

    @torch.no_grad()
    def zipf_logits(self, logits: torch.Tensor, weak_logits: torch.Tensor, labels: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        """log of the Zipf soft label before renormalization, -inf at the target: -log(rank + 1)."""
        acc = _checks.acc_dtype(logits.dtype)
        weak_probs = torch.softmax(weak_logits.to(acc), dim=1)
        final = (torch.log_softmax if self.rank_log_probs else torch.softmax)(logits.to(acc), dim=1)
        index = labels[:, None]
        score = (weak_probs / (1 - weak_probs.gather(1, index) + RANK_EPS)
                 + final / (1 - final.gather(1, index) + RANK_EPS))
        rank = score.argsort(dim=1, descending=True).argsort(dim=1)  # 0 for the largest score
        return (-torch.log1p(rank.to(acc))).masked_fill(target, float("-inf"))

    def forward(self, mid_features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                return_components: bool = False):
        check_class_logits("logits", logits, min_classes=2)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have {self.num_classes} classes; got {tuple(logits.shape)}")
        in_features = self.weak_head.in_features
        if not isinstance(mid_features, torch.Tensor) or mid_features.shape != (logits.shape[0], in_features):
            got = tuple(mid_features.shape) if isinstance(mid_features, torch.Tensor) else type(mid_features).__name__
            raise ValueError(f"mid_features must have shape [{logits.shape[0]}, {in_features}]; got {got}")
        every_row = labeled_rows(labels, logits, ignore_index=None)
        labels = safe_labels(labels, every_row)

        nll = label_nll(logits, labels, every_row)  # -log s_y
        ce = nll.mean()
        with torch.no_grad():
            squared = torch.exp(-2 * nll)  # s_y^2
            soft_target = squared + 1 - squared.mean()
        target_term = (soft_target * nll).mean()

        weak_logits = self.weak_head(mid_features)
        acc = _checks.acc_dtype(logits.dtype)
        weak = F.cross_entropy(weak_logits.to(acc), labels, label_smoothing=WEAK_LABEL_SMOOTHING)

        target = target_mask(logits, labels)
        zipf = self.zipf_logits(logits, weak_logits, labels, target)
        non_target = soft_cross_entropy(logits.masked_fill(target, float("-inf")), zipf)

        loss = self.w_ce * ce + self.alpha * target_term + self.beta * non_target + self.mu * weak
        if not return_components:
            return loss
        return {"loss": loss, "ce": ce, "target": target_term, "non_target": non_target, "weak": weak}

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, mu={self.mu}, w_ce={self.w_ce}, "
                f"rank_log_probs={self.rank_log_probs}")
