"""Tests of kdops.kd_loss (DESIGN.md sections 2, 3.1 and 4) against the float64 oracle
kdops.reference.kd_loss: values, gradients (student, teacher, temperature), gradcheck, opcheck,
hypothesis properties, argument checks, backends, the nn module and torch.compile.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdops
import kdops.reference
from record_ops import RecordKdopsOps

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
INF = float("inf")
HYPOTHESIS = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------
# Tolerances (DESIGN.md 4: from the input dtype). The reference is computed in float64 on the
# very same (already rounded) input values, so input rounding is not part of any tolerance.
# --------------------------------------------------------------------------------------------


def fp32_rtol(V: int) -> float:
    """float32 arithmetic: the kernel sums V terms per row; the rounding error of such sums grows
    like sqrt(V) * eps32. 1e-5 covers V <= 1024; beyond, scale by sqrt(V / 1024) (7e-5 at 50257)."""
    return 1e-5 * max(1.0, math.sqrt(V / 1024))


def tolerances(dtype: torch.dtype, V: int) -> tuple[float, float, float]:
    """(rtol for the float32 loss and temperature gradient, rtol for the logits' gradients,
    absolute floor for the logits' gradients)."""
    if dtype == torch.float64:
        # float64 inputs are computed in float64 by the CPU kernel: only summation order differs.
        return 1e-10, 1e-10, 0.0
    r32 = fp32_rtol(V)
    if dtype == torch.float32:
        return r32, r32, 0.0
    # Half precisions: the fused gradient is stored in the input dtype by the forward pass and
    # multiplied by grad_output (also rounded to that dtype) in backward: two roundings of up to
    # half an ulp each, i.e. up to one ulp at 1 = finfo(dtype).eps relative in all, on top of the
    # float32 arithmetic error (covered by the atol relative to the largest gradient).
    if dtype == torch.bfloat16:
        return r32, torch.finfo(torch.bfloat16).eps, 0.0  # 2^-7: 8 significant bits
    if dtype == torch.float16:
        # 2^-10: 11 significant bits; below 2^-14 fp16 is subnormal with an absolute spacing of
        # 2^-24, so two roundings there can be off by up to 2^-24 whatever the value.
        return r32, torch.finfo(torch.float16).eps, 2.0**-24
    raise AssertionError(dtype)


def assert_close(actual, expected, *, rtol, atol_rel, atol_abs=0.0, scale=None, what=""):
    """|actual - expected| <= rtol * |expected| + atol_rel * scale + atol_abs elementwise, where
    `scale` defaults to max |expected| (errors of float32 sums are relative to the large terms)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double()
    actual = actual.detach().double()
    if scale is None:
        finite = expected[torch.isfinite(expected)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_rel * scale + atol_abs, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------
# Detecting whether a kdops kernel ran (argument checks must run before any kernel).
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Reference comparison
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    divergence: str
    reduction: str = "mean"
    temp: str = "float"  # float (2.0) | row ([N], grad) | lead (leading shape) | scalar (0-d, grad)
    dtype: torch.dtype = torch.float32
    lead: tuple = (6,)
    V: int = 37
    beta: float = 0.5
    alpha: float = 0.1
    rows: str = "all"  # all | labels | mask | both (labels AND mask)
    normalizer: str = "none"  # none | float | tensor  (replaces the mean's denominator)
    t2: bool = False
    layout: str = "contiguous"  # contiguous | strided (x[..., :V] of a wider tensor) | transposed
    neg_inf: bool = False  # -inf at the same positions in student and teacher
    teacher_grad: bool = True
    seed: int = 0

    def id(self) -> str:
        parts = [self.divergence, self.reduction, f"tau_{self.temp}", str(self.dtype).split(".")[-1]]
        parts.append("x".join(map(str, self.lead + (self.V,))))
        if self.divergence == "jsd":
            parts.append(f"beta{self.beta}")
        if self.divergence.startswith("skew"):
            parts.append(f"alpha{self.alpha}")
        if self.rows != "all":
            parts.append(self.rows)
        if self.normalizer != "none":
            parts.append(f"norm_{self.normalizer}")
        if self.t2:
            parts.append("t2")
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.neg_inf:
            parts.append("neginf")
        if not self.teacher_grad:
            parts.append("detached_teacher")
        return "-".join(parts)


def _sampled(rng: random.Random, div: str, reduction: str, temp: str, dtype: torch.dtype, k: int, **over) -> Case:
    """A case with the given main axes and the secondary features sampled (deterministically)."""
    lead = rng.choice(((6,), (2, 3), (5,), (3, 4)))
    fields = dict(
        divergence=div,
        reduction=reduction,
        temp=temp,
        dtype=dtype,
        lead=lead,
        V=rng.choice((37, 3, 64, 1271)),
        beta=(0.0, 0.3, 1.0)[k % 3],
        alpha=(0.0, 0.1, 0.9)[k % 3],
        rows=rng.choice(("all", "labels", "mask", "both")),
        normalizer=rng.choice(("none", "float", "tensor")) if reduction == "mean" else "none",
        t2=rng.random() < 0.4,
        layout=rng.choice(("contiguous", "strided", "contiguous", "transposed")),
        neg_inf=rng.random() < 0.35,
        teacher_grad=rng.random() < 0.6,
        seed=rng.randrange(2**31),
    )
    fields.update(over)
    return Case(**fields)


def _cases() -> list[Case]:
    rng = random.Random(20240501)
    cases = []
    # Every divergence x reduction x temperature form in float32; beta / alpha run through
    # (0, 0.3, 1) / (0, 0.1, 0.9) as a Latin square over (reduction, temperature form).
    for div in DIVERGENCES:
        for r, red in enumerate(REDUCTIONS):
            for t, temp in enumerate(("float", "row", "scalar")):
                cases.append(_sampled(rng, div, red, temp, torch.float32, r + t))
    # Half precisions and float64: every divergence once per dtype.
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for k, div in enumerate(DIVERGENCES):
            cases.append(
                _sampled(rng, div, rng.choice(REDUCTIONS), rng.choice(("float", "row", "scalar")), dtype, k + 1)
            )
    # Odd sizes, leading-shape temperatures, large vocabularies.
    for k, div in enumerate(DIVERGENCES):
        cases.append(_sampled(rng, div, REDUCTIONS[k % 3], "scalar", torch.float32, 1, V=1, lead=(4,)))
    cases += [
        Case("fkl", "mean", "scalar", lead=(3,), V=50257, rows="mask", seed=11),
        Case("jsd", "none", "row", torch.bfloat16, lead=(2,), V=50257, beta=0.3, neg_inf=True, seed=12),
        Case("tvd", "sum", "float", lead=(1, 2), V=50257, layout="strided", seed=13),
        Case("rkl", "mean", "lead", lead=(2, 4), V=129, rows="both", layout="strided", t2=True, seed=14),
        Case("skew_fkl", "none", "lead", torch.bfloat16, lead=(3, 2), V=1271, alpha=0.1, layout="transposed", seed=15),
        Case("skew_rkl", "sum", "lead", torch.float16, lead=(2, 3), V=3, alpha=0.9, neg_inf=True, seed=16),
        Case("jsd", "mean", "row", lead=(2, 5), V=1271, beta=0.3, rows="labels", normalizer="tensor", t2=True,
             layout="transposed", neg_inf=True, seed=17),
    ]
    return cases


CASES = _cases()


def _with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x in the requested memory layout."""
    if layout == "contiguous":
        return x.clone()
    if layout == "strided":
        # Rows of a wider buffer whose tail is NaN: a kernel reading past V would show it.
        wide = torch.full(x.shape[:-1] + (x.shape[-1] + 5,), float("nan"), dtype=x.dtype)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    if layout == "transposed":  # last dimension not contiguous (copied once by the wrapper)
        return x.reshape(-1, x.shape[-1]).t().contiguous().t().reshape(x.shape)
    raise AssertionError(layout)


def _make_case(case: Case, make_gen, make_logits):
    g = make_gen(case.seed)
    shape = case.lead + (case.V,)
    N = math.prod(case.lead)
    s = make_logits(shape, g, neg_inf=0.2 if case.neg_inf else 0.0)
    t = make_logits(shape, g, neg_inf=(s == -INF) if case.neg_inf else 0.0)
    s = _with_layout(s.to(case.dtype), case.layout).requires_grad_()
    t = _with_layout(t.to(case.dtype), case.layout).requires_grad_(case.teacher_grad)
    tdtype = torch.float64 if case.dtype == torch.float64 else torch.float32

    labels = mask = None
    if case.rows in ("labels", "both"):
        labels = torch.randint(0, 50, case.lead, generator=g)
        labels[torch.rand(case.lead, generator=g) < 0.3] = -100
    if case.rows in ("mask", "both"):
        mask = torch.rand(case.lead, generator=g) > 0.3

    if case.temp == "float":
        tau = 2.0
    elif case.temp == "row":
        tau = (torch.rand(N, generator=g) * 1.5 + 0.5).to(tdtype).requires_grad_()
    elif case.temp == "lead":
        # leading-shape temperature: learnable in some cases (gradient comes back in that shape)
        tau = (torch.rand(case.lead, generator=g) * 1.5 + 0.5).to(tdtype).requires_grad_(case.teacher_grad)
    else:
        tau = torch.tensor(1.7, dtype=tdtype, requires_grad=True)

    normalizer = {"none": None, "float": 7.0, "tensor": torch.tensor(7.0, dtype=tdtype)}[case.normalizer]
    weight = torch.rand(case.lead, generator=g, dtype=torch.float64) + 0.5 if case.reduction == "none" else None
    kwargs = dict(
        divergence=case.divergence, beta=case.beta, alpha=case.alpha, labels=labels, mask=mask,
        reduction=case.reduction, normalizer=normalizer, t2_scale=case.t2,
    )
    return s, t, tau, kwargs, weight


def _reference(s, t, tau, kwargs, weight):
    """Float64 reference loss and exact float64 gradients for s, t and tau on the same values."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    tau64 = tau.detach().double().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    loss = kdops.reference.kd_loss(s64, t64, temperature=tau64, **kwargs)
    loss.backward(weight if weight is not None else torch.ones_like(loss))
    tau_grad = tau64.grad if isinstance(tau, torch.Tensor) else None
    return loss.detach(), s64, t64, tau_grad


def _tau_grad_scale(s64, t64, tau) -> float:
    """Magnitude of the terms summed into dL/dtau: dL/dtau = -(1/tau) sum_k z_k dL/dz_k over both
    logits (+ the t2 term), so errors of float32 arithmetic are relative to sum |z_k dL/dz_k| / tau."""
    terms = torch.zeros(s64.shape[:-1], dtype=torch.float64)
    for z in (s64, t64):
        prod = (z.detach() * z.grad).nan_to_num(nan=0.0)  # -inf entries have zero gradient
        terms += prod.abs().sum(-1)
    tau_rows = tau.detach().double().reshape(-1) if isinstance(tau, torch.Tensor) else torch.tensor(float(tau))
    if tau_rows.numel() > 1:
        terms = terms.reshape(-1) / tau_rows
        return terms.max().item()
    return (terms.sum() / tau_rows.reshape(())).item()


def _magnitudes(s, t, tau, kwargs, weight) -> tuple[float, float, float]:
    """Natural size of the float terms behind the loss, dL/dtau and dL/dz, for absolute floors.

    A single-pass kernel evaluates a row's divergence from terms like the scaled logits z / tau
    and their log-sum-exps, which cancel: even a divergence that is exactly 0 (V = 1) comes out
    as a few eps * (1 + max|z| / tau), times the row's weight in the reduction (and tau^2 for
    t2_scale). Likewise dL/dz_k = (row weight) (tau^2 for t2) / tau * q_k (g_k - sum_j q_j g_j)
    is a difference of O(1) terms that cancel exactly at V = 1. Returns (for the loss, for the
    temperature gradient ~ loss terms / tau, for the logits' gradients)."""
    lead = s.shape[:-1]
    n = math.prod(lead)
    valid = torch.ones(n, dtype=torch.bool)
    if kwargs.get("labels") is not None:
        valid &= kwargs["labels"].reshape(-1) != kwargs.get("ignore_index", -100)
    if kwargs.get("mask") is not None:
        valid &= kwargs["mask"].reshape(-1)
    zmax = torch.zeros(n, dtype=torch.float64)
    for z in (s, t):
        z = z.detach().double().reshape(n, -1)
        zmax = torch.maximum(zmax, z.masked_fill(~torch.isfinite(z), 0).abs().amax(-1))
    taus = tau.detach().double().reshape(-1) if isinstance(tau, torch.Tensor) else torch.tensor([float(tau)])
    taus = taus.expand(n)
    reduction = kwargs.get("reduction", "mean")
    if reduction == "none":
        w = weight.reshape(-1).double() if weight is not None else torch.ones(n, dtype=torch.float64)
    elif reduction == "sum":
        w = torch.ones(n, dtype=torch.float64)
    else:
        norm = kwargs.get("normalizer")
        denom = float(norm) if norm is not None else max(int(valid.sum()), 1)
        w = torch.full((n,), 1.0 / denom, dtype=torch.float64)
    rows = w * (taus**2 if kwargs.get("t2_scale") else 1.0) * (1.0 + zmax / taus)
    grad_unit = w * (taus if kwargs.get("t2_scale") else 1.0 / taus)
    rows, grad_unit = rows[valid], grad_unit[valid]
    if rows.numel() == 0:
        return 0.0, 0.0, 0.0
    per_tau = 2.0 * rows / taus[valid]
    if reduction == "none" or (isinstance(tau, torch.Tensor) and tau.dim() > 0):
        return rows.max().item(), per_tau.max().item(), grad_unit.max().item()
    return rows.sum().item(), per_tau.sum().item(), grad_unit.max().item()


def _run_and_compare(s, t, tau, kwargs, weight=None, backend=None):
    """kdops.kd_loss forward + backward on s, t, tau (any device; s requires grad, t and a tensor
    tau may), compared with the float64 reference on CPU copies of the same values: the loss and
    every gradient that was requested, with the tolerances of s.dtype."""
    def cpu(x):
        return x.detach().cpu() if isinstance(x, torch.Tensor) else x

    ref_kwargs = {k: cpu(v) for k, v in kwargs.items()}
    ref_loss, s64, t64, ref_tau_grad = _reference(cpu(s), cpu(t), cpu(tau), ref_kwargs, weight)

    with kdops.use_backend(backend) if backend else contextlib.nullcontext():
        loss = kdops.kd_loss(s, t, temperature=tau, **kwargs)
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        assert loss.dtype == acc, "the loss is float32 (float64 for float64 inputs)"
        loss.backward(weight.to(loss) if weight is not None else None)

    V = s.shape[-1]
    loss_rtol, grad_rtol, grad_atol = tolerances(s.dtype, V)
    loss_mag, tau_mag, grad_unit = _magnitudes(cpu(s), cpu(t), cpu(tau), ref_kwargs, weight)
    assert_close(cpu(loss), ref_loss, rtol=loss_rtol, atol_rel=loss_rtol, atol_abs=loss_rtol * loss_mag, what="loss")
    # a few roundings (8 eps of the arithmetic dtype) of the O(grad_unit) terms that cancel in dL/dz
    grad_atol += 8 * torch.finfo(acc).eps * grad_unit
    assert s.grad is not None and s.grad.dtype == s.dtype and s.grad.shape == s.shape
    assert_close(cpu(s.grad), s64.grad, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_atol, what="student grad")
    if t.requires_grad:
        assert t.grad is not None and t.grad.dtype == t.dtype
        assert_close(cpu(t.grad), t64.grad, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_atol,
                     what="teacher grad")
    else:
        assert t.grad is None
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        assert tau.grad is not None and tau.grad.dtype == tau.dtype and tau.grad.shape == tau.shape
        scale = _tau_grad_scale(s64, t64, cpu(tau)) + ref_tau_grad.abs().max().item() + tau_mag
        assert_close(cpu(tau.grad), ref_tau_grad, rtol=loss_rtol, atol_rel=loss_rtol, scale=scale,
                     what="temperature grad")
    at_neg_inf = s.detach() == -INF
    assert (s.grad[at_neg_inf] == 0).all(), "-inf logits must get a zero gradient"


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_matches_reference(case: Case, make_gen, make_logits):
    s, t, tau, kwargs, weight = _make_case(case, make_gen, make_logits)
    _run_and_compare(s, t, tau, kwargs, weight)


# --------------------------------------------------------------------------------------------
# gradcheck (float64: the CPU kernel computes float64 inputs in float64)
# --------------------------------------------------------------------------------------------


def _gradcheck_inputs(divergence: str, temp: str, make_gen):
    g = make_gen(123)
    for _ in range(100):
        s = torch.randn(3, 5, generator=g, dtype=torch.float64)
        t = torch.randn(3, 5, generator=g, dtype=torch.float64) * 2
        if temp == "scalar":
            tau = torch.tensor(1.3, dtype=torch.float64)
        else:
            tau = torch.rand(3, generator=g, dtype=torch.float64) + 0.8
        tau_rows = tau.reshape(-1, 1) if tau.dim() else tau
        p = torch.softmax(t / tau_rows, -1)
        q = torch.softmax(s / tau_rows, -1)
        # tvd = 1/2 sum |p - q| has a kink at p_k = q_k, where finite differences are wrong:
        # keep every |p_k - q_k| far above gradcheck's eps (1e-6).
        if divergence != "tvd" or (p - q).abs().min() > 1e-2:
            break
    else:
        raise AssertionError("could not draw inputs away from tvd's kink")
    return s.requires_grad_(), t.requires_grad_(), tau.requires_grad_()


@pytest.mark.parametrize("temp", ["scalar", "row"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence, temp, make_gen):
    s, t, tau = _gradcheck_inputs(divergence, temp, make_gen)
    if temp == "scalar":
        kwargs = dict(reduction="mean", mask=torch.tensor([True, False, True]), t2_scale=True)
    else:
        kwargs = dict(reduction="none")

    def fn(s, t, tau):
        return kdops.kd_loss(s, t, divergence=divergence, temperature=tau, beta=0.3, alpha=0.2, **kwargs)

    assert torch.autograd.gradcheck(fn, (s, t, tau))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence, make_gen):
    """The oracle itself: autograd through it matches finite differences."""
    s, t, tau = _gradcheck_inputs(divergence, "row", make_gen)

    def fn(s, t, tau):
        return kdops.reference.kd_loss(
            s, t, divergence=divergence, temperature=tau, beta=0.3, alpha=0.2, reduction="sum", t2_scale=True
        )

    assert torch.autograd.gradcheck(fn, (s, t, tau))


# --------------------------------------------------------------------------------------------
# opcheck of the registered operator
# --------------------------------------------------------------------------------------------


def _opcheck_args(which: str):
    g = torch.Generator().manual_seed(5)
    if which == "fkl_mean_student":
        s = torch.randn(4, 11, generator=g).requires_grad_()
        t = torch.randn(4, 11, generator=g)
        tau = torch.tensor(2.0)
        return (s, t, tau, None, None, "fkl", 0.5, 0.1, "mean", False, True, False, False)
    if which == "jsd_all_grads":
        s = torch.randn(5, 9, generator=g).requires_grad_()
        t = torch.randn(5, 9, generator=g).requires_grad_()
        tau = (torch.rand(5, generator=g) + 0.5).requires_grad_()
        valid = torch.tensor([True, False, True, True, False])
        norm = torch.tensor(6.0)
        return (s, t, tau, valid, norm, "jsd", 0.3, 0.1, "mean", True, True, True, True)
    if which == "tvd_none_bf16":
        s = torch.randn(3, 17, generator=g).bfloat16().requires_grad_()
        t = torch.randn(3, 17, generator=g).bfloat16()
        tau = torch.tensor(1.5).requires_grad_()
        return (s, t, tau, None, None, "tvd", 0.5, 0.1, "none", False, True, False, True)
    if which == "skew_rkl_sum_f64_nograd":
        s = torch.randn(6, 8, generator=g, dtype=torch.float64)
        t = torch.randn(6, 8, generator=g, dtype=torch.float64)
        tau = torch.tensor(0.7, dtype=torch.float64)
        valid = torch.rand(6, generator=g) > 0.4
        return (s, t, tau, valid, None, "skew_rkl", 0.5, 0.9, "sum", False, False, False, False)
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["fkl_mean_student", "jsd_all_grads", "tvd_none_bf16", "skew_rkl_sum_f64_nograd"])
def test_opcheck(which):
    args = _opcheck_args(which)
    torch.library.opcheck(torch.ops.kdops.kd_loss.default, args, {})


# --------------------------------------------------------------------------------------------
# hypothesis properties (float32 inputs)
# --------------------------------------------------------------------------------------------

# float32 arithmetic on O(1)-entropy rows: a divergence that is 0 exactly comes out within a few
# eps32 * log(V) of it; nothing is clamped, so tiny negative values are legal.
FP32_ZERO = 1e-5


@HYPOTHESIS
@given(
    divergence=st.sampled_from(DIVERGENCES),
    n=st.integers(1, 6),
    v=st.integers(1, 40),
    tau=st.floats(0.25, 4.0),
    scale=st.floats(0.1, 10.0),
    beta=st.sampled_from((0.0, 0.3, 0.5, 1.0)),
    alpha=st.sampled_from((0.0, 0.1, 0.9, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_nonnegative(divergence, n, v, tau, scale, beta, alpha, seed, make_gen, make_logits):
    g = make_gen(seed)
    s = make_logits((n, v), g, scale=scale)
    t = make_logits((n, v), g, scale=scale)
    rows = kdops.kd_loss(s, t, divergence=divergence, temperature=tau, beta=beta, alpha=alpha, reduction="none")
    assert torch.isfinite(rows).all()
    assert (rows >= -FP32_ZERO).all(), rows
    if divergence == "tvd":
        assert (rows <= 1 + FP32_ZERO).all(), rows


@HYPOTHESIS
@given(
    divergence=st.sampled_from(DIVERGENCES),
    lead=st.sampled_from(((1,), (4,), (2, 3))),
    v=st.integers(1, 50),
    tau=st.floats(0.25, 4.0),
    beta=st.sampled_from((0.0, 0.3, 1.0)),
    alpha=st.sampled_from((0.0, 0.1, 0.9)),
    neg_inf=st.sampled_from((0.0, 0.3)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_identical_inputs_give_zero(divergence, lead, v, tau, beta, alpha, neg_inf, seed, make_gen,
                                             make_logits):
    g = make_gen(seed)
    s = make_logits(lead + (v,), g, neg_inf=neg_inf).requires_grad_()
    t = s.detach().clone().requires_grad_()
    loss = kdops.kd_loss(s, t, divergence=divergence, temperature=tau, beta=beta, alpha=alpha, reduction="none")
    assert loss.abs().max() <= FP32_ZERO, loss
    loss.sum().backward()
    # Every divergence is stationary at p = q (tvd: subgradient sign(0) = 0).
    assert s.grad.abs().max() <= FP32_ZERO and t.grad.abs().max() <= FP32_ZERO


@HYPOTHESIS
@given(
    endpoint=st.sampled_from(((0.0, "fkl"), (1.0, "rkl"))),
    reduction=st.sampled_from(REDUCTIONS),
    n=st.integers(1, 6),
    v=st.integers(1, 40),
    tau=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_jsd_endpoints(endpoint, reduction, n, v, tau, seed, make_gen, make_logits):
    beta, other = endpoint
    g = make_gen(seed)
    s0 = make_logits((n, v), g)
    t0 = make_logits((n, v), g)
    results = []
    for div in ("jsd", other):
        s = s0.clone().requires_grad_()
        t = t0.clone().requires_grad_()
        loss = kdops.kd_loss(s, t, divergence=div, beta=beta, temperature=tau, reduction=reduction)
        loss.sum().backward()
        results.append((loss.detach(), s.grad, t.grad))
    for a, b, what in zip(results[0], results[1], ("loss", "student grad", "teacher grad")):
        assert_close(a, b, rtol=1e-6, atol_rel=1e-6, what=f"jsd beta={beta} vs {other}: {what}")


@HYPOTHESIS
@given(
    divergence=st.sampled_from(DIVERGENCES),
    reduction=st.sampled_from(REDUCTIONS),
    via=st.sampled_from(("mask", "labels")),
    n=st.integers(2, 8),
    v=st.integers(1, 30),
    row_tau=st.booleans(),
    garbage=st.sampled_from(("random", "huge", "nan", "inf")),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_masked_rows_contribute_nothing(divergence, reduction, via, n, v, row_tau, garbage, seed, make_gen,
                                                  make_logits):
    g = make_gen(seed)
    s0 = make_logits((n, v), g)
    t0 = make_logits((n, v), g)
    valid = torch.rand(n, generator=g) > 0.4
    valid[0] = False
    if via == "mask":
        rows = dict(mask=valid)
    else:
        rows = dict(labels=torch.where(valid, torch.arange(n), torch.full((n,), -7)), ignore_index=-7)
    tau0 = torch.rand(n, generator=g) + 0.5 if row_tau else torch.tensor(1.5)

    def run(s_val, t_val, tau_val):
        s = s_val.clone().requires_grad_()
        t = t_val.clone().requires_grad_()
        tau = tau_val.clone().requires_grad_()
        loss = kdops.kd_loss(s, t, divergence=divergence, temperature=tau, beta=0.3, alpha=0.1,
                             reduction=reduction, **rows)
        loss.sum().backward()
        return loss.detach(), s.grad, t.grad, tau.grad

    base = run(s0, t0, tau0)
    fill = {"random": make_logits((n, v), g, scale=5.0), "huge": torch.full((n, v), 3e38),
            "nan": torch.full((n, v), float("nan")), "inf": torch.full((n, v), INF)}[garbage]
    invalid = ~valid[:, None]
    s1 = torch.where(invalid, fill, s0)
    t1 = torch.where(invalid, fill.flip(-1), t0)
    tau1 = torch.where(~valid, tau0 * 3.0, tau0) if row_tau else tau0
    changed = run(s1, t1, tau1)

    for a, b, what in zip(base, changed, ("loss", "student grad", "teacher grad", "temperature grad")):
        assert torch.equal(a, b), f"{what} changed when masked rows changed ({garbage})"
    for grad in changed[1:3]:
        assert (grad[~valid] == 0).all(), "masked rows must have zero gradient"
    if reduction == "none":
        assert (changed[0][~valid] == 0).all()
    if row_tau:
        assert (changed[3][~valid] == 0).all()


@HYPOTHESIS
@given(
    divergence=st.sampled_from(DIVERGENCES),
    reduction=st.sampled_from(REDUCTIONS),
    via=st.sampled_from(("mask", "labels", "both")),
    lead=st.sampled_from(((1,), (5,), (2, 3))),
    v=st.integers(1, 30),
    normalizer=st.sampled_from((None, 4.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_all_rows_masked(divergence, reduction, via, lead, v, normalizer, seed, make_gen, make_logits):
    g = make_gen(seed)
    s = make_logits(lead + (v,), g).requires_grad_()
    t = make_logits(lead + (v,), g).requires_grad_()
    tau = torch.tensor(2.0, requires_grad=True)
    rows = {}
    if via in ("mask", "both"):
        rows["mask"] = torch.zeros(lead, dtype=torch.bool)
    if via in ("labels", "both"):
        rows["labels"] = torch.full(lead, -100)
    loss = kdops.kd_loss(s, t, divergence=divergence, temperature=tau, reduction=reduction,
                         normalizer=normalizer if reduction == "mean" else None, **rows)
    assert not torch.isnan(loss).any()
    assert (loss == 0).all(), loss
    loss.sum().backward()
    for x in (s, t, tau):
        assert torch.equal(x.grad, torch.zeros_like(x)), "all rows masked: gradients must be 0"


@HYPOTHESIS
@given(
    divergence=st.sampled_from(DIVERGENCES),
    reduction=st.sampled_from(REDUCTIONS),
    n=st.integers(1, 6),
    v=st.integers(2, 40),
    frac=st.floats(0.1, 0.9),
    beta=st.sampled_from((0.0, 0.3, 1.0)),
    alpha=st.sampled_from((0.0, 0.1, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_shared_neg_inf_is_finite(divergence, reduction, n, v, frac, beta, alpha, seed, make_gen, make_logits):
    g = make_gen(seed)
    s = make_logits((n, v), g, neg_inf=frac)
    at_inf = s == -INF
    t = make_logits((n, v), g, neg_inf=at_inf)
    s.requires_grad_()
    t.requires_grad_()
    tau = torch.tensor(1.3, requires_grad=True)
    loss = kdops.kd_loss(s, t, divergence=divergence, temperature=tau, beta=beta, alpha=alpha, reduction=reduction)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    # (a backend may leave .grad None for an input the value does not depend on: skew alpha = 1)
    gs, gt, gtau = (torch.zeros_like(x) if x.grad is None else x.grad for x in (s, t, tau))
    for grad in (gs, gt, gtau):
        assert torch.isfinite(grad).all(), f"non-finite gradient: {grad}"
    assert (gs[at_inf] == 0).all() and (gt[at_inf] == 0).all()


def test_truly_infinite_term_stays_infinite():
    """fkl where the student has -inf and the teacher does not: KL is +inf, not clamped."""
    s = torch.tensor([[0.0, -INF, 1.0], [0.5, 0.1, 0.2]])
    t = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.1, 0.2]])
    rows = kdops.kd_loss(s, t, divergence="fkl", reduction="none")
    assert rows[0] == INF and rows[1].abs() < 1e-6
    ref = kdops.reference.kd_loss(s, t, divergence="fkl", reduction="none")
    assert ref[0] == INF


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_in_gives_nan_out(divergence, side):
    """DESIGN.md 2: NaN in gives NaN out (nothing silently dropped); other rows are unaffected."""
    with_nan = torch.tensor([[0.0, float("nan"), 1.0], [0.5, 0.1, 0.2]])
    other = torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.1, 0.3]])
    s, t = (with_nan, other) if side == "student" else (other, with_nan)
    rows = kdops.kd_loss(s, t, divergence=divergence, beta=0.3, alpha=0.1, reduction="none")
    assert torch.isnan(rows[0]), f"row with a NaN logit gave {rows[0].item()}"
    assert torch.isfinite(rows[1])


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, raised before any kernel
# --------------------------------------------------------------------------------------------

_S = (4, 6)


def _bad_call(which):
    s = torch.randn(_S, requires_grad=True)
    t = torch.randn(_S)
    calls = {
        "shape": lambda: kdops.kd_loss(s, torch.randn(4, 7)),
        "shape_rows": lambda: kdops.kd_loss(s, torch.randn(5, 6)),
        "dtype": lambda: kdops.kd_loss(s, t.half()),
        "temperature_zero": lambda: kdops.kd_loss(s, t, temperature=0.0),
        "temperature_negative": lambda: kdops.kd_loss(s, t, temperature=-1.0),
        "temperature_tensor_row": lambda: kdops.kd_loss(s, t, temperature=torch.tensor([1.0, 0.0, 2.0, 1.0])),
        "temperature_tensor_0d": lambda: kdops.kd_loss(s, t, temperature=torch.tensor(-0.5, requires_grad=True)),
        "temperature_shape": lambda: kdops.kd_loss(s, t, temperature=torch.ones(5)),
        "beta_low": lambda: kdops.kd_loss(s, t, divergence="jsd", beta=-0.1),
        "beta_high": lambda: kdops.kd_loss(s, t, divergence="jsd", beta=1.5),
        "alpha_low": lambda: kdops.kd_loss(s, t, divergence="skew_fkl", alpha=-0.01),
        "alpha_high": lambda: kdops.kd_loss(s, t, divergence="skew_rkl", alpha=2.0),
        "divergence": lambda: kdops.kd_loss(s, t, divergence="kl"),
        "reduction": lambda: kdops.kd_loss(s, t, reduction="avg"),
        "labels": lambda: kdops.kd_loss(s, t, labels=torch.zeros(5, dtype=torch.long)),
        "mask": lambda: kdops.kd_loss(s, t, mask=torch.ones(4, 6, dtype=torch.bool)),
    }
    return calls[which]


BAD = [
    ("shape", "teacher_logits"),
    ("shape_rows", "teacher_logits"),
    ("dtype", "teacher_logits"),
    ("temperature_zero", "temperature"),
    ("temperature_negative", "temperature"),
    ("temperature_tensor_row", "temperature"),
    ("temperature_tensor_0d", "temperature"),
    ("temperature_shape", "temperature"),
    ("beta_low", "beta"),
    ("beta_high", "beta"),
    ("alpha_low", "alpha"),
    ("alpha_high", "alpha"),
    ("divergence", "divergence"),
    ("reduction", "reduction"),
    ("labels", "labels"),
    ("mask", "mask"),
]


@pytest.mark.parametrize("which,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_kernel(which, argument):
    call = _bad_call(which)
    with RecordKdopsOps() as rec:
        with pytest.raises((ValueError, RuntimeError), match=argument):
            call()
    assert rec.ops == [], f"a kernel ran before the check: {rec.ops}"


def test_kernel_recorder_sees_the_op():
    """Makes the 'before any kernel' checks above meaningful: a good call is recorded."""
    with RecordKdopsOps() as rec:
        kdops.kd_loss(torch.randn(_S), torch.randn(_S))
    assert any("kd_loss" in op for op in rec.ops), rec.ops


# --------------------------------------------------------------------------------------------
# nn module, backends
# --------------------------------------------------------------------------------------------


def test_module_matches_function(make_gen, make_logits):
    g = make_gen(3)
    s = make_logits((2, 3, 50), g).requires_grad_()
    t = make_logits((2, 3, 50), g)
    labels = torch.randint(0, 50, (2, 3), generator=g)
    labels[0, 1] = -100
    opts = dict(divergence="jsd", temperature=2.0, beta=0.3, reduction="mean", t2_scale=True)
    module = kdops.nn.KDLoss(**opts)
    out = module(s, t, labels=labels)
    out.backward()
    grad_module = s.grad.clone()
    s.grad = None
    ref = kdops.kd_loss(s, t, labels=labels, **opts)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad_module, s.grad, rtol=0, atol=0)


def test_reference_backend(make_gen, make_logits):
    g = make_gen(4)
    s = make_logits((5, 33), g)
    t = make_logits((5, 33), g)
    kwargs = dict(divergence="skew_rkl", alpha=0.2, temperature=1.5, reduction="none")
    s1 = s.clone().requires_grad_()
    cpu = kdops.kd_loss(s1, t, **kwargs)
    cpu.sum().backward()
    s2 = s.clone().requires_grad_()
    with RecordKdopsOps() as rec, kdops.use_backend("reference"):
        ref = kdops.kd_loss(s2, t, **kwargs)
        ref.sum().backward()
    assert rec.ops == [], "the reference backend must not run a kdops kernel"
    assert_close(cpu, ref, rtol=1e-5, atol_rel=1e-5, what="loss")
    assert_close(s1.grad, s2.grad, rtol=1e-5, atol_rel=1e-5, what="student grad")


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        with kdops.use_backend("nonexistent"):
            kdops.kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    message = str(info.value)
    for name in ("cpu", "cuda", "triton", "reference"):
        assert name in message, message


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_raises(backend):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the backend may well be available")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under TRITON_INTERPRET=1 the triton backend runs CPU tensors")
    with pytest.raises(RuntimeError, match="not (available|built|installed)"):
        with kdops.use_backend(backend):
            kdops.kd_loss(torch.randn(2, 3), torch.randn(2, 3))


# --------------------------------------------------------------------------------------------
# autograd details: fused gradient buffer reuse, grad_output scaling, no grad, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_and_weighted(reduction, make_gen, make_logits):
    g = make_gen(8)
    s = make_logits((4, 21), g).requires_grad_()
    t = make_logits((4, 21), g).requires_grad_()
    tau = torch.tensor(1.4, requires_grad=True)
    loss = kdops.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=tau, reduction=reduction)
    out = loss.sum()
    out.backward(retain_graph=True)
    first = [x.grad.clone() for x in (s, t, tau)]
    for x in (s, t, tau):
        x.grad = None
    out.backward(retain_graph=True)
    second = [x.grad.clone() for x in (s, t, tau)]
    for a, b in zip(first, second):
        assert torch.equal(a, b), "second backward differs: the stored gradient was modified in place"
    for x in (s, t, tau):
        x.grad = None
    (0.7 * out).backward()
    for a, x in zip(first, (s, t, tau)):
        torch.testing.assert_close(x.grad, 0.7 * a, rtol=1e-6, atol=1e-7)


def test_double_backward_raises(make_gen, make_logits):
    """The stored gradient has no graph: create_graph=True must fail loudly, not return zeros."""
    g = make_gen(10)
    s = make_logits((3, 17), g).requires_grad_()
    t = make_logits((3, 17), g)
    loss = kdops.kd_loss(s, t, divergence="fkl", temperature=2.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_no_grad_still_computes_loss(make_gen, make_logits):
    g = make_gen(9)
    s = make_logits((3, 40), g)
    t = make_logits((3, 40), g)
    kwargs = dict(divergence="rkl", temperature=2.0, reduction="none")
    ref = kdops.reference.kd_loss(s, t, **kwargs)
    plain = kdops.kd_loss(s, t, **kwargs)
    assert not plain.requires_grad
    assert_close(plain, ref, rtol=1e-5, atol_rel=1e-5, what="no requires_grad")
    with torch.no_grad():
        under = kdops.kd_loss(s.clone().requires_grad_(), t.clone().requires_grad_(), **kwargs)
    assert not under.requires_grad
    assert_close(under, ref, rtol=1e-5, atol_rel=1e-5, what="torch.no_grad")


@pytest.mark.slow
def test_torch_compile_fullgraph(make_gen, make_logits):
    g = make_gen(10)
    s0 = make_logits((2, 3, 17), g)
    t0 = make_logits((2, 3, 17), g)
    mask = torch.tensor([[True, False, True], [True, True, True]])

    def f(s, t, tau):
        loss = kdops.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=tau, mask=mask, t2_scale=True)
        return 2.0 * loss

    def run(fn):
        s = s0.clone().requires_grad_()
        t = t0.clone().requires_grad_()
        tau = torch.tensor(1.6, requires_grad=True)
        out = fn(s, t, tau)
        out.backward()
        return out.detach(), s.grad, t.grad, tau.grad

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b, what in zip(eager, compiled, ("loss", "student grad", "teacher grad", "temperature grad")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# GPU backends (run only where a CUDA device is present)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_matches_reference(backend, divergence, dtype, make_gen, make_logits):
    g = make_gen(21)
    lead, V = (3, 5), 1271
    s = make_logits(lead + (V,), g, neg_inf=0.1)
    t = make_logits(lead + (V,), g, neg_inf=s == -INF)
    s = s.to(device="cuda", dtype=dtype).requires_grad_()
    t = t.to(device="cuda", dtype=dtype).requires_grad_()
    tau = (torch.rand(lead, generator=g) + 0.5).cuda().requires_grad_()
    mask = (torch.rand(lead, generator=g) > 0.3).cuda()
    weight = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
    for reduction in ("mean", "none"):
        for x in (s, t, tau):
            x.grad = None
        kwargs = dict(divergence=divergence, beta=0.3, alpha=0.1, mask=mask, t2_scale=True, reduction=reduction)
        _run_and_compare(s, t, tau, kwargs, weight if reduction == "none" else None, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_31_elements(backend):
    """N * V > 2^31: 64-bit offsets. Compared with the reference on the last rows, which lie beyond
    2^31 elements from the start (bf16: ~13 GB of device memory)."""
    V = 32768
    N = 2**31 // V + 8
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("not enough device memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16)
    with kdops.use_backend(backend):
        rows = kdops.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0, reduction="none")
        rows[-8:].sum().backward()
    tail = slice(N - 8, N)
    ref, s64, _, _ = _reference(s[tail].cpu(), t[tail].cpu(), 2.0, dict(divergence="jsd", beta=0.3, reduction="none"),
                                None)
    loss_rtol, grad_rtol, _ = tolerances(torch.bfloat16, V)
    assert_close(rows[tail].detach().cpu(), ref, rtol=loss_rtol, atol_rel=loss_rtol, what="loss tail")
    assert_close(s.grad[tail].cpu(), s64.grad, rtol=grad_rtol, atol_rel=loss_rtol, what="grad tail")
    assert (s.grad[: N - 8] == 0).all()


@pytest.mark.gpu
def test_gpu_device_mismatch_raises():
    s = torch.randn(4, 6, device="cuda", requires_grad=True)
    with RecordKdopsOps() as rec:
        with pytest.raises((ValueError, RuntimeError), match="teacher_logits"):
            kdops.kd_loss(s, torch.randn(4, 6))
        with pytest.raises((ValueError, RuntimeError), match="labels"):
            kdops.kd_loss(s, torch.randn(4, 6, device="cuda"), labels=torch.zeros(4, dtype=torch.long))
    assert rec.ops == []
