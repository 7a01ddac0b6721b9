"""Shared pytest fixtures for the kdops tests."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is available")
    config.addinivalue_line("markers", "slow: slower than the rest (e.g. torch.compile); still run by default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _random_logits(
    shape,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 2.0,
    neg_inf: float | torch.Tensor = 0.0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Normal(0, scale) logits of `shape`, drawn in float32 and then cast (rounded) to `dtype`.

    `neg_inf` is either a fraction of entries to set to -inf (never a whole row: one entry per row
    is always kept finite) or a boolean tensor of the positions to set to -inf, e.g. `x == -inf`
    of another tensor to put -inf at the same positions in student and teacher.
    """
    shape = tuple(shape)
    x = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device) * scale
    if isinstance(neg_inf, torch.Tensor):
        x = x.masked_fill(neg_inf.to(x.device), float("-inf"))
    elif neg_inf > 0:
        drop = torch.rand(shape, generator=generator, device=generator.device) < neg_inf
        keep = torch.randint(0, shape[-1], shape[:-1] + (1,), generator=generator, device=generator.device)
        drop.scatter_(-1, keep, False)
        x = x.masked_fill(drop, float("-inf"))
    return x.to(device=device, dtype=dtype)


@pytest.fixture(scope="session")
def make_gen():
    """`make_gen(seed, device="cpu")` -> a torch.Generator seeded with `seed`."""
    return _seeded_generator


@pytest.fixture(scope="session")
def make_logits():
    """`make_logits(shape, gen, dtype=, scale=, neg_inf=, device=)` -> random logits (see above)."""
    return _random_logits
