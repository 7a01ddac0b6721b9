"""Tests of kdops.fused_linear_kd_loss (DESIGN.md 3.3 and 4): against the float64 oracle
kdops.reference.fused_linear_kd_loss and against kd_loss / topk_kd_loss on materialized logits
(every divergence, teacher form, temperature form, reduction, masks, normalizer, bias, softcap,
chunking), gradcheck, opcheck, a hypothesis property, memory independent of N, argument errors,
the nn module, autograd details and torch.compile.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import kdops
import kdops.reference
from record_ops import RecordKdopsOps

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
TEACHERS = ("logits", "hidden", "topk")
HYPOTHESIS = settings(max_examples=20, deadline=None)


# --------------------------------------------------------------------------------------------
# Tolerances. The oracle runs in float64 on the very same (already rounded) inputs.
# --------------------------------------------------------------------------------------------


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest expected magnitude) for the loss and every gradient.

    float64: computed in float64 throughout; only summation order differs.
    float32: the logits are H-term float32 dot products, the divergence sums V float32 terms and
    the weight gradient sums N rows of products: each carries ~sqrt(terms) * eps32 (~1e-7)
    relative to its largest terms; 1e-5 of the largest value covers the sizes used here
    (N, V <= ~300) with a margin of about 10.
    bfloat16 / float16: the logits themselves are rounded to the input dtype (relative 2^-9 /
    2^-12 per logit, which moves the loss and every gradient by up to a few of those relative
    to their largest terms) and so are the gradients; 4 * 2^-8 (bf16) and 4 * 2^-11 (fp16).
    """
    if dtype == torch.float64:
        return 1e-9, 1e-9
    if dtype == torch.float32:
        return 1e-5, 1e-5
    eps = torch.finfo(dtype).eps
    return 4 * eps, 4 * eps


def assert_close(actual, expected, *, rtol, atol_rel, what=""):
    """|actual - expected| <= rtol |expected| + atol_rel * scale elementwise, scale = max |expected|.

    A divergence that is exactly 0 (V = 1, or p = q) is computed from O(1) terms (scaled logits,
    log-sum-exps) that cancel, so the loss's scale is at least 1. A gradient that is exactly 0
    (V = 1: q = p = 1) comes out as a rounding of terms of the size of the gradient's unit
    (1 / (counted rows * tau), of order 2^-7 in these tests), e.g. e * (1 / e) - 1 = 1 ulp in float32:
    its scale is at least 2^-7."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    scale = max(scale, 1.0) if what == "loss" else max(scale, 2.0**-7)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol_rel * scale,
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    divergence: str
    teacher: str = "hidden"  # logits | hidden | topk
    reduction: str = "mean"
    temp: str = "float"  # float (2.0) | row ([N], learnable) | scalar (0-d, learnable)
    dtype: torch.dtype = torch.float32
    lead: tuple = (5, 7)
    H: int = 16
    V: int = 61
    K: int = 6
    chunk: int | None = 8
    bias: bool = True
    softcap: float | None = None
    rows: str = "all"  # all | labels | mask
    normalizer: str = "none"  # none | float | tensor
    t2: bool = False
    beta: float = 0.3
    alpha: float = 0.1
    seed: int = 0

    def id(self) -> str:
        parts = [self.divergence, self.teacher, self.reduction, f"tau_{self.temp}",
                 str(self.dtype).split(".")[-1], "x".join(map(str, self.lead)) + f"-H{self.H}-V{self.V}",
                 f"chunk{self.chunk}"]
        parts += ["bias"] if self.bias else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += [self.rows] if self.rows != "all" else []
        parts += [f"norm_{self.normalizer}"] if self.normalizer != "none" else []
        parts += ["t2"] if self.t2 else []
        return "-".join(parts)


def _cases() -> list[Case]:
    rng = random.Random(7)

    def sampled(div, teacher, dtype=torch.float32, **over):
        reduction = rng.choice(REDUCTIONS)
        fields = dict(
            divergence=div, teacher=teacher, dtype=dtype, reduction=reduction,
            temp=rng.choice(("float", "row", "scalar")),
            lead=rng.choice(((5, 7), (33,), (2, 3, 4))),
            H=rng.choice((16, 24, 1)), V=rng.choice((61, 128, 257)),
            chunk=rng.choice((8, 16, 5, None)), bias=rng.random() < 0.6,
            softcap=rng.choice((None, None, 4.0)) if teacher != "logits" else rng.choice((None, 3.0)),
            rows=rng.choice(("all", "labels", "mask")),
            normalizer=rng.choice(("none", "float", "tensor")) if reduction == "mean" else "none",
            t2=rng.random() < 0.4, beta=rng.choice((0.0, 0.3, 1.0)), alpha=rng.choice((0.0, 0.1, 0.9)),
            seed=rng.randrange(2**31),
        )
        fields.update(over)
        return Case(**fields)

    cases = [sampled(div, teacher) for div in DIVERGENCES for teacher in TEACHERS]
    cases += [sampled(div, "hidden", torch.float64) for div in ("fkl", "jsd", "tvd")]
    cases += [sampled(div, teacher, torch.bfloat16) for div, teacher in
              (("fkl", "hidden"), ("jsd", "logits"), ("rkl", "topk"), ("skew_fkl", "hidden"))]
    cases += [sampled("fkl", "hidden", torch.float16, softcap=4.0)]
    cases += [
        # odd shapes: N not a multiple of the chunk, a single row, H = 1, V odd, one chunk
        Case("jsd", "hidden", "sum", "row", lead=(13,), H=1, V=9, chunk=4, softcap=2.0, seed=1),
        Case("fkl", "logits", "mean", "scalar", lead=(1,), H=5, V=3, chunk=4, rows="mask", seed=2),
        Case("tvd", "topk", "mean", "row", lead=(17,), H=8, V=33, K=33, chunk=100, seed=3),
        Case("rkl", "hidden", "none", "scalar", lead=(4, 5), H=3, V=1, chunk=3, seed=4),
    ]
    return cases


CASES = _cases()


def _make(case: Case):
    """(student tensors, fused-op kwargs) for a case; every student tensor that can requires grad."""
    g = torch.Generator().manual_seed(case.seed)
    n = math.prod(case.lead)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(case.dtype)

    hidden = randn(*case.lead, case.H)
    # logits of O(2): weight entries ~ 2 / sqrt(H)
    weight = randn(case.V, case.H, scale=2.0 / math.sqrt(case.H))
    bias = randn(case.V, scale=0.5) if case.bias else None
    tdtype = torch.float64 if case.dtype == torch.float64 else torch.float32

    kwargs = dict(divergence=case.divergence, beta=case.beta, alpha=case.alpha, reduction=case.reduction,
                  t2_scale=case.t2, softcap=case.softcap)
    if case.teacher == "logits":
        kwargs["teacher_logits"] = randn(*case.lead, case.V, scale=2.0)
    elif case.teacher == "hidden":
        th = case.H + 8
        kwargs["teacher_hidden"] = randn(*case.lead, th)
        kwargs["teacher_weight"] = randn(case.V, th, scale=2.0 / math.sqrt(th))
        if case.bias:
            kwargs["teacher_bias"] = randn(case.V, scale=0.5)
    else:
        k = min(case.K, case.V)
        kwargs["teacher_ids"] = torch.stack([torch.randperm(case.V, generator=g)[:k] for _ in range(n)]).reshape(
            case.lead + (k,))
        kwargs["teacher_logprobs"] = torch.log_softmax(torch.randn(case.lead + (k,), generator=g) * 2, -1)

    if case.rows == "labels":
        labels = torch.randint(0, case.V, case.lead, generator=g)
        labels[torch.rand(case.lead, generator=g) < 0.3] = -100
        kwargs["labels"] = labels
    elif case.rows == "mask":
        kwargs["mask"] = torch.rand(case.lead, generator=g) > 0.3
    if case.temp == "float":
        kwargs["temperature"] = 2.0
    elif case.temp == "row":
        kwargs["temperature"] = (torch.rand(case.lead, generator=g) * 1.5 + 0.5).to(tdtype)
    else:
        kwargs["temperature"] = torch.tensor(1.7, dtype=tdtype)
    kwargs["normalizer"] = {"none": None, "float": 7.0, "tensor": torch.tensor(7.0, dtype=tdtype)}[case.normalizer]

    # reduction "none" cannot give weight / bias gradients (see the docstring): hidden only
    learn_linear = case.reduction != "none"
    hidden.requires_grad_()
    weight.requires_grad_(learn_linear)
    if bias is not None:
        bias.requires_grad_(learn_linear)
    if isinstance(kwargs["temperature"], torch.Tensor):
        kwargs["temperature"].requires_grad_()
    return hidden, weight, bias, kwargs


def _named_leaves(hidden, weight, bias, kwargs) -> list[tuple[str, torch.Tensor]]:
    named = (("hidden", hidden), ("weight", weight), ("bias", bias), ("temperature", kwargs["temperature"]))
    return [(name, x) for name, x in named if isinstance(x, torch.Tensor) and x.requires_grad]


def _leaves(hidden, weight, bias, kwargs) -> list[torch.Tensor]:
    return [x for _, x in _named_leaves(hidden, weight, bias, kwargs)]


def _grad_weights(case_reduction, lead, seed=0):
    """grad_output: random positive per-row weights for "none" (they must scale each row)."""
    if case_reduction != "none":
        return None
    return torch.rand(lead, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def _run(fn, hidden, weight, bias, kwargs, grad_out):
    loss = fn(hidden, weight, student_bias=bias, **kwargs)
    leaves = _leaves(hidden, weight, bias, kwargs)
    grads = torch.autograd.grad(loss, leaves, None if grad_out is None else grad_out.to(loss.dtype))
    return loss.detach(), grads


def _float64_copy(hidden, weight, bias, kwargs):
    def up(x):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            return x
        return x.detach().double().requires_grad_(x.requires_grad)

    return up(hidden), up(weight), up(bias), {k: up(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_matches_reference(case: Case):
    hidden, weight, bias, kwargs = _make(case)
    grad_out = _grad_weights(case.reduction, case.lead, case.seed)
    loss, grads = _run(
        lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=case.chunk, **k), hidden, weight, bias, kwargs,
        grad_out)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.shape == (case.lead if case.reduction == "none" else ())
    ref_loss, ref_grads = _run(kdops.reference.fused_linear_kd_loss, *_float64_copy(hidden, weight, bias, kwargs),
                               grad_out)
    rtol, atol = tolerances(case.dtype)
    assert_close(loss, ref_loss, rtol=rtol, atol_rel=atol, what="loss")
    for (name, x), got, want in zip(_named_leaves(hidden, weight, bias, kwargs), grads, ref_grads):
        assert got.dtype == x.dtype and got.shape == x.shape, f"{name} grad: {got.dtype} {tuple(got.shape)}"
        assert_close(got, want, rtol=rtol, atol_rel=atol, what=f"{name} grad")


# --------------------------------------------------------------------------------------------
# Equality with kd_loss / topk_kd_loss on materialized logits (same dtype, same options)
# --------------------------------------------------------------------------------------------


def _materialized(hidden, weight, *, student_bias=None, teacher_logits=None, teacher_hidden=None,
                  teacher_weight=None, teacher_bias=None, teacher_ids=None, teacher_logprobs=None,
                  softcap=None, renormalize=True, **options):
    """What a user would write: the logits in full, then kd_loss / topk_kd_loss."""

    def logits(h, w, b):
        z = F.linear(h, w, b)
        if softcap:
            acc = torch.float64 if z.dtype == torch.float64 else torch.float32
            z = (softcap * torch.tanh(z.to(acc) / softcap)).to(z.dtype)
        return z

    student = logits(hidden, weight, student_bias)
    if teacher_ids is not None:
        return kdops.topk_kd_loss(student, teacher_ids, teacher_logprobs, renormalize=renormalize, **options)
    if teacher_logits is None:
        teacher_logits = logits(teacher_hidden, teacher_weight, teacher_bias)
    return kdops.kd_loss(student, teacher_logits.to(student.dtype), **options)


MATERIALIZED = [
    Case("fkl", "hidden", "mean", "scalar", rows="labels", softcap=3.0, seed=21),
    Case("jsd", "logits", "sum", "row", bias=False, seed=22),
    Case("tvd", "topk", "mean", "float", rows="mask", normalizer="tensor", t2=True, seed=23),
    Case("skew_rkl", "hidden", "none", "row", alpha=0.9, seed=24),
    Case("rkl", "hidden", "mean", "scalar", dtype=torch.bfloat16, softcap=4.0, seed=25),
    Case("jsd", "topk", "sum", "row", dtype=torch.bfloat16, seed=26),
]


@pytest.mark.parametrize("case", MATERIALIZED, ids=[c.id() for c in MATERIALIZED])
def test_matches_materialized(case: Case):
    """The fused op against the unfused kdops ops on the same logits: the same arithmetic up to
    the chunked accumulation of the weight gradient (float32 here, the matmul's own there)."""
    hidden, weight, bias, kwargs = _make(case)
    grad_out = _grad_weights(case.reduction, case.lead, case.seed)
    loss, grads = _run(
        lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=case.chunk, **k), hidden, weight, bias, kwargs,
        grad_out)
    want_loss, want_grads = _run(_materialized, hidden, weight, bias, kwargs, grad_out)
    rtol, atol = tolerances(case.dtype)
    assert_close(loss, want_loss, rtol=rtol, atol_rel=atol, what="loss")
    for got, want in zip(grads, want_grads):
        assert got.dtype == want.dtype
        assert_close(got, want, rtol=rtol, atol_rel=atol, what="grad")


# --------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# --------------------------------------------------------------------------------------------


def _gradcheck_problem(divergence: str, teacher: str, seed: int = 5):
    """Small float64 inputs; for tvd, drawn away from its kink p_k = q_k (finite differences
    across it are wrong)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        h = torch.randn(7, 3, generator=g, dtype=torch.float64)
        w = torch.randn(5, 3, generator=g, dtype=torch.float64)
        b = torch.randn(5, generator=g, dtype=torch.float64)
        tau = torch.tensor(1.3, dtype=torch.float64)
        teacher_kwargs = {
            "logits": lambda: dict(teacher_logits=torch.randn(7, 5, generator=g, dtype=torch.float64) * 2),
            "hidden": lambda: dict(teacher_hidden=torch.randn(7, 4, generator=g, dtype=torch.float64),
                                   teacher_weight=torch.randn(5, 4, generator=g, dtype=torch.float64)),
            "topk": lambda: dict(teacher_ids=torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(7)]),
                                 teacher_logprobs=torch.randn(7, 3, generator=g, dtype=torch.float64)),
        }[teacher]()
        if divergence != "tvd":
            break
        with torch.no_grad():
            q = torch.softmax(torch.tanh((h @ w.T + b) / 2.0) * 2.0 / tau, -1)
            if teacher == "hidden":
                z = teacher_kwargs["teacher_hidden"] @ teacher_kwargs["teacher_weight"].T
                p = torch.softmax(torch.tanh(z / 2.0) * 2.0 / tau, -1)
            else:
                p = torch.softmax(teacher_kwargs["teacher_logits"] / tau, -1)
        if (p - q).abs().min() > 1e-2:
            break
    return h, w, b, tau, teacher_kwargs


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence):
    teacher = "logits" if divergence == "tvd" else "hidden"
    h, w, b, tau, teacher_kwargs = _gradcheck_problem(divergence, teacher)
    mask = torch.tensor([True, False, True, True, True, False, True])

    def fn(h, w, b, tau):
        return kdops.fused_linear_kd_loss(h, w, student_bias=b, divergence=divergence, temperature=tau, beta=0.3,
                                          alpha=0.2, mask=mask, t2_scale=True, softcap=2.0, chunk_size=3,
                                          **teacher_kwargs)

    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (h, w, b, tau)))


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_gradcheck_topk_row_temperature_none(divergence):
    """Top-k teacher, a per-row temperature and reduction "none" (hidden and temperature)."""
    h, w, b, _, teacher_kwargs = _gradcheck_problem(divergence, "topk")
    tau = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.8

    def fn(h, tau):
        return kdops.fused_linear_kd_loss(h, w, student_bias=b, divergence=divergence, temperature=tau,
                                          reduction="none", chunk_size=2, **teacher_kwargs)

    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), tau.requires_grad_()))


def _opcheck_args(which: str):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(9, 4, generator=g)
    w = torch.randn(11, 4, generator=g)
    b = torch.randn(11, generator=g)
    tau = torch.tensor(2.0)
    none = (None,) * 6
    if which == "hidden_all_grads":
        th, tw = torch.randn(9, 6, generator=g), torch.randn(11, 6, generator=g)
        tau = (torch.rand(9, generator=g) + 0.5).requires_grad_()
        valid = torch.rand(9, generator=g) > 0.3
        return (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), None, th, tw, None, None, None, tau,
                valid, None, "jsd", 0.3, 0.1, True, "mean", True, 3.0, 4, True, True, True, True)
    if which == "logits_sum_no_bias":
        t = torch.randn(9, 11, generator=g)
        return (h.requires_grad_(), w.requires_grad_(), None, t, None, None, None, None, None, tau, None,
                None, "fkl", 0.5, 0.1, True, "sum", False, 0.0, 0, True, True, False, False)
    if which == "topk_none_bf16":
        ids = torch.randint(0, 11, (9, 3), generator=g)
        lp = torch.log_softmax(torch.randn(9, 3, generator=g), -1)
        return (h.bfloat16().requires_grad_(), w.bfloat16(), None, None, None, None, None, ids, lp,
                tau.requires_grad_(), None, None, "rkl", 0.5, 0.1, True, "none", False, 0.0, 4, True,
                False, False, True)
    if which == "f64_nograd":
        t = torch.randn(9, 11, generator=g, dtype=torch.float64)
        return (h.double(), w.double(), b.double(), t, *none[:5], tau.double(), None, torch.tensor(5.0),
                "tvd", 0.5, 0.1, True, "mean", False, 0.0, 2, False, False, False, False)
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["hidden_all_grads", "logits_sum_no_bias", "topk_none_bf16", "f64_nograd"])
def test_opcheck(which):
    torch.library.opcheck(torch.ops.kdops.fused_linear_kd_loss.default, _opcheck_args(which), {})


# --------------------------------------------------------------------------------------------
# hypothesis: fused-linear equals materialized logits (float32)
# --------------------------------------------------------------------------------------------


@HYPOTHESIS
@given(
    divergence=st.sampled_from(DIVERGENCES),
    teacher=st.sampled_from(TEACHERS),
    n=st.integers(1, 40),
    h=st.integers(1, 12),
    v=st.integers(1, 50),
    chunk=st.integers(1, 45),
    reduction=st.sampled_from(("mean", "sum")),
    tau=st.floats(0.5, 3.0),
    softcap=st.sampled_from((None, 2.5)),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_equals_materialized(divergence, teacher, n, h, v, chunk, reduction, tau, softcap, bias, seed):
    case = Case(divergence, teacher, reduction, "float", lead=(n,), H=h, V=v, K=3, chunk=chunk, bias=bias,
                softcap=softcap, rows="mask", seed=seed)
    hidden, weight, b, kwargs = _make(case)
    kwargs["temperature"] = tau
    loss, grads = _run(lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=chunk, **k), hidden, weight, b,
                       kwargs, None)
    want_loss, want_grads = _run(_materialized, hidden, weight, b, kwargs, None)
    assert_close(loss, want_loss, rtol=1e-5, atol_rel=1e-5, what="loss")
    for got, want in zip(grads, want_grads):
        assert_close(got, want, rtol=1e-5, atol_rel=1e-5, what="grad")


# --------------------------------------------------------------------------------------------
# Memory: no [N, V] temporary, whatever N
# --------------------------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """The largest storage (in float32 elements) that an op inside the block returns, other
    than the storages of `inputs` (views of an input allocate nothing)."""

    def __init__(self, inputs):
        super().__init__()
        self.inputs = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // 4)
        return out


@pytest.mark.parametrize("teacher", TEACHERS)
def test_no_tensor_of_all_rows_of_logits(teacher):
    """The only tensors above chunk * V elements are the gradients of the inputs themselves."""
    case = Case("jsd", teacher, "mean", "scalar", lead=(512,), H=8, V=100, K=4, chunk=16, softcap=3.0, seed=31)
    hidden, weight, bias, kwargs = _make(case)
    with LargestAllocation([hidden, weight, bias, *kwargs.values()]) as mode:
        loss = kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=case.chunk, **kwargs)
        loss.backward()
    n, chunk_elems = 512, case.chunk * case.V
    allowed = max(chunk_elems, hidden.numel(), weight.numel(), n * case.K)
    assert mode.largest <= allowed < n * case.V // 4, (mode.largest, allowed)


def test_default_chunk_rows():
    from kdops.fused_linear import default_chunk_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_rows(4096, 32000, cpu) == 512  # 64 MiB of float32 logits
    assert default_chunk_rows(8192, 128256, cuda) == 512  # 256 MiB
    assert default_chunk_rows(100, 32000, cpu) == 100  # never more than N
    assert default_chunk_rows(4096, 10**7, cuda) == 512  # never fewer than 512 rows
    assert default_chunk_rows(4096, 16000, cpu) == 1024  # a multiple of 64 rows


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, raised before any kernel
# --------------------------------------------------------------------------------------------


def _bad_call(which):
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(4, 6)
    ids = torch.zeros(4, 2, dtype=torch.long)
    lp = torch.zeros(4, 2)
    f = kdops.fused_linear_kd_loss
    calls = {
        "no_teacher": lambda: f(h, w),
        "two_teachers": lambda: f(h, w, teacher_logits=t, teacher_ids=ids, teacher_logprobs=lp),
        "teacher_requires_grad": lambda: f(h, w, teacher_logits=t.requires_grad_()),
        "teacher_weight_requires_grad": lambda: f(h, w, teacher_hidden=torch.randn(4, 5),
                                                  teacher_weight=torch.randn(6, 5, requires_grad=True)),
        "teacher_hidden_without_weight": lambda: f(h, w, teacher_hidden=torch.randn(4, 5)),
        "teacher_bias_alone": lambda: f(h, w, teacher_bias=torch.randn(6)),
        "ids_without_logprobs": lambda: f(h, w, teacher_ids=ids),
        "weight_shape": lambda: f(h, torch.randn(6, 4), teacher_logits=t),
        "weight_dtype": lambda: f(h, w.detach().double(), teacher_logits=t),
        "bias_shape": lambda: f(h, w, student_bias=torch.randn(5), teacher_logits=t),
        "teacher_logits_vocab": lambda: f(h, w, teacher_logits=torch.randn(4, 7)),
        "teacher_logits_rows": lambda: f(h, w, teacher_logits=torch.randn(5, 6)),
        "teacher_weight_vocab": lambda: f(h, w, teacher_hidden=torch.randn(4, 5), teacher_weight=torch.randn(7, 5)),
        "teacher_hidden_rows": lambda: f(h, w, teacher_hidden=torch.randn(3, 5), teacher_weight=torch.randn(6, 5)),
        "teacher_ids_range": lambda: f(h, w, teacher_ids=ids + 6, teacher_logprobs=lp),
        "softcap": lambda: f(h, w, teacher_logits=t, softcap=0.0),
        "chunk_size": lambda: f(h, w, teacher_logits=t, chunk_size=0),
        "none_with_weight_grad": lambda: f(h, w, teacher_logits=t, reduction="none"),
        "divergence": lambda: f(h, w, teacher_logits=t, divergence="kl"),
        "temperature": lambda: f(h, w, teacher_logits=t, temperature=0.0),
        "mask": lambda: f(h, w, teacher_logits=t, mask=torch.ones(5, dtype=torch.bool)),
        "hidden_dtype": lambda: f(h.detach().long(), w, teacher_logits=t),
    }
    return calls[which]


BAD = [
    ("no_teacher", "teacher"), ("two_teachers", "teacher"), ("teacher_requires_grad", "teacher_logits"),
    ("teacher_weight_requires_grad", "teacher_weight"), ("teacher_hidden_without_weight", "teacher_weight"),
    ("teacher_bias_alone", "teacher_weight"), ("ids_without_logprobs", "teacher_logprobs"),
    ("weight_shape", "student_weight"), ("weight_dtype", "student_weight"), ("bias_shape", "student_bias"),
    ("teacher_logits_vocab", "teacher_logits"), ("teacher_logits_rows", "teacher_logits"),
    ("teacher_weight_vocab", "teacher_weight"), ("teacher_hidden_rows", "teacher_hidden"),
    ("teacher_ids_range", "teacher_ids"), ("softcap", "softcap"), ("chunk_size", "chunk_size"),
    ("none_with_weight_grad", "reduction"), ("divergence", "divergence"), ("temperature", "temperature"),
    ("mask", "mask"), ("hidden_dtype", "student_hidden"),
]


@pytest.mark.parametrize("which,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_kernel(which, argument):
    call = _bad_call(which)
    with RecordKdopsOps() as rec:
        with pytest.raises((ValueError, TypeError), match=argument):
            call()
    assert rec.ops == [], f"a kernel ran before the check: {rec.ops}"


def test_kernel_recorder_sees_the_op():
    with RecordKdopsOps() as rec:
        kdops.fused_linear_kd_loss(torch.randn(4, 3), torch.randn(6, 3), teacher_logits=torch.randn(4, 6))
    assert any("fused_linear_kd_loss" in op for op in rec.ops), rec.ops


def test_teacher_requiring_grad_is_fine_without_grad_mode():
    t = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        loss = kdops.fused_linear_kd_loss(torch.randn(4, 3), torch.randn(6, 3), teacher_logits=t)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------
# Semantics, nn module, autograd details, backends, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_masked(reduction):
    case = Case("jsd", "hidden", reduction, "scalar", lead=(6,), chunk=4, rows="mask", seed=41)
    hidden, weight, bias, kwargs = _make(case)
    kwargs["mask"] = torch.zeros(6, dtype=torch.bool)
    loss = kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=4, **kwargs)
    assert (loss == 0).all() and not torch.isnan(loss).any()
    loss.sum().backward()
    for x in _leaves(hidden, weight, bias, kwargs):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_chunk_size_does_not_change_the_result():
    case = Case("skew_fkl", "hidden", "mean", "row", lead=(23,), softcap=3.0, rows="labels", seed=42)
    results = []
    for chunk in (1, 7, 23, None, 1000):
        hidden, weight, bias, kwargs = _make(case)
        results.append(_run(lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=chunk, **k), hidden, weight,
                            bias, kwargs, None))
    for loss, grads in results[1:]:
        assert_close(loss, results[0][0], rtol=1e-6, atol_rel=1e-6, what="loss")
        for got, want in zip(grads, results[0][1]):
            assert_close(got, want, rtol=1e-6, atol_rel=1e-6, what="grad")


def test_module_matches_function():
    case = Case("jsd", "hidden", "mean", "float", lead=(2, 5), softcap=4.0, rows="labels", seed=43)
    hidden, weight, bias, kwargs = _make(case)
    opts = dict(divergence="jsd", temperature=2.0, beta=0.3, t2_scale=True, softcap=4.0, chunk_size=4)
    module = kdops.nn.FusedLinearKDLoss(**opts)
    assert "jsd" in repr(module)
    teacher = dict(teacher_hidden=kwargs["teacher_hidden"], teacher_weight=kwargs["teacher_weight"],
                   teacher_bias=kwargs["teacher_bias"])
    out = module(hidden, weight, bias, labels=kwargs["labels"], **teacher)
    ref = kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, labels=kwargs["labels"], **teacher, **opts)
    assert torch.equal(out, ref)


def test_backward_twice_and_weighted():
    case = Case("fkl", "hidden", "sum", "scalar", lead=(9,), chunk=4, seed=44)
    hidden, weight, bias, kwargs = _make(case)
    leaves = _leaves(hidden, weight, bias, kwargs)
    loss = kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=4, **kwargs)
    # clones: with grad_output 1 on the CPU the returned gradient is the stored buffer itself
    first = [g.clone() for g in torch.autograd.grad(loss, leaves, retain_graph=True)]
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "second backward differs: the stored gradient was modified in place"
    (0.7 * loss).backward()
    for a, x in zip(first, leaves):
        torch.testing.assert_close(x.grad, 0.7 * a, rtol=1e-6, atol=1e-7)


def test_double_backward_raises():
    case = Case("fkl", "logits", "mean", "float", lead=(5,), seed=45)
    hidden, weight, bias, kwargs = _make(case)
    loss = kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, **kwargs)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_no_grad_computes_no_gradient():
    case = Case("rkl", "hidden", "none", "float", lead=(6,), chunk=4, seed=46)
    hidden, weight, bias, kwargs = _make(case)
    with torch.no_grad(), RecordGradFlags() as flags:
        loss = kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=4, **kwargs)
    assert not loss.requires_grad and flags.seen == [False] * 4
    ref = kdops.reference.fused_linear_kd_loss(hidden, weight, student_bias=bias, **kwargs)
    assert_close(loss, ref, rtol=1e-5, atol_rel=1e-5, what="loss")


class RecordGradFlags(TorchDispatchMode):
    """The grad_* flags (hidden, weight, bias, temperature) the fused op ran with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kdops":
            self.seen += list(args[-4:])
        return func(*args, **(kwargs or {}))


def test_reference_backend_runs_the_oracle():
    case = Case("jsd", "hidden", "mean", "scalar", lead=(11,), chunk=4, softcap=3.0, seed=47)
    hidden, weight, bias, kwargs = _make(case)
    fused = _run(lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=4, **k), hidden, weight, bias, kwargs,
                 None)
    with kdops.use_backend("reference"), RecordKdopsOps() as rec:
        ref = _run(lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=4, **k), hidden, weight, bias, kwargs,
                   None)
    assert rec.ops == [], "the reference backend must not run a kdops kernel"
    assert_close(fused[0], ref[0], rtol=1e-5, atol_rel=1e-5, what="loss")
    for got, want in zip(fused[1], ref[1]):
        assert_close(got, want, rtol=1e-5, atol_rel=1e-5, what="grad")


@pytest.mark.slow
def test_torch_compile_fullgraph():
    case = Case("jsd", "hidden", "mean", "scalar", lead=(2, 5), chunk=4, softcap=3.0, rows="mask", seed=48)

    def f(hidden, weight, bias, kwargs):
        return 2.0 * kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=4, **kwargs)

    eager = _run(lambda h, w, student_bias, **k: f(h, w, student_bias, k), *_make(case), None)
    torch._dynamo.reset()
    compiled_f = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled = _run(lambda h, w, student_bias, **k: compiled_f(h, w, student_bias, k), *_make(case), None)
    assert_close(compiled[0], eager[0], rtol=1e-6, atol_rel=1e-6, what="loss")
    for got, want in zip(compiled[1], eager[1]):
        assert_close(got, want, rtol=1e-6, atol_rel=1e-6, what="grad")


# --------------------------------------------------------------------------------------------
# GPU (run only where a CUDA device is present)
# --------------------------------------------------------------------------------------------


def _to_cuda(hidden, weight, bias, kwargs):
    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.detach().cuda().requires_grad_(x.requires_grad)

    return move(hidden), move(weight), move(bias), {k: move(v) for k, v in kwargs.items()}


GPU_CASES = [
    Case("fkl", "hidden", "mean", "scalar", dtype=torch.bfloat16, lead=(300,), H=64, V=1271, chunk=128, seed=51,
         softcap=4.0, rows="labels"),
    Case("jsd", "logits", "sum", "row", dtype=torch.bfloat16, lead=(4, 50), H=32, V=1000, chunk=None, seed=52),
    Case("tvd", "hidden", "mean", "float", dtype=torch.float32, lead=(130,), H=48, V=517, chunk=64, seed=53),
    Case("rkl", "topk", "mean", "row", dtype=torch.bfloat16, lead=(70,), H=32, V=800, K=16, chunk=32, seed=54),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["default", "cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id() for c in GPU_CASES])
def test_gpu_matches_reference(case, backend):
    hidden, weight, bias, kwargs = _make(case)
    ref_loss, ref_grads = _run(kdops.reference.fused_linear_kd_loss, *_float64_copy(hidden, weight, bias, kwargs),
                               None)
    op = "kd_loss" if case.teacher != "topk" else "topk_kd_loss"
    if backend != "default" and backend not in kdops.available_backends(op, torch.device("cuda")):
        pytest.skip(f"no {backend} backend for {op}")
    with kdops.use_backend(backend) if backend != "default" else contextlib.nullcontext():
        loss, grads = _run(lambda *a, **k: kdops.fused_linear_kd_loss(*a, chunk_size=case.chunk, **k),
                           *_to_cuda(hidden, weight, bias, kwargs), None)
    rtol, atol = tolerances(case.dtype)
    assert_close(loss.cpu(), ref_loss, rtol=rtol, atol_rel=atol, what="loss")
    for got, want in zip(grads, ref_grads):
        assert_close(got.cpu(), want, rtol=rtol, atol_rel=atol, what="grad")


@pytest.mark.gpu
def test_gpu_no_host_synchronisation():
    """No .item() or other host sync in forward + backward (device-side temperature and
    normalizer: a Python float would be copied to the device once, which synchronises)."""
    case = Case("jsd", "hidden", "mean", "scalar", dtype=torch.bfloat16, lead=(256,), H=64, V=1000, chunk=64,
                rows="mask", softcap=4.0, seed=55)
    hidden, weight, bias, kwargs = _to_cuda(*_make(case))
    kwargs["normalizer"] = torch.tensor(100.0, device="cuda")
    kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=64, **kwargs).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kdops.fused_linear_kd_loss(hidden, weight, student_bias=bias, chunk_size=64, **kwargs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
