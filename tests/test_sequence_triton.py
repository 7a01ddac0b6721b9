"""The Triton sequence_logprob op (kernels/sequence.py, ``kdops::sequence_logprob_triton``) against
the float64 oracle ``kdops.reference.sequence_logprob`` (DESIGN.md 3.8 and 4).

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests/test_sequence_triton.py

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
from kdops.kernels import sequence as triton_sequence  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

OP = TRITON_OPS["sequence_logprob"]
INF = float("inf")
NAN = float("nan")
IGNORE = -100
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Several vocabulary tiles (16 wide, ragged last) on small rows."""
    monkeypatch.setattr(triton_sequence, "MAX_BLOCK_V", 16)


def _tolerances(dtype: torch.dtype, V: int) -> tuple[float, float]:
    """(atol of a float32 log-probability per unit of the row's size 1 + max|z|, rtol of a gradient
    in `dtype`: float32 arithmetic, then one rounding to the dtype (eps))."""
    r32 = 2e-5 * max(1.0, math.sqrt(V / 1024))
    return r32, (r32 if dtype == torch.float32 else torch.finfo(dtype).eps)


def _inputs(rows: int, V: int, dtype: torch.dtype, *, seed=0, neg_inf=False, strided=False,
            labels_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, V, generator=g) * 3
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[::3] = IGNORE
    if neg_inf:
        off = torch.rand(rows, V, generator=g) < 0.2
        off[torch.arange(rows), labels.clamp_min(0)] = False
        z = z.masked_fill(off, -INF)
    if strided:
        wide = torch.full((rows, V + 3), NAN)
        wide[:, :V] = z
        z = wide[:, :V]
    return z.to(device=DEVICE, dtype=dtype), labels.to(device=DEVICE, dtype=labels_dtype)


def _reference(z: torch.Tensor, labels: torch.Tensor):
    """(token log-probabilities, onehot - softmax) in float64, zero on ignored rows."""
    z64 = z.detach().double().cpu()
    labels = labels.cpu()
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0).long()
    lsm = torch.log_softmax(z64, -1)
    token = torch.where(valid, lsm.gather(-1, safe[:, None])[:, 0], 0.0)
    grad = torch.nn.functional.one_hot(safe, z.shape[-1]).double() - lsm.exp()
    return token, torch.where(valid[:, None], grad, 0.0)


def _check(z, labels, token, grad):
    ref_token, ref_grad = _reference(z, labels)
    vtol, gtol = _tolerances(z.dtype, z.shape[-1])
    finite = z[torch.isfinite(z)]
    size = 1.0 + (finite.abs().max().item() if finite.numel() else 0.0)
    assert token.dtype == torch.float32
    torch.testing.assert_close(token.double().cpu(), ref_token, rtol=vtol, atol=vtol * size, equal_nan=True)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=gtol, atol=gtol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 3, 16, 53])
def test_raw_op_matches_reference(dtype, V):
    z, labels = _inputs(7, V, dtype, seed=V)
    token, grad = OP(z, labels, IGNORE, True)
    assert grad.dtype == dtype and grad.shape == z.shape
    _check(z, labels, token, grad)
    token_only, empty = OP(z, labels, IGNORE, False)
    assert empty.shape == (0,)
    torch.testing.assert_close(token_only, token, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["neg_inf", "strided", "int32"])
def test_raw_op_variants(variant):
    z, labels = _inputs(5, 41, torch.float32, neg_inf=variant == "neg_inf", strided=variant == "strided",
                        labels_dtype=torch.int32 if variant == "int32" else torch.int64)
    token, grad = OP(z, labels, IGNORE, True)
    _check(z, labels, token, grad)


def test_raw_op_special_rows():
    """An all -inf row and a NaN logit give NaN (as log_softmax); a label outside [0, V) gives a
    NaN row without being read; -inf at the label gives -inf and gradient 1 there; an
    ignore_index inside [0, V) still ignores."""
    z = torch.randn(5, 20)
    z[0] = -INF
    z[1, 7] = NAN
    z[3, 4] = -INF
    labels = torch.tensor([2, 2, 20, 4, 9])
    token, grad = OP(z.to(DEVICE), labels.to(DEVICE), 9, True)
    token, grad = token.cpu(), grad.cpu()
    assert torch.isnan(token[:3]).all() and torch.isnan(grad[:3]).all()
    assert token[3].item() == -INF and grad[3, 4].item() == 1.0 and torch.isfinite(grad[3]).all()
    assert token[4].item() == 0.0 and (grad[4] == 0).all()


def test_public_function_and_autograd():
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 4, 23, generator=g) * 2).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 23, (2, 4), generator=g).to(DEVICE)
    labels[1] = IGNORE  # a sequence without a valid position: mean 0
    for reduction in ("mean", "sum", "none"):
        z.grad = None
        with kdops.use_backend("triton"):
            out = kdops.sequence_logprob(z, labels, reduction=reduction)
        w = torch.rand(out.shape, generator=g).to(DEVICE) + 0.5
        (out * w).sum().backward()
        z64 = z.detach().double().cpu().requires_grad_()
        ref = kdops.reference.sequence_logprob(z64, labels.cpu(), reduction=reduction)
        (ref * w.double().cpu()).sum().backward()
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=2e-5, atol=2e-6)


def test_bad_input():
    z = torch.randn(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        OP(z.double(), torch.zeros(3, dtype=torch.long, device=DEVICE), IGNORE, False)
    with pytest.raises(ValueError, match="labels must have shape"):
        OP(z, torch.zeros(2, dtype=torch.long, device=DEVICE), IGNORE, False)
    with pytest.raises(ValueError, match="int64 or int32"):
        OP(z, torch.zeros(3, dtype=torch.int16, device=DEVICE), IGNORE, False)


def test_opcheck():
    """Schema and fake kernel; with a gradient also the autograd registration (the AOT-dispatch
    check traces the kernel through wrap_triton, which the interpreter cannot: CUDA only, and
    without a gradient: see test_sequence.py's test_opcheck)."""
    kdops.sequence._sequence_op("triton")  # registers the autograd formula on the Triton op
    z, labels = _inputs(4, 9, torch.float32)
    torch.library.opcheck(OP, (z.requires_grad_(), labels, IGNORE, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    utils = ("test_schema", "test_faketensor") + (("test_aot_dispatch_dynamic",) if DEVICE == "cuda" else ())
    torch.library.opcheck(OP, (z.detach(), labels, IGNORE, False), test_utils=utils)
