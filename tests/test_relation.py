"""Tests of kdops.relation_kd_loss and kdops.token_relation (DESIGN.md 3.6) against the float64
oracle kdops.reference.relation, which materializes every relation matrix: every kind x scope x
mask pattern (none, random with a one-token and an empty sequence, all masked) x odd N x
exclude_diagonal, different student and teacher widths, dtypes, reductions, several row blocks,
strided features, each CPU instruction-set build, thread-count independence; gradcheck of both
features and the temperature; opcheck of both ops; argument errors before any kernel; memory far
below N^2 at N = 16384; torch.compile.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kdops
import kdops.reference.relation as ref
from record_ops import RecordKdopsOps
from scaled_close import assert_scaled_close

KIND_CASES = [("kl", False), ("kl", True), ("mse", False), ("mse", True), ("infonce", False)]
SCOPES = ("sequence", "batch")

# Tolerances, relative to the largest expected magnitude. The oracle runs in float64 on the very
# same input values. float64: only the order of sums differs. float32: relation entries come from
# float32 GEMMs (|error| ~ D eps |S| / tau), softmax statistics and sums of N terms in float32.
# bf16 / fp16 with normalize=False: float32 arithmetic on the same values, then gradients rounded
# once to the input dtype (relative 2^-8 / 2^-11).
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def _feats(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def _mask(kind, batch, tokens, seed):
    """none; random (sequence 0 keeps a single token, sequence 2, if any, none); all masked."""
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(batch, tokens, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, tokens, generator=gen) < 0.6
    mask[0] = False
    mask[0, tokens // 2] = True
    if batch > 2:
        mask[2] = False
    return mask


def _check_against_oracle(student, teacher, *, grad=True, loss_rtol=None, grad_rtol=None, **kwargs):
    """The per-token losses and both feature gradients (of a random weighting of the tokens)."""
    dtype = student.dtype
    s = student.clone().requires_grad_(grad)
    t = teacher.clone().requires_grad_(grad)
    rows = kdops.relation_kd_loss(s, t, reduction="none", **kwargs)
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    s_ref = student.detach().double().requires_grad_(grad)
    t_ref = teacher.detach().double().requires_grad_(grad)
    expected = ref.relation_kd_loss(s_ref, t_ref, reduction="none", **kwargs)
    # The float32 relation entries carry rounding errors of their own size (about 1/tau for unit
    # tokens): that, not r (tiny when the relations nearly agree), sets the absolute error of r.
    entries = [ref.token_relation(x.detach(), temperature=kwargs.get("temperature", 1.0),
                                  normalize=kwargs.get("normalize", True)) for x in (student, teacher)]
    scale = max([expected.abs().max().item()] + [e.abs().max().item() for e in entries if e.numel()])
    assert_scaled_close(rows, expected, loss_rtol or LOSS_RTOL[dtype], "row loss", scale=scale)
    mask = kwargs.get("mask")
    if mask is not None:
        assert (rows[~mask] == 0).all()
    if not grad:
        return
    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights = weights.to(rows.device)
    (rows.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    assert s.grad.dtype == dtype and t.grad.dtype == dtype
    # A gradient that is exactly 0 in exact arithmetic (a singleton infonce row: softmax 1) comes
    # out as rounding noise: forward and backward form the same scaled entries, but the compiler
    # may fuse a product into the shift that follows it (FMA). The floor measures that noise
    # against the features' size.
    floor = 1e-3 * max(student.abs().max().item(), teacher.abs().max().item(), 0.0)
    for got, want, name in ((s.grad, s_ref.grad, "student grad"), (t.grad, t_ref.grad, "teacher grad")):
        assert_scaled_close(got, want, grad_rtol or GRAD_RTOL[dtype], name,
                      scale=max(want.abs().max().item(), floor) if want.numel() else None)


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
@pytest.mark.parametrize("tokens", [1, 7, 33, 130])
def test_matches_reference(kind, exclude_diagonal, scope, mask_kind, tokens):
    widths = (16, 16) if kind == "infonce" else (12, 20)
    s = _feats((3, tokens, widths[0]), seed=tokens)
    t = _feats((3, tokens, widths[1]), seed=tokens + 1)
    _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude_diagonal, scope=scope,
                          mask=_mask(mask_kind, 3, tokens, seed=2), temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_dtypes(dtype, kind, exclude_diagonal):
    """normalize=False: the oracle sees exactly the features the kernel sees."""
    widths = (24, 24) if kind == "infonce" else (24, 40)
    s = _feats((2, 45, widths[0]), seed=3, dtype=dtype) * 0.3
    t = _feats((2, 45, widths[1]), seed=4, dtype=dtype) * 0.3
    _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude_diagonal, normalize=False,
                          mask=_mask("random", 2, 45, seed=5), temperature=1.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_half_precision_normalized(dtype, kind):
    """normalize=True is fused: the kernels scale float32 products of the given 16-bit values by
    float32 inverse norms, so no normalized token is rounded back to 16 bits and the float32
    tolerances of the raw features hold (gradients: rounded once to the input dtype)."""
    s = _feats((2, 30, 32), seed=6, dtype=dtype)
    t = _feats((2, 30, 32), seed=7, dtype=dtype)
    _check_against_oracle(s, t, kind=kind, temperature=0.5)


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_several_row_blocks(kind, exclude_diagonal, dtype):
    """N = 600: three blocks of rows per sequence, the last one partial."""
    s = _feats((2, 600, 8), seed=8, dtype=dtype)
    t = _feats((2, 600, 8), seed=9, dtype=dtype)
    _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude_diagonal,
                          mask=_mask("random", 2, 600, seed=10), temperature=0.4)


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_small_temperature(kind):
    """tau = 0.05 on unit tokens: entries up to 20, nearly one-hot softmaxes. The gradients are
    differences of terms about 1/tau times their size (infonce: sum_j s_j F[j] - F[i] with s_i
    near 1), so float32 rounding of the entries shows relative to the result: 1e-3."""
    s = _feats((2, 50, 16), seed=11)
    t = s + 0.3 * _feats((2, 50, 16), seed=12)
    _check_against_oracle(s, t, kind=kind, temperature=0.05, loss_rtol=1e-4, grad_rtol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_reductions(reduction, mask_kind, kind):
    s = _feats((3, 9, 6), seed=13, dtype=torch.float64).requires_grad_()
    t = _feats((3, 9, 6), seed=14, dtype=torch.float64)
    kwargs = dict(kind=kind, mask=_mask(mask_kind, 3, 9, seed=15), reduction=reduction, scope="batch")
    loss = kdops.relation_kd_loss(s, t, **kwargs)
    expected = ref.relation_kd_loss(s, t, **kwargs)
    assert_scaled_close(loss, expected, 1e-10, "loss", scale=1.0)
    assert torch.isfinite(loss).all()
    if mask_kind == "all_masked":
        assert (loss == 0).all()
    (grad,) = torch.autograd.grad(loss.sum(), s)
    (want,) = torch.autograd.grad(expected.sum(), s)
    assert_scaled_close(grad, want, 1e-10, "grad", scale=1.0)


def test_equal_inputs_give_zero():
    f = _feats((2, 17, 9), seed=16)
    for kind in ("kl", "mse"):
        assert kdops.relation_kd_loss(f, f.clone(), kind=kind, reduction="none").abs().max() < 1e-6


def test_mean_counts_tokens_without_columns():
    """One valid token and exclude_diagonal: r = 0, and the token still counts in the mean."""
    s, t = _feats((2, 4, 3), seed=17), _feats((2, 4, 3), seed=18)
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])
    rows = kdops.relation_kd_loss(s, t, mask=mask, exclude_diagonal=True, reduction="none")
    assert rows[0, 0] == 0
    mean = kdops.relation_kd_loss(s, t, mask=mask, exclude_diagonal=True)
    torch.testing.assert_close(mean, rows.sum() / 4)


def test_strided_features():
    wide = _feats((4, 40, 30), seed=19)
    s = wide[::2, ::3, 5:17]  # group and token strides, a contiguous last dim
    t = wide[1::2, ::3, 2:9]
    assert s.stride(-1) == 1 and not s.is_contiguous()
    _check_against_oracle(s, t, normalize=False, temperature=3.0)
    _check_against_oracle(wide.transpose(1, 2)[:, :9], wide.transpose(1, 2)[:, 9:18], kind="infonce")


def test_temperature_tensor_gradient():
    s = _feats((2, 11, 5), seed=20).requires_grad_()
    t = _feats((2, 11, 7), seed=21)
    for kind in ("kl", "mse"):
        tau = torch.tensor(0.6, requires_grad=True)
        tau_ref = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        kdops.relation_kd_loss(s, t, kind=kind, temperature=tau).backward()
        ref.relation_kd_loss(s.detach(), t, kind=kind, temperature=tau_ref).backward()
        torch.testing.assert_close(tau.grad.double(), tau_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_row_dots(kind, exclude_diagonal, normalize):
    """Backward's third output: per token <g, u>, g the gradient of the loss with respect to the
    relation tokens u (normalized or not), against float64 autograd through the oracle."""
    widths = (5, 5) if kind == "infonce" else (5, 3)
    s = _feats((2, 9, widths[0]), seed=60, dtype=torch.float64)
    t = _feats((2, 9, widths[1]), seed=61, dtype=torch.float64)
    tau = torch.tensor(0.8, dtype=torch.float64)
    mask = _mask("random", 2, 9, seed=62)
    weights = torch.randn(2, 9, generator=torch.Generator().manual_seed(63), dtype=torch.float64)
    rows, stats = torch.ops.kdops.relation_kd_loss(s, t, tau, mask, kind, exclude_diagonal, normalize)
    _, _, dots = torch.ops.kdops.relation_kd_loss_backward(weights, s, t, tau, mask, stats, kind,
                                                           exclude_diagonal, normalize, True, True)
    u = [torch.nn.functional.normalize(x, dim=-1) if normalize else x.clone() for x in (s, t)]
    for x in u:
        x.requires_grad_()
    expected = ref.relation_kd_loss(*u, kind=kind, temperature=0.8, normalize=False, mask=mask,
                                    exclude_diagonal=exclude_diagonal, reduction="none")
    (expected * weights).sum().backward()
    for slot, x in enumerate(u):
        assert_scaled_close(dots[..., slot], (x.grad * x.detach()).sum(-1), 1e-10, f"row dots {slot}")


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_zero_and_tiny_norm_tokens(kind):
    """normalize=True at tokens with |F| <= eps = 1e-12 (an all-zero token, one of norm 1e-13):
    F.normalize divides them by eps, and so do the kernels (no radial term there); gradients match
    autograd through the float64 oracle, as do the losses. Zero-padded masked tokens get zero
    gradients."""
    s = _feats((2, 8, 4), seed=64, dtype=torch.float64)
    t = _feats((2, 8, 4), seed=65, dtype=torch.float64)
    s[0, 2] = 0
    t[1, 5] = 0
    s[1, 3] *= 1e-13 / s[1, 3].norm()
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 7] = mask[1, 0] = False
    s[0, 7] = t[0, 7] = s[1, 0] = t[1, 0] = 0
    _check_against_oracle(s, t, kind=kind, mask=mask, temperature=0.7)
    s.requires_grad_()
    kdops.relation_kd_loss(s, t, kind=kind, mask=mask).backward()
    assert (s.grad[0, 7] == 0).all() and (s.grad[1, 0] == 0).all()


def test_every_cpu_build_agrees(monkeypatch):
    s, t = _feats((2, 260, 10), seed=22), _feats((2, 260, 6), seed=23)  # two row blocks
    builds = ["baseline"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        builds.append("avx2")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        builds.append("avx512")
    for isa in builds:
        monkeypatch.setenv("KDOPS_CPU_ISA", isa)
        for kind, exclude in (("kl", True), ("mse", False)):
            _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude, mask=_mask("random", 2, 260, seed=24))
        _check_against_oracle(s, s.flip(1), kind="infonce")


def test_deterministic_across_thread_counts():
    s = _feats((2, 700, 12), seed=25).requires_grad_()
    t = _feats((2, 700, 12), seed=26).requires_grad_()
    mask = _mask("random", 2, 700, seed=27)

    def run(kind):
        s.grad = t.grad = None
        kdops.relation_kd_loss(s, t, kind=kind, mask=mask).backward()
        return s.grad.clone(), t.grad.clone()

    threads = torch.get_num_threads()
    try:
        for kind in ("kl", "mse", "infonce"):
            torch.set_num_threads(1)
            one = run(kind)
            torch.set_num_threads(max(2, threads))
            many = run(kind)
            assert all(torch.equal(a, b) for a, b in zip(one, many)), kind
    finally:
        torch.set_num_threads(threads)


# ---- token_relation, backends --------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_token_relation(normalize):
    f = _feats((2, 13, 7), seed=28).requires_grad_()
    f_ref = f.detach().double().requires_grad_()
    tau = torch.tensor(0.8, requires_grad=True)
    r = kdops.token_relation(f, temperature=tau, normalize=normalize)
    expected = ref.token_relation(f_ref, temperature=0.8, normalize=normalize)
    assert r.shape == (2, 13, 13) and r.dtype == torch.float32
    assert_scaled_close(r, expected, 1e-6, "relation")
    weights = torch.randn(r.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (r.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_scaled_close(f.grad, f_ref.grad, 1e-5, "feature grad")
    assert tau.grad is not None


def test_reference_backend():
    s, t = _feats((2, 9, 4), seed=29), _feats((2, 9, 6), seed=30)
    with kdops.use_backend("reference"):
        loss = kdops.relation_kd_loss(s, t, kind="mse", exclude_diagonal=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(kdops.relation_kd_loss(s, t, kind="mse", exclude_diagonal=True), loss)


def test_no_gradient_work_without_grad():
    s, t = _feats((2, 9, 4), seed=31), _feats((2, 9, 6), seed=32)
    with RecordKdopsOps() as rec:
        loss = kdops.relation_kd_loss(s, t)
    assert not loss.requires_grad and rec.ops == ["kdops.relation_kd_loss.default"]


# ---- gradcheck and opcheck ------------------------------------------------------------------


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(kind, exclude_diagonal, normalize):
    widths = (4, 4) if kind == "infonce" else (3, 5)
    s = _feats((2, 6, widths[0]), seed=33, dtype=torch.float64).requires_grad_()
    t = _feats((2, 6, widths[1]), seed=34, dtype=torch.float64).requires_grad_()
    tau = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    mask = _mask("random", 2, 6, seed=35)
    mask[1, :3] = True
    torch.autograd.gradcheck(
        lambda s, t, tau: kdops.relation_kd_loss(s, t, kind=kind, temperature=tau, mask=mask, reduction="none",
                                                 exclude_diagonal=exclude_diagonal, normalize=normalize),
        (s, t, tau),
    )


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_gradcheck_batch_scope_temperature_only(kind, exclude_diagonal):
    """Neither feature requires grad: backward still forms the feature gradients for tau's."""
    widths = (4, 4) if kind == "infonce" else (3, 5)
    s = _feats((2, 5, widths[0]), seed=36, dtype=torch.float64)
    t = _feats((2, 5, widths[1]), seed=37, dtype=torch.float64)
    tau = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda tau: kdops.relation_kd_loss(s, t, kind=kind, temperature=tau, scope="batch",
                                           exclude_diagonal=exclude_diagonal),
        (tau,),
    )


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(kind, exclude_diagonal, normalize):
    widths = (6, 6) if kind == "infonce" else (6, 3)
    s = _feats((2, 7, widths[0]), seed=38).requires_grad_()
    t = _feats((2, 7, widths[1]), seed=39).requires_grad_()
    tau = torch.tensor(0.7)
    mask = _mask("random", 2, 7, seed=40)
    args = (s, t, tau, mask, kind, exclude_diagonal, normalize)
    torch.library.opcheck(torch.ops.kdops.relation_kd_loss.default, args)
    _, stats = torch.ops.kdops.relation_kd_loss(s.detach(), t.detach(), tau, mask, kind, exclude_diagonal,
                                                normalize)
    grad = torch.randn(2, 7)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.kdops.relation_kd_loss_backward.default,
                              (grad, s.detach(), t.detach(), tau, mask, stats, kind, exclude_diagonal, normalize,
                               *flags))


# ---- argument checks ------------------------------------------------------------------------


def _bad_call(which):
    s = _feats((2, 5, 4), seed=41)
    t = _feats((2, 5, 6), seed=42)
    f = kdops.relation_kd_loss
    calls = {
        "student_2d": (lambda: f(s[0], t), "student_feats"),
        "teacher_tokens": (lambda: f(s, t[:, :4]), "teacher_feats"),
        "teacher_dtype": (lambda: f(s, t.double()), "teacher_feats"),
        "student_int": (lambda: f(s.long(), t), "student_feats"),
        "infonce_widths": (lambda: f(s, t, kind="infonce"), "project"),
        "infonce_diagonal": (lambda: f(s, s, kind="infonce", exclude_diagonal=True), "exclude_diagonal"),
        "kind": (lambda: f(s, t, kind="cosine"), "kind"),
        "scope": (lambda: f(s, t, scope="global"), "scope"),
        "reduction": (lambda: f(s, t, reduction="avg"), "reduction"),
        "temperature_zero": (lambda: f(s, t, temperature=0.0), "temperature"),
        "temperature_negative_tensor": (lambda: f(s, t, temperature=torch.tensor(-1.0)), "temperature"),
        "temperature_shape": (lambda: f(s, t, temperature=torch.ones(2)), "temperature"),
        "mask_shape": (lambda: f(s, t, mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
        "mask_dtype": (lambda: f(s, t, mask=torch.ones(2, 5)), "mask"),
        "exclude_not_bool": (lambda: f(s, t, exclude_diagonal="yes"), "exclude_diagonal"),
        "token_relation_2d": (lambda: kdops.token_relation(s[0]), "feats"),
    }
    return calls[which]


@pytest.mark.parametrize("which", [
    "student_2d", "teacher_tokens", "teacher_dtype", "student_int", "infonce_widths", "infonce_diagonal",
    "kind", "scope", "reduction", "temperature_zero", "temperature_negative_tensor", "temperature_shape",
    "mask_shape", "mask_dtype", "exclude_not_bool", "token_relation_2d",
])
def test_bad_arguments_raise_before_any_kernel(which):
    call, match = _bad_call(which)
    with RecordKdopsOps() as recorder, pytest.raises(ValueError, match=match):
        call()
    assert recorder.ops == []


def test_op_checks_its_arguments():
    """The registered op checks on its own too (a direct caller skips the wrapper)."""
    s, t = _feats((2, 5, 4), seed=43), _feats((2, 5, 6), seed=44)
    tau = torch.tensor(1.0)
    with pytest.raises(ValueError, match="infonce needs equal"):
        torch.ops.kdops.relation_kd_loss(s, t, tau, None, "infonce", False, True)
    with pytest.raises(ValueError, match="kind"):
        torch.ops.kdops.relation_kd_loss(s, t, tau, None, "dot", False, True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        torch.ops.kdops.relation_kd_loss(s, t, torch.tensor(0.0), None, "kl", False, True)
    with pytest.raises(ValueError, match="temperature must be a 0-d"):
        torch.ops.kdops.relation_kd_loss(s, t, torch.tensor(1.0, dtype=torch.float64), None, "kl", False,
                                         True)


# ---- memory ---------------------------------------------------------------------------------


def _resident_peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("no VmHWM")


def _reset_resident_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc (Linux)")
def test_memory_far_below_n_squared():
    """N = 16384 tokens, forward + backward of both features: the peak resident memory of the
    call (buffers allocated inside the C++ op included) stays far below one N x N float matrix
    (1 GiB); the inputs and gradients are 1.5 MiB."""
    try:
        _reset_resident_peak()
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    tokens = 16384
    s = _feats((1, tokens, 8), seed=45).requires_grad_()
    t = _feats((1, tokens, 8), seed=46).requires_grad_()
    kdops.relation_kd_loss(s[:, :64], t[:, :64]).backward()  # load and warm everything up first
    s.grad = t.grad = None
    _reset_resident_peak()
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    loss = kdops.relation_kd_loss(s, t, exclude_diagonal=True)
    loss.backward()
    extra_bytes = (_resident_peak_kib() - before) * 1024
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    n_squared_bytes = tokens * tokens * 4
    assert extra_bytes < n_squared_bytes / 32, f"extra {extra_bytes / 2**20:.1f} MiB"


# ---- torch.compile --------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Traced through the fake kernels and the registered autograd (aot_eager keeps it quick)."""
    s = _feats((2, 12, 6), seed=47).requires_grad_()
    t = _feats((2, 12, 4), seed=48).requires_grad_()
    tau = torch.tensor(0.8, requires_grad=True)
    mask = _mask("random", 2, 12, seed=49)

    def f(s, t, tau):
        loss = kdops.relation_kd_loss(s, t, kind="kl", temperature=tau, mask=mask, exclude_diagonal=True)
        return loss + 0.5 * kdops.relation_kd_loss(s, t, kind="mse", scope="batch")

    def run(fn):
        s.grad = t.grad = tau.grad = None
        out = fn(s, t, tau)
        out.backward()
        return out.detach(), s.grad.clone(), t.grad.clone(), tau.grad.clone()

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_gpu_backends_match_reference(kind):
    """Every backend registered for CUDA tensors (none yet besides the reference) against the oracle."""
    s = _feats((2, 40, 16), seed=50).cuda()
    t = _feats((2, 40, 16), seed=51).cuda()
    for backend in kdops.available_backends("relation_kd_loss", s.device):
        with kdops.use_backend(backend):
            _check_against_oracle(s, t, kind=kind, mask=_mask("random", 2, 40, seed=52).cuda())
