"""The Triton adaspec_token_kl op (kernels/adaspec.py, ``kdops::adaspec_token_kl_triton``) against the
float64 oracle ``kdops.reference.adaspec_token_kl`` and the C++ op (DESIGN.md 3.7 and 4).

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests/test_adaspec_triton.py

Without TRITON_INTERPRET=1 the same tests run on CUDA tensors where a GPU is present, and the
module is skipped elsewhere. Shapes are tiny: the interpreter executes every program in numpy.
Under the interpreter there is no bf16 arithmetic, so bf16 runs only on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from triton_device import triton_device_or_skip

DEVICE = triton_device_or_skip()

import kdops  # noqa: E402
import kdops.reference  # noqa: E402
from kdops.kernels import TRITON_OPS  # noqa: E402
from kdops.kernels import adaspec as triton_adaspec  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

OP = TRITON_OPS["adaspec_token_kl"]
INF = float("inf")
NAN = float("nan")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())


def _triple(rows, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(rows, V, generator=g) * 2.0
    draft = target + torch.randn(rows, V, generator=g) * (torch.rand(rows, 1, generator=g) + 0.1)
    reference = target + torch.randn(rows, V, generator=g) * (torch.rand(rows, 1, generator=g) + 0.1)
    return tuple(x.to(device=DEVICE, dtype=dtype) for x in (draft, reference, target))


def _check(got, d, r, t, tau, valid):
    expect = kdops.reference.adaspec_token_kl(d, r, t, temperature=tau, mask=valid)
    V = d.shape[-1]
    size = 1.0 + torch.stack([d, r, t]).float().nan_to_num(0, 0, 0).abs().max().item() / float(tau.min())
    atol = 2e-6 * size * max(1.0, math.sqrt(V / 1024))
    for name, a, e in zip(("draft_kl", "reference_kl"), got, expect):
        assert a.dtype == torch.float32 and a.shape == e.shape
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), rtol=1e-5, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("V", [1, 3, 37, 300])
def test_matches_reference(dtype, V):
    d, r, t = _triple(6, V, dtype, seed=V)
    valid = torch.tensor([True, True, False, True, True, False], device=DEVICE)
    d[2] = NAN  # masked rows are never read
    tau = torch.rand(6, device=DEVICE) + 0.5
    _check(OP(d, r, t, tau, valid), d, r, t, tau, valid)
    tau0 = torch.tensor(1.7)  # 0-d on the CPU: the op moves it
    got = OP(d, r, t, tau0, None)
    assert got[0][2].isnan()
    keep = torch.tensor([0, 1, 3, 4, 5], device=DEVICE)
    _check(tuple(x[keep] for x in got), d[keep], r[keep], t[keep], tau0, None)


def test_multi_tile_strided_neg_inf(monkeypatch):
    # several tiles per row (running maxima that grow tile after tile), strided rows, -inf ids
    monkeypatch.setattr(triton_adaspec, "SINGLE_MAX_V", 16)
    monkeypatch.setattr(triton_adaspec, "MULTI_TILE", (32, 1))
    V = 150
    d, r, t = (torch.cat([x, torch.full_like(x, NAN)], -1)[:, :V] for x in _triple(4, V, torch.float32, 3))
    t[0, :40] = -INF
    d[0, :40] = -INF
    d[1] = d[1] + torch.linspace(-30, 30, V, device=DEVICE)  # the draft's max keeps moving
    t[2] = t[2] + torch.linspace(30, -30, V, device=DEVICE)  # the target's max is in the first tile
    tau = torch.tensor(0.8)
    _check(OP(d, r, t, tau, None), d, r, t, tau, None)
    got = OP(d, r, t, tau, None)
    cpu = torch.ops.kdops.adaspec_token_kl(*(x.cpu() for x in (d, r, t)), tau, None)
    for a, c in zip(got, cpu):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-5)


def test_infinite_kl_and_equal_rows():
    d, r, t = _triple(3, 20, torch.float32, 5)
    d[0, 4] = -INF  # target mass the draft rules out
    r[1], t[1] = d[1], d[1]
    got = OP(d, r, t, torch.tensor(1.0), None)
    assert got[0][0] == INF
    assert got[1][1] == 0


def test_through_adaspec_loss():
    d, r, t = _triple(24, 50, torch.float32, 7)
    labels = torch.randint(0, 50, (24,), device=DEVICE)
    labels[:3] = -100
    with kdops.use_backend("triton"):
        loss, kept, _, _ = kdops.adaspec_loss(d, r, t, labels=labels, return_details=True)
    expect, expect_kept, _, _ = kdops.reference.adaspec_loss(d, r, t, labels=labels, return_details=True)
    assert torch.equal(kept.cpu(), expect_kept.cpu())
    torch.testing.assert_close(loss.double().cpu(), expect.double().cpu(), rtol=1e-5, atol=1e-5)


def test_bad_input():
    d, r, t = _triple(3, 10, torch.float32, 9)
    tau = torch.tensor(1.0)
    with pytest.raises(ValueError, match="float64"):
        OP(d.double(), r.double(), t.double(), tau.double(), None)
    with pytest.raises(ValueError, match="reference must have the draft's shape"):
        OP(d, r[:, :9], t, tau, None)
    with pytest.raises(ValueError, match="temperature must be 0-d"):
        OP(d, r, t, torch.ones(4), None)
