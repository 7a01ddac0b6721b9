"""DistiLLM: distillation of language models with the skew Kullback-Leibler divergences.

Ko, Kim, Chen, Yun. "DistiLLM: Towards Streamlined Distillation for Large Language Models".
ICML 2024 (arXiv:2402.03898). Released code: github.com/jongwooko/distillm
(``distillm/losses.py``: ``skewed_forward_kl``, ``skewed_reverse_kl``; ``finetune.py``).
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from ..divergence import kd_loss
from .token_kd import TokenDivergenceKD, aligned_labels, counted_tokens, reduce_tokens


class DistiLLM(TokenDivergenceKD):
    r"""DistiLLM's skew KL between teacher p and student q per token, mean over the counted tokens:

    ==========  ==========================================================
    skew_fkl    SKL(alpha)  = KL(p || alpha p + (1 - alpha) q)
    skew_rkl    SRKL(alpha) = KL(q || (1 - alpha) p + alpha q)
    ==========  ==========================================================

    p = softmax(z_t / temperature), q = softmax(z_s / temperature); the gradient flows through q
    in the mixture too, as in the code (:func:`kdops.kd_loss`, ``skew_fkl`` / ``skew_rkl``).

    Matches ``distillm/losses.py`` (token mean over labels != -100, no temperature, teacher
    constant). Its training loop adds the cross-entropy, ``(1 - kd_ratio) CE + kd_ratio loss``, and
    the adaptive off-policy sampling (student generations kept in a replay buffer): both are the
    trainer's job; this is the distillation term.

    Differences from the paper, and choices of ours:

    * The code's ``skewed_forward_kl`` returns the cross-entropy -sum p log(alpha p + (1 - alpha) q),
      not the KL: it leaves out the teacher's entropy H(p), a constant for the student. The
      gradient is the same; the value is larger by the token mean of H(p). ``cross_entropy_value``
      (default True, the code's number) adds that mean; False gives the paper's KL.
      ``skewed_reverse_kl`` is the KL exactly, so the flag does not touch ``skew_rkl``.
    * The code's labels (``no_model_batch["label"]``) are already aligned with the logits: pass
      ``shift_labels=False`` to use them as they are. The default, True, takes a Hugging Face
      causal LM's unshifted labels (position t scored against label t + 1).
    * ``temperature`` (default 1, the code's only value) is an addition.

    Args:
        divergence: ``"skew_fkl"`` (the authors' recommended SKL) or ``"skew_rkl"``.
        alpha: skew weight in [0, 1] (the code's ``skew_alpha``, 0.1).
        temperature: softmax temperature of both models, > 0.
        ignore_index: label value of the positions that do not count.
        shift_labels: score position t against label t + 1; False for already aligned labels.
        cross_entropy_value: report ``skew_fkl`` as the code does (see above).

    Call: ``loss = distillm(student_logits, teacher_logits, labels=None, *, mask=None,
    num_items_in_batch=None)``; logits ``[B, T, V]`` or ``[N, V]``, labels of the leading shape.
    The teacher is detached.
    """

    DIVERGENCES = ("skew_fkl", "skew_rkl")

    def __init__(self, divergence: str = "skew_fkl", alpha: float = 0.1, temperature: float = 1.0,
                 ignore_index: int = -100, shift_labels: bool = True, cross_entropy_value: bool = True):
        _checks.check_choice("divergence", divergence, self.DIVERGENCES)
        super().__init__(divergence, temperature=temperature, alpha=alpha, ignore_index=ignore_index,
                         shift_labels=shift_labels)
        self.cross_entropy_value = cross_entropy_value

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        loss = super().forward(student_logits, teacher_logits, labels, mask=mask,
                               num_items_in_batch=num_items_in_batch)
        if not (self.cross_entropy_value and self.divergence == "skew_fkl"):
            return loss
        labels = aligned_labels(labels, self.ignore_index, self.shift_labels)
        counted = counted_tokens(teacher_logits, labels, self.ignore_index, mask)
        entropy = teacher_entropy(teacher_logits.detach(), self.temperature, counted)
        return loss + reduce_tokens(entropy, counted, num_items_in_batch=num_items_in_batch)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cross_entropy_value={self.cross_entropy_value}"


def teacher_entropy(teacher_logits: torch.Tensor, temperature: float, counted: torch.Tensor) -> torch.Tensor:
    """H(softmax(z_t / temperature)) at the counted positions, 0 elsewhere; the logits' leading
    shape, without gradient.

    H(p) = log V - KL(p || uniform): one fused kd_loss sweep over the counted teacher rows, against a
    uniform "student" that is a single zero row broadcast with stride 0 (no [N, V] tensor is made).
    """
    vocab = teacher_logits.shape[-1]
    uniform = teacher_logits.new_zeros(vocab).expand_as(teacher_logits)
    with torch.no_grad():
        kl_to_uniform = kd_loss(uniform, teacher_logits, divergence="fkl", temperature=temperature,
                                mask=counted, reduction="none")
    return torch.where(counted, math.log(vocab) - kl_to_uniform, 0.0)
