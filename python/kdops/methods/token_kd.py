"""Token-level distillation of a language model (DistillSpec's divergences) and the acceptance rate
of a speculative-decoding draft.

Zhou, Lyu, Rawat, Menon, Rostamizadeh, Kumar, Kagy, Agarwal. "DistillSpec: Improving Speculative
Decoding via Knowledge Distillation". ICLR 2024 (arXiv:2310.08461). Released code: none that we
know of, so :class:`TokenKD` follows the paper's formulas. The acceptance rate is that of
Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML 2023):
a draft token from q is accepted by a target p with probability sum_v min(p_v, q_v) = 1 - TVD(p, q).

This module also holds what the token-level methods of this package (GKD, DistiLLM, AKL, Swing,
offline top-k) share: the causal-LM label shift and the token / sequence reductions.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import _checks
from ..divergence import kd_loss


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        0.0 < float(temperature) < float("inf")
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    return float(temperature)


def check_student_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Both ``[..., V]`` logits of one shape, dtype and device (ValueError naming the argument)."""
    _checks.check_logits("student_logits", student_logits)
    _checks.check_logits("teacher_logits", teacher_logits)
    _checks.check_pair(student_logits, teacher_logits, "teacher_logits")


def aligned_labels(labels: torch.Tensor | None, ignore_index: int, shift_labels: bool) -> torch.Tensor | None:
    """The labels each logit row is scored against. With ``shift_labels`` (a Hugging Face causal LM's
    unshifted labels) position t gets label t + 1 and the last position ``ignore_index``: the shift
    is made on the labels, so no logits are sliced or copied (the kernels skip ignored rows)."""
    if labels is None or not shift_labels:
        return labels
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1:
        raise ValueError(f"labels must be a tensor [..., T]; "
                         f"got {getattr(labels, 'shape', type(labels).__name__)}")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def counted_tokens(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Bool, the logits' leading shape: the positions that count (label != ignore_index AND mask)."""
    lead_shape = logits.shape[:-1]
    valid = _checks.valid_rows(lead_shape, logits.device, labels, ignore_index, mask)
    if valid is None:
        return torch.ones(lead_shape, dtype=torch.bool, device=logits.device)
    return valid.reshape(lead_shape)


def reduce_tokens(per_token: torch.Tensor, counted: torch.Tensor, *, sequence_mean: bool = False,
                  num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-position losses (0 where a position does not count) to the training loss.

    Token mean (default): the sum over counted positions divided by their number (0 when none
    count) or by ``num_items_in_batch`` (gradient accumulation: the counted tokens of the whole
    accumulated batch). ``sequence_mean``: each sequence's mean over its counted positions (the last
    dim), then the mean over the sequences that have one.
    """
    if sequence_mean:
        counts = counted.sum(-1)
        per_sequence = per_token.sum(-1) / counts.clamp_min(1)
        return per_sequence.sum() / (counts > 0).sum().clamp_min(1)
    denominator = counted.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / denominator


def check_sequence_mean(logits: torch.Tensor, num_items_in_batch) -> None:
    if logits.dim() < 3:
        raise ValueError(f"sequence_mean needs logits [..., T, V] with a sequence dim; "
                         f"got {tuple(logits.shape)}")
    if num_items_in_batch is not None:
        raise ValueError("num_items_in_batch counts tokens: it cannot normalize sequence_mean; pass None")


class TokenDivergenceKD(nn.Module):
    """A kd_loss divergence per token between a student and a frozen teacher, reduced over the
    counted tokens: the shared body of :class:`TokenKD`, ``GKD`` and ``DistiLLM``.

    Call: ``loss = method(student_logits, teacher_logits, labels=None, *, mask=None,
    num_items_in_batch=None)`` with logits ``[B, T, V]`` (or ``[N, V]`` rows) and labels of the
    leading shape, ``ignore_index`` where a position does not count. ``shift_labels=True`` (default)
    takes a causal LM's unshifted labels: position t is scored against label t + 1 (see
    :func:`aligned_labels`; it shifts along the last label dim, so ``[N, V]`` rows of several
    sequences need aligned labels and ``shift_labels=False``); ``mask`` (bool, the leading shape) is
    aligned with the logits and is not shifted. The teacher is detached: no gradient reaches it.
    """

    def __init__(self, divergence: str, *, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 ignore_index: int = -100, shift_labels: bool = True, sequence_mean: bool = False):
        super().__init__()
        _checks.check_unit_interval("beta", beta)
        _checks.check_unit_interval("alpha", alpha)
        self.divergence = divergence
        self.temperature = check_temperature(temperature)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.sequence_mean = sequence_mean

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        labels = aligned_labels(labels, self.ignore_index, self.shift_labels)
        options = dict(divergence=self.divergence, temperature=self.temperature, beta=self.beta,
                       alpha=self.alpha, labels=labels, ignore_index=self.ignore_index, mask=mask)
        if not self.sequence_mean:
            return kd_loss(student_logits, teacher_logits.detach(), normalizer=num_items_in_batch, **options)
        check_sequence_mean(student_logits, num_items_in_batch)
        per_token = kd_loss(student_logits, teacher_logits.detach(), reduction="none", **options)
        return reduce_tokens(per_token, counted_tokens(student_logits, labels, self.ignore_index, mask),
                             sequence_mean=True)

    def extra_repr(self) -> str:
        weight = {"jsd": f", beta={self.beta}", "skew_fkl": f", alpha={self.alpha}",
                  "skew_rkl": f", alpha={self.alpha}"}.get(self.divergence, "")
        return (f"divergence={self.divergence!r}, temperature={self.temperature}{weight}, "
                f"ignore_index={self.ignore_index}, shift_labels={self.shift_labels}, "
                f"sequence_mean={self.sequence_mean}")


class TokenKD(TokenDivergenceKD):
    r"""DistillSpec's token-level distillation of a draft (student) toward a target (teacher).

    Per position, with q = softmax(z_s / temperature) the student and p = softmax(z_t / temperature)
    the teacher, one of DistillSpec's divergences (:func:`kdops.kd_loss`):

    ======  ================================================================================
    fkl     KL(p || q)
    rkl     KL(q || p)
    jsd     beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (the JSD[beta]
            DistillSpec takes from GKD; beta = 0 / 1 give the plain forward / reverse KL)
    tvd     1/2 sum |p - q| = 1 - the acceptance rate of the draft (:func:`acceptance_rate`)
    ======  ================================================================================

    The loss is the mean over the counted (response) tokens of the batch, or their sum divided by
    ``num_items_in_batch``. No tau^2 factor.

    Difference from the paper (no released code to match): the paper writes the sequence-level
    divergence as the mean over each sequence's tokens, averaged over sequences; the default here
    is the flat mean over all counted tokens (the usual trainer convention; the two agree when every
    sequence has as many counted tokens). ``sequence_mean=True`` gives the paper's form (logits
    ``[..., T, V]``; a sequence without counted tokens is left out).

    Where the response comes from (fixed data, teacher or student samples: DistillSpec's on-policy
    variants) is the trainer's business; this is the per-batch loss.

    Args:
        divergence: ``"fkl"``, ``"rkl"``, ``"jsd"`` or ``"tvd"``.
        temperature: softmax temperature of both models, > 0 (distill at the temperature the draft
            will sample at).
        beta: the JSD mixing weight, in [0, 1].
        ignore_index: label value of the positions that do not count (prompt, padding).
        shift_labels: score position t against label t + 1 (a Hugging Face causal LM's unshifted
            labels); False when the labels are already aligned with the logits.
        sequence_mean: the paper's per-sequence mean (see above).

    Call: ``loss = kd(student_logits, teacher_logits, labels=None, *, mask=None,
    num_items_in_batch=None)``; logits ``[B, T, V]`` or ``[N, V]``, labels of the leading shape.
    The teacher is detached.
    """

    DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")

    def __init__(self, divergence: str = "fkl", temperature: float = 1.0, beta: float = 0.5,
                 ignore_index: int = -100, shift_labels: bool = True, sequence_mean: bool = False):
        _checks.check_choice("divergence", divergence, self.DIVERGENCES)
        super().__init__(divergence, temperature=temperature, beta=beta, ignore_index=ignore_index,
                         shift_labels=shift_labels, sequence_mean=sequence_mean)


def acceptance_rate(draft_logits: torch.Tensor, target_logits: torch.Tensor,
                    mask: torch.Tensor | None = None, *, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the counted positions of sum_v min(p_v, q_v) = 1 - TVD(p, q): the probability that
    speculative sampling accepts the draft's token, q = softmax(draft / temperature) and
    p = softmax(target / temperature) at the same positions (Leviathan et al. 2023).

    A metric, computed without gradient (train on it with ``TokenKD("tvd")``, whose loss is one
    minus it). ``mask`` (bool, the leading shape) selects the positions; none counted gives NaN.
    Greedy decoding (temperature -> 0) accepts on argmax agreement instead, which this is not.

    Returns a 0-d float32 tensor (float64 for float64 logits).
    """
    temperature = check_temperature(temperature)
    with torch.no_grad():
        tvd_sum = kd_loss(draft_logits, target_logits, divergence="tvd", temperature=temperature,
                          mask=mask, reduction="sum")
        counted = draft_logits.shape[:-1].numel() if mask is None else mask.sum()
        return 1.0 - tvd_sum / counted
