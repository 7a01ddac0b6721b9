"""Hinton KD, and the argument checks and cross-entropy that every classification method shares.

Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". NIPS 2014 Deep Learning
Workshop (arXiv:1503.02531). Matches ``KD`` / ``kd_loss`` of the released mdistiller code
(github.com/megvii-research/mdistiller, ``mdistiller/distillers/KD.py``), whose CIFAR-100
configuration gives the defaults.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..divergence import kd_loss


# ---- shared by the classification methods ----------------------------------------------------

def check_number(name: str, value, *, positive: bool = False) -> float:
    """A finite real number >= 0 (> 0 with ``positive``), as a float; ValueError naming ``name``."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and abs(float(value)) != float("inf") and (value > 0 if positive else value >= 0))
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}")
    return float(value)


def check_class_logits(name: str, logits: torch.Tensor, *, min_classes: int = 1) -> None:
    """Classification logits: a float tensor ``[N, C]`` with C >= ``min_classes``."""
    _checks.check_logits(name, logits)
    if logits.dim() != 2 or logits.shape[1] < min_classes:
        raise ValueError(f"{name} must have shape [N, C] with C >= {min_classes}; got {tuple(logits.shape)}")


def check_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  name: str = "teacher_logits") -> None:
    _checks.check_logits(name, teacher_logits)
    _checks.check_pair(student_logits, teacher_logits, name)


def labeled_rows(labels: torch.Tensor, logits: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Bool ``[N]``: the rows with a class label (``labels != ignore_index``).

    ``labels`` must be integer ``[N]`` on the logits' device with every label in [0, C) or equal
    to ``ignore_index`` (``None``: every row must be labeled). CPU labels are checked here
    (ValueError); CUDA labels on the device (``torch._assert_async``, no host synchronisation),
    as kdops checks temperatures.
    """
    rows, classes = logits.shape
    if not isinstance(labels, torch.Tensor) or labels.shape != (rows,):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape [{rows}] (one class index per row); got {got}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {logits.device}")
    labeled = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    in_range = ((labels >= 0) & (labels < classes)) | ~labeled
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(in_range.all(), "labels must be in [0, C) or ignore_index")
    elif not bool(in_range.all()):
        bad = labels[~in_range][0].item()
        allowed = f"[0, {classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"labels must be in {allowed}; got {bad}")
    return labeled


def safe_labels(labels: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Labels usable as gather indices: unlabeled rows point at class 0 (their terms are masked)."""
    return labels.masked_fill(~labeled, 0).long()


def target_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[N, C]``, True at each row's label (``labels`` already safe for indexing)."""
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, labels[:, None], True)


def labeled_mean(per_row: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` over the labeled rows; 0 (not NaN) when there are none, no host sync."""
    return torch.where(labeled, per_row, 0).sum() / labeled.sum().clamp_min(1)


def label_nll(logits: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label] per row in the arithmetic dtype, 0 on unlabeled rows."""
    acc = _checks.acc_dtype(logits.dtype)
    return F.cross_entropy(logits.to(acc), safe_labels(labels, labeled), reduction="none") * labeled


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """The CE term of every method: the mean over labeled rows (0 when none are)."""
    return labeled_mean(label_nll(logits, labels, labeled), labeled)


def soft_cross_entropy(student_logits: torch.Tensor, target_logits: torch.Tensor, *,
                       temperature: float = 1.0, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``rows`` (all when None) of -sum_k p_k log q_k with p = softmax(target_logits / tau),
    q = softmax(student_logits / tau); ``-inf`` target logits mark classes with p = 0.

    Cross-entropy against a soft target is KL(p || q) + H(p): the KL is one fused
    :func:`kdops.kd_loss` (loss and student gradient in one sweep), the entropy, a constant for
    the student, is added without a graph so that the value is the cross-entropy itself.
    The target gets no gradient.
    """
    acc = _checks.acc_dtype(student_logits.dtype)
    target = target_logits.detach().to(acc)
    kl = kd_loss(student_logits.to(acc), target, temperature=temperature, mask=rows)
    with torch.no_grad():
        entropy = torch.special.entr(torch.softmax(target / temperature, dim=1)).sum(dim=1)
        mean_entropy = entropy.mean() if rows is None else labeled_mean(entropy, rows)
    return kl + mean_entropy


# ---- Hinton KD --------------------------------------------------------------------------------

class HintonKD(nn.Module):
    r"""Hinton knowledge distillation with the cross-entropy term::

        L = w_ce * CE(z_s, y) + w_kd * tau^2 * mean_rows KL(softmax(z_t / tau) || softmax(z_s / tau))

    The KD term is one fused :func:`kdops.kd_loss` (``divergence="fkl"``, ``t2_scale=True``).
    The teacher is frozen: its logits are detached (the code computes them under
    ``torch.no_grad()``), so no gradient reaches it even when they require grad.

    Defaults are mdistiller's CIFAR-100 values (tau=4, w_ce=0.1, w_kd=0.9); its ImageNet values
    are tau=1, w_ce=0.5, w_kd=0.5.

    Rows whose label is ``ignore_index`` are unlabeled: they get the KD term but not CE (the CE
    mean runs over labeled rows, the KD mean over every row). This is an addition: the code has
    every row labeled, where the two agree. No difference from the code otherwise.

    Args:
        temperature: tau > 0.
        w_ce: weight of the cross-entropy term (>= 0).
        w_kd: weight of the KD term (>= 0).
        ignore_index: label of unlabeled rows.

    ``forward(student_logits [N, C], teacher_logits [N, C], labels [N])`` returns the 0-d loss
    (float32; float64 for float64 logits).
    """

    def __init__(self, *, temperature: float = 4.0, w_ce: float = 0.1, w_kd: float = 0.9,
                 ignore_index: int = -100):
        super().__init__()
        self.temperature = check_number("temperature", temperature, positive=True)
        self.w_ce = check_number("w_ce", w_ce)
        self.w_kd = check_number("w_kd", w_kd)
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        check_class_logits("student_logits", student_logits)
        check_teacher(student_logits, teacher_logits)
        labeled = labeled_rows(labels, student_logits, self.ignore_index)
        return (self.w_ce * cross_entropy(student_logits, labels, labeled)
                + self.distillation_loss(student_logits, teacher_logits, labels, labeled))

    def distillation_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          labels: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
        """The weighted KD term alone, w_kd tau^2 KL (labels are not needed; the signature is
        the one :class:`~kdops.methods.logit_standardization.LogitStandardized` calls)."""
        return self.w_kd * kd_loss(student_logits, teacher_logits.detach(), divergence="fkl",
                                   temperature=self.temperature, t2_scale=True)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, w_ce={self.w_ce}, w_kd={self.w_kd}"
