"""Tests of MiniPLM's difference sampling (python/kdops/methods/miniplm.py, METHODS.md): the
per-sequence difference score against the float64 oracle, and the streaming selector against
torch.quantile on small corpora."""

from __future__ import annotations

import pytest
import torch

import kdops.reference
from kdops.methods import DifferenceSampler, difference_scores

IGNORE = -100


def _corpus(seed=0, B=6, T=9, V_teacher=50, V_ref=47):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, min(V_teacher, V_ref), (B, T), generator=g)
    labels[0, :3] = IGNORE
    labels[1] = IGNORE  # no valid position: score 0
    teacher = torch.randn(B, T, V_teacher, generator=g) * 2
    reference = torch.randn(B, T, V_ref, generator=g) * 2
    return teacher, reference, labels


def test_difference_scores_match_reference():
    teacher, reference, labels = _corpus()
    scores = difference_scores(teacher, reference, labels)
    expected = (kdops.reference.sequence_logprob(teacher, labels)
                - kdops.reference.sequence_logprob(reference, labels))
    assert scores.shape == (6,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    assert scores[1].item() == 0.0


def test_difference_scores_of_one_model_are_zero_and_strided_logits_work():
    teacher, _, labels = _corpus(seed=1)
    wide = torch.cat([teacher, torch.full_like(teacher[..., :3], float("nan"))], -1)[..., : teacher.shape[-1]]
    assert (difference_scores(teacher, wide, labels) == 0).all()


def test_difference_scores_shape_mismatch():
    teacher, reference, labels = _corpus()
    with pytest.raises(ValueError, match="agree"):
        difference_scores(teacher, reference[:, :-1], labels)


def _expected_ids(ids: torch.Tensor, scores: torch.Tensor, ratio: float) -> torch.Tensor:
    keep = scores >= torch.quantile(scores, 1.0 - ratio)
    return ids[keep].sort().values


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.999, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_sampler_matches_quantile(ratio, ties):
    g = torch.Generator().manual_seed(int(ratio * 1000) + ties)
    n = 1003
    scores = torch.randn(n, generator=g)
    if ties:
        scores = (scores * 2).round() / 2  # a handful of distinct values, ties at the cut
    ids = torch.randperm(n, generator=g) + 10_000  # sparse, shuffled corpus positions
    sampler = DifferenceSampler(ratio)
    for batch in torch.arange(n).split(97):  # batches of the shuffled stream
        sampler.add(ids[batch], scores[batch])
    assert len(sampler) == n
    kept = sampler.select()
    torch.testing.assert_close(kept, _expected_ids(ids, scores, ratio))
    assert kept.numel() >= round(ratio * n) - 1
    by_threshold = ids[scores >= sampler.threshold()].sort().values
    torch.testing.assert_close(by_threshold, kept)


def test_sampler_end_to_end_keeps_half_in_corpus_order():
    sampler = DifferenceSampler()
    all_scores = []
    for start in range(0, 24, 6):
        teacher, reference, labels = _corpus(seed=start, V_ref=50)
        with torch.no_grad():
            scores = difference_scores(teacher, reference, labels)
        sampler.add(torch.arange(start, start + 6), scores)
        all_scores.append(scores)
    kept = sampler.select()
    assert kept.dtype == torch.int64 and (kept[1:] > kept[:-1]).all()
    torch.testing.assert_close(kept, _expected_ids(torch.arange(24), torch.cat(all_scores), 0.5))


def test_sampler_bad_input():
    for ratio in (0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="ratio"):
            DifferenceSampler(ratio)
    sampler = DifferenceSampler()
    with pytest.raises(ValueError, match="no scores"):
        sampler.select()
    with pytest.raises(ValueError, match="NaN"):
        sampler.add(torch.arange(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="one length"):
        sampler.add(torch.arange(3), torch.zeros(2))
    with pytest.raises(ValueError, match="integer"):
        sampler.add(torch.zeros(2), torch.zeros(2))
    sampler.add(torch.tensor([4, 5]), torch.tensor([1.0, 2.0]))
    sampler.add(torch.tensor([5]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="id 5"):
        sampler.select()
