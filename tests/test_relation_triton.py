"""The Triton relation_kd_loss ops (kernels/relation.py, ``kdops::relation_kd_loss_triton`` and
``kdops::relation_kd_loss_backward_triton``) against the CPU ops on the same inputs and the float64
oracle kdops.reference.relation (DESIGN.md 3.6 and 4): row losses, row statistics and both
feature gradients for every kind, masks (a one-token and an empty group, all masked), odd N over
several 16-wide row, column and feature blocks, different student and teacher widths, strided
features, a forward of one backend with a backward of the other; the public function under
use_backend("triton") with scope="batch" and the temperature's gradient; gradcheck and opcheck.

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests/test_relation_triton.py

Without TRITON_INTERPRET=1 the same tests run on CUDA tensors where a GPU is present (with the
@pytest.mark.gpu cases: bfloat16 at N = 4096, float32 precision, torch.compile), and the module is
skipped elsewhere. Shapes are tiny: the interpreter executes every program in numpy. Under the
interpreter there is no bf16 arithmetic, so float32 and float64 only.
"""

from __future__ import annotations

import pytest
import torch

from triton_device import triton_device_or_skip

DEVICE = triton_device_or_skip()

import kdops  # noqa: E402
import kdops.reference.relation as ref  # noqa: E402
from kdops.kernels import TRITON_OPS  # noqa: E402
from kdops.kernels import relation as triton_relation  # noqa: E402
from record_ops import RecordKdopsOps

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

FORWARD = TRITON_OPS["relation_kd_loss"]
BACKWARD = TRITON_OPS["relation_kd_loss_backward"]
CPU_FORWARD = torch.ops.kdops.relation_kd_loss.default
CPU_BACKWARD = torch.ops.kdops.relation_kd_loss_backward.default
KIND_CASES = [("kl", False), ("kl", True), ("mse", False), ("mse", True), ("infonce", False)]

# Tolerances relative to the largest expected magnitude (for losses and statistics: at least the
# largest relation entry, whose rounding sets their absolute error). float64: only the order of
# sums differs. float32: the entries' sums of D products and the rows' sums of N terms in float32.
VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 3e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide row, column, feature and gradient-feature blocks: several of each on tiny inputs."""
    for name in ("FORWARD_BLOCKS", "BACKWARD_BLOCKS"):
        monkeypatch.setattr(triton_relation, name, dict.fromkeys(getattr(triton_relation, name), 16))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _features(groups, tokens, width, dtype, gen, strided=False):
    """Features of norm about 1 on DEVICE; `strided`: every token 3 elements further apart."""
    x = torch.randn(groups, tokens, width + 3 * strided, generator=gen, dtype=torch.float64)
    x = (x / width**0.5).to(device=DEVICE, dtype=dtype)
    return x[..., :width]


def _mask(kind, groups, tokens, gen):
    """none; random (group 0 keeps a single token, group 2, if any, none); all masked."""
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(groups, tokens, dtype=torch.bool, device=DEVICE)
    mask = torch.rand(groups, tokens, generator=gen) < 0.7
    mask[0] = False
    mask[0, tokens // 2] = True
    if groups > 2:
        mask[2] = False
    return mask.to(DEVICE)


def _assert_close(actual, expected, rtol, what, scale=None):
    """Max error within rtol of `scale`, by default the largest expected magnitude."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype or expected.dtype == torch.float64, (what, actual.dtype)
    if expected.numel() == 0:
        return
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    if scale is None:
        scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * max(scale, 1e-30) + 1e-300, f"{what}: max error {err} vs scale {scale}"


def _entry_scale(student, teacher, tau):
    """The largest relation entry |<f_i, f_j>| / tau of either side."""
    return max((x.double() @ x.double().transpose(-1, -2)).abs().max().item() for x in (student, teacher)) / tau


def _cpu(x):
    return None if x is None else x.cpu()


def _check_ops(student, teacher, tau, valid, kind, exclude_diagonal):
    """The raw Triton ops against the CPU ops (outputs, statistics, gradients) and the oracle
    (row losses, gradients); each backward also takes the other backend's statistics."""
    dtype = student.dtype
    acc = _acc(dtype)
    temperature = torch.tensor(tau, dtype=acc)
    rows, stats = FORWARD(student, teacher, temperature, valid, kind, exclude_diagonal)
    cpu_args = (student.cpu(), teacher.cpu(), temperature, _cpu(valid))
    cpu_rows, cpu_stats = CPU_FORWARD(*cpu_args, kind, exclude_diagonal)
    assert rows.dtype == acc and stats.dtype == acc and stats.shape == (*student.shape[:2], 4)
    scale = max(cpu_rows.abs().max().item(), _entry_scale(student, teacher, tau), 1.0)
    _assert_close(rows, cpu_rows, VALUE_RTOL[dtype], "row loss vs cpu", scale)
    _assert_close(stats, cpu_stats, VALUE_RTOL[dtype], "row stats vs cpu", scale)

    s64 = student.detach().double().cpu().requires_grad_()
    t64 = teacher.detach().double().cpu().requires_grad_()
    expected = ref.relation_row_loss(s64, t64, kind=kind, temperature=tau, normalize=False,
                                     mask=_cpu(valid), exclude_diagonal=exclude_diagonal)
    _assert_close(rows, expected, VALUE_RTOL[dtype], "row loss vs oracle", scale)

    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(9), dtype=acc)
    if valid is not None:
        # what an invalid row's weight holds must not matter
        weights = weights.masked_fill(~valid.cpu(), float("nan"))
        (expected * weights.nan_to_num(0.0)).sum().backward()
    else:
        (expected * weights).sum().backward()
    grads = BACKWARD(weights.to(DEVICE), student, teacher, temperature, valid, cpu_stats.to(DEVICE), kind,
                     exclude_diagonal, True, True)
    cpu_grads = CPU_BACKWARD(weights, *cpu_args, stats.cpu(), kind, exclude_diagonal, True, True)
    # at least one term's size, |w| |f| / tau: a gradient that vanishes exactly (a row whose only
    # column is its own token) is a cancellation of such terms
    unit = weights.nan_to_num(0.0).abs().max().item() / tau * max(
        x.double().norm(dim=-1).max().item() for x in (student, teacher))
    for got, cpu, want, name in zip(grads, cpu_grads, (s64.grad, t64.grad), ("student", "teacher")):
        assert got.dtype == dtype and got.shape == want.shape
        grad_scale = max(want.abs().max().item(), unit)
        _assert_close(got, cpu, GRAD_RTOL[dtype], f"{name} grad vs cpu", grad_scale)
        _assert_close(got, want, GRAD_RTOL[dtype], f"{name} grad vs oracle", grad_scale)
    return rows, stats, grads


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_ops_match_cpu_and_oracle_float32(kind, exclude_diagonal, small_blocks):
    """N = 19 over two row and column blocks, widths 12 and 24 (two feature and gradient blocks
    for the teacher), strided features, a one-token and an empty group."""
    gen = torch.Generator().manual_seed(1)
    widths = (24, 24) if kind == "infonce" else (12, 24)
    student = _features(3, 19, widths[0], torch.float32, gen, strided=True)
    teacher = _features(3, 19, widths[1], torch.float32, gen, strided=True)
    _check_ops(student, teacher, 0.3, _mask("random", 3, 19, gen), kind, exclude_diagonal)


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_ops_match_cpu_and_oracle_float64(kind, exclude_diagonal):
    gen = torch.Generator().manual_seed(2)
    widths = (20, 20) if kind == "infonce" else (20, 9)
    student = _features(3, 13, widths[0], torch.float64, gen)
    teacher = _features(3, 13, widths[1], torch.float64, gen)
    _check_ops(student, teacher, 0.5, _mask("random", 3, 13, gen), kind, exclude_diagonal)


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", True), ("mse", False), ("infonce", False)])
def test_odd_token_counts(tokens, kind, exclude_diagonal, small_blocks):
    """N = 1 (kl excluding the diagonal: no row has a column), 5 and 40 (three blocks, the last
    ragged), without a mask."""
    gen = torch.Generator().manual_seed(tokens)
    widths = (20, 20) if kind == "infonce" else (20, 7)
    student = _features(2, tokens, widths[0], torch.float32, gen)
    teacher = _features(2, tokens, widths[1], torch.float32, gen)
    rows, _, _ = _check_ops(student, teacher, 0.7, None, kind, exclude_diagonal)
    if tokens == 1 and exclude_diagonal:
        assert (rows == 0).all()


@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", False), ("mse", True), ("infonce", False)])
def test_all_masked_and_single_token(kind, exclude_diagonal):
    """All masked: zeros everywhere. A group with one valid token excluding its diagonal: that
    row has no column, so 0 and a zero gradient, like the masked rows."""
    gen = torch.Generator().manual_seed(3)
    student = _features(2, 6, 8, torch.float32, gen)
    teacher = _features(2, 6, 8, torch.float32, gen)
    for valid in (_mask("all_masked", 2, 6, gen), _mask("random", 2, 6, gen)):
        rows, stats, grads = _check_ops(student, teacher, 1.0, valid, kind, exclude_diagonal)
        empty = ~valid.any(-1) if not exclude_diagonal else valid.sum(-1) <= 1
        assert (rows[empty] == 0).all() and (stats[empty] == 0).all()
        for grad in grads:
            assert (grad[empty] == 0).all()


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_gradient_subsets(kind):
    """One gradient asked for: the other is an empty [0] tensor and the asked one is unchanged
    (infonce: the row pass alone, the column pass alone)."""
    gen = torch.Generator().manual_seed(4)
    student = _features(2, 9, 16, torch.float32, gen)
    teacher = _features(2, 9, 16 if kind == "infonce" else 24, torch.float32, gen)
    valid = _mask("random", 2, 9, gen)
    tau = torch.tensor(0.8)
    _, stats = FORWARD(student, teacher, tau, valid, kind, False)
    weights = torch.randn(2, 9, generator=gen).to(DEVICE)
    both = BACKWARD(weights, student, teacher, tau, valid, stats, kind, False, True, True)
    only_student = BACKWARD(weights, student, teacher, tau, valid, stats, kind, False, True, False)
    only_teacher = BACKWARD(weights, student, teacher, tau, valid, stats, kind, False, False, True)
    assert only_student[1].shape == (0,) and only_teacher[0].shape == (0,)
    torch.testing.assert_close(only_student[0], both[0])
    torch.testing.assert_close(only_teacher[1], both[1])
    nothing = BACKWARD(weights, student, teacher, tau, valid, stats, kind, False, False, False)
    assert nothing[0].shape == (0,) and nothing[1].shape == (0,)


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_public_function_batch_scope_and_temperature_grad(kind):
    """kdops.relation_kd_loss under use_backend("triton") runs the Triton ops forward and backward
    (scope="batch": one group of all tokens, normalize=True, a mask) and matches the oracle,
    gradients of both features and of a tensor temperature included."""
    gen = torch.Generator().manual_seed(5)
    widths = (10, 10) if kind == "infonce" else (10, 6)
    s0 = torch.randn(2, 7, widths[0], generator=gen)
    t0 = torch.randn(2, 7, widths[1], generator=gen)
    mask = torch.rand(2, 7, generator=gen) < 0.8
    s, t = s0.to(DEVICE).requires_grad_(), t0.to(DEVICE).requires_grad_()
    tau = torch.tensor(0.6, device=DEVICE, requires_grad=True)
    with kdops.use_backend("triton"), RecordKdopsOps() as recorder:
        loss = kdops.relation_kd_loss(s, t, kind=kind, temperature=tau, mask=mask.to(DEVICE), scope="batch")
        loss.backward()
    assert recorder.ops == ["kdops.relation_kd_loss_triton.default",
                            "kdops.relation_kd_loss_backward_triton.default"]
    s64, t64 = s0.detach().double().requires_grad_(), t0.detach().double().requires_grad_()
    tau64 = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    expected = ref.relation_kd_loss(s64, t64, kind=kind, temperature=tau64, mask=mask, scope="batch")
    expected.backward()
    _assert_close(loss, expected, VALUE_RTOL[torch.float32], "loss", scale=max(1.0, 1 / 0.6))
    _assert_close(s.grad, s64.grad, GRAD_RTOL[torch.float32], "student grad")
    _assert_close(t.grad, t64.grad, GRAD_RTOL[torch.float32], "teacher grad")
    _assert_close(tau.grad, tau64.grad, GRAD_RTOL[torch.float32], "temperature grad",
                  scale=max(abs(tau64.grad.item()), 1e-3))


@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", True), ("mse", False), ("infonce", False)])
def test_gradcheck(kind, exclude_diagonal):
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.randn(2, 5, 4 if kind == "infonce" else 3, generator=gen, dtype=torch.float64)
    t = t.to(DEVICE).requires_grad_()
    tau = torch.tensor(0.9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]], device=DEVICE)

    def loss(student, teacher, temperature):
        with kdops.use_backend("triton"):
            return kdops.relation_kd_loss(student, teacher, kind=kind, temperature=temperature, mask=mask,
                                          exclude_diagonal=exclude_diagonal, reduction="none")

    torch.autograd.gradcheck(loss, (s, t, tau), fast_mode=True)


def test_opcheck():
    """Schema, fake kernels and the autograd registration of the Triton ops (the AOT-dispatch
    check traces the kernels through wrap_triton, which the interpreter cannot: CUDA only)."""
    kdops.relation._relation_op("triton")  # registers the autograd formula on the Triton op
    gen = torch.Generator().manual_seed(7)
    s = _features(2, 6, 5, torch.float32, gen)
    t = _features(2, 6, 3, torch.float32, gen)
    valid = _mask("random", 2, 6, gen)
    tau = torch.tensor(0.8, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if DEVICE == "cuda" else ())
    torch.library.opcheck(FORWARD, (s.requires_grad_(), t, tau, valid, "kl", True), test_utils=utils)
    _, stats = FORWARD(s.detach(), t, tau, valid, "mse", False)
    grad = torch.randn(2, 6, generator=gen).to(DEVICE)
    torch.library.opcheck(BACKWARD, (grad, s.detach(), t, tau, valid, stats, "mse", False, True, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(s=torch.zeros(3, 5)), "student must be 3-D"),
        (dict(s=torch.zeros(2, 3, 4, dtype=torch.int32)), "float32, float64"),
        (dict(t=torch.zeros(2, 3, 4, dtype=torch.float64)), "teacher dtype"),
        (dict(t=torch.zeros(2, 4, 4)), "groups, tokens"),
        (dict(s=torch.zeros(2, 4, 3).transpose(1, 2)), "last dim must be contiguous"),
        (dict(kind="cosine"), "kind must be"),
        (dict(kind="infonce", t=torch.zeros(2, 3, 5)), "equal student and teacher widths"),
        (dict(kind="infonce", exclude_diagonal=True), "exclude_diagonal"),
        (dict(tau=torch.tensor(1.0, dtype=torch.float64)), "temperature"),
        (dict(tau=torch.ones(1)), "temperature"),
        (dict(valid=torch.ones(2, 4, dtype=torch.bool)), "valid"),
        (dict(valid=torch.ones(2, 3)), "valid"),
    ],
)
def test_bad_input(change, match):
    args = dict(s=torch.zeros(2, 3, 4), t=torch.zeros(2, 3, 4), tau=torch.tensor(1.0), valid=None,
                kind="kl", exclude_diagonal=False)
    args.update(change)
    a = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in args.items()}
    with pytest.raises(ValueError, match=match):
        FORWARD(a["s"], a["t"], a["tau"], a["valid"], a["kind"], a["exclude_diagonal"])


def test_bad_backward_input():
    s = torch.zeros(2, 3, 4, device=DEVICE)
    tau = torch.tensor(1.0, device=DEVICE)
    rows, stats = FORWARD(s, s, tau, None, "kl", False)
    with pytest.raises(ValueError, match="grad_row_loss"):
        BACKWARD(rows[:1], s, s, tau, None, stats, "kl", False, True, True)
    with pytest.raises(ValueError, match="row_stats"):
        BACKWARD(rows, s, s, tau, None, stats[..., :2], "kl", False, True, True)


# --------------------------------------------------------------------------------------------
# GPU only: bfloat16 at N = 4096, float32 precision, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", False), ("mse", True), ("infonce", False)])
def test_gpu_bf16_4096_tokens(kind, exclude_diagonal):
    """bfloat16 features, N = 4096 (64 row and column blocks), widths 768 and 1024 (several
    gradient chunks), against the CPU op in float32 on the same values. Entries are exact bf16
    products summed in float32 on both sides; the Triton gradient rounds M to bfloat16 before its
    dot and the result to bfloat16 (relative 2^-8 each), hence 2^-6 of the largest gradient."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    widths = (768, 768) if kind == "infonce" else (768, 1024)
    tokens = 4096
    s = torch.nn.functional.normalize(torch.randn(2, tokens, widths[0], generator=gen, device="cuda"), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, tokens, widths[1], generator=gen, device="cuda"), dim=-1)
    s, t = s.bfloat16(), t.bfloat16()
    valid = torch.rand(2, tokens, generator=gen, device="cuda") < 0.9
    tau = torch.tensor(0.1)
    rows, stats = FORWARD(s, t, tau, valid, kind, exclude_diagonal)
    weights = torch.randn(2, tokens, generator=gen, device="cuda")
    grads = BACKWARD(weights, s, t, tau, valid, stats, kind, exclude_diagonal, True, True)
    cpu_args = (s.float().cpu(), t.float().cpu(), tau, valid.cpu())
    cpu_rows, cpu_stats = CPU_FORWARD(*cpu_args, kind, exclude_diagonal)
    cpu_grads = CPU_BACKWARD(weights.cpu(), *cpu_args, cpu_stats, kind, exclude_diagonal, True, True)
    scale = max(cpu_rows.abs().max().item(), 1 / 0.1)
    _assert_close(rows, cpu_rows, 1e-4, "row loss", scale)
    _assert_close(stats, cpu_stats, 1e-4, "row stats", scale)
    for got, want, name in zip(grads, cpu_grads, ("student", "teacher")):
        assert got.dtype == torch.bfloat16
        _assert_close(got.float(), want, 2**-6, f"{name} grad")


@pytest.mark.gpu
def test_gpu_float32_is_ieee_by_default():
    """float32 features with torch's default matmul precision ("highest"): no TF32, so tau = 0.1
    on unit tokens (entries up to 10) still meets the float32 tolerances against the CPU op and
    the oracle (TF32's entry errors, about 1e-3 / tau, would not)."""
    assert torch.get_float32_matmul_precision() == "highest"
    gen = torch.Generator(device="cuda").manual_seed(9)
    s = torch.nn.functional.normalize(torch.randn(2, 300, 128, generator=gen, device="cuda"), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, 300, 64, generator=gen, device="cuda"), dim=-1)
    _check_ops(s, t, 0.1, None, "kl", False)


@pytest.mark.gpu
def test_gpu_torch_compile():
    """torch.compile (fullgraph) traces the public function through wrap_triton, forward and
    backward, and matches eager."""
    gen = torch.Generator(device="cuda").manual_seed(10)
    s0 = torch.randn(2, 200, 96, generator=gen, device="cuda", dtype=torch.bfloat16)
    t0 = torch.randn(2, 200, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(2, 200, generator=gen, device="cuda") < 0.8

    def f(s, t, tau):
        return kdops.relation_kd_loss(s, t, kind="kl", temperature=tau, mask=mask, exclude_diagonal=True)

    def run(fn):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        tau = torch.tensor(0.5, device="cuda", requires_grad=True)
        with kdops.use_backend("triton"):
            out = fn(s, t, tau)
        out.backward()
        return out.detach(), s.grad, t.grad, tau.grad

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b, what in zip(eager, compiled, ("loss", "student grad", "teacher grad", "temperature grad")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
