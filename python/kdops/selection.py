"""select_top_fraction: keep the scores at or above a quantile (DESIGN.md 3.7).

AdaSPEC keeps the tokens with the largest fraction of the draft's excess loss; MiniPLM keeps the
top half of the sequences by difference score. Both are "score >= torch.quantile(scores,
1 - fraction)": this op returns that mask without sorting (O(N) selection of two order
statistics), without torch.quantile's 2^24-element limit, and bit-for-bit the set torch.quantile
gives where it runs.
"""

from __future__ import annotations

import numbers

import torch

from . import _backend, _checks, kernels_registry
from . import reference as _reference


def select_top_fraction(
    scores: torch.Tensor,
    fraction: float,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Boolean mask of the scores at or above the (1 - fraction) quantile of the valid scores.

    ``out = mask & (scores >= t)`` with ``t = torch.quantile(scores[mask], 1 - fraction)``
    (linear interpolation); ties with t are all kept, so about ``fraction`` of the valid scores
    are kept, more with ties. The result is exactly the set torch.quantile gives, because t is
    computed with torch's own roundings: q = 1 - fraction in double, rounded to the scores'
    dtype; rank = q (n - 1) in that dtype; the order statistics v[floor(rank)] and
    v[ceil(rank)] of the n valid scores; t = torch.lerp(v_lo, v_hi, rank - floor(rank)) with
    torch's fused multiply-adds (csrc/selection/selection.h has the details).

    Decisions:

    * dtypes: float32 and float64 as torch.quantile; bfloat16 and float16 (which torch.quantile
      refuses) are widened exactly to float32, i.e. the set of
      ``torch.quantile(scores[mask].float(), 1 - fraction)``.
    * N above 2^24 (torch.quantile refuses): the rank q (n - 1) is computed in float64 and the
      weight rounded to the scores' compute dtype; everything else is unchanged.
    * No valid score (empty input, or mask all False): nothing is kept.
    * ``fraction = 1``: q = 0, t = the minimum: every valid score is kept (except NaN, below).
    * NaN: as torch.quantile, a NaN among the valid scores makes t NaN and nothing is kept (a
      NaN score is a bug upstream: an all-False mask makes it visible, e.g. as a zero count of
      kept tokens). NaNs at masked-out positions are ignored.
    * Infinities follow torch.quantile's arithmetic too, quirks included: an infinite order
      statistic can make t NaN (``torch.quantile(torch.tensor([inf]), q)`` is NaN: nothing
      kept) or infinite.
    * -0.0 and +0.0 are equal, as in any float comparison.
    * No gradient: the result is a bool mask (scores that require grad are fine).

    Backends: ``"cpu"`` (nth_element), ``"cuda"`` (radix select, no host synchronisation),
    ``"triton"`` (radix select; float32 / bfloat16 / float16), ``"reference"`` (torch.quantile,
    or a sort above 2^24). All are deterministic and give the same mask.

    Args:
        scores: any shape, float32 / float64 / bfloat16 / float16.
        fraction: a number in (0, 1].
        mask: bool tensor of ``scores``' shape on its device; False marks scores that neither
            count towards the quantile nor are kept. None: every score counts.

    Returns:
        A bool tensor of ``scores``' shape.

    Example::

        >>> excess = draft_kl - reference_kl                       # [B, T] per-token scores
        >>> kept = kdops.select_top_fraction(excess, 0.4, mask=labels != -100)
    """
    _check_scores(scores)
    fraction = _check_fraction(fraction)
    valid = _checks.valid_rows(scores.shape, scores.device, None, -100, mask)
    flat = scores.detach().reshape(-1)
    backend = _backend.select("select_top_fraction", scores.device, needs_grad=False)
    if backend == "reference":
        return _reference.select_top_fraction(scores.detach(), fraction, mask=mask)
    if backend == "triton":
        op = kernels_registry.triton_ops()["select_top_fraction"]
    else:
        op = torch.ops.kdops.select_top_fraction.default  # cpu and cuda: the dispatcher picks by device
    return op(flat, fraction, valid).reshape(scores.shape)


def _check_scores(scores) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor; got {type(scores).__name__}")
    if scores.dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"scores must be float32, float64, bfloat16 or float16; got {scores.dtype}")


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(f"fraction must be a number in (0, 1]; got {fraction!r}")
    value = float(fraction)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"fraction must be a number in (0, 1]; got {fraction!r}")
    return value


def select_top_fraction_fake(scores, fraction, valid):
    return torch.empty_like(scores, dtype=torch.bool)


torch.library.register_fake("kdops::select_top_fraction")(select_top_fraction_fake)
