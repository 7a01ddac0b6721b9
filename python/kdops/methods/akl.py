"""AKL: adaptive Kullback-Leibler divergence, forward and reverse KL weighted per token by where the
student misses the teacher (head or tail of the teacher's distribution).

Wu, Tao, Wang, Yang, Zhao, Wong. "Rethinking Kullback-Leibler Divergence in Knowledge Distillation
for Large Language Models". COLING 2025 (arXiv:2404.02657). Released code:
github.com/wutaiqiang/LLM_KD_AKL (``AKL.py``: ``get_ratio``, ``get_kl``, ``AKL``, a drop-in for the
distillation loss of MiniLLM's ``finetune.py``).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import _checks
from ..divergence import kd_loss
from .token_kd import (aligned_labels, check_student_teacher, check_temperature, counted_tokens,
                       reduce_tokens)

# Rows of the weight pass are processed a chunk at a time so that its temporaries (two softmaxes,
# the sort and its indices) stay near this many elements whatever N is; the KLs themselves run in
# the fused kd_loss kernels.
_GAP_CHUNK_ELEMENTS = 1 << 22


def check_mu(mu: float) -> float:
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not 0.0 <= float(mu) <= 1.0:
        raise ValueError(f"mu must be a number in [0, 1]; got {mu!r}")
    return float(mu)


def akl_gaps(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mu: float = 0.5,
             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL's head and tail gaps per row, ``(g_head, g_tail)``, each of the logits' leading shape.

    With p = softmax(z_t / temperature), q = softmax(z_s / temperature): sort the vocabulary by p,
    descending (ties by id); the head is the prefix whose cumulative p does not exceed ``mu``, plus
    the teacher's top-1 always (so a teacher with max p > mu still has a head); the tail is the
    rest. g_head = sum over the head of |p - q|, g_tail = the same over the tail. No gradient.
    """
    check_student_teacher(student_logits, teacher_logits)
    mu = check_mu(mu)
    temperature = check_temperature(temperature)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    acc = _checks.acc_dtype(student_logits.dtype)
    student, teacher = _checks.rows_view(student_logits), _checks.rows_view(teacher_logits)
    head = student.new_empty(student.shape[0], dtype=acc)
    tail = torch.empty_like(head)
    chunk = max(1, _GAP_CHUNK_ELEMENTS // vocab)
    with torch.no_grad():
        for start in range(0, student.shape[0], chunk):
            rows = slice(start, start + chunk)
            p = torch.softmax(teacher[rows].to(acc) / temperature, dim=-1)
            q = torch.softmax(student[rows].to(acc) / temperature, dim=-1)
            p_sorted, order = p.sort(dim=-1, descending=True, stable=True)
            gap = (p_sorted - q.gather(-1, order)).abs_()
            in_tail = p_sorted.cumsum(dim=-1) > mu
            in_tail[:, 0] = False  # the teacher's top-1 is always head
            head[rows] = gap.masked_fill(in_tail, 0.0).sum(-1)
            tail[rows] = gap.masked_fill_(~in_tail, 0.0).sum(-1)
    return head.reshape(lead_shape), tail.reshape(lead_shape)


class AKL(nn.Module):
    r"""Adaptive KL: per token, L = (g_head FKL + g_tail RKL) / (g_head + g_tail), the mean over the
    counted tokens, with FKL = KL(p || q), RKL = KL(q || p) (:func:`kdops.kd_loss`, two fused sweeps)
    and g_head, g_tail the student's total absolute error on the head and the tail of the teacher's
    distribution (:func:`akl_gaps`, ``mu`` = the head's cumulative-probability threshold). FKL
    dominates where the student misses the head, RKL where it misses the tail.

    Matches ``AKL.py``: the head is the teacher-sorted prefix with cumulative p <= mu plus the top-1
    (``mask = cum_sum > mu; mask[..., 0] = False``); the weights are constants (the code detaches the
    student's probabilities and takes the teacher's under no_grad); FKL and RKL get the full
    gradient; the loss is the sum over tokens with labels != -100 divided by their number (or by
    ``num_items_in_batch`` when given). The distillation term only: MiniLLM's loop mixes it with the
    cross-entropy, which is the trainer's job.

    Differences from the released code:

    * ``-inf`` logits (a padded vocabulary): the code sets them to 0 before computing the weights,
      which gives those ids probability in p and q; here they have probability 0 in the weights as in
      the KLs.
    * A token where p == q exactly has g_head = g_tail = 0: the code's weights are 0 / 0 = NaN;
      here they are 1/2 each (both KLs and their gradients are 0 there, so the loss is unchanged).
    * The code's labels (``no_model_batch["label"]``) are already aligned with the logits: pass
      ``shift_labels=False`` to use them as they are (the default, True, shifts a Hugging Face
      causal LM's labels so that position t is scored against label t + 1).
    * ``temperature`` (default 1, the code's only value) is an addition; it tempers the weights and
      both KLs alike.

    The paper describes the head as the tokens whose cumulative teacher probability reaches mu; its
    exact boundary rule could not be checked here, so the code's (cumulative p <= mu, top-1 always
    in) is the one implemented.

    Memory: two kd_loss calls, so two [N, V] gradient buffers in a training step; the weight pass
    holds a few [chunk, V] temporaries (chunk = 2^22 / V rows, at least one).

    Args:
        mu: head threshold on the teacher's cumulative probability, in [0, 1] (the code's 0.5).
        temperature: softmax temperature of both models, > 0.
        ignore_index: label value of the positions that do not count.
        shift_labels: score position t against label t + 1; False for already aligned labels.

    Call: ``loss = akl(student_logits, teacher_logits, labels=None, *, mask=None,
    num_items_in_batch=None)``; logits ``[B, T, V]`` or ``[N, V]``, labels of the leading shape. The
    teacher is detached.
    """

    def __init__(self, mu: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 shift_labels: bool = True):
        super().__init__()
        self.mu = check_mu(mu)
        self.temperature = check_temperature(temperature)
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        check_student_teacher(student_logits, teacher_logits)
        _checks.normalizer_tensor(num_items_in_batch)  # checked here: kd_loss does not see it
        teacher_logits = teacher_logits.detach()
        labels = aligned_labels(labels, self.ignore_index, self.shift_labels)
        counted = counted_tokens(student_logits, labels, self.ignore_index, mask)
        head_gap, tail_gap = akl_gaps(student_logits.detach(), teacher_logits, mu=self.mu,
                                      temperature=self.temperature)
        total_gap = head_gap + tail_gap
        fkl_weight = torch.where(total_gap > 0, head_gap / total_gap, 0.5)
        # uncounted rows get weight 0, so that garbage there (NaN logits in padding) cannot leak in
        fkl_weight = torch.where(counted, fkl_weight, 0.0)
        rkl_weight = torch.where(counted, 1.0 - fkl_weight, 0.0)

        options = dict(temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
                       mask=mask, reduction="none")
        fkl = kd_loss(student_logits, teacher_logits, divergence="fkl", **options)
        rkl = kd_loss(student_logits, teacher_logits, divergence="rkl", **options)
        return reduce_tokens(fkl_weight * fkl + rkl_weight * rkl, counted,
                             num_items_in_batch=num_items_in_batch)

    def extra_repr(self) -> str:
        return (f"mu={self.mu}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"shift_labels={self.shift_labels}")
