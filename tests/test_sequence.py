"""Tests of kdops.sequence_logprob (DESIGN.md sections 2, 3.8 and 4) against the float64 oracle
kdops.reference.sequence_logprob: values and gradients over dtypes, sizes, ignored positions,
strided rows, -inf logits, int32 labels and reductions; the raw op on every CPU instruction-set
build; gradcheck, opcheck, argument checks, autograd corner cases, torch.compile, GPU backends.
The Triton kernel's interpreter tests are in test_sequence_triton.py.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdops
import kdops.reference
from record_ops import RecordKdopsOps

REDUCTIONS = ("mean", "sum", "none")
INF = float("inf")
NAN = float("nan")
IGNORE = -100


# --------------------------------------------------------------------------------------------
# Tolerances. The reference runs in float64 on the very same (already rounded) inputs.
#   token log-probabilities: float32 sums of V exponentials: 1e-5 relative, growing like
#     sqrt(V / 1024), relative to the row's natural size 1 + max|z| (a log-probability is a
#     difference of numbers that large).
#   gradients (onehot - softmax, entries in [-1, 1]): the same float32 bound absolute, then one
#     rounding to the input dtype in forward and one of grad_output * buffer in backward: one ulp
#     of the dtype relative (eps), plus 2^-24 absolute for fp16 subnormals.
# --------------------------------------------------------------------------------------------


def _rtol32(V: int) -> float:
    return 1e-5 * max(1.0, math.sqrt(V / 1024))


def _value_atol(dtype: torch.dtype, V: int, logits: torch.Tensor) -> float:
    finite = logits[torch.isfinite(logits)]
    size = 1.0 + (finite.abs().max().item() if finite.numel() else 0.0)
    return (1e-12 if dtype == torch.float64 else _rtol32(V)) * size


def _grad_tolerance(dtype: torch.dtype, V: int) -> tuple[float, float]:
    """(rtol, atol) of a logit gradient in `dtype`."""
    if dtype == torch.float64:
        return 1e-10, 1e-12
    if dtype == torch.float32:
        return _rtol32(V), _rtol32(V)
    return torch.finfo(dtype).eps, _rtol32(V) + (2.0**-24 if dtype == torch.float16 else 0.0)


def assert_close(actual, expected, *, rtol, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float32
    lead: tuple = (3, 5)  # [..., T]
    V: int = 37
    ignored: str = "some"  # none | some | all | sequence (one whole sequence ignored)
    labels: str = "int64"  # int64 | int32
    neg_inf: bool = False  # about 10% -inf logits off the labels (padded vocabulary)
    strided: bool = False  # rows of a wider buffer (NaN past V)
    seed: int = 0

    def id(self) -> str:
        parts = [str(self.dtype).split(".")[-1], "x".join(map(str, self.lead + (self.V,))), f"ign_{self.ignored}"]
        parts += [name for name, on in (("int32", self.labels == "int32"), ("neginf", self.neg_inf),
                                        ("strided", self.strided)) if on]
        return "-".join(parts)


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CASES = (
    [Case(dtype=d) for d in DTYPES]
    + [Case(dtype=d, V=v, lead=(2, 3), seed=v) for d in (torch.float32, torch.bfloat16) for v in (1, 3, 1271)]
    + [Case(V=50257, lead=(2, 2), neg_inf=True, strided=True), Case(dtype=torch.float16, V=50257, lead=(1, 3))]
    + [Case(ignored="all"), Case(ignored="sequence", dtype=torch.float64), Case(ignored="none", lead=(7,))]
    + [Case(labels="int32", dtype=torch.bfloat16), Case(neg_inf=True, dtype=torch.float16),
       Case(strided=True, dtype=torch.bfloat16, V=4099, lead=(2, 2), neg_inf=True),
       Case(strided=True, lead=(2, 1, 4), labels="int32"), Case(lead=(4, 2, 3), V=2050)]
)


def make_inputs(case: Case, device: str = "cpu"):
    g = torch.Generator().manual_seed(case.seed)
    shape = case.lead + (case.V,)
    labels = torch.randint(0, case.V, case.lead, generator=g)
    z = torch.randn(shape, generator=g) * 3
    if case.neg_inf:
        off = torch.rand(shape, generator=g) < 0.1
        off.scatter_(-1, labels.unsqueeze(-1), False)
        z = z.masked_fill(off, -INF)
    if case.ignored == "some":
        labels = labels.masked_fill(torch.rand(case.lead, generator=g) < 0.3, IGNORE)
    elif case.ignored == "all":
        labels.fill_(IGNORE)
    elif case.ignored == "sequence":
        labels[(0,) * (len(case.lead) - 1)] = IGNORE
    if case.strided:
        wide = torch.full(case.lead + (case.V + 5,), NAN)
        wide[..., : case.V] = z
        z = wide.to(device=device, dtype=case.dtype)[..., : case.V]
    else:
        z = z.to(device=device, dtype=case.dtype)
    labels = labels.to(device=device, dtype=torch.int32 if case.labels == "int32" else torch.int64)
    return z, labels


def run_and_compare(case: Case, device: str = "cpu", backend: str | None = None):
    z, labels = make_inputs(case, device)
    z64 = z.detach().cpu().double()
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    vatol = _value_atol(case.dtype, case.V, z64)
    rtol, gatol = _grad_tolerance(case.dtype, case.V)
    for reduction in REDUCTIONS:
        leaf = z.detach().requires_grad_()
        ctx = kdops.use_backend(backend) if backend else contextlib.nullcontext()
        with ctx:
            out = kdops.sequence_logprob(leaf, labels, reduction=reduction)
        ref_leaf = z64.clone().requires_grad_()
        ref = kdops.reference.sequence_logprob(ref_leaf, labels.cpu(), reduction=reduction)
        assert out.dtype == acc and not torch.isnan(out).any()
        # mean divides by up to T positions: its values are as accurate as the per-token ones
        assert_close(out, ref, rtol=_rtol32(case.V), atol=vatol * (1 if reduction != "sum" else case.lead[-1]),
                     what=f"{reduction} value")
        weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        out.backward(weight.to(device=device, dtype=out.dtype))
        ref.backward(weight.double())
        assert leaf.grad.dtype == case.dtype
        assert_close(leaf.grad, ref_leaf.grad, rtol=rtol, atol=gatol * 1.5, what=f"{reduction} grad")


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_matches_reference(case: Case):
    run_and_compare(case)


def test_no_valid_position_mean_is_zero():
    z, labels = make_inputs(Case(ignored="sequence"))
    leaf = z.requires_grad_()
    out = kdops.sequence_logprob(leaf, labels)
    assert out[0].item() == 0.0 and torch.isfinite(out).all()
    out.sum().backward()
    assert (leaf.grad[0] == 0).all() and leaf.grad[1:].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# The raw op: every CPU build, special values
# --------------------------------------------------------------------------------------------


def _raw_reference(z: torch.Tensor, labels: torch.Tensor):
    """(token log-probabilities, onehot - softmax) in float64, zero on ignored rows."""
    z64 = z.double()
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0).long()
    lsm = torch.log_softmax(z64, -1)
    token = torch.where(valid, lsm.gather(-1, safe[:, None])[:, 0], 0.0)
    grad = torch.nn.functional.one_hot(safe, z.shape[-1]).double() - lsm.exp()
    return token, torch.where(valid[:, None], grad, 0.0)


def _cpu_isas():
    isas = ["baseline"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" in flags and " f16c" in flags and " fma" in flags:
        isas.append("avx2")
        if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
            isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", _cpu_isas())
@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_op_every_cpu_build(isa, dtype, monkeypatch):
    """Each instruction-set build (KDOPS_CPU_ISA is read on every call): several L1 blocks of
    sweep 1, a block of -inf only before the first finite value, ignored rows."""
    monkeypatch.setenv("KDOPS_CPU_ISA", isa)
    g = torch.Generator().manual_seed(3)
    V = 5000
    z = (torch.randn(6, V, generator=g) * 4).to(dtype)
    z[1, :2100] = -INF  # the first block holds no finite value
    labels = torch.randint(0, V, (6,), generator=g)
    labels[1] = 3000
    labels[4] = IGNORE
    token, grad = torch.ops.kdops.sequence_logprob(z, labels, IGNORE, True)
    ref_token, ref_grad = _raw_reference(z, labels)
    assert_close(token, ref_token, rtol=_rtol32(V), atol=_value_atol(dtype, V, z.double()), what="token")
    rtol, atol = _grad_tolerance(dtype, V)
    assert_close(grad, ref_grad, rtol=rtol, atol=atol, what="grad")
    token_only, empty = torch.ops.kdops.sequence_logprob(z, labels, IGNORE, False)
    assert empty.shape == (0,)
    torch.testing.assert_close(token_only, token, rtol=0, atol=0)


def test_raw_op_special_values():
    """-inf at the label (log p = -inf, gradient 1 there), an all -inf row and NaN or +inf logits
    (NaN, as log_softmax gives), V = 1 (0 and a zero gradient)."""
    z = torch.randn(6, 8, dtype=torch.float64)
    z[0, 2] = -INF
    z[1] = -INF
    z[2, 5] = NAN
    z[3, 1] = INF
    labels = torch.tensor([2, 0, 0, 0, 0, 7])
    for dtype in (torch.float64, torch.float32):
        token, grad = torch.ops.kdops.sequence_logprob(z.to(dtype), labels, IGNORE, True)
        assert token[0].item() == -INF and grad[0, 2].item() == 1.0
        assert torch.isfinite(grad[0]).all()
        assert torch.isnan(token[1:4]).all() and torch.isnan(grad[1:4]).all()
        assert grad[4:].sum(-1).abs().max().item() < 1e-6
    token, grad = torch.ops.kdops.sequence_logprob(torch.randn(3, 1), torch.tensor([0, IGNORE, 0]), IGNORE, True)
    assert (token == 0).all() and (grad == 0).all()


def test_raw_op_bad_label_gives_nan_row():
    """The kernel itself never reads out of bounds: a label outside [0, V) that is not ignore_index
    gets NaN (value and gradient row); the other rows are untouched."""
    z = torch.randn(4, 6)
    for labels in (torch.tensor([0, 6, -1, 2]), torch.tensor([0, 6, -1, 2], dtype=torch.int32)):
        token, grad = torch.ops.kdops.sequence_logprob(z, labels, IGNORE, True)
        assert torch.isnan(token[1:3]).all() and torch.isnan(grad[1:3]).all()
        assert torch.isfinite(token[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()
    # an ignore_index inside [0, V) still ignores
    token, grad = torch.ops.kdops.sequence_logprob(z, torch.tensor([0, 1, 2, 3]), 2, True)
    assert token[2] == 0 and (grad[2] == 0).all() and token[1] != 0


@settings(max_examples=20, deadline=None)
@given(v=st.integers(1, 300), scale=st.floats(0.1, 30.0), seed=st.integers(0, 2**16))
def test_property_probabilities_sum_to_one(v, scale, seed):
    """Scoring one row against every label of the vocabulary: log p <= 0 and sum_y p_y = 1;
    each gradient row sums to 0."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(1, v, generator=g) * scale).expand(v, v)
    token, grad = torch.ops.kdops.sequence_logprob(z, torch.arange(v), IGNORE, True)
    assert (token <= 1e-6).all()
    assert abs(token.double().exp().sum().item() - 1.0) < 1e-5 * max(1.0, math.sqrt(v / 64))
    assert grad.double().sum(-1).abs().max().item() < 1e-5 * max(1.0, math.sqrt(v / 64))


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 4), generator=g)
    labels[0, 1] = IGNORE
    labels[1] = IGNORE  # a sequence without a valid position

    def f(logits):
        return kdops.sequence_logprob(logits, labels, reduction=reduction)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-8)


def _opcheck_args(which: str):
    g = torch.Generator().manual_seed(5)
    if which == "grad_fp32":
        z = torch.randn(5, 11, generator=g).requires_grad_()
        return (z, torch.tensor([0, 10, IGNORE, 3, 3]), IGNORE, True)
    if which == "no_grad_bf16_int32":
        z = torch.randn(4, 17, generator=g).bfloat16()
        return (z, torch.randint(0, 17, (4,), generator=g, dtype=torch.int32), IGNORE, False)
    if which == "grad_strided_fp64":
        z = torch.randn(3, 20, generator=g, dtype=torch.float64)[:, :13].requires_grad_()
        return (z, torch.tensor([12, 0, -1]), -1, True)
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["grad_fp32", "no_grad_bf16_int32", "grad_strided_fp64"])
def test_opcheck(which):
    """Schema, fake kernel and autograd registration. With a gradient, the AOT-dispatch check is
    left out: it compares the raw op's outputs after a backward, and backward scales the op's own
    grad_logits output in place (by design: kdops.sequence_logprob never hands that buffer out;
    opcheck's grad_output, the sign of a negative sum, is -1). test_torch_compile_fullgraph traces
    forward and backward instead."""
    args = _opcheck_args(which)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not args[3]:
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.kdops.sequence_logprob.default, args, {}, test_utils=utils)


# --------------------------------------------------------------------------------------------
# Argument checks: a clear error before any kdops kernel runs
# --------------------------------------------------------------------------------------------


def _bad_inputs(which: str):
    z = torch.randn(2, 3, 10, requires_grad=True)
    labels = torch.randint(0, 10, (2, 3))
    kwargs = {}
    if which == "label_too_large":
        labels[1, 2] = 10
    elif which == "label_negative":
        labels[0, 0] = -1
    elif which == "float_labels":
        labels = labels.float()
    elif which == "bool_labels":
        labels = labels > 3
    elif which == "labels_shape":
        labels = labels[:, :2]
    elif which == "logits_1d":
        z, labels = torch.randn(10), torch.tensor(3)
    elif which == "int_logits":
        z = torch.zeros(2, 3, 10, dtype=torch.int64)
    elif which == "empty_vocab":
        z = torch.randn(2, 3, 0)
    elif which == "reduction":
        kwargs["reduction"] = "avg"
    elif which == "ignore_index":
        kwargs["ignore_index"] = -100.0
    return z, labels, kwargs


BAD = [("label_too_large", "labels"), ("label_negative", "labels"), ("float_labels", "labels"),
       ("bool_labels", "labels"), ("labels_shape", "labels"), ("logits_1d", "logits"), ("int_logits", "logits"),
       ("empty_vocab", "logits"), ("reduction", "reduction"), ("ignore_index", "ignore_index")]


@pytest.mark.parametrize("which,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_before_kernel(which, argument):
    z, labels, kwargs = _bad_inputs(which)
    with RecordKdopsOps() as rec:
        with pytest.raises(ValueError, match=argument):
            kdops.sequence_logprob(z, labels, **kwargs)
    assert rec.calls == []


def test_raw_op_checks():
    z = torch.randn(3, 5)
    with pytest.raises(ValueError, match="labels must have shape"):
        torch.ops.kdops.sequence_logprob(z, torch.zeros(2, dtype=torch.long), IGNORE, False)
    with pytest.raises(ValueError, match="int64 or int32"):
        torch.ops.kdops.sequence_logprob(z, torch.zeros(3, dtype=torch.int16), IGNORE, False)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.kdops.sequence_logprob(torch.randn(5, 3).t(), torch.zeros(3, dtype=torch.long), IGNORE, False)


# --------------------------------------------------------------------------------------------
# Autograd corner cases, backends, torch.compile
# --------------------------------------------------------------------------------------------


def _small(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 6, 40, generator=g).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[0, :2] = IGNORE
    return z, labels.to(device)


def test_no_grad_computes_no_gradient():
    z, labels = _small()
    with RecordKdopsOps() as rec, torch.no_grad():
        out = kdops.sequence_logprob(z, labels)
    assert not out.requires_grad
    assert [(name, args[3]) for name, args in rec.calls] == [("kdops.sequence_logprob.default", False)]
    with RecordKdopsOps() as rec:
        kdops.sequence_logprob(z.detach(), labels)
    assert rec.calls[0][1][3] is False
    with RecordKdopsOps() as rec:
        kdops.sequence_logprob(z, labels)
    assert rec.calls[0][1][3] is True


def test_other_integer_labels_accepted():
    z, labels = _small()
    torch.testing.assert_close(kdops.sequence_logprob(z, labels.to(torch.int16)), kdops.sequence_logprob(z, labels))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retained_graph_backward_three_times(reduction):
    """Each pass through a retained graph adds the same gradient (the stored buffer is never handed
    out, then rescaled)."""
    z, labels = _small()
    out = kdops.sequence_logprob(z, labels, reduction=reduction)
    w = torch.rand_like(out) + 0.5
    out.backward(w, retain_graph=True)
    first = z.grad.clone()
    out.backward(2 * w, retain_graph=True)
    out.backward(w)
    torch.testing.assert_close(z.grad, 4 * first)


def test_double_backward_raises():
    z, labels = _small()
    out = kdops.sequence_logprob(z, labels)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), z, create_graph=True)


def test_reference_backend():
    z, labels = _small()
    with kdops.use_backend("reference"):
        ref = kdops.sequence_logprob(z, labels, reduction="sum")
    assert ref.dtype == torch.float32
    torch.testing.assert_close(kdops.sequence_logprob(z, labels, reduction="sum"), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Traced through the fake kernel and the registered autograd (aot_eager keeps it quick; the
    kernel itself is the eager one)."""
    z, labels = _small()

    def f(z, labels):
        return kdops.sequence_logprob(z, labels).exp().sum() * 3.0

    def run(fn):
        z.grad = None
        out = fn(z, labels)
        out.backward()
        return out.detach(), z.grad.clone()

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# GPU backends (run only where a CUDA device is present)
# --------------------------------------------------------------------------------------------

GPU_CASES = CASES[::2]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.id() for c in GPU_CASES])
def test_gpu_backend_matches_reference(backend, case):
    if backend == "triton" and case.dtype == torch.float64:
        pytest.skip("the triton backend has no float64")
    run_and_compare(case, device="cuda", backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_raw_op_bad_label_gives_nan_row(backend):
    z = torch.randn(3, 40, device="cuda")
    labels = torch.tensor([1, 40, IGNORE], device="cuda")
    if backend == "triton":
        from kdops.kernels_registry import triton_ops

        op = triton_ops()["sequence_logprob"]
    else:
        op = torch.ops.kdops.sequence_logprob
    token, grad = op(z, labels, IGNORE, True)
    assert torch.isnan(token[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(token[0]) and token[2] == 0 and (grad[2] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_31_elements(backend):
    """N * V > 2^31: 64-bit offsets, checked on the last rows."""
    V = 32768
    N = 2**31 // V + 8
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("not enough device memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    with kdops.use_backend(backend):
        token = kdops.sequence_logprob(z, labels, reduction="none")
        token[-8:].sum().backward()
    tail = slice(N - 8, N)
    z64 = z[tail].detach().cpu().double().requires_grad_()
    ref = kdops.reference.sequence_logprob(z64, labels[tail].cpu(), reduction="none")
    ref.sum().backward()
    assert_close(token[tail], ref, rtol=_rtol32(V), atol=1e-4, what="token tail")
    assert_close(z.grad[tail], z64.grad, rtol=2**-7, atol=2**-7, what="grad tail")
    assert (z.grad[: N - 8] == 0).all()
