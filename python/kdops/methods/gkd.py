"""GKD: generalized knowledge distillation with the generalized Jensen-Shannon divergence.

Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist, Bachem. "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes". ICLR 2024 (arXiv:2306.13649). Code matched: TRL's
``GKDTrainer`` (huggingface/trl, ``trl/experimental/gkd/gkd_trainer.py``: ``generalized_jsd_loss``
and ``compute_loss``), the implementation the paper's method is used through.
"""

from __future__ import annotations

from .token_kd import TokenDivergenceKD


class GKD(TokenDivergenceKD):
    r"""GKD's token-level loss: the generalized JSD between teacher p and student q per token,

        JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q,

    p = softmax(z_t / temperature), q = softmax(z_s / temperature), averaged over the counted
    tokens (sum / ``num_items_in_batch`` when given). beta = 0 is exactly KL(p || q) (forward KL)
    and beta = 1 exactly KL(q || p) (reverse KL): TRL's convention, which :func:`kdops.kd_loss`'s
    ``jsd`` follows.

    Matches TRL's ``compute_loss``: logits at position t against the label t + 1 (the shift is made
    on the labels here, ``shift_labels=True``), tokens with label -100 left out, the token mean or
    sum / ``num_items_in_batch``, no tau^2 factor, teacher constant.

    On-policy data is the trainer's job: with probability ``lmbda`` TRL replaces the batch's
    responses by the student's samples (at ``GKDConfig.temperature``), and ``seq_kd`` by the
    teacher's, before this loss is taken. The loss itself is the same for every data source.

    Differences from the paper and TRL:

    * ``temperature``: TRL's ``generalized_jsd_loss`` takes one but ``compute_loss`` does not pass
      it, so TRL trains at temperature 1 (``GKDConfig.temperature``, default 0.9, is the sampling
      temperature). The default here, 1, matches; another value tempers both softmaxes.
    * At beta = 0 or 1 the paper's formula is identically 0 (m equals one of the two
      distributions); TRL and this class use the plain KLs there, the limits of JSD(beta) / beta
      and JSD(beta) / (1 - beta).
    * The paper writes the sequence-level divergence as each sequence's mean over its tokens,
      averaged over sequences; TRL takes the flat token mean (the default here).
      ``sequence_mean=True`` gives the paper's form (logits ``[..., T, V]``).

    Args:
        beta: JSD interpolation weight in [0, 1] (TRL's default 0.5).
        temperature: softmax temperature of both models, > 0.
        ignore_index: label value of the positions that do not count.
        shift_labels: score position t against label t + 1 (causal LM, TRL's shift); False when
            the labels are already aligned with the logits.
        sequence_mean: the paper's per-sequence mean instead of TRL's token mean.

    Call: ``loss = gkd(student_logits, teacher_logits, labels=None, *, mask=None,
    num_items_in_batch=None)``; logits ``[B, T, V]`` or ``[N, V]``, labels of the leading shape.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 shift_labels: bool = True, sequence_mean: bool = False):
        super().__init__("jsd", temperature=temperature, beta=beta, ignore_index=ignore_index,
                         shift_labels=shift_labels, sequence_mean=sequence_mean)
