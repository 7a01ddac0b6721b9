"""Tests of kdops.topk_kd_loss (DESIGN.md sections 2, 3.2 and 4) against the float64 oracle
kdops.reference.topk_kd_loss: values and gradients (student, teacher log-probabilities,
temperature) over every divergence and option, duplicate and int32 ids, gradcheck, opcheck,
identities with kd_loss, argument checks, autograd corner cases, torch.compile, GPU backends.
The Triton kernel's interpreter tests are in test_topk_triton.py.
"""

from __future__ import annotations

import contextlib
import math
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
# Tolerances. The reference runs in float64 on the very same (already rounded) inputs.
#   loss: float32 sums over V (fkl's log-sum-exp) and K terms: 1e-5 relative, growing like
#     sqrt(V / 1024), plus the same relative to the row's natural size (1 + max|z| / tau) because
#     log-probabilities are differences of such numbers.
#   gradients: float32 arithmetic (same bound, relative to the largest gradient), then one rounding
#     to the input dtype in forward and one of grad_output * buffer in backward: up to one ulp of
#     the dtype relative (eps), i.e. 2^-7 for bf16 and 2^-10 for fp16 (+2^-24 absolute: fp16
#     subnormals).
# --------------------------------------------------------------------------------------------


def _rtol32(V: int) -> float:
    return 1e-5 * max(1.0, math.sqrt(V / 1024))


def _grad_tolerance(dtype: torch.dtype, V: int) -> tuple[float, float]:
    """(rtol, absolute floor) for a logit gradient in `dtype`."""
    if dtype == torch.float64:
        return 1e-10, 0.0
    if dtype == torch.float32:
        return _rtol32(V), 0.0
    return torch.finfo(dtype).eps, (2.0**-24 if dtype == torch.float16 else 0.0)


def assert_close(actual, expected, *, rtol, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: {m}")


def _largest_finite(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return finite.abs().max().item() if finite.numel() else 0.0


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    divergence: str
    reduction: str = "mean"
    temp: str = "float"  # float (2.0) | row ([N], learnable) | scalar (0-d, learnable)
    dtype: torch.dtype = torch.float32
    lead: tuple = (6,)
    V: int = 37
    K: int = 5
    renormalize: bool = True
    beta: float = 0.5
    alpha: float = 0.1
    rows: str = "all"  # all | labels | mask
    normalizer: bool = False
    t2: bool = False
    ids: str = "int64"  # int64 | int32
    duplicates: bool = False  # some ids repeated within a row
    empty_slots: bool = False  # some teacher log-probabilities -inf (fewer than K candidates)
    student_neg_inf: bool = False  # -inf student logits off the ids (padded vocabulary)
    strided: bool = False  # student rows of a wider buffer (NaN past V)
    teacher_grad: bool = True
    seed: int = 0

    def id(self) -> str:
        parts = [self.divergence, self.reduction, f"tau_{self.temp}", str(self.dtype).split(".")[-1],
                 "x".join(map(str, self.lead + (self.V,))) + f"_K{self.K}"]
        if not self.renormalize:
            parts.append("as_given")
        if self.divergence == "jsd":
            parts.append(f"beta{self.beta}")
        if self.divergence.startswith("skew"):
            parts.append(f"alpha{self.alpha}")
        flags = dict(normalizer=self.normalizer, t2=self.t2, dup=self.duplicates, empty=self.empty_slots,
                     neginf=self.student_neg_inf, strided=self.strided)
        parts += [name for name, on in flags.items() if on]
        if self.rows != "all":
            parts.append(self.rows)
        if self.ids != "int64":
            parts.append(self.ids)
        return "-".join(parts)


def _cases() -> list[Case]:
    rng = random.Random(7)

    def sampled(div, reduction, temp, dtype, k, **over):
        V = rng.choice((37, 64, 1271, 3))
        fields = dict(
            divergence=div, reduction=reduction, temp=temp, dtype=dtype, lead=rng.choice(((6,), (2, 3), (5,))),
            V=V, K=min(V, rng.choice((1, 5, 16, V))), renormalize=k % 2 == 0, beta=(0.0, 0.3, 1.0)[k % 3],
            alpha=(0.0, 0.1, 0.9)[k % 3], rows=rng.choice(("all", "labels", "mask")),
            normalizer=reduction == "mean" and rng.random() < 0.3, t2=rng.random() < 0.4,
            ids=rng.choice(("int64", "int32")), duplicates=rng.random() < 0.4, empty_slots=rng.random() < 0.3,
            student_neg_inf=rng.random() < 0.3, strided=rng.random() < 0.3, teacher_grad=rng.random() < 0.7,
            seed=rng.randrange(2**31),
        )
        fields.update(over)
        # an empty slot (p = 0) under a reverse KL is a truly infinite term: not a value to compare
        reverse = div == "rkl" or (div == "jsd" and fields["beta"] == 1.0) or (
            div == "skew_rkl" and fields["alpha"] == 0.0)
        fields["empty_slots"] = fields["empty_slots"] and not reverse
        return Case(**fields)

    cases = []
    for div in DIVERGENCES:
        for r, red in enumerate(REDUCTIONS):
            for t, temp in enumerate(("float", "row", "scalar")):
                cases.append(sampled(div, red, temp, torch.float32, r + t))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for k, div in enumerate(DIVERGENCES):
            cases.append(sampled(div, rng.choice(REDUCTIONS), rng.choice(("float", "row", "scalar")), dtype, k))
    cases += [
        Case("fkl", "mean", "scalar", lead=(3,), V=50257, K=64, rows="mask", seed=11),
        Case("fkl", "none", "row", torch.bfloat16, lead=(2,), V=50257, K=1024, duplicates=True, seed=12),
        Case("jsd", "sum", "float", lead=(2, 2), V=1, K=1, seed=13),
        Case("fkl", "sum", "scalar", lead=(4,), V=1, K=1, t2=True, seed=14),
        Case("tvd", "mean", "row", lead=(3,), V=5000, K=4096, renormalize=False, seed=15),
        Case("skew_rkl", "none", "scalar", torch.float16, lead=(2, 2), V=129, K=129, duplicates=True,
             empty_slots=True, student_neg_inf=True, seed=16),
    ]
    return cases


CASES = _cases()


def _make_case(case: Case, device="cpu"):
    g = torch.Generator().manual_seed(case.seed)
    N = math.prod(case.lead)
    V, K = case.V, case.K
    z = torch.randn(N, V, generator=g) * 2
    teacher = torch.randn(N, V, generator=g) * 2
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    if case.duplicates and K > 1:
        ids[:, -1] = ids[:, 0]
        ids[0, :] = ids[0, 0]  # one row names a single id K times
    logprobs = torch.log_softmax(teacher, -1).gather(1, ids)
    if case.empty_slots and K > 1:
        logprobs[:, -1] = -INF
    if case.student_neg_inf:
        off = torch.ones(N, V, dtype=torch.bool).scatter_(1, ids, False)
        z = z.masked_fill(off & (torch.rand(N, V, generator=g) < 0.3), -INF)
    z = z.to(case.dtype)
    if case.strided:
        wide = torch.full((N, V + 3), float("nan"), dtype=case.dtype)
        wide[:, :V] = z
        z = wide[:, :V]
    s = z.reshape(case.lead + (V,)).to(device).requires_grad_()
    ids = ids.reshape(case.lead + (K,)).to(device=device, dtype=torch.int32 if case.ids == "int32" else torch.int64)
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    lp = logprobs.reshape(case.lead + (K,)).to(device=device, dtype=acc).requires_grad_(case.teacher_grad)

    labels = mask = None
    if case.rows == "labels":
        labels = torch.randint(0, 50, case.lead, generator=g)
        labels[torch.rand(case.lead, generator=g) < 0.3] = -100
        labels = labels.to(device)
    elif case.rows == "mask":
        mask = (torch.rand(case.lead, generator=g) > 0.3).to(device)
    if case.temp == "float":
        tau = 2.0
    elif case.temp == "row":
        tau = (torch.rand(N, generator=g) * 1.5 + 0.5).to(device=device, dtype=acc).requires_grad_()
    else:
        tau = torch.tensor(1.7, dtype=acc, device=device, requires_grad=True)
    kwargs = dict(divergence=case.divergence, beta=case.beta, alpha=case.alpha, renormalize=case.renormalize,
                  labels=labels, mask=mask, reduction=case.reduction,
                  normalizer=torch.tensor(7.0) if case.normalizer else None, t2_scale=case.t2)
    weight = torch.rand(case.lead, generator=g, dtype=torch.float64) + 0.5 if case.reduction == "none" else None
    return s, ids, lp, tau, kwargs, weight


def _run_and_compare(s, ids, lp, tau, kwargs, weight=None, backend=None):
    """Forward + backward through kdops.topk_kd_loss, compared with the float64 oracle on CPU
    copies of the same values: the loss and every requested gradient."""
    def cpu(x):
        return x.detach().cpu() if isinstance(x, torch.Tensor) else x

    s64 = cpu(s).double().requires_grad_()
    lp64 = cpu(lp).double().requires_grad_()
    tau64 = cpu(tau).double().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    ref_kwargs = {k: cpu(v) for k, v in kwargs.items()}
    ref = kdops.reference.topk_kd_loss(s64, cpu(ids), lp64, temperature=tau64, **ref_kwargs)
    ref.backward(weight if weight is not None else torch.ones_like(ref))

    with kdops.use_backend(backend) if backend else contextlib.nullcontext():
        loss = kdops.topk_kd_loss(s, ids, lp, temperature=tau, **kwargs)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc
    loss.backward(weight.to(loss) if weight is not None else None)

    V = s.shape[-1]
    rtol = 1e-10 if acc == torch.float64 else _rtol32(V)
    z = cpu(s).double()
    tau_min = float(tau.detach().min()) if isinstance(tau, torch.Tensor) else tau
    z_size = 1.0 + _largest_finite(z) / tau_min
    loss_scale = max(_largest_finite(ref.detach()), 1.0) * z_size
    assert_close(loss, ref, rtol=rtol, atol=rtol * loss_scale, what="loss")

    grad_rtol, grad_floor = _grad_tolerance(s.dtype, V)
    gmax = _largest_finite(s64.grad)
    # dL/dz = (row weight) (tau^2 for t2) / tau * (differences of O(1) terms that may cancel to 0):
    # a few roundings of the arithmetic dtype of that unit on top of the relative bounds
    grad_floor += 8 * torch.finfo(acc).eps * _gradient_unit(loss, ref_kwargs, weight, tau)
    assert s.grad is not None and s.grad.dtype == s.dtype
    assert_close(s.grad, s64.grad, rtol=grad_rtol, atol=(rtol * z_size + grad_rtol) * gmax + grad_floor,
                 what="student grad")
    if lp.requires_grad:
        assert lp.grad is not None and lp.grad.dtype == lp.dtype
        assert_close(lp.grad, lp64.grad, rtol=rtol, atol=rtol * z_size * _largest_finite(lp64.grad),
                     what="teacher grad")
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        assert tau.grad is not None and tau.grad.shape == tau.shape
        tau_scale = _largest_finite(tau64.grad) + loss_scale / tau_min
        assert_close(tau.grad, tau64.grad, rtol=rtol, atol=rtol * z_size * tau_scale, what="temperature grad")


def _gradient_unit(loss, kwargs, weight, tau) -> float:
    """Largest per-row factor in front of a logit gradient: reduction weight * (tau if t2 else 1/tau)."""
    taus = tau.detach().double().reshape(-1).cpu() if isinstance(tau, torch.Tensor) else torch.tensor([float(tau)])
    per_tau = taus if kwargs.get("t2_scale") else 1.0 / taus
    if kwargs["reduction"] == "none":
        w = weight.max().item() if weight is not None else 1.0
    elif kwargs["reduction"] == "sum" or kwargs.get("normalizer") is not None:
        w = 1.0 if kwargs["reduction"] == "sum" else 1.0 / float(kwargs["normalizer"])
    else:
        w = 1.0  # 1 / (number of counted rows) <= 1
    return w * per_tau.max().item()


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_matches_reference(case: Case):
    _run_and_compare(*_make_case(case))


# --------------------------------------------------------------------------------------------
# Identities with kd_loss, properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_support_equals_kd_loss(divergence):
    """K = V (ids a permutation of the vocabulary): every divergence is kd_loss's."""
    g = torch.Generator().manual_seed(3)
    N, V = 5, 29
    s = torch.randn(N, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
    lp = torch.log_softmax(t, -1).gather(1, ids)
    kw = dict(divergence=divergence, temperature=1.7, beta=0.3, alpha=0.2, reduction="none", t2_scale=True)
    sparse = kdops.topk_kd_loss(s, ids, lp, **kw)
    (g_sparse,) = torch.autograd.grad(sparse.sum(), s)
    dense = kdops.kd_loss(s, t, **kw)
    (g_dense,) = torch.autograd.grad(dense.sum(), s)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-12)


@HYPOTHESIS
@given(
    n=st.integers(1, 5), v=st.integers(2, 60), k=st.integers(1, 60), tau=st.floats(0.25, 4.0),
    renormalize=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_property_fkl_bounds(n, v, k, tau, renormalize, seed):
    """Exact fkl with a renormalized teacher is >= KL(p || q~) on the support >= 0; the
    support-renormalized student can only fit better."""
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1).gather(1, ids)
    exact = kdops.topk_kd_loss(s, ids, lp, temperature=tau, reduction="none")
    support = kdops.topk_kd_loss(s, ids, lp, divergence="jsd", beta=0.0, temperature=tau, reduction="none")
    assert (support >= -1e-5).all(), support
    assert (exact >= support - 1e-4 * (1 + support.abs())).all(), (exact, support)


@HYPOTHESIS
@given(divergence=st.sampled_from(DIVERGENCES), n=st.integers(1, 4), v=st.integers(1, 40), k=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_property_masked_rows_are_ignored(divergence, n, v, k, seed):
    """A masked row's ids may be anything (even out of range) and its values NaN: loss and
    gradients of the other rows do not change, the masked row's gradient is 0."""
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n + 1, v, generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n + 1)])
    lp = torch.log_softmax(torch.randn(n + 1, k, generator=g), -1)
    s[-1], ids[-1], lp[-1] = float("nan"), -100, float("nan")
    mask = torch.ones(n + 1, dtype=torch.bool)
    mask[-1] = False
    s.requires_grad_()
    loss = kdops.topk_kd_loss(s, ids, lp, divergence=divergence, mask=mask, reduction="sum")
    loss.backward()
    s0 = s.detach()[:-1].clone().requires_grad_()
    loss0 = kdops.topk_kd_loss(s0, ids[:-1], lp[:-1], divergence=divergence, reduction="sum")
    loss0.backward()
    torch.testing.assert_close(loss, loss0)
    torch.testing.assert_close(s.grad[:-1], s0.grad)
    assert (s.grad[-1] == 0).all()


def test_all_rows_masked_mean_is_zero():
    s = torch.randn(3, 10, requires_grad=True)
    ids = torch.zeros(3, 2, dtype=torch.long)
    loss = kdops.topk_kd_loss(s, ids, torch.zeros(3, 2), mask=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_duplicate_id_row_is_exact_in_bf16():
    """A row naming one id K times: its gradient there is q*P - P summed exactly in float32 and
    rounded once (reading back a rounded bf16 partial sum would be off by more than an ulp)."""
    V, K = 100, 64
    s = (torch.randn(1, V) * 3).bfloat16().requires_grad_()
    ids = torch.full((1, K), 7, dtype=torch.long)
    lp = torch.full((1, K), -math.log(K))
    kdops.topk_kd_loss(s, ids, lp, reduction="sum").backward()
    s64 = s.detach().double().requires_grad_()
    kdops.reference.topk_kd_loss(s64, ids, lp.double(), reduction="sum").backward()
    assert s.grad[0, 7].item() == s64.grad[0, 7].to(torch.bfloat16).item()


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence, renormalize):
    g = torch.Generator().manual_seed(19)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0, 3, 5], [6, 1, 1], [2, 4, 0]])
    lp = torch.log_softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1).gather(1, ids)
    tau = torch.rand(3, generator=g, dtype=torch.float64) + 0.8

    def fn(s, lp, tau):
        return kdops.topk_kd_loss(s, ids, lp, divergence=divergence, temperature=tau, beta=0.3, alpha=0.2,
                                  renormalize=renormalize, reduction="sum", t2_scale=True)

    # tvd's kink at p_k = q_k: these draws keep every |p - q| far above gradcheck's eps
    assert torch.autograd.gradcheck(fn, (s.requires_grad_(), lp.requires_grad_(), tau.requires_grad_()))


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 5], [4, 1, 1]])
    lp = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    for div in ("fkl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda s, lp, tau: kdops.reference.topk_kd_loss(s, ids, lp, divergence=div, temperature=tau),
            (s, lp, tau))


def _opcheck_args(which: str):
    g = torch.Generator().manual_seed(5)
    if which == "fkl_mean_student":
        s = torch.randn(4, 11, generator=g).requires_grad_()
        ids = torch.randint(0, 11, (4, 3), generator=g)
        lp = torch.randn(4, 3, generator=g)
        return (s, ids, lp, torch.tensor(2.0), None, None, "fkl", 0.5, 0.1, True, "mean", False, True, False, False)
    if which == "jsd_all_grads_int32":
        s = torch.randn(5, 9, generator=g).requires_grad_()
        ids = torch.randint(0, 9, (5, 4), generator=g, dtype=torch.int32)
        lp = torch.randn(5, 4, generator=g).requires_grad_()
        tau = (torch.rand(5, generator=g) + 0.5).requires_grad_()
        valid = torch.tensor([True, False, True, True, False])
        return (s, ids, lp, tau, valid, torch.tensor(6.0), "jsd", 0.3, 0.1, False, "mean", True, True, True, True)
    if which == "tvd_none_bf16":
        s = torch.randn(3, 17, generator=g).bfloat16().requires_grad_()
        ids = torch.randint(0, 17, (3, 5), generator=g)
        lp = torch.randn(3, 5, generator=g)
        tau = torch.tensor(1.5).requires_grad_()
        return (s, ids, lp, tau, None, None, "tvd", 0.5, 0.1, True, "none", False, True, False, True)
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["fkl_mean_student", "jsd_all_grads_int32", "tvd_none_bf16"])
def test_opcheck(which):
    torch.library.opcheck(torch.ops.kdops.topk_kd_loss.default, _opcheck_args(which), {})


# --------------------------------------------------------------------------------------------
# Argument checks: a clear error before any kdops kernel runs
# --------------------------------------------------------------------------------------------


def _bad_inputs(which: str):
    s = torch.randn(4, 10, requires_grad=True)
    ids = torch.randint(0, 10, (4, 3))
    lp = torch.randn(4, 3)
    kwargs = {}
    if which == "id_too_large":
        ids = ids.clone()
        ids[2, 1] = 10
    elif which == "id_negative":
        ids = ids.clone()
        ids[0, 0] = -1
    elif which == "k_above_v":
        ids, lp = torch.zeros(4, 11, dtype=torch.long), torch.zeros(4, 11)
    elif which == "float_ids":
        ids = ids.float()
    elif which == "ids_shape":
        ids = ids[:3]
    elif which == "logprobs_shape":
        lp = lp[:, :2]
    elif which == "int_logprobs":
        lp = lp.long()
    elif which == "divergence":
        kwargs["divergence"] = "kl"
    elif which == "temperature":
        kwargs["temperature"] = 0.0
    elif which == "beta":
        kwargs["beta"] = 1.5
    elif which == "reduction":
        kwargs["reduction"] = "avg"
    return s, ids, lp, kwargs


BAD = [("id_too_large", "teacher_ids"), ("id_negative", "teacher_ids"), ("k_above_v", "K"),
       ("float_ids", "teacher_ids"), ("ids_shape", "teacher_ids"), ("logprobs_shape", "teacher_logprobs"),
       ("int_logprobs", "teacher_logprobs"), ("divergence", "divergence"), ("temperature", "temperature"),
       ("beta", "beta"), ("reduction", "reduction")]


@pytest.mark.parametrize("which,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_kernel(which, argument):
    s, ids, lp, kwargs = _bad_inputs(which)
    with RecordKdopsOps() as rec:
        with pytest.raises(ValueError, match=argument):
            kdops.topk_kd_loss(s, ids, lp, **kwargs)
    assert rec.ops == []


def test_raw_op_bad_id_gives_nan_row():
    """The kernel itself never reads out of bounds: a counted row with a bad id gets a NaN loss."""
    s = torch.randn(2, 6)
    ids = torch.tensor([[0, 6], [1, 2]])
    loss, *_ = torch.ops.kdops.topk_kd_loss(s, ids, torch.zeros(2, 2), torch.tensor(1.0), None, None, "fkl", 0.5,
                                            0.1, True, "none", False, False, False, False)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


# --------------------------------------------------------------------------------------------
# Autograd corner cases, backends, torch.compile
# --------------------------------------------------------------------------------------------


def _small(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 40, generator=g).to(device=device, dtype=dtype).requires_grad_()
    ids = torch.randint(0, 40, (2, 3, 8), generator=g).to(device)
    lp = torch.log_softmax(torch.randn(2, 3, 8, generator=g), -1).to(device)
    return s, ids, lp


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_and_weighted(reduction):
    s, ids, lp = _small()
    loss = kdops.topk_kd_loss(s, ids, lp, divergence="jsd", reduction=reduction)
    w = torch.rand_like(loss) + 0.5
    loss.backward(w, retain_graph=True)
    first = s.grad.clone()
    loss.backward(w)
    torch.testing.assert_close(s.grad, 2 * first)
    s64 = s.detach().double().requires_grad_()
    kdops.reference.topk_kd_loss(s64, ids, lp.double(), divergence="jsd", reduction=reduction).backward(w.double())
    torch.testing.assert_close(first.double(), s64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["kd_loss", "topk_kd_loss"])
def test_retained_graph_backward_three_times(op):
    """Each pass through a retained graph adds the same gradient: no pass may hand out, then
    rescale or accumulate into, the stored buffer that a later pass reads (shared autograd)."""
    s, ids, lp = _small()
    t = torch.randn(s.shape)

    def loss_fn():
        if op == "kd_loss":
            return kdops.kd_loss(s, t)
        return kdops.topk_kd_loss(s, ids, lp)

    loss = loss_fn()
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward(torch.tensor(2.0), retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 4 * first)


def test_double_backward_raises():
    s, ids, lp = _small()
    loss = kdops.topk_kd_loss(s, ids, lp)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_reference_backend_and_module():
    s, ids, lp = _small()
    with kdops.use_backend("reference"):
        ref = kdops.topk_kd_loss(s, ids, lp, temperature=2.0, divergence="tvd")
    out = kdops.topk_kd_loss(s, ids, lp, temperature=2.0, divergence="tvd")
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    module = kdops.nn.TopKKDLoss("tvd", temperature=2.0)
    torch.testing.assert_close(module(s, ids, lp), out)


def test_no_grad_computes_no_gradient():
    s, ids, lp = _small()
    with RecordKdopsOps() as rec, torch.no_grad():
        loss = kdops.topk_kd_loss(s, ids, lp)
    assert not loss.requires_grad and rec.ops == ["kdops.topk_kd_loss.default"]


@pytest.mark.slow
def test_torch_compile_fullgraph():
    s, ids, lp = _small()
    tau = torch.tensor(1.5, requires_grad=True)

    def f(s, ids, lp, tau):
        return kdops.topk_kd_loss(s, ids, lp, divergence="skew_fkl", temperature=tau, t2_scale=True) * 3.0

    def run(fn):
        s.grad = tau.grad = None
        out = fn(s, ids, lp, tau)
        out.backward()
        return out.detach(), s.grad.clone(), tau.grad.clone()

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU backends (run only where a CUDA device is present)
# --------------------------------------------------------------------------------------------

GPU_CASES = [c for c in CASES if c.dtype != torch.float64][::3]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id() for c in GPU_CASES])
def test_gpu_backend_matches_reference(backend, case):
    _run_and_compare(*_make_case(case, device="cuda"), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_31_elements(backend):
    """N * V > 2^31: 64-bit offsets, checked on the last rows."""
    V, K = 32768, 64
    N = 2**31 // V + 8
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("not enough device memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (N, K), generator=g, device="cuda")
    lp = torch.log_softmax(torch.randn(N, K, generator=g, device="cuda"), -1)
    with kdops.use_backend(backend):
        rows = kdops.topk_kd_loss(s, ids, lp, temperature=2.0, reduction="none")
        rows[-8:].sum().backward()
    tail = slice(N - 8, N)
    s64 = s[tail].detach().cpu().double().requires_grad_()
    ref = kdops.reference.topk_kd_loss(s64, ids[tail].cpu(), lp[tail].cpu().double(), temperature=2.0,
                                       reduction="none")
    ref.sum().backward()
    assert_close(rows[tail], ref, rtol=_rtol32(V), atol=1e-4, what="loss tail")
    assert_close(s.grad[tail], s64.grad, rtol=2**-7, atol=2**-7 * s64.grad.abs().max().item(), what="grad tail")
    assert (s.grad[: N - 8] == 0).all()
