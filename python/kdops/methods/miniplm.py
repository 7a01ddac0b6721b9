"""MiniPLM's difference sampling: score a pre-training corpus with a large teacher and a small
reference model, keep the sequences the teacher finds much likelier than the reference does.

Gu, Zhou, Meng, Wang, Huang, "MiniPLM: Knowledge Distillation for Pre-Training Language Models"
(arXiv 2410.17215, 2024; ICLR 2025). Difference sampling refines the corpus offline, once: each
sequence x gets r(x) = log p_teacher(x) - log p_ref(x), taken here as in METHODS.md with the
per-token mean of each model's log-probabilities over the sequence's valid positions, and the
top ``ratio`` of the corpus by r (default 0.5, the paper's setting) is kept, in corpus order, as
the student's pre-training data. Neither model is needed while the student trains.

Matches: the paper's difference sampling with the per-token mean score and ratio 0.5 (METHODS.md,
MiniPLM row). The authors' released code could not be consulted here, so no deviation from it is
claimed or listed; the selection rule is kdops.select_top_fraction's (score >= the (1 - ratio)
quantile, linear interpolation, ties kept), so with ties slightly more than ``ratio`` may be kept.
"""

from __future__ import annotations

import numbers

import torch

from ..sequence import sequence_logprob


def difference_scores(
    teacher_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """MiniPLM's per-sequence score: mean_t log p_teacher(x_t) - mean_t log p_ref(x_t).

    Args:
        teacher_logits: ``[..., T, V_teacher]`` logits of the teacher on the sequences.
        reference_logits: ``[..., T, V_ref]`` logits of the small reference model (the two
            vocabularies may differ in size, e.g. a padded one, as long as the tokens agree).
        labels: ``[..., T]`` the tokens each position predicts (already shifted, see
            :func:`kdops.sequence_logprob`), ``ignore_index`` where a position does not count.

    Returns:
        ``[...]`` float32 scores (float64 for float64 logits); 0 for a sequence without a valid
        position. Differentiable, but meant for inference: run it under ``torch.no_grad()``.
    """
    if not isinstance(teacher_logits, torch.Tensor) or not isinstance(reference_logits, torch.Tensor):
        raise TypeError("teacher_logits and reference_logits must be tensors")
    if teacher_logits.shape[:-1] != reference_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and reference_logits "
            f"{tuple(reference_logits.shape)} must agree on every dim but the vocabulary"
        )
    teacher = sequence_logprob(teacher_logits, labels, ignore_index=ignore_index, reduction="mean")
    reference = sequence_logprob(reference_logits, labels, ignore_index=ignore_index, reduction="mean")
    return teacher - reference.to(teacher.dtype)


def _top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """scores >= the (1 - fraction) quantile, through kdops.select_top_fraction (no size limit)."""
    try:
        from ..selection import select_top_fraction
    except ImportError:  # a build without the selection op: torch.quantile, up to 2^24 scores
        return scores >= torch.quantile(scores, 1.0 - fraction)
    return select_top_fraction(scores, fraction)


class DifferenceSampler:
    """Streaming corpus selection for MiniPLM: feed (ids, scores) batch by batch, then ask for the
    ids of the top ``ratio`` of all scores, in corpus order.

    The selection is exact: the kept set is ``score >= q`` with q the (1 - ratio) quantile of every
    score added (kdops.select_top_fraction, which equals torch.quantile's linear interpolation
    without its 2^24-element limit); ties with q are all kept. "Corpus order" is ascending id.

    Memory: the scores are held on the CPU, 4 bytes (float32) plus 8 bytes (int64 id) per
    sequence, and :meth:`select` needs about twice that at its peak (one concatenated copy and a
    sort of the ids): 10^8 sequences take about 2.4 GB; 10^9 about 24 GB. For a corpus whose
    scores do not fit, split it in two passes: compute :meth:`threshold` on the scores (or on a
    file of them, e.g. ``torch.from_file``), then stream the corpus again and keep each sequence
    whose score is >= that threshold: the same set, in constant memory.

    Example::

        >>> sampler = kdops.methods.DifferenceSampler(ratio=0.5)
        >>> with torch.no_grad():
        ...     for ids, tokens in corpus_batches:                   # ids: [B] sequence indices
        ...         scores = kdops.methods.difference_scores(
        ...             teacher(tokens).logits[:, :-1], reference(tokens).logits[:, :-1], tokens[:, 1:])
        ...         sampler.add(ids, scores)
        >>> keep = sampler.select()                                   # int64 ids, ascending
    """

    def __init__(self, ratio: float = 0.5):
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must be a number in (0, 1]; got {ratio!r}")
        self.ratio = float(ratio)
        self._ids: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Record a batch: ``ids`` [n] integer sequence indices (each id once over the corpus),
        ``scores`` [n] their difference scores (any device; kept on the CPU as float32)."""
        if not isinstance(ids, torch.Tensor) or not isinstance(scores, torch.Tensor):
            raise TypeError("ids and scores must be tensors")
        if ids.dim() != 1 or scores.shape != ids.shape:
            raise ValueError(
                f"ids and scores must be 1-D of one length; got {tuple(ids.shape)} and {tuple(scores.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor; got {ids.dtype}")
        scores = scores.detach().to(device="cpu", dtype=torch.float32)
        if torch.isnan(scores).any():
            raise ValueError("scores must not be NaN (a NaN score means a bad label or a broken model)")
        self._ids.append(ids.detach().to(device="cpu", dtype=torch.int64))
        self._scores.append(scores)
        self._count += ids.numel()

    def _all_scores(self) -> torch.Tensor:
        if self._count == 0:
            raise ValueError("no scores were added")
        if len(self._scores) > 1:  # keep one tensor: later calls do not concatenate again
            self._scores = [torch.cat(self._scores)]
            self._ids = [torch.cat(self._ids)]
        return self._scores[0]

    def threshold(self) -> float:
        """The smallest kept score: a sequence is kept iff its score >= it (the same set as
        score >= the (1 - ratio) quantile, which may lie between two scores)."""
        scores = self._all_scores()
        kept = scores[_top_fraction_mask(scores, self.ratio)]
        return kept.min().item()

    def select(self) -> torch.Tensor:
        """int64 ids of the kept sequences, ascending (corpus order)."""
        scores = self._all_scores()
        keep = _top_fraction_mask(scores, self.ratio)
        ids, order = torch.sort(self._ids[0])
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
            duplicate = ids[1:][ids[1:] == ids[:-1]][0].item()
            raise ValueError(f"sequence id {duplicate} was added more than once")
        return ids[keep[order]]
