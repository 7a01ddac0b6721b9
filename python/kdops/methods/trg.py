"""TRG: knowledge distillation through token-level relationship graphs.

Zhang, Liu, He. "Knowledge Distillation via Token-level Relationship Graph" (arXiv:2306.12442,
2023). No code was released with the paper; this module follows its description (METHODS.md):

    L = CE + kd_weight * KD + inner_weight * L_inner + local_weight * L_local
        + global_weight * L_global

* KD: Hinton KD on the logits, tau^2-scaled, with an optional temperature schedule.
* L_inner (the paper's contextual loss): within each instance, the row-softmaxed token relation
  matrices of student and teacher, R = F F^T / sqrt(D), no normalization, compared by the mean
  squared error (relation_kd_loss kind="mse").
* L_local: a token graph over tokens sampled across the batch; the student's row distributions
  over its neighbours follow the teacher's by KL (kind="kl", scope="batch"), optionally keeping only
  each token's k nearest neighbours in the teacher graph.
* L_global: a contrastive loss between student and teacher tokens: each student token must pick out
  its own teacher token among all tokens of the batch (kind="infonce", scope="batch"), after a
  learned linear projection of the student tokens to the teacher's width.

The paper does not publish its loss weights, temperatures, sample size or schedule: every such
value below is a documented parameter and its default is OURS (marked so), not the authors'.
The relation terms run on :func:`kdops.relation_kd_loss`, which never stores an N x N matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import acc_dtype
from ..divergence import kd_loss
from ..relation import relation_kd_loss


class TRG(nn.Module):
    r"""Token-level relationship graph distillation.

    Args:
        student_dim, teacher_dim: token widths D_s and D_t. The global contrastive term projects
            student tokens to D_t with a learned ``nn.Linear`` (this module's only parameters).
        kd_weight: weight of the logit KD term (ours: 1).
        kd_temperature: a float, or a schedule ``epoch -> tau`` for the logit KD term (ours: 4, the
            usual CIFAR value; the paper mentions a temperature schedule without its form:
            :meth:`linear_temperature` builds one).
        inner_weight: weight of the contextual loss L_inner (ours: 1).
        local_weight: weight of the local graph loss L_local (ours: 1).
        local_tokens: tokens sampled across the batch for L_local (ours: 256; all valid tokens when
            fewer).
        local_temperature: temperature of the L_local relations of L2-normalized tokens (ours: 0.1).
        knn: keep only each sampled token's ``knn`` nearest neighbours in the teacher graph for
            L_local (None: the full graph). The sparsified graph is formed explicitly over the
            sampled tokens ([M, M] with M = local_tokens), in plain torch.
        global_weight: weight of the global contrastive loss (ours: 0.1).
        global_temperature: temperature of L_global on L2-normalized tokens (ours: 0.1).

    Call: ``loss = trg(student_logits, teacher_logits, labels, student_tokens, teacher_tokens,
    mask=None, epoch=0, generator=None)`` with logits ``[B, C]``, labels ``[B]``, tokens
    ``[B, N, D_s]`` / ``[B, N, D_t]`` (ViT patch tokens or a flattened feature map) and an optional
    ``[B, N]`` token mask. The teacher inputs are treated as constants. ``generator`` seeds the
    token sampling of L_local. Returns the total loss; the last terms are kept in
    ``self.last_terms`` (detached) for logging.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        kd_weight: float = 1.0,
        kd_temperature: float | Callable[[float], float] = 4.0,
        inner_weight: float = 1.0,
        local_weight: float = 1.0,
        local_tokens: int = 256,
        local_temperature: float = 0.1,
        knn: int | None = None,
        global_weight: float = 0.1,
        global_temperature: float = 0.1,
    ):
        super().__init__()
        for name, value in (("kd_weight", kd_weight), ("inner_weight", inner_weight),
                            ("local_weight", local_weight), ("global_weight", global_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value}")
        for name, value in (("local_temperature", local_temperature),
                            ("global_temperature", global_temperature)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value}")
        if local_tokens < 2:
            raise ValueError(f"local_tokens must be >= 2; got {local_tokens}")
        if knn is not None and knn < 1:
            raise ValueError(f"knn must be >= 1 or None; got {knn}")
        if not callable(kd_temperature) and not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0 or a schedule; got {kd_temperature}")
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.inner_weight = inner_weight
        self.local_weight = local_weight
        self.local_tokens = local_tokens
        self.local_temperature = local_temperature
        self.knn = knn
        self.global_weight = global_weight
        self.global_temperature = global_temperature
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False)
        self.last_terms: dict[str, torch.Tensor] = {}

    @staticmethod
    def linear_temperature(start: float, end: float, epochs: int) -> Callable[[float], float]:
        """A schedule for ``kd_temperature``: linear from ``start`` to ``end`` over ``epochs``,
        then constant."""
        if not (start > 0 and end > 0 and epochs >= 1):
            raise ValueError("linear_temperature needs start > 0, end > 0 and epochs >= 1")
        return lambda epoch: start + (end - start) * min(max(epoch, 0) / epochs, 1.0)

    def forward(self, student_logits, teacher_logits, labels, student_tokens, teacher_tokens, *,
                mask=None, epoch: float = 0, generator: torch.Generator | None = None):
        if student_tokens.dim() != 3 or teacher_tokens.dim() != 3:
            raise ValueError("student_tokens and teacher_tokens must be [B, N, D]")
        if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
            raise ValueError(f"student and teacher tokens must share [B, N]; got "
                             f"{tuple(student_tokens.shape[:2])} and {tuple(teacher_tokens.shape[:2])}")
        if student_tokens.shape[-1] != self.student_dim or teacher_tokens.shape[-1] != self.teacher_dim:
            raise ValueError(f"token widths must be ({self.student_dim}, {self.teacher_dim}); got "
                             f"({student_tokens.shape[-1]}, {teacher_tokens.shape[-1]})")
        teacher_logits = teacher_logits.detach()
        teacher_tokens = teacher_tokens.detach()
        tau = self.kd_temperature(epoch) if callable(self.kd_temperature) else self.kd_temperature

        terms = {
            "ce": F.cross_entropy(student_logits.to(acc_dtype(student_logits.dtype)), labels),
            "kd": kd_loss(student_logits, teacher_logits, temperature=tau, t2_scale=True),
            "inner": self.inner_loss(student_tokens, teacher_tokens, mask),
            "local": self.local_loss(student_tokens, teacher_tokens, mask, generator),
            "global": relation_kd_loss(self.projection(student_tokens), teacher_tokens, kind="infonce",
                                       temperature=self.global_temperature, mask=mask, scope="batch"),
        }
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return (terms["ce"] + self.kd_weight * terms["kd"] + self.inner_weight * terms["inner"]
                + self.local_weight * terms["local"] + self.global_weight * terms["global"])

    @staticmethod
    def inner_loss(student_tokens, teacher_tokens, mask=None):
        """The contextual loss: relation mse within each instance at tau = sqrt(D) per side. One
        op temperature serves both widths by scaling each side by D^(-1/4) first, so that
        (F D^-1/4)(F D^-1/4)^T = F F^T / sqrt(D)."""
        s = student_tokens * student_tokens.shape[-1] ** -0.25
        t = teacher_tokens * teacher_tokens.shape[-1] ** -0.25
        return relation_kd_loss(s, t, kind="mse", temperature=1.0, normalize=False, mask=mask)

    def local_loss(self, student_tokens, teacher_tokens, mask=None, generator=None):
        """Relation KL over tokens sampled across the batch (optionally kNN-sparsified)."""
        s = student_tokens.reshape(-1, student_tokens.shape[-1])
        t = teacher_tokens.reshape(-1, teacher_tokens.shape[-1])
        valid = torch.arange(s.shape[0], device=s.device)
        if mask is not None:
            valid = valid[mask.reshape(-1)]
        if valid.numel() > self.local_tokens:
            order = torch.randperm(valid.numel(), generator=generator, device="cpu").to(valid.device)
            valid = valid[order[: self.local_tokens]].sort().values
        s, t = s[valid], t[valid]
        if self.knn is None:
            return relation_kd_loss(s[None], t[None], kind="kl", temperature=self.local_temperature,
                                    exclude_diagonal=True)
        return _knn_relation_kl(s, t, self.knn, self.local_temperature)


def _knn_relation_kl(student, teacher, knn, temperature):
    """Relation KL restricted to each token's knn nearest neighbours in the teacher graph
    (cosine similarity, self excluded): the mean over tokens of KL(softmax b || softmax a) over
    the kept entries. Formed explicitly over the M sampled tokens: [M, M] floats."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    a = s @ s.T / temperature
    b = t @ t.T / temperature
    m = a.shape[0]
    if m < 2:
        return a.new_zeros(())
    eye = torch.eye(m, dtype=torch.bool, device=a.device)
    neighbours = b.masked_fill(eye, float("-inf")).topk(min(knn, m - 1), dim=-1).indices
    keep = torch.zeros_like(eye).scatter_(1, neighbours, True)
    log_q = a.masked_fill(~keep, float("-inf")).log_softmax(-1)
    log_p = b.masked_fill(~keep, float("-inf")).log_softmax(-1)
    terms = torch.where(keep, log_p.exp() * (log_p - log_q), torch.zeros_like(a))
    return terms.sum(-1).mean()
