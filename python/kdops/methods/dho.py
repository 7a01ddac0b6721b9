"""DHO: dual-head optimization for (semi-supervised) knowledge distillation.

Kang, Lee, Jang, Hwang. "Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization" (arXiv:2505.07675, 2025). Matches the released
code (github.com/erjui/DHO: ``train_imgnet.py`` / ``train_others.py``: ``StudentModel``, the loss
of ``train_student`` and ``evaluate``'s head mixture and its grid search).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..divergence import kd_loss
from .hinton import check_class_logits, check_number, check_teacher, cross_entropy, labeled_rows

# the code's grid for the inference mixture (searched on held-out data)
MIXTURE_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
MIXTURE_BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


class DualHead(nn.Module):
    """Two linear heads on the same features: ``forward(features) -> (ce_logits, kd_logits)``.

    ``kd_logit_scale`` (off by default) applies the KD head to L2-normalized features and scales
    its logits, as the code's CLIP students do (scale 100, both heads initialized from CLIP's
    text embeddings, which is the caller's business); plain linear heads are the paper's
    description.
    """

    def __init__(self, in_features: int, num_classes: int, *, kd_logit_scale: float | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.ce_head = nn.Linear(int(in_features), int(num_classes))
        self.kd_head = nn.Linear(int(in_features), int(num_classes))
        self.kd_logit_scale = (None if kd_logit_scale is None
                               else check_number("kd_logit_scale", kd_logit_scale, positive=True))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kd_logit_scale is None:
            return self.ce_head(features), self.kd_head(features)
        return self.ce_head(features), self.kd_head(F.normalize(features, dim=-1)) * self.kd_logit_scale


class DHO(nn.Module):
    r"""DHO training loss on the two heads' logits, and the inference mixture::

        L = w_ce * CE(z_ce, y) + w_kd * tau^2 (mean_labeled KL(p_t || q_kd) + mean_unlabeled KL(p_t || q_kd))
        p(x) = alpha softmax(z_ce) + (1 - alpha) softmax(z_kd / beta)        (inference)

    with p_t = softmax(z_t / tau), q_kd = softmax(z_kd / tau). The CE head learns from the labels
    only and the KD head from the teacher only, so their gradients never conflict in one head.
    Rows whose label is ``ignore_index`` are the unlabeled ones: they train only the KD head. As
    in the code (which feeds a labeled and an unlabeled batch), the KD term is the sum of the
    mean over labeled rows and the mean over unlabeled rows (a part without rows adds 0): one
    fused :func:`kdops.kd_loss` with ``reduction="none"``, weighted per row. The teacher is frozen
    (detached).

    Defaults are the code's (``train_imgnet.py``, ``train_others.py``): tau=2, w_ce=w_kd=0.5
    (its ``train_imgnet_semi.py`` uses 1 and 1). Differences from the code: labeled and
    unlabeled rows come in one batch marked by ``ignore_index`` instead of two batches (the
    same loss); nothing else.

    The mixture's alpha and beta are chosen on held-out data: :meth:`search_mixture` runs the
    code's grid (alpha in 0, 0.05, ..., 1; beta in 0.5, 0.75, 1, 1.25, 1.5, 2, 4) and keeps the
    first best accuracy in its order.

    Args:
        temperature: tau > 0.
        w_ce, w_kd: weights of the two heads' losses (>= 0).
        ignore_index: label of unlabeled rows.

    ``forward(ce_logits [N, C], kd_logits [N, C], teacher_logits [N, C], labels [N])`` returns the
    0-d loss.
    """

    def __init__(self, *, temperature: float = 2.0, w_ce: float = 0.5, w_kd: float = 0.5,
                 ignore_index: int = -100):
        super().__init__()
        self.temperature = check_number("temperature", temperature, positive=True)
        self.w_ce = check_number("w_ce", w_ce)
        self.w_kd = check_number("w_kd", w_kd)
        self.ignore_index = ignore_index

    def forward(self, ce_logits: torch.Tensor, kd_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        check_class_logits("ce_logits", ce_logits)
        check_class_logits("kd_logits", kd_logits)
        check_teacher(kd_logits, ce_logits, "ce_logits")
        check_teacher(kd_logits, teacher_logits)
        labeled = labeled_rows(labels, ce_logits, self.ignore_index)
        per_row = kd_loss(kd_logits, teacher_logits.detach(), divergence="fkl", temperature=self.temperature,
                          t2_scale=True, reduction="none")
        # 1 / (rows in the part) per row: the sum of the labeled and the unlabeled means
        n_labeled = labeled.sum()
        part_size = torch.where(labeled, n_labeled, labeled.numel() - n_labeled)
        kd = (per_row / part_size).sum()
        return self.w_ce * cross_entropy(ce_logits, labels, labeled) + self.w_kd * kd

    @staticmethod
    def mixture(ce_logits: torch.Tensor, kd_logits: torch.Tensor, *, alpha: float, beta: float) -> torch.Tensor:
        """Class probabilities alpha softmax(z_ce) + (1 - alpha) softmax(z_kd / beta)."""
        check_class_logits("ce_logits", ce_logits)
        check_teacher(ce_logits, kd_logits, "kd_logits")
        alpha = check_number("alpha", alpha)
        if alpha > 1:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
        beta = check_number("beta", beta, positive=True)
        acc = _checks.acc_dtype(ce_logits.dtype)
        return (alpha * torch.softmax(ce_logits.to(acc), dim=1)
                + (1 - alpha) * torch.softmax(kd_logits.to(acc) / beta, dim=1))

    @staticmethod
    @torch.no_grad()
    def search_mixture(ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, *,
                       alphas=MIXTURE_ALPHAS, betas=MIXTURE_BETAS) -> tuple[float, float, float]:
        """(alpha, beta, accuracy) of the best mixture on held-out logits and labels; betas in the
        outer loop, the first strictly best kept (the code's order)."""
        check_class_logits("ce_logits", ce_logits)
        labeled_rows(labels, ce_logits, ignore_index=None)
        best = (0.0, 1.0, -1.0)
        for beta in betas:
            for alpha in alphas:
                predicted = DHO.mixture(ce_logits, kd_logits, alpha=alpha, beta=beta).argmax(dim=1)
                accuracy = (predicted == labels).double().mean().item()
                if accuracy > best[2]:
                    best = (float(alpha), float(beta), accuracy)
        return best

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, w_ce={self.w_ce}, w_kd={self.w_kd}"
