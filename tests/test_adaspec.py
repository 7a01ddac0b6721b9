"""Tests of AdaSPEC (DESIGN.md 3.7): the statistics op ``adaspec_token_kl`` against the float64 oracle
``kdops.reference.adaspec_token_kl`` (dtypes, masks, strided rows, -inf, NaN, V = 1, temperatures,
every CPU instruction-set build), ``kdops.adaspec_loss`` against ``kdops.reference.adaspec_loss``
(values, gradients, fractions, ties, normalizer, all masked, fraction = 1 as kd_loss), gradcheck,
opcheck, argument checks, and the GPU backends. The Triton kernel's interpreter tests are in
test_adaspec_triton.py.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import kdops
import kdops.reference
from kdops.adaspec import adaspec_token_kl

INF = float("inf")
NAN = float("nan")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Inputs and tolerances
# --------------------------------------------------------------------------------------------


def _triple(lead, V, dtype=torch.float32, *, seed=0, device="cpu"):
    """(draft, reference, target): the students are the target plus noise of a random size per
    row, so that the scores l_d - l_r of different rows lie far apart (far beyond float32 rounding)
    and the selection is the same whatever computed them."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (V,)
    target = torch.randn(shape, generator=g) * 2.0
    spread = lambda: torch.rand(tuple(lead) + (1,), generator=g) * 1.5 + 0.1  # noqa: E731
    draft = target + torch.randn(shape, generator=g) * spread()
    reference = target + torch.randn(shape, generator=g) * spread()
    return tuple(x.to(device=device, dtype=dtype) for x in (draft, reference, target))


def _kl_atol(dtype, V, logits, tau=1.0) -> float:
    """float32 arithmetic: sums over V of terms of the row's natural size (1 + max|z| / tau);
    float64 inputs run in float64."""
    if dtype == torch.float64:
        return 1e-11
    finite = logits[torch.isfinite(logits)]
    size = 1.0 + (finite.abs().max().item() if finite.numel() else 0.0) / tau
    return 2e-6 * size * max(1.0, math.sqrt(V / 1024))


def _close(actual, expected, atol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=1e-5, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# The statistics op
# --------------------------------------------------------------------------------------------

CASES = {
    "plain": dict(),
    "mask": dict(mask=True),
    "strided": dict(strided=True),
    "neg_inf": dict(neg_inf=True),
    "row_tau": dict(tau="row"),
    "scalar_tau": dict(tau="scalar"),
    "v1": dict(V=1),
    "long": dict(V=5003, lead=(3,)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_token_kl_matches_reference(case, dtype):
    opts = CASES[case]
    lead, V = opts.get("lead", (4, 5)), opts.get("V", 37)
    d, r, t = _triple(lead, V, dtype, seed=hash(case) % 1000)
    rows = math.prod(lead)
    if opts.get("neg_inf"):
        # padded vocabulary: -inf in all three rows, and a draft that rules out target-free ids
        pad = torch.zeros(V, dtype=torch.bool)
        pad[V // 3 :: 4] = True
        d, r, t = (x.masked_fill(pad, -INF) for x in (d, r, t))
    if opts.get("strided"):
        d, r, t = (torch.cat([x, torch.full_like(x, NAN)], -1)[..., :V] for x in (d, r, t))
        assert d.stride(-2) == 2 * V
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if opts.get("tau") == "row":
        tau = (torch.rand(rows, generator=torch.Generator().manual_seed(3)) + 0.5).to(acc)
    else:
        tau = torch.tensor(0.6 if opts.get("tau") == "scalar" else 1.7, dtype=acc)
    valid = None
    if opts.get("mask"):
        valid = torch.tensor([True, False] * (rows // 2) + [True] * (rows % 2))
        # masked rows are never read: NaN there must not reach anything
        d.reshape(rows, V)[~valid] = NAN

    draft_kl, reference_kl = adaspec_token_kl(d, r, t, tau, valid)
    expect_d, expect_r = kdops.reference.adaspec_token_kl(
        d, r, t, temperature=tau, mask=None if valid is None else valid.reshape(lead))
    assert draft_kl.dtype == acc and draft_kl.shape == (rows,)
    atol = _kl_atol(dtype, V, torch.stack([d, r, t]), float(tau.min()))
    _close(draft_kl, expect_d.reshape(-1), atol, "draft_kl")
    _close(reference_kl, expect_r.reshape(-1), atol, "reference_kl")
    if valid is not None:
        assert (draft_kl[~valid] == 0).all() and (reference_kl[~valid] == 0).all()


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_token_kl_matches_reference_per_isa(isa, monkeypatch):
    needs = {"baseline": set(), "avx2": {"avx2", "fma", "f16c"},
             "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}[isa]
    flags = set(open("/proc/cpuinfo").read().split()) if sys.platform == "linux" else set()
    if not needs <= flags:
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("KDOPS_CPU_ISA", isa)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        d, r, t = _triple((5,), 4099, dtype, seed=7)  # two blocks and a tail
        tau = torch.tensor(1.3)
        got = adaspec_token_kl(d, r, t, tau, None)
        expect = kdops.reference.adaspec_token_kl(d, r, t, temperature=tau)
        for a, e in zip(got, expect):
            _close(a, e, _kl_atol(dtype, 4099, torch.stack([d, r, t]), 1.3), f"{isa} {dtype}")


def test_token_kl_infinite_and_nan():
    V = 64
    d, r, t = (x.clone() for x in _triple((4,), V, seed=1))
    t[0, :10] = -INF  # no target mass on ids 0-9 ...
    d[0, :10] = -INF  # ... so a draft without them is finite
    d[1, 5] = -INF  # target mass on id 5 that the draft rules out: a truly infinite KL
    t[2, 3] = NAN
    r[3, 7] = NAN
    draft_kl, reference_kl = adaspec_token_kl(d, r, t, torch.tensor(1.0), None)
    expect_d, _ = kdops.reference.adaspec_token_kl(d, r, t)
    _close(draft_kl[0], expect_d[0], 1e-5, "padded row")
    assert draft_kl[1] == INF
    assert draft_kl[2].isnan() and reference_kl[2].isnan()
    assert draft_kl[3].isfinite() and reference_kl[3].isnan()


def test_token_kl_equal_rows_give_exact_zero():
    d, _, _ = _triple((3,), 5000, seed=2)
    for tau in (1.0, 0.7, 3.0):
        draft_kl, reference_kl = adaspec_token_kl(d, d.clone(), d.clone(), torch.tensor(tau), None)
        assert (draft_kl == 0).all() and (reference_kl == 0).all()


def test_token_kl_opcheck():
    d, r, t = _triple((6,), 33, seed=4)
    for valid in (None, torch.tensor([True, False, True, True, False, True])):
        for tau in (torch.tensor(2.0), torch.rand(6) + 0.5):
            torch.library.opcheck(torch.ops.kdops.adaspec_token_kl.default, (d, r, t, tau, valid))


def test_token_kl_bad_input():
    d, r, t = _triple((3,), 10, seed=5)
    op = torch.ops.kdops.adaspec_token_kl.default
    tau = torch.tensor(1.0)
    with pytest.raises(ValueError, match="reference must have the draft's shape"):
        op(d, r[:, :9], t, tau, None)
    with pytest.raises(ValueError, match="target dtype"):
        op(d, r, t.double(), tau, None)
    with pytest.raises(ValueError, match="temperature must be"):
        op(d, r, t, torch.ones(4), None)
    with pytest.raises(ValueError, match="valid must be a bool"):
        op(d, r, t, tau, torch.ones(3))
    with pytest.raises(ValueError, match="last dim"):
        op(d.t().contiguous().t(), r, t, tau, None)


# --------------------------------------------------------------------------------------------
# adaspec_loss
# --------------------------------------------------------------------------------------------


def _loss_and_grad(fn, d, r, t, **kw):
    d = d.detach().clone().requires_grad_()
    loss = fn(d, r, t, **kw)
    loss.backward()
    return loss.detach(), d.grad


LOSS_CASES = [
    dict(fraction=0.4),
    dict(fraction=0.1, labels=True),
    dict(fraction=0.75, mask=True, temperature=2.0),
    dict(fraction=1.0, labels=True),
    dict(fraction=0.4, labels=True, normalizer=57.0),
    dict(fraction=0.5, normalizer="tensor", temperature="row"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_loss_matches_reference(case, dtype):
    opts = dict(LOSS_CASES[case])
    lead, V = (4, 11), 301
    d, r, t = _triple(lead, V, dtype, seed=10 + case)
    g = torch.Generator().manual_seed(case)
    if opts.pop("labels", False):
        labels = torch.randint(0, V, lead, generator=g)
        labels[0, :4] = -100
        opts["labels"] = labels
    if opts.pop("mask", False):
        opts["mask"] = torch.rand(lead, generator=g) > 0.3
    if opts.get("normalizer") == "tensor":
        opts["normalizer"] = torch.tensor(40.0)
    if opts.get("temperature") == "row":
        opts["temperature"] = torch.rand(lead, generator=g) + 0.5

    loss, grad = _loss_and_grad(kdops.adaspec_loss, d, r, t, **opts)
    expect, expect_grad = _loss_and_grad(kdops.reference.adaspec_loss, d, r, t, **opts)
    _, kept, draft_kl, reference_kl = kdops.adaspec_loss(d, r, t, return_details=True, **opts)
    _, expect_kept, expect_d, expect_r = kdops.reference.adaspec_loss(d, r, t, return_details=True, **opts)

    assert torch.equal(kept, expect_kept)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    atol = _kl_atol(dtype, V, torch.stack([d, r, t]), 0.5)
    _close(loss, expect, atol, "loss")
    _close(draft_kl, expect_d, atol, "draft_kl")
    _close(reference_kl, expect_r, atol, "reference_kl")
    grad_rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2**-7}[dtype]
    scale = expect_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expect_grad.double(), rtol=grad_rtol, atol=grad_rtol * scale)
    assert (grad.reshape(-1, V)[~kept.reshape(-1)] == 0).all()


def test_loss_without_grad_equals_loss_with_grad():
    d, r, t = _triple((32,), 100, seed=3)
    with_grad = kdops.adaspec_loss(d.clone().requires_grad_(), r, t, normalizer=50)
    with torch.no_grad():
        without = kdops.adaspec_loss(d.clone().requires_grad_(), r, t, normalizer=50)
    _close(without, with_grad.detach(), 1e-6, "no-grad loss")
    assert not without.requires_grad


def test_ties_are_kept():
    d, r, t = _triple((6,), 50, seed=8)
    # rows 0-3 identical: one score four times, straddling the 0.6 quantile of the 6 scores
    d[1:4], r[1:4], t[1:4] = d[0], r[0], t[0]
    _, kept, draft_kl, reference_kl = kdops.adaspec_loss(d, r, t, fraction=0.4, return_details=True)
    _, expect_kept, _, _ = kdops.reference.adaspec_loss(d, r, t, fraction=0.4, return_details=True)
    assert torch.equal(kept, expect_kept)
    scores = draft_kl - reference_kl
    assert scores[0] == scores[1] == scores[2] == scores[3]
    assert kept[:4].all() or not kept[:4].any()


def test_all_masked():
    d, r, t = _triple((2, 5), 17, seed=9)
    d = d.requires_grad_()
    for normalizer in (None, 3.0):
        loss, kept, _, _ = kdops.adaspec_loss(d, r, t, mask=torch.zeros(2, 5, dtype=torch.bool),
                                              normalizer=normalizer, return_details=True)
        loss.backward()
        assert loss.item() == 0.0 and not kept.any()
        assert (d.grad == 0).all()
        d.grad = None


@pytest.mark.parametrize("normalizer", [None, 23.0])
def test_fraction_one_is_fkl(normalizer):
    d, r, t = _triple((3, 9), 40, seed=11)
    labels = torch.randint(0, 40, (3, 9))
    labels[1, 2:] = -100
    loss, grad = _loss_and_grad(kdops.adaspec_loss, d, r, t, fraction=1.0, labels=labels,
                                normalizer=normalizer, temperature=1.5)
    expect, expect_grad = _loss_and_grad(
        lambda s, _r, te, **kw: kdops.kd_loss(s, te, divergence="fkl", **kw), d, r, t, labels=labels,
        normalizer=normalizer, temperature=1.5)
    _close(loss, expect, 1e-6, "loss")
    torch.testing.assert_close(grad, expect_grad, rtol=1e-6, atol=1e-9)


def test_gradient_flows_to_the_draft_only():
    d, r, t = _triple((4, 6), 30, seed=12)
    d, r, t = (x.requires_grad_() for x in (d, r, t))
    tau = torch.tensor(1.5, requires_grad=True)
    loss, kept, draft_kl, reference_kl = kdops.adaspec_loss(d, r, t, temperature=tau, return_details=True)
    assert not kept.requires_grad and not draft_kl.requires_grad and not reference_kl.requires_grad
    loss.backward()
    assert d.grad is not None and d.grad.abs().sum() > 0
    assert r.grad is None and t.grad is None and tau.grad is None


def test_gradcheck_draft():
    d, r, t = _triple((2, 5), 7, torch.float64, seed=13)
    d.requires_grad_()
    labels = torch.tensor([[1, 2, -100, 3, 4], [5, 6, 0, -100, 1]])
    for normalizer in (None, 4.0):
        fn = lambda x: kdops.adaspec_loss(x, r, t, fraction=0.5, labels=labels,  # noqa: E731
                                          normalizer=normalizer, temperature=1.3)
        assert torch.autograd.gradcheck(fn, (d,), eps=1e-6, atol=1e-7)


def test_reference_backend():
    d, r, t = _triple((10,), 21, seed=14)
    with kdops.use_backend("reference"):
        loss = kdops.adaspec_loss(d, r, t)
    _close(loss, kdops.reference.adaspec_loss(d, r, t), 1e-6, "reference backend")


@pytest.mark.slow
def test_torch_compile_fullgraph():
    d, r, t = _triple((2, 16), 50, seed=16)
    labels = torch.randint(0, 50, (2, 16))
    labels[0, :3] = -100
    compiled = torch.compile(lambda x: kdops.adaspec_loss(x, r, t, labels=labels, normalizer=20),
                             fullgraph=True, backend="aot_eager")
    loss, grad = _loss_and_grad(lambda x, _r, _t: compiled(x), d, r, t)
    expect, expect_grad = _loss_and_grad(kdops.adaspec_loss, d, r, t, labels=labels, normalizer=20)
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(grad, expect_grad)


def test_bad_input():
    d, r, t = _triple((4,), 10, seed=15)
    for fraction in (0.0, -0.1, 1.5, float("nan"), True, "0.4"):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            kdops.adaspec_loss(d, r, t, fraction=fraction)
    with pytest.raises(ValueError, match="reference_logits must have"):
        kdops.adaspec_loss(d, r[:, :5], t)
    with pytest.raises(ValueError, match="target_logits dtype"):
        kdops.adaspec_loss(d, r, t.double())
    with pytest.raises(ValueError, match="temperature"):
        kdops.adaspec_loss(d, r, t, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        kdops.adaspec_loss(d, r, t, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="normalizer"):
        kdops.adaspec_loss(d, r, t, normalizer=-1.0)


# --------------------------------------------------------------------------------------------
# GPU backends
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("V", [1, 37, 4099, 32000])
def test_gpu_token_kl_matches_reference(backend, dtype, V):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes no float64")
    lead = (5, 7)
    d, r, t = _triple(lead, V + 3, dtype, seed=V, device="cuda")
    d, r, t = d[..., 3:], r[..., 1 : V + 1], t[..., :V]  # strided rows, three different alignments
    t[0, 0, : V // 2] = -INF
    d[0, 0, : V // 2] = -INF
    valid = torch.rand(lead, device="cuda") > 0.2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = (torch.rand(35, device="cuda") + 0.5).to(acc)
    with kdops.use_backend(backend):
        got = adaspec_token_kl(d, r, t, tau, valid.reshape(-1))
    expect = kdops.reference.adaspec_token_kl(d, r, t, temperature=tau, mask=valid)
    atol = _kl_atol(dtype, V, torch.stack([d, r, t]).float(), 0.5)
    for a, e in zip(got, expect):
        _close(a, e.reshape(-1), atol, f"{backend} {dtype} V={V}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_loss_matches_reference(backend):
    d, r, t = _triple((8, 64), 32000, torch.bfloat16, seed=1, device="cuda")
    labels = torch.randint(0, 32000, (8, 64), device="cuda")
    labels[:, :5] = -100
    with kdops.use_backend(backend):
        loss, grad = _loss_and_grad(kdops.adaspec_loss, d, r, t, labels=labels, normalizer=400)
    expect, expect_grad = _loss_and_grad(kdops.reference.adaspec_loss, d, r, t, labels=labels, normalizer=400)
    _close(loss, expect, 1e-4, "loss")
    torch.testing.assert_close(grad.double(), expect_grad.double(), rtol=2**-7,
                               atol=2**-7 * expect_grad.abs().max().item())
