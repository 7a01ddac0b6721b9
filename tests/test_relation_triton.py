"""The Triton relation_kd_loss ops (kernels/relation.py, ``kdops::relation_kd_loss_triton`` and
``kdops::relation_kd_loss_backward_triton``) against the CPU ops on the same inputs and the float64
oracle kdops.reference.relation (DESIGN.md 3.6 and 4): row losses, row statistics, both feature
gradients and the row dots (from which the temperature's gradient follows) for every kind, with
and without the fused normalization, masks (a one-token and an empty group, all masked), odd N
over several 16-wide row, column and feature blocks, different student and teacher widths, token
norms far from 1 and a zero token, strided features, a forward of one backend with a backward of
the other; the public function under use_backend("triton") with both scopes and the temperature's
gradient; gradcheck and opcheck.

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests/test_relation_triton.py

Without TRITON_INTERPRET=1 the same tests run on CUDA tensors where a GPU is present (with the
@pytest.mark.gpu cases: bfloat16 at N = 4096, float32 precision, torch.compile), and the module is
skipped elsewhere. Shapes are tiny: the interpreter executes every program in numpy. Under the
interpreter there is no bf16 arithmetic, so float32 and float64, and one float16 case (numpy has
float16).
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
from scaled_close import assert_scaled_close

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
    """Features on DEVICE whose token norms spread over about [0.3, 3] (normalize changes the
    relations); `strided`: every token 3 elements further apart."""
    x = torch.randn(groups, tokens, width + 3 * strided, generator=gen, dtype=torch.float64)
    x = x / width**0.5 * torch.exp(0.6 * torch.randn(groups, tokens, 1, generator=gen, dtype=torch.float64))
    return x.to(device=DEVICE, dtype=dtype)[..., :width]


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
    """assert_scaled_close, and the dtype of the C++ op's output (or any against the oracle)."""
    assert actual.dtype == expected.dtype or expected.dtype == torch.float64, (what, actual.dtype)
    assert_scaled_close(actual, expected, rtol, what, scale)


def _entry_scale(student, teacher, tau, normalize):
    """The largest relation entry |<u_i, u_j>| / tau of either side."""
    return max(ref.token_relation(x.cpu(), temperature=tau, normalize=normalize).abs().max().item()
               for x in (student, teacher))


def _grad_unit(weights, student, teacher, tau, normalize):
    """The size of one gradient term, |w| / tau times the largest |F_j| (raw) or s_i (normalize:
    dF_i = s_i sum_j M_ij u_j - ...): a gradient that vanishes exactly (a row whose only column is
    its own token) is a cancellation of such terms."""
    norms = torch.cat([x.double().norm(dim=-1).flatten().cpu() for x in (student, teacher)])
    factor = 1 / norms.min().clamp_min(1e-12).item() if normalize else norms.max().item()
    return weights.abs().max().item() / tau * factor


def _oracle_row_dots(student, teacher, tau, valid, kind, exclude_diagonal, normalize, weights):
    """c_i = <g_i, u_i> per token from the oracle's autograd, g the gradient of sum_i w_i r_i with
    respect to the relation tokens u (the normalized features, or the features)."""
    units = [x.detach().double().cpu() for x in (student, teacher)]
    if normalize:
        units = [torch.nn.functional.normalize(u, dim=-1) for u in units]
    units = [u.requires_grad_() for u in units]
    rows = ref.relation_row_loss(*units, kind=kind, temperature=tau, normalize=False, mask=_cpu(valid),
                                 exclude_diagonal=exclude_diagonal)
    grads = torch.autograd.grad((rows * weights).sum(), units)
    return torch.stack([(g * u).sum(-1) for g, u in zip(grads, units)], dim=-1).detach()


def _cpu(x):
    return None if x is None else x.cpu()


def _tau_grad(row_dots, kind, tau):
    """dL/dtau from the row dots (csrc/relation/relation.h)."""
    if kind == "infonce":
        return -row_dots[..., 0].sum() / tau
    return -row_dots.sum() / (2 * tau)


def _check_ops(student, teacher, tau, valid, kind, exclude_diagonal, normalize):
    """The raw Triton ops against the CPU ops (outputs, statistics, gradients, row dots) and the
    oracle (row losses, feature gradients, the temperature's gradient from the row dots); each
    backward also takes the other backend's statistics."""
    dtype = student.dtype
    acc = _acc(dtype)
    temperature = torch.tensor(tau, dtype=acc)
    rows, stats = FORWARD(student, teacher, temperature, valid, kind, exclude_diagonal, normalize)
    cpu_args = (student.cpu(), teacher.cpu(), temperature, _cpu(valid))
    cpu_rows, cpu_stats = CPU_FORWARD(*cpu_args, kind, exclude_diagonal, normalize)
    assert rows.dtype == acc and stats.dtype == acc and stats.shape == (*student.shape[:2], 4)
    entry_scale = _entry_scale(student, teacher, tau, normalize)
    scale = max(cpu_rows.abs().max().item(), entry_scale, 1.0)
    _assert_close(rows, cpu_rows, VALUE_RTOL[dtype], "row loss vs cpu", scale)
    _assert_close(stats, cpu_stats, VALUE_RTOL[dtype], "row stats vs cpu", scale)

    s64 = student.detach().double().cpu().requires_grad_()
    t64 = teacher.detach().double().cpu().requires_grad_()
    tau64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    expected = ref.relation_row_loss(s64, t64, kind=kind, temperature=tau64, normalize=normalize,
                                     mask=_cpu(valid), exclude_diagonal=exclude_diagonal)
    _assert_close(rows, expected, VALUE_RTOL[dtype], "row loss vs oracle", scale)

    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(9), dtype=acc)
    if valid is not None:
        # what an invalid row's weight holds must not matter
        weights = weights.masked_fill(~valid.cpu(), float("nan"))
    plain_weights = weights.nan_to_num(0.0)
    (expected * plain_weights).sum().backward()
    *grads, row_dots = BACKWARD(weights.to(DEVICE), student, teacher, temperature, valid,
                                cpu_stats.to(DEVICE), kind, exclude_diagonal, normalize, True, True)
    *cpu_grads, cpu_row_dots = CPU_BACKWARD(weights, *cpu_args, stats.cpu(), kind, exclude_diagonal,
                                            normalize, True, True)
    unit = _grad_unit(plain_weights, student, teacher, tau, normalize)
    for got, cpu, want, name in zip(grads, cpu_grads, (s64.grad, t64.grad), ("student", "teacher")):
        assert got.dtype == dtype and got.shape == want.shape
        grad_scale = max(want.abs().max().item(), unit)
        _assert_close(got, cpu, GRAD_RTOL[dtype], f"{name} grad vs cpu", grad_scale)
        _assert_close(got, want, GRAD_RTOL[dtype], f"{name} grad vs oracle", grad_scale)

    # c_i is bounded by about |w| times the largest entry; dL/dtau sums one c per counting row
    assert row_dots.dtype == acc and row_dots.shape == (*student.shape[:2], 2)
    dot_scale = plain_weights.abs().max().item() * max(entry_scale, 1e-3)
    expected_dots = _oracle_row_dots(student, teacher, tau, valid, kind, exclude_diagonal, normalize,
                                     plain_weights.double())
    _assert_close(row_dots, expected_dots, GRAD_RTOL[dtype], "row dots vs oracle", dot_scale)
    _assert_close(row_dots, cpu_row_dots, GRAD_RTOL[dtype], "row dots vs cpu", dot_scale)
    counted = valid.sum().item() if valid is not None else rows.numel()
    _assert_close(_tau_grad(row_dots, kind, tau), tau64.grad, GRAD_RTOL[dtype],
                  "temperature grad from row dots vs oracle", max(counted, 1) * dot_scale / tau)
    return rows, stats, grads, row_dots


@pytest.mark.parametrize("kind,exclude_diagonal,normalize",
                         [(kind, exclude, True) for kind, exclude in KIND_CASES] + [("mse", True, False)])
def test_ops_match_cpu_and_oracle_float32(kind, exclude_diagonal, normalize, small_blocks):
    """N = 19 over two row and column blocks, widths 12 and 24 (two feature and gradient blocks
    for the teacher: each chunk's program applies the radial term to its columns, the first
    stores the row dots), strided features, a one-token and an empty group."""
    gen = torch.Generator().manual_seed(1)
    widths = (24, 24) if kind == "infonce" else (12, 24)
    student = _features(3, 19, widths[0], torch.float32, gen, strided=True)
    teacher = _features(3, 19, widths[1], torch.float32, gen, strided=True)
    _check_ops(student, teacher, 0.3, _mask("random", 3, 19, gen), kind, exclude_diagonal, normalize)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_ops_match_cpu_and_oracle_float64(kind, exclude_diagonal, normalize):
    """float64, both with and without normalize: everything, the row dots included, equal to the
    CPU op's and the oracle's to 1e-10."""
    gen = torch.Generator().manual_seed(2)
    widths = (20, 20) if kind == "infonce" else (20, 9)
    student = _features(3, 13, widths[0], torch.float64, gen)
    teacher = _features(3, 13, widths[1], torch.float64, gen)
    _check_ops(student, teacher, 0.5, _mask("random", 3, 13, gen), kind, exclude_diagonal, normalize)


@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", True), ("mse", False), ("infonce", False)])
def test_odd_token_counts(tokens, kind, exclude_diagonal, small_blocks):
    """N = 1 (kl excluding the diagonal: no row has a column), 5 and 40 (three blocks, the last
    ragged), without a mask, normalizing."""
    gen = torch.Generator().manual_seed(tokens)
    widths = (20, 20) if kind == "infonce" else (20, 7)
    student = _features(2, tokens, widths[0], torch.float32, gen)
    teacher = _features(2, tokens, widths[1], torch.float32, gen)
    rows, _, _, row_dots = _check_ops(student, teacher, 0.7, None, kind, exclude_diagonal, True)
    if tokens == 1 and exclude_diagonal:
        assert (rows == 0).all() and (row_dots == 0).all()


@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", False), ("mse", True), ("infonce", False)])
def test_all_masked_and_single_token(kind, exclude_diagonal):
    """All masked: zeros everywhere. A group with one valid token excluding its diagonal: that
    row has no column, so 0, a zero gradient and zero row dots, like the masked rows."""
    gen = torch.Generator().manual_seed(3)
    student = _features(2, 6, 8, torch.float32, gen)
    teacher = _features(2, 6, 8, torch.float32, gen)
    for valid in (_mask("all_masked", 2, 6, gen), _mask("random", 2, 6, gen)):
        rows, stats, grads, row_dots = _check_ops(student, teacher, 1.0, valid, kind, exclude_diagonal, True)
        empty = ~valid.any(-1) if not exclude_diagonal else valid.sum(-1) <= 1
        assert (rows[empty] == 0).all() and (stats[empty] == 0).all() and (row_dots[empty] == 0).all()
        for grad in grads:
            assert (grad[empty] == 0).all()


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_gradient_subsets(kind):
    """One gradient asked for: the other is an empty [0] tensor, its row dots stay 0 and the asked
    one is unchanged (infonce: the row pass alone, the column pass alone)."""
    gen = torch.Generator().manual_seed(4)
    student = _features(2, 9, 16, torch.float32, gen)
    teacher = _features(2, 9, 16 if kind == "infonce" else 24, torch.float32, gen)
    valid = _mask("random", 2, 9, gen)
    tau = torch.tensor(0.8)
    _, stats = FORWARD(student, teacher, tau, valid, kind, False, True)
    weights = torch.randn(2, 9, generator=gen).to(DEVICE)

    def backward(student_grad, teacher_grad):
        return BACKWARD(weights, student, teacher, tau, valid, stats, kind, False, True, student_grad,
                        teacher_grad)

    both, only_student, only_teacher = backward(True, True), backward(True, False), backward(False, True)
    assert only_student[1].shape == (0,) and only_teacher[0].shape == (0,)
    torch.testing.assert_close(only_student[0], both[0])
    torch.testing.assert_close(only_teacher[1], both[1])
    torch.testing.assert_close(only_student[2][..., 0], both[2][..., 0])
    torch.testing.assert_close(only_teacher[2][..., 1], both[2][..., 1])
    assert (only_student[2][..., 1] == 0).all() and (only_teacher[2][..., 0] == 0).all()
    nothing = backward(False, False)
    assert nothing[0].shape == (0,) and nothing[1].shape == (0,) and (nothing[2] == 0).all()


def _public_loss(student, teacher, tau, kind, normalize, mask, exclude_diagonal, scope, reduction="mean"):
    with kdops.use_backend("triton"):
        return kdops.relation_kd_loss(student, teacher, kind=kind, temperature=tau, normalize=normalize,
                                      mask=mask, exclude_diagonal=exclude_diagonal, scope=scope,
                                      reduction=reduction)


@pytest.mark.parametrize(
    "kind,exclude_diagonal,normalize,scope",
    [("kl", False, True, "batch"), ("kl", True, False, "sequence"), ("mse", False, False, "batch"),
     ("mse", True, True, "sequence"), ("infonce", False, True, "batch"),
     ("infonce", False, False, "sequence")],
)
def test_public_function(kind, exclude_diagonal, normalize, scope):
    """kdops.relation_kd_loss under use_backend("triton") runs the Triton ops forward and backward
    on the caller's features (no normalized copy: the op normalizes) and matches the oracle,
    gradients of both features and of a tensor temperature included."""
    gen = torch.Generator().manual_seed(5)
    widths = (10, 10) if kind == "infonce" else (10, 6)
    s0 = torch.randn(2, 7, widths[0], generator=gen) * torch.exp(torch.randn(2, 7, 1, generator=gen))
    t0 = torch.randn(2, 7, widths[1], generator=gen) * torch.exp(torch.randn(2, 7, 1, generator=gen))
    mask = torch.rand(2, 7, generator=gen) < 0.8
    s, t = s0.to(DEVICE).requires_grad_(), t0.to(DEVICE).requires_grad_()
    tau = torch.tensor(0.6, device=DEVICE, requires_grad=True)
    with RecordKdopsOps() as recorder:
        loss = _public_loss(s, t, tau, kind, normalize, mask.to(DEVICE), exclude_diagonal, scope)
        loss.backward()
    assert recorder.ops == ["kdops.relation_kd_loss_triton.default",
                            "kdops.relation_kd_loss_backward_triton.default"]
    forward_args = recorder.calls[0][1]
    assert forward_args[0].data_ptr() == s.data_ptr() and forward_args[1].data_ptr() == t.data_ptr()
    assert forward_args[-1] is normalize
    s64, t64 = s0.detach().double().requires_grad_(), t0.detach().double().requires_grad_()
    tau64 = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    expected = ref.relation_kd_loss(s64, t64, kind=kind, temperature=tau64, normalize=normalize,
                                    mask=mask, exclude_diagonal=exclude_diagonal, scope=scope)
    expected.backward()
    entries = max(ref.token_relation(x, temperature=0.6, normalize=normalize).abs().max().item()
                  for x in (s64, t64))
    _assert_close(loss, expected, VALUE_RTOL[torch.float32], "loss", scale=max(1.0, entries))
    _assert_close(s.grad, s64.grad, GRAD_RTOL[torch.float32], "student grad")
    _assert_close(t.grad, t64.grad, GRAD_RTOL[torch.float32], "teacher grad")
    _assert_close(tau.grad, tau64.grad, GRAD_RTOL[torch.float32], "temperature grad",
                  scale=max(abs(tau64.grad.item()), 1e-3))


@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", True), ("mse", False), ("infonce", False)])
def test_zero_and_tiny_tokens(kind, exclude_diagonal):
    """normalize with tokens that count of norm 0 (all-zero features) and 1e-13 (below eps), in
    the student and the teacher: F.normalize divides them by eps (a zero token stays 0), so their
    Jacobian is I / eps, without the radial term of the others, and their gradients are about
    1e12 times the others'. Every token's gradient matches the oracle's autograd at its own
    scale, and so does the temperature's gradient (from the row dots)."""
    gen = torch.Generator().manual_seed(11)
    widths = (6, 6) if kind == "infonce" else (6, 4)
    s0 = torch.randn(2, 5, widths[0], generator=gen, dtype=torch.float64)
    t0 = torch.randn(2, 5, widths[1], generator=gen, dtype=torch.float64)
    s0[0, 1] = 0.0
    s0[1, 2] *= 1e-13 / s0[1, 2].norm()
    t0[1, 3] = 0.0
    t0[0, 0] *= 1e-13 / t0[0, 0].norm()
    mask = torch.tensor([[True, True, True, False, True], [True, True, True, True, False]])
    for dtype in (torch.float64, torch.float32):
        s, t = (x.to(DEVICE, dtype, copy=True).requires_grad_() for x in (s0, t0))
        tau = torch.tensor(0.7, dtype=_acc(dtype), device=DEVICE, requires_grad=True)
        loss = _public_loss(s, t, tau, kind, True, mask.to(DEVICE), exclude_diagonal, "sequence", "sum")
        loss.backward()
        s64, t64 = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        tau64 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        expected = ref.relation_kd_loss(s64, t64, kind=kind, temperature=tau64, mask=mask,
                                        exclude_diagonal=exclude_diagonal, reduction="sum")
        expected.backward()
        rtol = GRAD_RTOL[dtype]
        _assert_close(loss, expected, VALUE_RTOL[dtype], "loss", scale=max(1.0, 1 / 0.7))
        for got, want, x, name in ((s.grad, s64.grad, s0, "student"), (t.grad, t64.grad, t0, "teacher")):
            got = got.double().cpu()
            small = x.norm(dim=-1) < 1e-12
            assert want[small].abs().amax(-1).min() > 1e9, "the gradients of F / eps"
            for token in small.nonzero().tolist() + [None]:
                at = tuple(token) if token else ~small  # each small token alone, then the others
                _assert_close(got[at], want[at], rtol, f"{name} grad at {token or 'the other tokens'}")
        _assert_close(tau.grad, tau64.grad, rtol, "temperature grad", scale=max(abs(tau64.grad.item()), 1e-3))


@pytest.mark.parametrize("kind", ["kl", "infonce"])
def test_float16_extreme_norms(kind):
    """normalize on float16 tokens of norms 1e-2 to 1e3 and a zero token that counts, against the
    CPU op in float32 on the same values. The weights s_j M on the raw features would overflow
    float16 for the zero token (s = 1e12: inf, then inf * 0 = NaN in every row's gradient), so
    the float16 dot takes the unit tokens: every other token's gradient is finite and accurate at
    its own scale (s_i |w| / tau: they differ by 1e5). The zero token's own gradient, s_i g_i
    with s_i = 1e12, is beyond float16 and not compared."""
    gen = torch.Generator().manual_seed(12)
    tokens, width = 20, 16

    def features():
        x = torch.nn.functional.normalize(torch.randn(2, tokens, width, generator=gen), dim=-1)
        x = x * 10 ** (torch.rand(2, tokens, 1, generator=gen) * 5 - 2)
        x[1, 4] = 0.0
        return x.half()

    s, t = features(), features()
    tau = torch.tensor(0.2)
    weights = torch.randn(2, tokens, generator=gen)
    rows, stats = FORWARD(s.to(DEVICE), t.to(DEVICE), tau, None, kind, False, True)
    *grads, row_dots = BACKWARD(weights.to(DEVICE), s.to(DEVICE), t.to(DEVICE), tau, None, stats, kind,
                                False, True, True, True)
    cpu_args = (s.float(), t.float(), tau, None)
    cpu_rows, cpu_stats = CPU_FORWARD(*cpu_args, kind, False, True)
    *cpu_grads, cpu_row_dots = CPU_BACKWARD(weights, *cpu_args, cpu_stats, kind, False, True, True, True)
    _assert_close(rows, cpu_rows, 1e-4, "row loss", 1 / 0.2)
    _assert_close(row_dots, cpu_row_dots, 1e-3, "row dots", weights.abs().max().item() / 0.2)
    for got, want, x, name in zip(grads, cpu_grads, (s, t), ("student", "teacher")):
        nonzero = x.float().norm(dim=-1) > 0
        got = got.float().cpu()[nonzero]
        assert torch.isfinite(got).all(), f"{name} grad: not finite"
        # float16 rounds M, the unit tokens and the result: 2^-11 each
        token_scale = weights.abs().max().item() / 0.2 / x.float().norm(dim=-1)[nonzero]
        err = ((got - want[nonzero]).abs().amax(-1) / token_scale).max().item()
        assert err < 2**-8, f"{name} grad: error {err} of the token's scale"


@pytest.mark.parametrize("kind,exclude_diagonal", [("kl", True), ("mse", False), ("infonce", False)])
def test_gradcheck(kind, exclude_diagonal):
    """normalize: both features and the temperature (its gradient from the row dots)."""
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    t = torch.randn(2, 5, 4 if kind == "infonce" else 3, generator=gen, dtype=torch.float64)
    t = t.to(DEVICE).requires_grad_()
    tau = torch.tensor(0.9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]], device=DEVICE)

    def loss(student, teacher, temperature):
        return _public_loss(student, teacher, temperature, kind, True, mask, exclude_diagonal,
                            "sequence", "none")

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
    for normalize in (True, False):
        torch.library.opcheck(FORWARD, (s.requires_grad_(), t, tau, valid, "kl", True, normalize),
                              test_utils=utils)
    _, stats = FORWARD(s.detach(), t, tau, valid, "mse", False, True)
    grad = torch.randn(2, 6, generator=gen).to(DEVICE)
    torch.library.opcheck(BACKWARD, (grad, s.detach(), t, tau, valid, stats, "mse", False, True, True, True),
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
        FORWARD(a["s"], a["t"], a["tau"], a["valid"], a["kind"], a["exclude_diagonal"], True)


def test_bad_backward_input():
    s = torch.zeros(2, 3, 4, device=DEVICE)
    tau = torch.tensor(1.0, device=DEVICE)
    rows, stats = FORWARD(s, s, tau, None, "kl", False, True)
    with pytest.raises(ValueError, match="grad_row_loss"):
        BACKWARD(rows[:1], s, s, tau, None, stats, "kl", False, True, True, True)
    with pytest.raises(ValueError, match="row_stats"):
        BACKWARD(rows, s, s, tau, None, stats[..., :2], "kl", False, True, True, True)


# --------------------------------------------------------------------------------------------
# GPU only: bfloat16 at N = 4096, float32 precision, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind,exclude_diagonal,normalize",
                         [("kl", False, True), ("mse", True, False), ("infonce", False, True)])
def test_gpu_bf16_4096_tokens(kind, exclude_diagonal, normalize):
    """bfloat16 features, N = 4096 (64 row and column blocks), widths 768 and 1024 (several
    gradient chunks), against the CPU op in float32 on the same values. Entries are exact bf16
    products summed in float32 on both sides; the Triton gradient rounds M (and the unit tokens)
    to bfloat16 before its dot and the result to bfloat16 (relative 2^-8 each), hence 2^-6 of the
    largest gradient. Raw features are unit tokens (tau = 0.1 keeps the entries at most 10), the
    normalized ones have norms about 2^±1."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    widths = (768, 768) if kind == "infonce" else (768, 1024)
    tokens = 4096

    def features(width):
        x = torch.nn.functional.normalize(torch.randn(2, tokens, width, generator=gen, device="cuda"), dim=-1)
        if normalize:
            x = x * torch.exp2(torch.rand(2, tokens, 1, generator=gen, device="cuda") * 2 - 1)
        return x.bfloat16()

    s, t = features(widths[0]), features(widths[1])
    valid = torch.rand(2, tokens, generator=gen, device="cuda") < 0.9
    tau = torch.tensor(0.1)
    rows, stats = FORWARD(s, t, tau, valid, kind, exclude_diagonal, normalize)
    weights = torch.randn(2, tokens, generator=gen, device="cuda")
    *grads, row_dots = BACKWARD(weights, s, t, tau, valid, stats, kind, exclude_diagonal, normalize,
                                True, True)
    cpu_args = (s.float().cpu(), t.float().cpu(), tau, valid.cpu())
    cpu_rows, cpu_stats = CPU_FORWARD(*cpu_args, kind, exclude_diagonal, normalize)
    *cpu_grads, cpu_row_dots = CPU_BACKWARD(weights.cpu(), *cpu_args, cpu_stats, kind, exclude_diagonal,
                                            normalize, True, True)
    scale = max(cpu_rows.abs().max().item(), 1 / 0.1)
    _assert_close(rows, cpu_rows, 1e-4, "row loss", scale)
    _assert_close(stats, cpu_stats, 1e-4, "row stats", scale)
    for got, want, name in zip(grads, cpu_grads, ("student", "teacher")):
        assert got.dtype == torch.bfloat16
        _assert_close(got.float(), want, 2**-6, f"{name} grad")
    _assert_close(row_dots, cpu_row_dots, 2**-6, "row dots", weights.abs().max().item() / 0.1)


@pytest.mark.gpu
def test_gpu_float32_is_ieee_by_default():
    """float32 features with torch's default matmul precision ("highest"): no TF32, so tau = 0.1
    on unit tokens (entries up to 10) still meets the float32 tolerances against the CPU op and
    the oracle (TF32's entry errors, about 1e-3 / tau, would not)."""
    assert torch.get_float32_matmul_precision() == "highest"
    gen = torch.Generator(device="cuda").manual_seed(9)
    s = torch.nn.functional.normalize(torch.randn(2, 300, 128, generator=gen, device="cuda"), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, 300, 64, generator=gen, device="cuda"), dim=-1)
    _check_ops(s, t, 0.1, None, "kl", False, False)


@pytest.mark.gpu
def test_gpu_torch_compile():
    """torch.compile (fullgraph) traces the public function through wrap_triton, forward and
    backward (the fused normalization included), and matches eager."""
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
