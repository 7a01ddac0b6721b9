"""The Triton kd_loss op (kernels/divergence.py, ``kdops::kd_loss_triton``) against the float64
oracle ``kdops.reference.kd_loss`` (DESIGN.md 3.1 and 4).

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_divergence_triton.py

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
from kdops.kernels import divergence as triton_divergence  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

OP = TRITON_OPS["kd_loss"]
INF = float("inf")
DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())

# (divergence, beta, alpha): every divergence plus the endpoints that dispatch to fkl / rkl
VARIANTS = (
    ("fkl", 0.5, 0.1),
    ("rkl", 0.5, 0.1),
    ("jsd", 0.3, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew_fkl", 0.5, 0.1),
    ("skew_fkl", 0.5, 0.0),
    ("skew_rkl", 0.5, 0.1),
    ("skew_rkl", 0.5, 0.0),
    ("tvd", 0.5, 0.1),
)


def _variant_id(v):
    div, beta, alpha = v
    if div == "jsd":
        return f"jsd_beta{beta}"
    if div.startswith("skew"):
        return f"{div}_alpha{alpha}"
    return div


def _effective(div: str, beta: float, alpha: float) -> str:
    """The kernel that runs: the exact endpoints are the plain KLs."""
    if div == "jsd" and beta in (0.0, 1.0):
        return "fkl" if beta == 0.0 else "rkl"
    if div.startswith("skew") and alpha == 0.0:
        return div[len("skew_"):]
    return div


@pytest.fixture(scope="module", autouse=True)
def _autograd_registered():
    """kdops.kd_loss registers the shared autograd formula on the Triton op the first time it
    picks the triton backend; the raw-op tests below may run first."""
    kdops.divergence._kd_loss_op("triton")
    yield


# --------------------------------------------------------------------------------------------
# Tolerances. The reference is computed in float64 on the very same (already rounded) inputs, so
# input rounding is not part of any tolerance; only float32 arithmetic and output rounding are.
# --------------------------------------------------------------------------------------------


def fp32_rtol(V: int) -> float:
    """float32 arithmetic: each row sums V terms (and the GPU's exp2 / log2 are approximate to a
    few ulp); the rounding error of such sums grows like sqrt(V) eps32. 2e-5 covers V <= 1024;
    beyond, scale by sqrt(V / 1024)."""
    return 2e-5 * max(1.0, math.sqrt(V / 1024))


def tolerances(dtype: torch.dtype, V: int) -> tuple[float, float, float]:
    """(rtol of the float32 loss and temperature gradient, rtol of the logits' gradients,
    absolute floor of the logits' gradients)."""
    r32 = fp32_rtol(V)
    if dtype == torch.float32:
        return r32, r32, 0.0
    if dtype == torch.bfloat16:
        # gradients stored in bf16 (8 significant bits): rounding is half an ulp (2^-9); allow one
        # ulp, 2^-8, for the float32 error before the rounding
        return r32, 2.0**-8, 0.0
    if dtype == torch.float16:
        # fp16 gradients: 11 significant bits, one ulp = 2^-10 relative; values below 2^-14 are
        # subnormal with an absolute spacing of 2^-24, hence the absolute floor
        return r32, 2.0**-10, 2.0**-24
    raise AssertionError(dtype)


# Where the exact value is 0 (V = 1, p == q) the float64 reference returns ~1e-17 and float32
# gives 0 or ~1e-8: an absolute floor of about eps32 times the O(1) probabilities summed.
ATOL_FLOOR = 1e-7


def assert_close(actual, expected, *, rtol, atol_rel, atol_abs=0.0, what=""):
    """|actual - expected| <= rtol |expected| + atol_rel max|expected| + atol_abs + ATOL_FLOOR
    elementwise: float32 sums err relative to their large terms, so the scale is the largest
    expected value."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_rel * scale + atol_abs + ATOL_FLOOR, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _logits(shape, gen, dtype, *, scale=2.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    return x.to(device=DEVICE, dtype=dtype)


def _neg_inf_positions(shape, gen, effective: str, frac=0.25):
    """-inf masks (student, teacher) that keep the divergence finite: shared positions for every
    divergence, plus one-sided ones where the divergence allows them (fkl: teacher-only, p = 0;
    rkl: student-only, q = 0; the mixtures and tvd: either side). Column 0 stays finite."""
    shared = torch.rand(shape, generator=gen) < frac
    one_side = torch.rand(shape, generator=gen) < frac
    to_student = torch.rand(shape, generator=gen) < 0.5
    if effective == "fkl":
        to_student[:] = False
    elif effective == "rkl":
        to_student[:] = True
    s_inf = shared | (one_side & to_student)
    t_inf = shared | (one_side & ~to_student)
    s_inf[:, 0] = False
    t_inf[:, 0] = False
    return s_inf.to(DEVICE), t_inf.to(DEVICE)


def _strided(x: torch.Tensor, extra: int = 5) -> torch.Tensor:
    """The same values as x, as rows of a wider buffer (row stride V + extra)."""
    n, v = x.shape
    buf = torch.full((n, v + extra), float("nan"), dtype=x.dtype, device=x.device)
    buf[:, :v] = x
    return buf[:, :v]


def _reference_grads(s, t, tau_rows, kwargs, valid):
    """float64 reference loss and d(loss.sum())/d(student, teacher, per-row temperature)."""
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    tau64 = tau_rows.detach().double().cpu().requires_grad_()
    mask = None if valid is None else valid.cpu()
    ref = kdops.reference.kd_loss(s64, t64, temperature=tau64, mask=mask, **kwargs)
    ref.sum().backward()
    return ref.detach(), s64.grad, t64.grad, tau64.grad


def _run_op(s, t, tau, valid, normalizer, div, beta, alpha, reduction, t2, grads=(True, True, True)):
    return OP(s, t, tau, valid, normalizer, div, float(beta), float(alpha), reduction, t2, *grads)


def _check(out, ref, dtype, V, grads=(True, True, True), what=""):
    loss, g_s, g_t, g_tau = out
    ref_loss, ref_s, ref_t, ref_tau = ref
    loss_rtol, grad_rtol, grad_abs = tolerances(dtype, V)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} loss")
    if grads[0]:
        assert g_s.dtype == dtype
        assert_close(g_s, ref_s, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_abs, what=f"{what} grad_student")
    if grads[1]:
        assert g_t.dtype == dtype
        assert_close(g_t, ref_t, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_abs, what=f"{what} grad_teacher")
    if grads[2]:
        assert g_tau.dtype == torch.float32
        # the temperature gradient sums V products of float32 terms: the loss's tolerance
        assert_close(g_tau, ref_tau, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} grad_temperature")


def _case(variant, dtype, V, i, o, *, N=5, multi_tile=False):
    """One comparison. The secondary options (reduction, temperature form, mask, t2, -inf, strided
    rows, normalizer) are cycled by the case index i (0..3, over the vocabulary sizes) and an offset
    o (variant and dtype), so that each variant meets every option value in every dtype."""
    div, beta, alpha = variant
    eff = _effective(div, beta, alpha)
    g = torch.Generator().manual_seed(1000 * i + 100 * o + V)
    reduction = REDUCTIONS[(i + o) % 3]
    temp_form = ("float", "row", "scalar")[(i + 2 * o) % 3]
    masked = (i + o) % 2 == 1
    t2 = ((i + o) // 2) % 2 == 0
    neg_inf = V > 1 and (i + o) % 3 != 1
    strided = (i + 3 * o) % 4 in (1, 2)
    normalizer = torch.tensor(3.5) if (reduction == "mean" and o % 2 == 0) else None

    s = _logits((N, V), g, dtype)
    t = _logits((N, V), g, dtype)
    if neg_inf:
        s_inf, t_inf = _neg_inf_positions((N, V), g, eff)
        s = s.masked_fill(s_inf, -INF)
        t = t.masked_fill(t_inf, -INF)
    if strided:
        s, t = _strided(s), _strided(t)
    if temp_form == "float":
        tau = torch.tensor(1.7)  # a 0-d CPU tensor, as the wrapper passes a Python float
        tau_rows = tau.expand(N)
    elif temp_form == "scalar":
        tau = torch.tensor(0.8, device=DEVICE)
        tau_rows = tau.expand(N)
    else:
        tau = (torch.rand(N, generator=g) * 1.5 + 0.5).to(DEVICE)
        tau_rows = tau
    valid = None
    if masked:
        valid = torch.tensor([True, False, True, True, False] * (N // 5 + 1))[:N].to(DEVICE)
    ref_kwargs = dict(divergence=div, beta=beta, alpha=alpha, reduction=reduction, t2_scale=t2,
                      normalizer=normalizer)
    ref = _reference_grads(s, t, tau_rows, ref_kwargs, valid)
    out = _run_op(s, t, tau, valid, normalizer, div, beta, alpha, reduction, t2)
    what = f"{_variant_id(variant)} {dtype} V={V} red={reduction} tau={temp_form} mask={masked} t2={t2} " \
           f"neginf={neg_inf} strided={strided} multi={multi_tile}"
    _check(out, ref, dtype, V, what=what)


# --------------------------------------------------------------------------------------------
# The op against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V", [1, 3, 257, 1031])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_op_matches_reference(variant, dtype, V):
    """Loss and all three gradients; short rows: the whole row in one tile, several rows per
    program."""
    _case(variant, dtype, V, [1, 3, 257, 1031].index(V), VARIANTS.index(variant) + DTYPES.index(dtype))


def _force_multi_tile(monkeypatch):
    """The multi-tile path (one row per program, 256-wide tiles) on small vocabularies."""
    monkeypatch.setattr(triton_divergence, "SINGLE_MAX_V", 64)
    monkeypatch.setattr(triton_divergence, "MULTI_TILE", {"kl": (256, 4), "other": (256, 4)})


@pytest.fixture
def multi_tile(monkeypatch):
    _force_multi_tile(monkeypatch)


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_op_matches_reference_multi_tile(variant, k, multi_tile):
    """The online max / sum across tiles (and the fkl / rkl folded loss) with a ragged last tile:
    V = 1031 = 4 * 256 + 7, V = 257 = 256 + 1, V = 512 (whole tiles only)."""
    V = (1031, 257, 512, 1031)[k]
    _case(variant, torch.float32 if k != 3 else torch.float16, V, k, VARIANTS.index(variant) + 1, multi_tile=True)


@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "multi_tile"])
@pytest.mark.parametrize("variant", VARIANTS[:3] + VARIANTS[5:6] + VARIANTS[7:8] + VARIANTS[9:], ids=_variant_id)
def test_gradient_subsets(variant, single, monkeypatch):
    """Each gradient alone (and none): the fkl / rkl kernels take different sweeps then."""
    if not single:
        _force_multi_tile(monkeypatch)
    div, beta, alpha = variant
    N, V = 4, 1031
    g = torch.Generator().manual_seed(7)
    s, t = _logits((N, V), g, torch.float32), _logits((N, V), g, torch.float32)
    tau = (torch.rand(N, generator=g) + 0.5).to(DEVICE)
    kwargs = dict(divergence=div, beta=beta, alpha=alpha, reduction="sum", t2_scale=True)
    ref = _reference_grads(s, t, tau, kwargs, None)
    for grads in [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]:
        out = _run_op(s, t, tau, None, None, div, beta, alpha, "sum", True, grads)
        _check(out, ref, torch.float32, V, grads=grads, what=f"grads={grads}")
        for wanted, x in zip(grads, out[1:]):
            if not wanted:
                assert x.shape == (0,)


# --------------------------------------------------------------------------------------------
# Masks, -inf, NaN, empty reductions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "multi_tile"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_masked(reduction, single, monkeypatch):
    """Nothing counts: loss 0 (never NaN, also for mean), gradients exactly 0; masked rows are
    never read, so NaN / bad temperatures in them change nothing."""
    if not single:
        _force_multi_tile(monkeypatch)
    N, V = 3, 257
    s = torch.full((N, V), float("nan"), device=DEVICE)
    t = torch.full((N, V), float("nan"), device=DEVICE)
    tau = torch.tensor([0.0, float("nan"), -1.0], device=DEVICE)
    valid = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    for div in DIVERGENCES:
        loss, g_s, g_t, g_tau = _run_op(s, t, tau, valid, None, div, 0.3, 0.1, reduction, True)
        assert torch.equal(loss.cpu(), torch.zeros_like(loss).cpu()), div
        for g in (g_s, g_t, g_tau):
            assert torch.equal(g.cpu(), torch.zeros_like(g).cpu()), div


@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "multi_tile"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_masked_rows_hold_garbage(variant, single, monkeypatch):
    """NaN / inf logits and a zero temperature in masked rows reach neither the loss nor any
    gradient. One tile: 16 rows of V = 257 per program, the second program has no valid row."""
    if not single:
        _force_multi_tile(monkeypatch)
    div, beta, alpha = variant
    N, V = 20, 257
    g = torch.Generator().manual_seed(3)
    s, t = _logits((N, V), g, torch.float32), _logits((N, V), g, torch.float32)
    tau = (torch.rand(N, generator=g) + 0.5).to(DEVICE)
    valid = torch.rand(N, generator=g) < 0.6
    valid[16:] = False
    valid[0] = True
    valid = valid.to(DEVICE)
    s_bad, t_bad, tau_bad = s.clone(), t.clone(), tau.clone()
    s_bad[~valid] = float("nan")
    t_bad[~valid] = INF
    tau_bad[~valid] = 0.0
    kwargs = dict(divergence=div, beta=beta, alpha=alpha, reduction="mean", t2_scale=False)
    ref = _reference_grads(s, t, tau, kwargs, valid)
    out = _run_op(s_bad, t_bad, tau_bad, valid, None, div, beta, alpha, "mean", False)
    _check(out, ref, torch.float32, V, what="garbage in masked rows")


@pytest.mark.parametrize("single", [True, False], ids=["one_tile", "multi_tile"])
def test_truly_infinite_term_stays_infinite(single, monkeypatch):
    """fkl / rkl where one side has -inf and the weighing side not: +inf, not clamped. Other rows
    (reduction none: no shared scale) are unaffected."""
    if not single:
        _force_multi_tile(monkeypatch)
    g = torch.Generator().manual_seed(12)
    s = _logits((3, 600), g, torch.float32)
    t = _logits((3, 600), g, torch.float32)
    for div in ("fkl", "rkl"):
        s_, t_ = s.clone(), t.clone()
        (s_ if div == "fkl" else t_)[0, 5] = -INF
        loss, g_s, _, _ = _run_op(s_, t_, torch.tensor(1.0), None, None, div, 0.5, 0.1, "none", False)
        ref = kdops.reference.kd_loss(s_.double(), t_.double(), divergence=div, reduction="none")
        assert loss[0].item() == INF and ref[0].item() == INF, div
        assert_close(loss[1:], ref[1:], rtol=2e-5, atol_rel=2e-5, what=f"{div} finite rows")
        assert torch.isfinite(g_s[1:]).all()


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_running_max_jump_across_tiles(divergence, monkeypatch):
    """A later tile raises the weighing side's row maximum by 200, so the folded loss numerator's
    rescale factor underflows to 0 while it holds an infinite term: the old terms vanish, as their
    float32 weights exp(x - max) do when taken against the final maximum (one tile, C++ kernels);
    no NaN, and the multi-tile result equals the one-tile result."""
    g = torch.Generator().manual_seed(13)
    s = _logits((2, 600), g, torch.float32)
    t = _logits((2, 600), g, torch.float32)
    x, y = (t, s) if divergence == "fkl" else (s, t)
    y[0, 5] = -INF  # infinite term while tile 0 is the running maximum
    x[0, 550] = 200.0  # the last tile moves the maximum: exp(-200 + ...) underflows
    x[1, 300] = 60.0  # a large jump that does not underflow
    one = _run_op(s, t, torch.tensor(1.0), None, None, divergence, 0.5, 0.1, "none", False)
    _force_multi_tile(monkeypatch)
    multi = _run_op(s, t, torch.tensor(1.0), None, None, divergence, 0.5, 0.1, "none", False)
    for a, b in zip(one, multi):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_in_gives_nan_out(divergence, side):
    with_nan = torch.tensor([[0.0, float("nan"), 1.0], [0.5, 0.1, 0.2]], device=DEVICE)
    other = torch.tensor([[0.3, 0.2, 0.1], [0.4, 0.1, 0.3]], device=DEVICE)
    s, t = (with_nan, other) if side == "student" else (other, with_nan)
    loss = _run_op(s, t, torch.tensor(1.0), None, None, divergence, 0.3, 0.1, "none", False, (False,) * 3)[0]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_inputs_give_zero(divergence):
    """p == q: the loss is 0 (the fkl / rkl folded form cancels exactly) and so are the gradients."""
    g = torch.Generator().manual_seed(5)
    s = _logits((4, 1031), g, torch.float32)
    s[:, 7] = -INF
    loss, g_s, g_t, g_tau = _run_op(s, s.clone(), torch.tensor(1.3), None, None, divergence, 0.3, 0.1, "none", True)
    assert loss.abs().max().item() <= 1e-6
    for x in (g_s, g_t, g_tau):
        assert x.abs().max().item() <= 1e-6


# --------------------------------------------------------------------------------------------
# Output contract and argument checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_contract(reduction):
    """Shapes and dtypes as kdops::kd_loss; fresh, non-aliasing outputs; empty [0] gradients when
    not requested; the same values as the C++ op where it runs on this device."""
    N, V = 5, 257
    g = torch.Generator().manual_seed(9)
    s, t = _logits((N, V), g, torch.float16), _logits((N, V), g, torch.float16)
    tau = torch.tensor(2.0)
    valid = torch.tensor([True, True, False, True, True], device=DEVICE)
    for grads in [(True, True, True), (True, False, False), (False, False, False)]:
        out = _run_op(s, t, tau, valid, None, "jsd", 0.3, 0.1, reduction, False, grads)
        loss, g_s, g_t, g_tau = out
        assert loss.shape == ((N,) if reduction == "none" else ())
        assert loss.dtype == torch.float32
        assert g_s.shape == ((N, V) if grads[0] else (0,)) and g_s.dtype == torch.float16
        assert g_t.shape == ((N, V) if grads[1] else (0,)) and g_t.dtype == torch.float16
        assert g_tau.shape == ((N,) if grads[2] else (0,)) and g_tau.dtype == torch.float32
        ptrs = [x.untyped_storage().data_ptr() for x in out if x.numel()]
        assert len(set(ptrs)) == len(ptrs), "outputs alias each other"
        if torch._C._dispatch_has_kernel_for_dispatch_key("kdops::kd_loss", "CPU" if DEVICE == "cpu" else "CUDA"):
            ref_out = torch.ops.kdops.kd_loss(s, t, tau, valid, None, "jsd", 0.3, 0.1, reduction, False, *grads)
            for a, b in zip(out, ref_out):
                assert a.shape == b.shape and a.dtype == b.dtype
                torch.testing.assert_close(a.cpu(), b.cpu(), rtol=2e-3, atol=1e-5)


def test_no_rows():
    s = torch.empty((0, 7), device=DEVICE)
    for reduction in REDUCTIONS:
        loss, g_s, _, g_tau = _run_op(s, s, torch.tensor(1.0), None, None, "fkl", 0.5, 0.1, reduction, False)
        assert loss.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert loss.item() == 0.0
        assert g_s.shape == (0, 7) and g_tau.shape == (0,)


def _bad(which):
    s = torch.randn(4, 6, device=DEVICE)
    t = torch.randn(4, 6, device=DEVICE)
    tau = torch.tensor(1.0)
    base = dict(student=s, teacher=t, temperature=tau, valid=None, normalizer=None, divergence="fkl",
                beta=0.5, alpha=0.1, reduction="mean")
    over = {
        "student": dict(student=s[0], teacher=t[0]),
        "teacher": dict(teacher=torch.randn(4, 7, device=DEVICE)),
        "teacher_dtype": dict(teacher=t.half()),
        "float64": dict(student=s.double(), teacher=t.double(), temperature=tau.double()),
        "vocab": dict(student=torch.randn(4, 0, device=DEVICE), teacher=torch.randn(4, 0, device=DEVICE)),
        "contiguous": dict(student=torch.randn(6, 4, device=DEVICE).t(), teacher=torch.randn(6, 4, device=DEVICE).t()),
        "beta": dict(divergence="jsd", beta=1.5),
        "alpha": dict(divergence="skew_fkl", alpha=-0.1),
        "temperature": dict(temperature=torch.ones(3, device=DEVICE)),
        "temperature_dtype": dict(temperature=torch.tensor(1.0, dtype=torch.float64)),
        "valid": dict(valid=torch.ones(4, dtype=torch.int64, device=DEVICE)),
        "normalizer": dict(normalizer=torch.ones(2)),
        "divergence": dict(divergence="kl"),
        "reduction": dict(reduction="avg"),
    }[which]
    args = {**base, **over}
    return lambda: OP(args["student"], args["teacher"], args["temperature"], args["valid"], args["normalizer"],
                      args["divergence"], args["beta"], args["alpha"], args["reduction"], False, True, False, False)


BAD = [
    ("student", "student"), ("teacher", "teacher"), ("teacher_dtype", "teacher"), ("float64", "float64"),
    ("vocab", "vocab"), ("contiguous", "contiguous"), ("beta", "beta"), ("alpha", "alpha"),
    ("temperature", "temperature"), ("temperature_dtype", "temperature"), ("valid", "valid"),
    ("normalizer", "normalizer"), ("divergence", "divergence"), ("reduction", "reduction"),
]


@pytest.mark.parametrize("which,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_value_error(which, argument):
    with pytest.raises(ValueError, match=argument):
        _bad(which)()


def test_opcheck():
    """Schema, fake kernel and autograd registration (the AOT-dispatch checks trace the kernel
    through wrap_triton, which the interpreter cannot: they run on CUDA only)."""
    g = torch.Generator().manual_seed(2)
    s = _logits((4, 3), g, torch.float32).requires_grad_()
    t = _logits((4, 3), g, torch.float32).requires_grad_()
    tau = torch.tensor(1.5, device=DEVICE, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    for reduction in ("mean", "none"):
        valid = torch.tensor([True, False, True, True], device=DEVICE)
        args = (s, t, tau, valid, None, "skew_rkl", 0.3, 0.1, reduction, True, True, True, True)
        torch.library.opcheck(OP, args, test_utils=utils)


# --------------------------------------------------------------------------------------------
# Through kdops.kd_loss with the Triton backend forced
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_backend_triton(divergence, dtype):
    """The public function (leading shape, labels + ignore_index, mask, normalizer, learnable
    per-position temperature, backward) with the Triton backend forced, against the reference."""
    g = torch.Generator().manual_seed(DIVERGENCES.index(divergence))
    lead, V = (2, 3), 257
    s0 = _logits(lead + (V,), g, dtype)
    t0 = _logits(lead + (V,), g, dtype)
    labels = torch.randint(0, V, lead, generator=g).to(DEVICE)
    labels[0, 1] = -100
    mask = torch.tensor([[True, True, False], [True, True, True]], device=DEVICE)
    tau0 = (torch.rand(lead, generator=g) + 0.5).to(DEVICE)
    for reduction, normalizer in (("mean", None), ("mean", 2.5), ("none", None)):
        kwargs = dict(divergence=divergence, beta=0.3, alpha=0.1, labels=labels, mask=mask,
                      reduction=reduction, normalizer=normalizer, t2_scale=True)
        s, t, tau = (x.clone().requires_grad_() for x in (s0, t0, tau0))
        with kdops.use_backend("triton"):
            loss = kdops.kd_loss(s, t, temperature=tau, **kwargs)
        weight = torch.rand(loss.shape, generator=g).to(DEVICE) + 0.5
        (loss * weight).sum().backward()
        s64, t64, tau64 = (x.detach().double().cpu().requires_grad_() for x in (s0, t0, tau0))
        ref = kdops.reference.kd_loss(s64, t64, temperature=tau64, **{**kwargs, "labels": labels.cpu(),
                                                                      "mask": mask.cpu()})
        (ref * weight.double().cpu()).sum().backward()
        loss_rtol, grad_rtol, grad_abs = tolerances(dtype, V)
        what = f"{divergence} {dtype} {reduction} normalizer={normalizer}"
        assert loss.dtype == torch.float32 and loss.shape == ref.shape
        assert_close(loss, ref, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} loss")
        assert_close(s.grad, s64.grad, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_abs, what=f"{what} d student")
        assert_close(t.grad, t64.grad, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_abs, what=f"{what} d teacher")
        assert_close(tau.grad, tau64.grad, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} d temperature")


def test_kd_loss_backend_triton_scalar_learnable_temperature():
    g = torch.Generator().manual_seed(4)
    s0, t0 = _logits((7, 257), g, torch.float32), _logits((7, 257), g, torch.float32)
    s = s0.clone().requires_grad_()
    tau = torch.tensor(1.6, device=DEVICE, requires_grad=True)
    with kdops.use_backend("triton"):
        kdops.kd_loss(s, t0, divergence="jsd", beta=0.3, temperature=tau, t2_scale=True).backward()
    s64, tau64 = s0.double().cpu().requires_grad_(), torch.tensor(1.6, dtype=torch.float64, requires_grad=True)
    kdops.reference.kd_loss(s64, t0.double().cpu(), divergence="jsd", beta=0.3, temperature=tau64,
                            t2_scale=True).backward()
    assert_close(s.grad, s64.grad, rtol=2e-5, atol_rel=2e-5, what="d student")
    assert_close(tau.grad, tau64.grad, rtol=2e-5, atol_rel=2e-5, what="d temperature")


# --------------------------------------------------------------------------------------------
# GPU only: large problems, bf16, torch.compile
# --------------------------------------------------------------------------------------------


def _gpu_spot_check(N, V, rows_to_check, divergence, beta=0.5, alpha=0.1, tau=2.0):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16)
    loss, g_s, g_t, g_tau = OP(s, t, torch.tensor(tau), None, None, divergence, beta, alpha, "none", False,
                               True, False, False)
    assert g_t.shape == (0,) and g_tau.shape == (0,)
    idx = torch.tensor(rows_to_check, device="cuda")
    s_rows, t_rows = s[idx].cpu(), t[idx].cpu()
    loss_rows, g_rows = loss[idx].cpu(), g_s[idx].cpu()
    del s, t, g_s
    torch.cuda.empty_cache()
    s64 = s_rows.double().requires_grad_()
    ref = kdops.reference.kd_loss(s64, t_rows.double(), divergence=divergence, beta=beta, alpha=alpha,
                                  temperature=tau, reduction="none")
    ref.sum().backward()
    loss_rtol, grad_rtol, _ = tolerances(torch.bfloat16, V)
    assert_close(loss_rows, ref, rtol=loss_rtol, atol_rel=loss_rtol, what="loss rows")
    assert_close(g_rows, s64.grad, rtol=grad_rtol, atol_rel=loss_rtol, what="grad_student rows")
    assert torch.isfinite(loss).all()


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """N * V = 2^31 + 2^17 bf16 elements (64-bit offsets; ~13 GB): forward and grad_student, the
    rows past 2^31 elements compared with the reference."""
    N, V = 16385, 131072
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GB of free device memory")
    _gpu_spot_check(N, V, [0, 1, 8191, 16383, 16384], "fkl")


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_gpu_llama3_vocab_bf16(divergence):
    """A Llama-3 sized problem: N = 8192 rows of V = 128256 bf16 logits."""
    _gpu_spot_check(8192, 128256, [0, 17, 4095, 8191], divergence, beta=0.3)


@pytest.mark.gpu
def test_gpu_torch_compile():
    """torch.compile (fullgraph) traces the op through wrap_triton, forward and backward (the
    autograd formula of kdops.divergence on the raw op)."""
    g = torch.Generator().manual_seed(8)
    s0, t0 = _logits((6, 1031), g, torch.bfloat16), _logits((6, 1031), g, torch.bfloat16)
    valid = torch.tensor([True, True, False, True, True, True], device=DEVICE)

    def f(s, t, tau):
        loss = OP(s, t, tau, valid, None, "skew_fkl", 0.5, 0.1, "mean", True, True, False, True)[0]
        return 2.0 * loss

    def run(fn):
        s = s0.clone().requires_grad_()
        tau = torch.tensor(1.7, device=DEVICE, requires_grad=True)
        out = fn(s, t0, tau)
        out.backward()
        return out.detach(), s.grad, tau.grad

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b, what in zip(eager, compiled, ("loss", "student grad", "temperature grad")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# backward's device-side scaling of the fused gradient (kernels/scale.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rows_unless_one(dtype):
    from kdops.kernels.scale import scale_rows_unless_one_

    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4099, generator=g).to(device=DEVICE, dtype=dtype)  # ragged last block
    x = base.clone()
    scale_rows_unless_one_(x, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(x, base)  # factor 1: untouched, bit for bit
    scale_rows_unless_one_(x, torch.tensor(-0.5, device=DEVICE))
    torch.testing.assert_close(x, (base.float() * -0.5).to(dtype), rtol=0, atol=0)
    per_row = torch.tensor([1.0, 2.0, 1.0, -3.0, 0.0], device=DEVICE)
    x = base.clone()
    scale_rows_unless_one_(x, per_row)
    torch.testing.assert_close(x, (base.float() * per_row[:, None]).to(dtype), rtol=0, atol=0)
