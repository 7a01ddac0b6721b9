"""CTKD: curriculum temperature for knowledge distillation.

Li, Li, Yang, Zhang, Song, Yang, Yang. "Curriculum Temperature for Knowledge Distillation".
AAAI 2023 (arXiv:2211.16231). Matches the global-temperature variant of the released code
(github.com/zhengli97/CTKD: ``models/temp_global.py``, ``helper/loops.py``, ``CosineDecay`` in
``train_student.py``, settings of ``scripts/run_cifar_distill.sh``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..divergence import kd_loss
from .hinton import check_class_logits, check_number, check_teacher, cross_entropy, labeled_rows


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (negative: reversed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def gradient_reversal(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Gradient-reversal layer (Ganin and Lempitsky 2015): x forward, ``factor`` * grad backward."""
    return _ScaleGradient.apply(x, factor)


class CTKD(nn.Module):
    r"""Hinton KD with a learnable temperature trained adversarially through a gradient reversal::

        tau = t_start + t_range * sigmoid(GRL_lambda(theta))
        L = w_ce * CE(z_s, y) + w_kd * tau^2 * mean_rows KL(softmax(z_t / tau) || softmax(z_s / tau))

    The KD term is one fused :func:`kdops.kd_loss` with tau a 0-d tensor that requires grad: the
    op returns dL/dtau along with the student gradient. The gradient-reversal layer between
    theta and tau passes theta ``lambda * dL/dtheta``, where lambda follows the code's cosine
    curriculum over epochs: lambda(e) = lambda_max + (lambda_min - lambda_max) (1 - cos(pi
    min(e, E) / E)) / 2, from 0 to -1 over E = 10 epochs, so that after the ramp the
    temperature *ascends* the KD loss (the "harder" curriculum) while the student descends it.

    theta is this module's parameter (``self.theta``, 0-d, initialized to 1 as in the code):
    add ``ctkd.parameters()`` to the optimizer alongside the student's. ``temperature(epoch)``
    gives the current tau (for logging, detach it).

    Defaults are the released CIFAR-100 script's: t_start=1, t_range=20 (its ``t_end``), lambda
    from 0 to -1 over 10 epochs, w_ce=0.1, w_kd=0.9. ``epoch`` is the code's 1-based epoch.

    Differences from the code: only the global temperature is implemented (the paper's
    instance-wise variant predicts tau per sample with an MLP); the teacher is detached (the code
    computes it under ``torch.no_grad()``); rows whose label is ``ignore_index`` get the KD term
    but not CE (the code has every row labeled). The code's "linear decay" alternative is not
    offered.

    Args:
        t_start: smallest temperature (> 0).
        t_range: span of the temperature above ``t_start`` (>= 0): tau lies in (t_start,
            t_start + t_range).
        lambda_max, lambda_min: the gradient-reversal factor at epoch 0 and from
            ``lambda_epochs`` on.
        lambda_epochs: length of the cosine ramp, in epochs (> 0).
        w_ce, w_kd: weights of the cross-entropy and KD terms (>= 0).
        init_theta: initial value of theta.
        ignore_index: label of unlabeled rows.

    ``forward(student_logits [N, C], teacher_logits [N, C], labels [N], *, epoch)`` returns
    the 0-d loss.
    """

    def __init__(self, *, t_start: float = 1.0, t_range: float = 20.0, lambda_max: float = 0.0,
                 lambda_min: float = -1.0, lambda_epochs: float = 10.0, w_ce: float = 0.1,
                 w_kd: float = 0.9, init_theta: float = 1.0, ignore_index: int = -100):
        super().__init__()
        self.t_start = check_number("t_start", t_start, positive=True)
        self.t_range = check_number("t_range", t_range)
        for name, value in (("lambda_max", lambda_max), ("lambda_min", lambda_min), ("init_theta", init_theta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        self.lambda_max = float(lambda_max)
        self.lambda_min = float(lambda_min)
        self.lambda_epochs = check_number("lambda_epochs", lambda_epochs, positive=True)
        self.w_ce = check_number("w_ce", w_ce)
        self.w_kd = check_number("w_kd", w_kd)
        self.ignore_index = ignore_index
        self.theta = nn.Parameter(torch.tensor(float(init_theta)))

    def reversal_factor(self, epoch: float) -> float:
        """The gradient-reversal factor lambda at ``epoch`` (the code's CosineDecay)."""
        progress = min(check_number("epoch", epoch), self.lambda_epochs) / self.lambda_epochs
        ramp = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.lambda_max + (self.lambda_min - self.lambda_max) * ramp

    def temperature(self, epoch: float) -> torch.Tensor:
        """tau as a 0-d tensor in the graph of theta (through the reversal layer)."""
        theta = gradient_reversal(self.theta, self.reversal_factor(epoch))
        return self.t_start + self.t_range * torch.sigmoid(theta)

    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          labels: torch.Tensor, labeled: torch.Tensor, *, epoch: float) -> torch.Tensor:
        """w_kd tau^2 KL at the learned temperature, without the CE term."""
        return self.w_kd * kd_loss(student_logits, teacher_logits.detach(), divergence="fkl",
                                   temperature=self.temperature(epoch), t2_scale=True)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, *, epoch: float) -> torch.Tensor:
        check_class_logits("student_logits", student_logits)
        check_teacher(student_logits, teacher_logits)
        self.reversal_factor(epoch)  # check epoch before any work
        labeled = labeled_rows(labels, student_logits, self.ignore_index)
        return (self.w_ce * cross_entropy(student_logits, labels, labeled)
                + self.distillation_loss(student_logits, teacher_logits, labels, labeled, epoch=epoch))

    def extra_repr(self) -> str:
        return (f"t_start={self.t_start}, t_range={self.t_range}, lambda_max={self.lambda_max}, "
                f"lambda_min={self.lambda_min}, lambda_epochs={self.lambda_epochs}, w_ce={self.w_ce}, "
                f"w_kd={self.w_kd}")
