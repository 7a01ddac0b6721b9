"""assert_scaled_close: the tolerance check the oracle tests share. The error is measured against
one scale for the whole tensor (by default the largest expected magnitude), not elementwise: a
kernel's rounding error follows the size of the largest terms it sums, so small entries of a
tensor with large ones are held to the large ones' absolute accuracy."""

from __future__ import annotations

import torch


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                        scale: float | None = None) -> None:
    """Same shape, finite, and max |actual - expected| <= rtol * scale (in float64, on the CPU)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if scale is None:
        scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-30) + 1e-300, f"{what}: max error {err} vs scale {scale}"
