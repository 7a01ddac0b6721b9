"""Logit standardization: z-score each logit row before the KD term.

Sun, Ren, Li, Wang, Cao. "Logit Standardization in Knowledge Distillation". CVPR 2024
(arXiv:2403.01427). Matches the released code (github.com/sunshangquan/logit-standardization-KD:
``normalize`` in ``mdistiller/distillers/KD.py`` and ``DKD.py``; the ``--logit-stand --base-temp 2
--kd-weight 9`` settings of ``tools/train.py``, which for DKD multiply alpha and beta by the KD
weight).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .dkd import DKD
from .hinton import HintonKD, check_class_logits, check_number, check_teacher, cross_entropy, labeled_rows

STANDARDIZE_EPS = 1e-7  # the code's, added to the standard deviation


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """(z - mean(z)) / (eps + std(z)) over the last dimension, std unbiased (n - 1), as the code.

    Computed in float32 (float64 for float64 logits); the last dimension must hold at least two
    entries (the unbiased std of one entry is undefined).
    """
    _checks.check_logits("logits", logits)
    if logits.shape[-1] < 2:
        raise ValueError(f"logits must have at least 2 entries in the last dimension to be standardized; "
                         f"got {tuple(logits.shape)}")
    check_number("eps", eps)
    z = logits.to(_checks.acc_dtype(logits.dtype))
    return (z - z.mean(dim=-1, keepdim=True)) / (eps + z.std(dim=-1, keepdim=True))


class LogitStandardized(nn.Module):
    r"""Wraps a KD method so that its distillation term sees standardized logits::

        L = w_ce * CE(z_s, y) + distillation(Z(z_s), Z(z_t)),   Z = standardize_logits

    The cross-entropy keeps the raw student logits (as the code), only the KD term is computed on
    z-scores; its temperature is then the paper's "base temperature". ``base`` is a
    :class:`~kdops.methods.hinton.HintonKD`, :class:`~kdops.methods.dkd.DKD` or
    :class:`~kdops.methods.ctkd.CTKD` (anything with ``w_ce``, ``ignore_index`` and a
    ``distillation_loss(student, teacher, labels, labeled, **kwargs)``); extra keyword arguments
    of ``forward`` (DKD's and CTKD's ``epoch``) are passed on. :class:`LogitStandardizedKD` and
    :class:`LogitStandardizedDKD` build the wrapper with the authors' settings.

    No difference from the code (the teacher is frozen there too: its logits are detached).
    """

    def __init__(self, base: nn.Module, *, eps: float = STANDARDIZE_EPS):
        super().__init__()
        if not callable(getattr(base, "distillation_loss", None)) or not hasattr(base, "w_ce"):
            raise ValueError(f"base must be a kdops KD method with w_ce and distillation_loss (HintonKD, "
                             f"DKD, CTKD); got {type(base).__name__}")
        self.base = base
        self.eps = check_number("eps", eps)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, **kwargs) -> torch.Tensor:
        check_class_logits("student_logits", student_logits, min_classes=2)
        check_teacher(student_logits, teacher_logits)
        labeled = labeled_rows(labels, student_logits, self.base.ignore_index)
        student_z = standardize_logits(student_logits, self.eps)
        teacher_z = standardize_logits(teacher_logits.detach(), self.eps)
        return (self.base.w_ce * cross_entropy(student_logits, labels, labeled)
                + self.base.distillation_loss(student_z, teacher_z, labels, labeled, **kwargs))

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LogitStandardizedKD(LogitStandardized):
    """Hinton KD on standardized logits with the authors' CIFAR-100 settings: base temperature 2,
    w_ce=0.1, w_kd=9. ``forward(student_logits, teacher_logits, labels)``."""

    def __init__(self, *, temperature: float = 2.0, w_ce: float = 0.1, w_kd: float = 9.0,
                 eps: float = STANDARDIZE_EPS, ignore_index: int = -100):
        super().__init__(HintonKD(temperature=temperature, w_ce=w_ce, w_kd=w_kd, ignore_index=ignore_index),
                         eps=eps)


class LogitStandardizedDKD(LogitStandardized):
    """DKD on standardized logits with the authors' settings: base temperature 2 and the KD
    weight 9 folded into alpha = 1 * 9 and beta = 8 * 9 (mdistiller's CIFAR values times 9).
    ``forward(student_logits, teacher_logits, labels, *, epoch)``."""

    def __init__(self, *, alpha: float = 9.0, beta: float = 72.0, temperature: float = 2.0,
                 warmup: float = 20.0, w_ce: float = 1.0, target_shift: float | None = 1000.0,
                 eps: float = STANDARDIZE_EPS, ignore_index: int = -100):
        super().__init__(DKD(alpha=alpha, beta=beta, temperature=temperature, warmup=warmup, w_ce=w_ce,
                             target_shift=target_shift, ignore_index=ignore_index), eps=eps)
