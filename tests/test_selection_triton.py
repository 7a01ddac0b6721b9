"""The Triton select_top_fraction op (kernels/selection.py, ``kdops::select_top_fraction_triton``)
against torch.quantile (DESIGN.md 3.7 and 4): the same mask, exactly.

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_selection_triton.py

Without TRITON_INTERPRET=1 the same tests run on CUDA tensors where a GPU is present, and the
module is skipped elsewhere. Sizes are small: the interpreter executes every program in numpy.
Under the interpreter there is no bf16 arithmetic, so bf16 runs only on CUDA.
"""

from __future__ import annotations


import pytest
import torch

from triton_device import triton_device_or_skip

DEVICE = triton_device_or_skip()

import kdops  # noqa: E402
from kdops.kernels import TRITON_OPS  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

OP = TRITON_OPS["select_top_fraction"]
INF = float("inf")
NAN = float("nan")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())


def expected_mask(x: torch.Tensor, fraction: float, valid: torch.Tensor | None) -> torch.Tensor:
    """torch.quantile's set on the scores' device (float32 for the 16-bit dtypes)."""
    xf = x.float()
    counted = torch.ones_like(xf, dtype=torch.bool) if valid is None else valid
    if not bool(counted.any()):
        return torch.zeros_like(counted)
    return counted & (xf >= torch.quantile(xf[counted], 1.0 - fraction))


def check(x, fraction, valid=None):
    got = OP(x, fraction, valid)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, expected_mask(x, fraction, valid)), (x.numel(), fraction, x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5, 1000, 2500])
def test_matches_quantile(dtype, n):
    gen = torch.Generator().manual_seed(n)
    for kind, fraction in (("normal", 0.4), ("ties", 0.5), ("wide", 0.1), ("normal", 1.0)):
        if kind == "normal":
            x = torch.randn(n, generator=gen) * 3
        elif kind == "ties":
            x = torch.randint(-3, 4, (n,), generator=gen).float()
        else:
            x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-10, 10, (n,), generator=gen).float())
        x = x.to(dtype=dtype, device=DEVICE)
        check(x, fraction)
        check(x, fraction, (torch.rand(n, generator=gen) < 0.5).to(DEVICE))


def test_narrow_values_need_every_level():
    """Scores within a few ulps of each other share the top two digits: the last level decides."""
    gen = torch.Generator().manual_seed(3)
    x = (1.0 + torch.randint(0, 9, (700,), generator=gen).double() * 2.0**-23).float().to(DEVICE)
    for fraction in (0.9, 0.5, 0.33, 0.01):
        check(x, fraction)


def test_edge_cases():
    for values in ([2.0], [3.0, 3.0], [1.0, NAN, 2.0], [INF], [-INF, 0.0], [-INF, 2.0, INF],
                   [-3e38, 3e38], [-0.0, 0.0, -0.0], [1e-40, 2e-40, -1e-40, 0.0]):
        x = torch.tensor(values, device=DEVICE)
        for fraction in (1.0, 0.75, 0.5, 0.25):
            check(x, fraction)
    x = torch.randn(100, device=DEVICE)
    assert not bool(OP(x, 0.4, torch.zeros(100, dtype=torch.bool, device=DEVICE)).any())
    masked_nan = torch.tensor([1.0, NAN, 3.0], device=DEVICE)
    check(masked_nan, 0.5, torch.tensor([True, False, True], device=DEVICE))
    assert OP(torch.empty(0, device=DEVICE), 0.5, None).shape == (0,)


def test_bad_arguments():
    x = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="fraction"):
        OP(x, 0.0, None)
    with pytest.raises(ValueError, match="float64"):
        OP(x.double(), 0.5, None)
    with pytest.raises(ValueError, match="valid"):
        OP(x, 0.5, torch.ones(9, dtype=torch.bool, device=DEVICE))


def test_public_function_uses_triton():
    x = torch.randn(300, device=DEVICE)
    with kdops.use_backend("triton"):
        got = kdops.select_top_fraction(x.reshape(3, 100), 0.4)
    assert torch.equal(got.reshape(-1), expected_mask(x, 0.4, None))
