"""select_top_fraction (DESIGN.md 3.7) against torch.quantile: the same set, exactly.

The op is defined as ``mask & (scores >= torch.quantile(scores[mask], 1 - fraction))``, so the
oracle is torch.quantile itself (kdops.reference.select_top_fraction: float32 for the 16-bit
dtypes, a sort with the same arithmetic above 2^24 scores) and every comparison is exact: no
tolerance, a mask either is torch's or it is not. GPU backends are compared with torch.quantile
run on the GPU (the contract is torch's result on the tensor's device).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import kdops
import kdops.reference

INF = float("inf")
NAN = float("nan")
OP = torch.ops.kdops.select_top_fraction.default
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SIZES = (1, 2, 3, 7, 64, 100, 1000, 4099, 65537)
FRACTIONS = (1.0, 0.999999, 0.9, 0.5, 0.4, 0.1, 1e-3, 1e-9)


def quantile_mask(scores: torch.Tensor, fraction: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, spelled out with torch.quantile on the scores' device."""
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.reshape(-1).to(compute)
    counted = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.reshape(-1)
    if not bool(counted.any()):
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.quantile(x[counted], 1.0 - fraction)
    return (counted & (x >= threshold)).reshape(scores.shape)


def random_scores(n: int, gen: torch.Generator, dtype: torch.dtype, kind: str = "normal") -> torch.Tensor:
    if kind == "normal":
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    elif kind == "ties":  # small integers: most order statistics are ties
        x = torch.randint(-3, 4, (n,), generator=gen).to(torch.float64)
    elif kind == "wide":  # magnitudes over many binades, both signs
        x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp2(
            torch.randint(-60, 60, (n,), generator=gen).to(torch.float64))
    elif kind == "narrow":  # all within a few ulps of 1: one top-level bucket
        x = 1.0 + torch.randint(0, 50, (n,), generator=gen).to(torch.float64) * 2.0**-23
    else:
        raise ValueError(kind)
    return x.to(dtype)


def random_mask(n: int, gen: torch.Generator, keep: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) < keep


def check(scores, fraction, mask=None, backend="cpu"):
    with kdops.use_backend(backend):
        got = kdops.select_top_fraction(scores, fraction, mask=mask)
    expected = quantile_mask(scores, fraction, mask)
    assert got.dtype == torch.bool and got.shape == scores.shape
    if not torch.equal(got, expected):
        diff = (got != expected).nonzero().flatten()[:5].tolist()
        raise AssertionError(
            f"{backend}: mask differs from torch.quantile's at {diff} (n={scores.numel()}, "
            f"fraction={fraction}, dtype={scores.dtype}); kept {int(got.sum())} vs {int(expected.sum())}"
        )


# ------------------------------------------------------------------------------------------
# CPU backend (and the reference) against torch.quantile
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_quantile_random(backend, dtype, make_gen):
    gen = make_gen(7)
    rng = random.Random(7)
    for n in SIZES:
        for kind in ("normal", "ties", "wide", "narrow"):
            fraction = rng.choice(FRACTIONS + (rng.random() or 0.5,))
            x = random_scores(n, gen, dtype, kind)
            check(x, fraction, backend=backend)
            check(x, fraction, random_mask(n, gen, rng.choice((0.05, 0.5, 0.95))), backend=backend)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_every_fraction_on_ties(fraction, make_gen):
    """Integers as floats: the threshold usually lands on a tie, every copy of which is kept."""
    gen = make_gen(1)
    for n in (5, 1000, 10001):
        x = random_scores(n, gen, torch.float32, "ties")
        check(x, fraction)
        got = kdops.select_top_fraction(x, fraction)
        # ties kept: the kept set is closed upwards and never splits a value
        assert not bool(torch.isin(x[got], x[~got]).any())


def test_fraction_one_keeps_every_valid_score(make_gen):
    gen = make_gen(2)
    x = torch.randn(1000, generator=gen)
    mask = random_mask(1000, gen, 0.6)
    assert bool(kdops.select_top_fraction(x, 1.0).all())
    assert torch.equal(kdops.select_top_fraction(x, 1.0, mask=mask), mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_inputs(dtype):
    for values in ([2.5], [1.0, 2.0], [2.0, 1.0], [3.0, 3.0], [-1.0, 0.0, 1.0]):
        x = torch.tensor(values, dtype=dtype)
        for fraction in FRACTIONS + (0.25, 0.75, 1 / 3, 2 / 3):
            check(x, fraction)


def test_nothing_valid_keeps_nothing():
    x = torch.randn(50)
    assert not bool(kdops.select_top_fraction(x, 0.4, mask=torch.zeros(50, dtype=torch.bool)).any())
    empty = kdops.select_top_fraction(torch.empty(0), 0.4)
    assert empty.shape == (0,) and empty.dtype == torch.bool
    empty2d = kdops.select_top_fraction(torch.empty(3, 0), 0.4, mask=torch.empty(3, 0, dtype=torch.bool))
    assert empty2d.shape == (3, 0)


def test_nan_policy():
    """A NaN among the valid scores makes torch.quantile NaN: nothing is kept. Masked-out NaNs are
    ignored."""
    x = torch.tensor([1.0, NAN, 3.0, 4.0, 5.0])
    assert not bool(kdops.select_top_fraction(x, 0.4).any())
    check(x, 0.4)
    mask = torch.tensor([True, False, True, True, True])
    got = kdops.select_top_fraction(x, 0.5, mask=mask)
    assert got.tolist() == [False, False, False, True, True]
    check(x, 0.5, mask)
    assert not bool(kdops.select_top_fraction(torch.full((4,), NAN), 1.0).any())


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_infinities_and_extremes_follow_torch(dtype):
    """torch.quantile's lerp on an infinite order statistic gives NaN or +-inf (e.g. quantile([inf])
    is NaN): the op keeps exactly what x >= that threshold keeps. Differences that overflow too."""
    big = torch.finfo(dtype).max
    cases = ([INF], [INF, INF], [-INF, 0.0], [-INF, -INF, 1.0], [-INF, 2.0, INF], [0.0, INF],
             [-big, big], [-big, big, big], [-big, -big, 1.0, big], [big / 2, -big / 2, 0.0],
             [-0.0, 0.0, -0.0], [1e-40, 2e-40, -1e-40, 0.0])
    for values in cases:
        x = torch.tensor(values, dtype=torch.float64).to(dtype)
        for fraction in (1.0, 0.9, 0.75, 0.5, 0.25, 0.1):
            check(x, fraction)


def test_subnormal_scores(make_gen):
    gen = make_gen(3)
    x = torch.randn(2000, generator=gen) * 1e-41  # float32 subnormals
    for fraction in (0.5, 0.4, 0.01):
        check(x, fraction)


def test_interpolation_rounding_matches_torch():
    """Cases where the rounding of lerp decides the set. With scores [1, b] the rank is q and
    t = 1 + q (b - 1); taking b - 1 = float32(2^-24 / q) puts q (b - 1) within an ulp of half an ulp
    of 1, so a lerp that rounds the product first (1 + 2^-24: a tie, to 1) keeps 1, and one fused
    multiply-add (above the tie: to 1 + 2^-23) does not, whenever the exact product is above 2^-24.
    torch fuses; the op must keep exactly torch's set."""
    rng = np.random.default_rng(0)
    qs = np.float32(2.0) ** rng.uniform(-20, -10, 400).astype(np.float32)
    gaps = (np.float32(2.0**-24) / qs).astype(np.float32)
    unfused_differs = 0
    for q, gap in zip(qs.tolist(), gaps.tolist()):
        x = torch.tensor([1.0, 1.0 + gap], dtype=torch.float32)
        fraction = 1.0 - q  # exact in double, and 1 - fraction rounds back to q
        got = OP(x, fraction, None)
        assert torch.equal(got, x >= torch.quantile(x, q)), (q, gap)
        product = np.float32(q) * np.float32(float(x[1]) - 1.0)  # rounded to float32
        unfused_differs += bool(got[0]) != bool(np.float32(1.0) + product <= np.float32(1.0))
    assert unfused_differs > 0  # the cases do tell the two roundings apart


def test_matches_sort_oracle_above_torch_limit(make_gen):
    """More scores than torch.quantile accepts (2^24): the rank is taken in float64."""
    gen = make_gen(5)
    n = (1 << 24) + 3
    x = torch.randn(n, generator=gen)
    ordered = x.sort().values
    for fraction in (0.4, 0.123456789):
        got = kdops.select_top_fraction(x, fraction)
        q = float(np.float32(1.0 - fraction))
        rank = q * (n - 1)
        lo = int(rank)
        weight = torch.tensor(rank - lo, dtype=torch.float32)
        t = torch.lerp(ordered[lo : lo + 1], ordered[lo + 1 : lo + 2], weight)
        assert torch.equal(got, x >= t)
        assert torch.equal(got, kdops.reference.select_top_fraction(x, fraction))


# ------------------------------------------------------------------------------------------
# the wrapper: shapes, checks, registration
# ------------------------------------------------------------------------------------------


def test_any_shape_and_mask(make_gen):
    gen = make_gen(6)
    x = torch.randn(4, 33, generator=gen)
    mask = random_mask(4 * 33, gen, 0.7).reshape(4, 33)
    check(x, 0.4, mask)
    check(x[:, ::2], 0.4, mask[:, ::2])  # strided scores are copied once
    scalar = kdops.select_top_fraction(torch.tensor(2.0), 0.5)
    assert scalar.shape == () and bool(scalar)


def test_scores_that_require_grad(make_gen):
    x = torch.randn(100, generator=make_gen(8), requires_grad=True)
    got = kdops.select_top_fraction(x, 0.4)
    assert not got.requires_grad
    assert torch.equal(got, quantile_mask(x.detach(), 0.4))


def test_deterministic(make_gen):
    x = random_scores(100_000, make_gen(9), torch.float32, "ties")
    first = kdops.select_top_fraction(x, 0.37)
    for _ in range(3):
        assert torch.equal(kdops.select_top_fraction(x, 0.37), first)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, NAN, INF, True, "0.5", None])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        kdops.select_top_fraction(torch.randn(10), fraction)


def test_bad_fraction_reaches_no_kernel():
    """The op itself checks too (callers of torch.ops.kdops)."""
    with pytest.raises(ValueError, match="fraction"):
        OP(torch.randn(10), 0.0, None)
    with pytest.raises(ValueError, match="fraction"):
        OP(torch.randn(10), 1.0000001, None)


def test_bad_inputs():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="scores"):
        kdops.select_top_fraction(torch.arange(10), 0.5)
    with pytest.raises(TypeError, match="scores"):
        kdops.select_top_fraction([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="mask"):
        kdops.select_top_fraction(x, 0.5, mask=torch.ones(10))
    with pytest.raises(ValueError, match="mask"):
        kdops.select_top_fraction(x, 0.5, mask=torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        OP(torch.randn(2, 5), 0.5, None)
    with pytest.raises(ValueError, match="valid"):
        OP(x, 0.5, torch.ones(9, dtype=torch.bool))


def test_opcheck(make_gen):
    gen = make_gen(10)
    x = torch.randn(257, generator=gen)
    mask = random_mask(257, gen, 0.5)
    torch.library.opcheck(OP, (x, 0.4, mask))
    torch.library.opcheck(OP, (x.to(torch.bfloat16), 1.0, None))


# ------------------------------------------------------------------------------------------
# GPU backends, against torch.quantile on the GPU
# ------------------------------------------------------------------------------------------

GPU_BACKENDS = ("cuda", "triton")


def _gpu_dtypes(backend):
    return DTYPES if backend == "cuda" else (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_quantile(backend, make_gen):
    gen = make_gen(11)
    rng = random.Random(11)
    for dtype in _gpu_dtypes(backend):
        for n in SIZES + (1 << 20, 3_000_001):
            for kind in ("normal", "ties", "wide", "narrow"):
                fraction = rng.choice(FRACTIONS)
                x = random_scores(n, gen, dtype, kind).cuda()
                check(x, fraction, backend=backend)
                check(x, fraction, random_mask(n, gen, 0.5).cuda(), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_edge_cases(backend):
    for dtype in _gpu_dtypes(backend):
        big = torch.finfo(dtype).max
        cases = ([2.0], [1.0, 2.0], [3.0, 3.0], [1.0, NAN, 2.0], [INF], [-INF, 0.0], [-INF, 2.0, INF],
                 [-big, big], [-big, -big, 1.0, big], [-0.0, 0.0, -0.0], [1e-40, 2e-40, -1e-40, 0.0])
        for values in cases:
            x = torch.tensor(values, dtype=torch.float64).to(dtype).cuda()
            for fraction in (1.0, 0.75, 0.5, 0.25, 0.1):
                check(x, fraction, backend=backend)
        x = torch.randn(1000, device="cuda").to(dtype)
        with kdops.use_backend(backend):
            assert not bool(kdops.select_top_fraction(x, 0.4, mask=torch.zeros_like(x, dtype=torch.bool)).any())
            assert bool(kdops.select_top_fraction(x, 1.0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_above_torch_limit(backend, make_gen):
    gen = make_gen(12)
    n = (1 << 24) + 1001
    x = random_scores(n, gen, torch.float32, "normal")
    mask = random_mask(n, gen, 0.999)
    expected = kdops.reference.select_top_fraction(x, 0.4, mask=mask)  # sort-based, on the CPU
    with kdops.use_backend(backend):
        got = kdops.select_top_fraction(x.cuda(), 0.4, mask=mask.cuda())
    assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
def test_gpu_opcheck():
    x = torch.randn(1000, device="cuda")
    torch.library.opcheck(OP, (x, 0.4, x > 0))


def test_default_backend_order():
    assert kdops.available_backends("select_top_fraction", torch.device("cpu"), False)[0] == "cpu"
