"""The Triton topk_kd_loss op (kernels/topk.py, ``kdops::topk_kd_loss_triton``) against the float64
oracle ``kdops.reference.topk_kd_loss`` (DESIGN.md 3.2 and 4).

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests/test_topk_triton.py

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
from kdops.kernels import topk as triton_topk  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

OP = TRITON_OPS["topk_kd_loss"]
INF = float("inf")
NAN = float("nan")
DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())

# (divergence, beta, alpha): every divergence plus the endpoints that become plain KLs on the support
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
    """What runs: "fkl" is the exact full-vocabulary fkl; the endpoints are the KLs on the support."""
    if (div == "jsd" and beta == 0.0) or (div == "skew_fkl" and alpha == 0.0):
        return "support_fkl"
    if (div == "jsd" and beta == 1.0) or (div == "skew_rkl" and alpha == 0.0):
        return "rkl"
    return div


@pytest.fixture(scope="module", autouse=True)
def _autograd_registered():
    """kdops.topk_kd_loss registers the shared autograd formula on the Triton op the first time it
    picks the triton backend; the raw-op tests below may run first."""
    kdops.topk._topk_op("triton")
    yield


@pytest.fixture
def small_blocks(monkeypatch):
    """Several vocabulary tiles (256 wide, ragged last) and K blocks (16) on small problems."""
    monkeypatch.setattr(triton_topk, "MAX_BLOCK_V", 256)
    monkeypatch.setattr(triton_topk, "MAX_BLOCK_K", 16)


# --------------------------------------------------------------------------------------------
# Tolerances. The reference runs in float64 on the very same (already rounded) inputs, so input
# rounding is in no tolerance; only float32 arithmetic and output rounding are.
# --------------------------------------------------------------------------------------------


def fp32_rtol(V: int) -> float:
    """float32 arithmetic: the exact fkl sums V exponentials per row (and the GPU's exp2 / log2
    are approximate to a few ulp); the rounding error of such sums grows like sqrt(V) eps32.
    2e-5 covers V <= 1024; beyond, scale by sqrt(V / 1024)."""
    return 2e-5 * max(1.0, math.sqrt(V / 1024))


def tolerances(dtype: torch.dtype, V: int) -> tuple[float, float, float]:
    """(rtol of the float32 loss, teacher and temperature gradients, rtol of the student gradient,
    absolute floor of the student gradient)."""
    r32 = fp32_rtol(V)
    if dtype == torch.float32:
        return r32, r32, 0.0
    # Half precisions: the fused student gradient is stored in the input dtype by the forward pass
    # and, unless grad_output is a CPU 1, multiplied by grad_output (rounded again) in backward:
    # two roundings of up to half an ulp each, one ulp = finfo(dtype).eps relative in all.
    if dtype == torch.bfloat16:
        return r32, torch.finfo(torch.bfloat16).eps, 0.0  # 2^-7: 8 significant bits
    if dtype == torch.float16:
        # 2^-10: 11 significant bits; below 2^-14 fp16 is subnormal with an absolute spacing of
        # 2^-24, so two roundings there can be off by up to 2^-24 whatever the value
        return r32, torch.finfo(torch.float16).eps, 2.0**-24
    raise AssertionError(dtype)


# Where the exact value is 0 (V = 1, p == q) the float64 reference returns ~1e-17 and float32 gives
# 0 or ~1e-8: an absolute floor of about eps32 times the O(1) probabilities summed.
ATOL_FLOOR = 1e-7


def assert_close(actual, expected, *, rtol, atol_rel, atol_abs=0.0, what=""):
    """|actual - expected| <= rtol |expected| + atol_rel max|expected| + atol_abs + ATOL_FLOOR
    elementwise (float32 sums err relative to their largest terms); infinities and NaNs must
    match exactly."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_rel * scale + atol_abs + ATOL_FLOOR, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _teacher(rows, V, K, gen, *, duplicates, empty_slot, ids_dtype=torch.int64):
    """Random distinct ids per row and top-k-like log-probabilities (log_softmax over K minus an
    offset: the K entries hold less than all of the teacher's mass).

    Slot 0 always holds a finite log-probability. `duplicates`: slots K-1 and (K >= 4) 1 repeat
    slot 0's id. `empty_slot` (K >= 4): slot 2 is -inf (an empty slot, p = 0)."""
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(rows)])
    if duplicates and K >= 2:
        ids[:, K - 1] = ids[:, 0]
        if K >= 4:
            ids[:, 1] = ids[:, 0]
    logprobs = torch.log_softmax(torch.randn(rows, K, generator=gen) * 2, dim=-1) - 0.4
    if empty_slot and K >= 4:
        logprobs[:, 2] = -INF
    return ids.to(device=DEVICE, dtype=ids_dtype), logprobs.to(DEVICE)


def _student(rows, V, gen, dtype, ids, *, neg_inf, slot2_neg_inf):
    """Normal(0, 2) logits rounded to `dtype`. `neg_inf`: about 10% of the logits off the ids are
    -inf (padded vocabulary). `slot2_neg_inf`: the logit at slot 2's id as well (q = 0 there)."""
    z = torch.randn(rows, V, generator=gen) * 2
    if neg_inf:
        off = torch.rand(rows, V, generator=gen) < 0.1
        off.scatter_(1, ids.cpu().long(), False)
        z = z.masked_fill(off, -INF)
        if slot2_neg_inf and ids.shape[1] >= 4:
            z.scatter_(1, ids[:, 2:3].cpu().long(), -INF)
    return z.to(device=DEVICE, dtype=dtype)


def _temperature(form, lead, gen):
    """(temperature as passed, float64 copy for the reference)."""
    if form == "float":
        return 1.7, 1.7
    if form == "row":
        tau = torch.rand(lead, generator=gen) * 1.5 + 0.5
        return tau.to(DEVICE), tau.double()
    if form == "scalar_learnable":
        return torch.tensor(0.8, device=DEVICE, requires_grad=True), torch.tensor(0.8, dtype=torch.float64,
                                                                                 requires_grad=True)
    tau = torch.rand(lead, generator=gen) * 1.5 + 0.5  # row_learnable
    return tau.clone().to(DEVICE).requires_grad_(), tau.double().requires_grad_()


def _compare(s0, ids, lp0, tau, tau64, kwargs, *, weight=None, grad_teacher=True, what=""):
    """kdops.topk_kd_loss with the triton backend forced against the reference: the loss and the
    gradients of every input that requires grad (student, teacher_logprobs, temperature)."""
    s = s0.clone().requires_grad_()
    lp = lp0.clone().requires_grad_(grad_teacher)
    with kdops.use_backend("triton"):
        loss = kdops.topk_kd_loss(s, ids, lp, temperature=tau, **kwargs)
    assert loss.dtype == torch.float32
    (loss.backward() if weight is None else (loss * weight).sum().backward())

    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    s64 = s0.detach().double().cpu().requires_grad_()
    lp64 = lp0.detach().double().cpu().requires_grad_(grad_teacher)
    ref = kdops.reference.topk_kd_loss(s64, ids.cpu(), lp64, temperature=tau64, **cpu)
    (ref.backward() if weight is None else (ref * weight.double().cpu()).sum().backward())

    V = s0.shape[-1]
    loss_rtol, grad_rtol, grad_abs = tolerances(s0.dtype, V)
    assert_close(loss, ref, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} loss")
    assert s.grad.dtype == s0.dtype
    assert_close(s.grad, s64.grad, rtol=grad_rtol, atol_rel=loss_rtol, atol_abs=grad_abs, what=f"{what} d student")
    if grad_teacher:
        assert lp.grad.dtype == torch.float32
        assert_close(lp.grad, lp64.grad, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} d teacher")
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        assert_close(tau.grad, tau64.grad, rtol=loss_rtol, atol_rel=loss_rtol, what=f"{what} d temperature")


def _case(variant, dtype, V, K, i, o):
    """One comparison through kdops.topk_kd_loss. The secondary options are cycled by the case
    index i and an offset o (variant and dtype), so that each variant meets every option value."""
    div, beta, alpha = variant
    eff = _effective(div, beta, alpha)
    g = torch.Generator().manual_seed(1000 * i + 10 * o + V)
    lead = (2, 3) if (i + o) % 2 else (5,)
    rows = math.prod(lead)
    renormalize = (i + o) % 2 == 0
    reduction = REDUCTIONS[(i + o) % 3]
    normalizer = 3.5 if reduction == "mean" and o % 2 == 0 else None
    temp_form = ("float", "row", "scalar_learnable", "row_learnable")[(i + 2 * o) % 4]
    masking = ("none", "labels", "mask", "both")[(i + 3 * o) % 4]
    t2 = (i + o) // 2 % 2 == 0
    ids_dtype = (torch.int64, torch.int32)[(i + o) // 3 % 2]
    duplicates = (i + o) % 3 != 2
    # an empty teacher slot against q > 0 is infinite for rkl (and exact KL(q || p))
    empty_slot = eff != "rkl" and (i + o) % 4 != 3
    neg_inf = (i + 2 * o) % 3 != 0
    # q = 0 against p > 0 is infinite for the fkls: only where the teacher's slot is empty
    slot2_neg_inf = eff not in ("fkl", "support_fkl") or empty_slot

    ids, lp = _teacher(rows, V, K, g, duplicates=duplicates, empty_slot=empty_slot, ids_dtype=ids_dtype)
    s = _student(rows, V, g, dtype, ids, neg_inf=neg_inf, slot2_neg_inf=slot2_neg_inf)
    tau, tau64 = _temperature(temp_form, lead, g)
    kwargs = dict(divergence=div, beta=beta, alpha=alpha, renormalize=renormalize, reduction=reduction,
                  normalizer=normalizer, t2_scale=t2)
    if masking in ("labels", "both"):
        labels = torch.randint(0, V, (rows,), generator=g)
        labels[1] = -100
        kwargs["labels"] = labels.reshape(lead).to(DEVICE)
    if masking in ("mask", "both"):
        mask = torch.ones(rows, dtype=torch.bool)
        mask[rows - 1] = False
        kwargs["mask"] = mask.reshape(lead).to(DEVICE)
    weight = (torch.rand(lead, generator=g) + 0.5).to(DEVICE) if reduction == "none" else None
    s, ids, lp = s.reshape(lead + (V,)), ids.reshape(lead + (K,)), lp.reshape(lead + (K,))
    what = (f"{_variant_id(variant)} {dtype} V={V} K={K} renorm={renormalize} red={reduction} "
            f"norm={normalizer} tau={temp_form} masking={masking} t2={t2} ids={ids_dtype} dup={duplicates} "
            f"empty={empty_slot} neginf={neg_inf}")
    _compare(s, ids, lp, tau, tau64, kwargs, weight=weight, what=what)


# --------------------------------------------------------------------------------------------
# Through kdops.topk_kd_loss against the reference
# --------------------------------------------------------------------------------------------

# (V, K): V = 1; K = V; K = V over two K blocks (64 + 36); an odd vocabulary with K < 64
SHAPES = ((1, 1), (3, 3), (100, 100), (1271, 40))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda vk: f"V{vk[0]}_K{vk[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_matches_reference(variant, dtype, shape):
    """Loss and the student, teacher and temperature gradients; the options (renormalize,
    temperature form, masks, reduction, normalizer, t2, id dtype, duplicates, -inf) are cycled."""
    V, K = shape
    _case(variant, dtype, V, K, SHAPES.index(shape), VARIANTS.index(variant) + DTYPES.index(dtype))


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_matches_reference_small_blocks(variant, small_blocks):
    """Sweep 1's online statistics and sweep 2's reverse walk across 5 vocabulary tiles (the last
    ragged: 1271 = 4 * 256 + 247), the K passes across 3 blocks (40 = 2 * 16 + 8), duplicates in
    different blocks."""
    _case(variant, torch.float32, 1271, 40, VARIANTS.index(variant), 1)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("variant", VARIANTS[:3] + VARIANTS[5:6], ids=_variant_id)
def test_all_ids_equal(variant, renormalize, small_blocks):
    """K = 33 entries on a single id (3 K blocks): every entry's correction lands on it, exactly
    (fp16: within one rounding of the float64 value, so no rounded partial sum was read back)."""
    div, beta, alpha = variant
    g = torch.Generator().manual_seed(11)
    rows, V, K = 3, 300, 33
    s = (torch.randn(rows, V, generator=g) * 2).to(device=DEVICE, dtype=torch.float16)
    ids = torch.tensor([5, 0, V - 1]).repeat_interleave(K).reshape(rows, K).to(DEVICE)
    lp = (torch.log_softmax(torch.randn(rows, K, generator=g), -1) - 0.2).to(DEVICE)
    kwargs = dict(divergence=div, beta=beta, alpha=alpha, renormalize=renormalize, reduction="sum")
    s_ = s.clone().requires_grad_()
    with kdops.use_backend("triton"):
        kdops.topk_kd_loss(s_, ids, lp, temperature=1.3, **kwargs).backward()  # grad_output 1: one rounding
    s64 = s.double().cpu().requires_grad_()
    kdops.reference.topk_kd_loss(s64, ids.cpu(), lp.double().cpu(), temperature=1.3, **kwargs).backward()
    expected = s64.grad
    at_ids = torch.zeros_like(expected, dtype=torch.bool).scatter_(1, ids.cpu()[:, :1], True)
    # half an fp16 ulp (2^-11 relative) of rounding, plus the float32 arithmetic
    assert_close(s_.grad.cpu()[at_ids], expected[at_ids], rtol=2.0**-11, atol_rel=fp32_rtol(V),
                 atol_abs=2.0**-25, what="at the id")
    assert_close(s_.grad.cpu()[~at_ids], expected[~at_ids], rtol=2.0**-11, atol_rel=fp32_rtol(V),
                 atol_abs=2.0**-25, what="off the id")


# --------------------------------------------------------------------------------------------
# The raw op: gradient subsets, masks, bad ids, output contract
# --------------------------------------------------------------------------------------------


def _inputs(rows=4, V=257, K=12, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids, lp = _teacher(rows, V, K, g, duplicates=True, empty_slot=True)
    s = _student(rows, V, g, dtype, ids, neg_inf=True, slot2_neg_inf=True)
    tau = (torch.rand(rows, generator=g) + 0.5).to(DEVICE)
    return s, ids, lp, tau


def _run_op(s, ids, lp, tau, valid, div="fkl", reduction="sum", grads=(True, True, True), *, beta=0.3,
            alpha=0.1, renormalize=True, t2=True, normalizer=None):
    return OP(s, ids, lp, tau, valid, normalizer, div, beta, alpha, renormalize, reduction, t2, *grads)


def _reference_grads(s, ids, lp, tau, valid, div, reduction, *, beta=0.3, alpha=0.1, t2=True):
    """float64 reference loss and d(loss.sum())/d(student, logprobs, per-row temperature)."""
    s64, lp64, tau64 = (x.detach().double().cpu().requires_grad_() for x in (s, lp, tau))
    ref = kdops.reference.topk_kd_loss(
        s64, ids.cpu(), lp64, temperature=tau64, mask=None if valid is None else valid.cpu(),
        divergence=div, beta=beta, alpha=alpha, reduction=reduction, t2_scale=t2,
    )
    ref.sum().backward()
    return ref.detach(), s64.grad, lp64.grad, tau64.grad


def _check(out, ref, V, grads=(True, True, True), what=""):
    r32 = fp32_rtol(V)
    assert_close(out[0], ref[0], rtol=r32, atol_rel=r32, what=f"{what} loss")
    for name, wanted, got, expected in zip(("student", "teacher", "temperature"), grads, out[1:], ref[1:]):
        if wanted:
            assert_close(got, expected, rtol=r32, atol_rel=r32, what=f"{what} d {name}")
        else:
            assert got.shape == (0,), f"{what}: grad_{name} not requested but has shape {tuple(got.shape)}"


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_gradient_subsets(divergence):
    """Each gradient alone, and none: the kernel takes different passes; the others come back
    as empty [0] tensors."""
    s, ids, lp, tau = _inputs()
    ref = _reference_grads(s, ids, lp, tau, None, divergence, "sum")
    for grads in [(False, False, False), (True, False, False), (False, True, False), (False, False, True)]:
        _check(_run_op(s, ids, lp, tau, None, divergence, grads=grads), ref, s.shape[1], grads, f"grads={grads}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_masked(reduction):
    """Nothing counts: loss 0 (never NaN, also for mean), every gradient exactly 0; masked rows
    are never read, so NaN logits, ids outside [0, V) and bad temperatures change nothing."""
    rows, V, K = 3, 257, 5
    s = torch.full((rows, V), NAN, device=DEVICE)
    ids = torch.tensor([[-1, V, 2**40, 0, 1]] * rows, device=DEVICE)
    lp = torch.full((rows, K), NAN, device=DEVICE)
    tau = torch.tensor([0.0, NAN, -1.0], device=DEVICE)
    valid = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    for div in DIVERGENCES:
        loss, g_s, g_t, g_tau = _run_op(s, ids, lp, tau, valid, div, reduction)
        assert torch.equal(loss.cpu(), torch.zeros_like(loss).cpu()), div
        assert g_s.shape == (rows, V) and g_t.shape == (rows, K) and g_tau.shape == (rows,)
        for g in (g_s, g_t, g_tau):
            assert torch.equal(g.cpu(), torch.zeros_like(g).cpu()), div


@pytest.mark.parametrize("divergence", ["fkl", "skew_rkl"])
def test_masked_rows_hold_garbage(divergence):
    """Garbage in masked rows reaches neither the loss (mean over the valid rows) nor any gradient."""
    s, ids, lp, tau = _inputs(rows=6)
    valid = torch.tensor([True, False, True, False, True, True], device=DEVICE)
    ref = _reference_grads(s, ids, lp, tau, valid, divergence, "mean")
    s_bad, ids_bad, lp_bad, tau_bad = s.clone(), ids.clone(), lp.clone(), tau.clone()
    s_bad[~valid] = NAN
    ids_bad[~valid] = -7
    lp_bad[~valid] = INF
    tau_bad[~valid] = 0.0
    _check(_run_op(s_bad, ids_bad, lp_bad, tau_bad, valid, divergence, "mean"), ref, s.shape[1], what="garbage")


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("divergence", ["fkl", "tvd"])
def test_id_out_of_range_gives_nan_row(divergence, ids_dtype):
    """A counted row with an id outside [0, V) (the wrapper's check bypassed): NaN loss and NaN
    gradients for that row, nothing read or written out of bounds, the other rows exact."""
    s, ids, lp, tau = _inputs(rows=5)
    ids = ids.to(ids_dtype)
    V = s.shape[1]
    bad_ids = ids.clone()
    bad_ids[1, 2] = V  # slot 2 is empty (p = 0): the fkl would add nothing for it
    bad_ids[3, 0] = -1
    good = torch.tensor([True, False, True, False, True])
    loss, g_s, g_t, g_tau = _run_op(s, bad_ids, lp, tau, None, divergence, "none")
    ref = _reference_grads(s[good], ids[good], lp[good], tau[good], None, divergence, "none")
    _check((loss[good], g_s[good], g_t[good], g_tau[good]), ref, V, what="good rows")
    for x in (loss, g_s, g_t, g_tau):
        assert torch.isnan(x[~good]).all()


def test_int32_and_int64_ids_agree():
    s, ids, lp, tau = _inputs()
    for div in ("fkl", "jsd"):
        wide = _run_op(s, ids, lp, tau, None, div)
        narrow = _run_op(s, ids.to(torch.int32), lp, tau, None, div)
        for a, b in zip(wide, narrow):
            assert torch.equal(a, b), div


def test_truly_infinite_term_stays_infinite():
    """fkl with p > 0 on a student logit of -inf: +inf (not clamped); other rows unaffected."""
    s, ids, lp, tau = _inputs(rows=3)
    s[0, ids[0, 0]] = -INF
    loss = _run_op(s, ids, lp, tau, None, "fkl", "none", (False, False, False))[0]
    ref = _reference_grads(s, ids, lp, tau, None, "fkl", "none")[0]
    assert loss[0].item() == INF and ref[0].item() == INF
    assert_close(loss[1:], ref[1:], rtol=2e-5, atol_rel=2e-5, what="finite rows")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_output_contract(reduction):
    """Shapes and dtypes as kdops::topk_kd_loss; fresh, non-aliasing outputs; empty [0] gradients
    when not requested."""
    s, ids, lp, _ = _inputs(rows=5, dtype=torch.float16)
    rows, V = s.shape
    K = ids.shape[1]
    valid = torch.tensor([True, True, False, True, True], device=DEVICE)
    for grads in [(True, True, True), (True, False, False), (False, False, False)]:
        out = _run_op(s, ids, lp, torch.tensor(2.0), valid, "jsd", reduction, grads)
        loss, g_s, g_t, g_tau = out
        assert loss.shape == ((rows,) if reduction == "none" else ()) and loss.dtype == torch.float32
        assert g_s.shape == ((rows, V) if grads[0] else (0,)) and g_s.dtype == torch.float16
        assert g_t.shape == ((rows, K) if grads[1] else (0,)) and g_t.dtype == torch.float32
        assert g_tau.shape == ((rows,) if grads[2] else (0,)) and g_tau.dtype == torch.float32
        ptrs = [x.untyped_storage().data_ptr() for x in out if x.numel()]
        assert len(set(ptrs)) == len(ptrs), "outputs alias each other"


def test_no_rows():
    s = torch.empty((0, 7), device=DEVICE)
    ids = torch.empty((0, 3), dtype=torch.int64, device=DEVICE)
    lp = torch.empty((0, 3), device=DEVICE)
    for reduction in REDUCTIONS:
        loss, g_s, g_t, g_tau = _run_op(s, ids, lp, torch.tensor(1.0), None, "fkl", reduction)
        assert loss.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert loss.item() == 0.0
        assert g_s.shape == (0, 7) and g_t.shape == (0, 3) and g_tau.shape == (0,)


def _bad(which):
    s = torch.randn(4, 6, device=DEVICE)
    ids = torch.randint(0, 6, (4, 3), device=DEVICE)
    lp = torch.randn(4, 3, device=DEVICE)
    base = dict(student=s, ids=ids, lp=lp, temperature=torch.tensor(1.0), valid=None, normalizer=None,
                divergence="fkl", beta=0.5, alpha=0.1, reduction="mean")
    over = {
        "student": dict(student=s[0]),
        "float64": dict(student=s.double(), lp=lp.double(), temperature=torch.tensor(1.0, dtype=torch.float64)),
        "vocab": dict(student=torch.randn(4, 0, device=DEVICE)),
        "contiguous": dict(student=torch.randn(6, 4, device=DEVICE).t()),
        "ids_shape": dict(ids=ids[:3]),
        "k_range": dict(ids=torch.randint(0, 6, (4, 7), device=DEVICE), lp=torch.randn(4, 7, device=DEVICE)),
        "ids_dtype": dict(ids=ids.to(torch.int16)),
        "logprobs_shape": dict(lp=lp[:, :2]),
        "logprobs_dtype": dict(lp=lp.half()),
        "beta": dict(divergence="jsd", beta=1.5),
        "alpha": dict(divergence="skew_fkl", alpha=-0.1),
        "temperature": dict(temperature=torch.ones(3, device=DEVICE)),
        "temperature_dtype": dict(temperature=torch.tensor(1.0, dtype=torch.float64)),
        "valid": dict(valid=torch.ones(4, dtype=torch.int64, device=DEVICE)),
        "normalizer": dict(normalizer=torch.ones(2)),
        "divergence": dict(divergence="kl"),
        "reduction": dict(reduction="avg"),
    }[which]
    a = {**base, **over}
    return lambda: OP(a["student"], a["ids"], a["lp"], a["temperature"], a["valid"], a["normalizer"],
                      a["divergence"], a["beta"], a["alpha"], True, a["reduction"], False, True, False, False)


BAD = [
    ("student", "student"), ("float64", "float64"), ("vocab", "vocab"), ("contiguous", "contiguous"),
    ("ids_shape", "teacher_ids"), ("k_range", "K"), ("ids_dtype", "teacher_ids"),
    ("logprobs_shape", "teacher_logprobs"), ("logprobs_dtype", "teacher_logprobs"), ("beta", "beta"),
    ("alpha", "alpha"), ("temperature", "temperature"), ("temperature_dtype", "temperature"),
    ("valid", "valid"), ("normalizer", "normalizer"), ("divergence", "divergence"), ("reduction", "reduction"),
]


@pytest.mark.parametrize("which,argument", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_value_error(which, argument):
    with pytest.raises(ValueError, match=argument):
        _bad(which)()


def test_opcheck():
    """Schema, fake kernel and autograd registration (the AOT-dispatch check traces the kernel
    through wrap_triton, which the interpreter cannot: it runs on CUDA only)."""
    s, ids, lp, _ = _inputs(rows=4, V=9, K=3)
    s.requires_grad_()
    lp.requires_grad_()
    tau = torch.tensor(1.5, device=DEVICE, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    valid = torch.tensor([True, False, True, True], device=DEVICE)
    for reduction in ("mean", "none"):
        args = (s, ids, lp, tau, valid, None, "fkl", 0.3, 0.1, True, reduction, True, True, True, True)
        torch.library.opcheck(OP, args, test_utils=utils)


# --------------------------------------------------------------------------------------------
# GPU only: large problems, bf16, torch.compile
# --------------------------------------------------------------------------------------------


def _gpu_spot_check(rows, V, K, rows_to_check, divergence):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(rows, V, generator=g, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, V, (rows, K), generator=g, device="cuda")
    lp = torch.log_softmax(torch.randn(rows, K, generator=g, device="cuda"), -1)
    loss, g_s, _, _ = OP(s, ids, lp, torch.tensor(2.0), None, None, divergence, 0.3, 0.1, True, "none", False,
                         True, False, False)
    idx = torch.tensor(rows_to_check, device="cuda")
    s_rows, ids_rows, lp_rows, loss_rows, g_rows = (x[idx].cpu() for x in (s, ids, lp, loss, g_s))
    del s, g_s
    torch.cuda.empty_cache()
    s64 = s_rows.double().requires_grad_()
    ref = kdops.reference.topk_kd_loss(s64, ids_rows, lp_rows.double(), divergence=divergence, beta=0.3,
                                       temperature=2.0, reduction="none")
    ref.sum().backward()
    loss_rtol, grad_rtol, _ = tolerances(torch.bfloat16, V)
    assert_close(loss_rows, ref, rtol=loss_rtol, atol_rel=loss_rtol, what="loss rows")
    assert_close(g_rows, s64.grad, rtol=grad_rtol, atol_rel=loss_rtol, what="grad_student rows")
    assert torch.isfinite(loss).all()


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """N * V = 2^31 + 2^17 bf16 elements (64-bit offsets; ~13 GB): the rows past 2^31 elements."""
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GB of free device memory")
    _gpu_spot_check(16385, 131072, 64, [0, 1, 16383, 16384], "fkl")


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_gpu_llama3_vocab_bf16(divergence):
    """A Llama-3 sized problem: N = 8192 rows of V = 128256 bf16 logits, K = 64."""
    _gpu_spot_check(8192, 128256, 64, [0, 17, 4095, 8191], divergence)


@pytest.mark.gpu
def test_gpu_torch_compile():
    """torch.compile (fullgraph) traces the public function through wrap_triton, forward and
    backward, and matches eager."""
    s0, ids, lp, _ = _inputs(rows=6, V=1031, K=16, dtype=torch.bfloat16)

    def f(s, tau):
        return 2.0 * kdops.topk_kd_loss(s, ids, lp, divergence="fkl", temperature=tau, t2_scale=True)

    def run(fn):
        s = s0.clone().requires_grad_()
        tau = torch.tensor(1.7, device=DEVICE, requires_grad=True)
        with kdops.use_backend("triton"):
            out = fn(s, tau)
        out.backward()
        return out.detach(), s.grad, tau.grad

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b, what in zip(eager, compiled, ("loss", "student grad", "temperature grad")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
