"""The CUDA kernels of relation_kd_loss (csrc/relation/relation_cuda.cu) against the float64 oracle
kdops.reference.relation and against the CPU op (DESIGN.md 3.6 and 4): every kind, exclude_diagonal,
both scopes, masks (none, random with a one-token and an empty sequence, all masked), odd N and N
spanning several 64-token tiles, widths that end inside a staged chunk, float64 / float32 /
bfloat16 / float16, raw and (fused) normalized features, tokens of zero and tiny norm, both feature
gradients, backward's row dots and the temperature's gradient, strided and misaligned features
(the element-load path), a forward of one backend with the backward of the other, bitwise
repeatability, gradcheck, opcheck, no feature-sized buffer for normalize, and offsets above 2^31
elements.

Every test needs a CUDA device (@pytest.mark.gpu) and is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import kdops
import kdops.reference.relation as ref
from scaled_close import assert_scaled_close

pytestmark = pytest.mark.gpu

KIND_CASES = [("kl", False), ("kl", True), ("mse", False), ("mse", True), ("infonce", False)]
OP = torch.ops.kdops.relation_kd_loss.default
BACKWARD = torch.ops.kdops.relation_kd_loss_backward.default

# Tolerances, relative to the largest expected magnitude (see _check_against_oracle). The oracle
# runs in float64 on the very same (already rounded) feature values. float32 / bf16 / fp16: the
# relation tiles are float32 sums of exact products (FMA for float32, tensor cores with float32
# accumulation for 16-bit), softmax statistics and losses in float32, so the losses match to float32
# accuracy whatever the input dtype; gradients are rounded once to the input dtype (relative 2^-8
# for bf16, 2^-11 for fp16) after a float32 product M F (tf32 hi + lo for 16-bit, ~2^-21).
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def _feats(shape, seed, dtype=torch.float32, scale=1.0):
    """Normal features drawn on the CPU (the same values whatever the device), then on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).cuda()


def _mask(kind, batch, tokens, seed):
    """none; random (sequence 0 keeps a single token, sequence 2, if any, none); all masked."""
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(batch, tokens, dtype=torch.bool, device="cuda")
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, tokens, generator=gen) < 0.6
    mask[0] = False
    mask[0, tokens // 2] = True
    if batch > 2:
        mask[2] = False
    return mask.cuda()


def _rows_and_grads(student, teacher, weights, backend, **kwargs):
    """Per-token losses and the gradients of sum(rows * weights) for both features."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    with kdops.use_backend(backend):
        rows = kdops.relation_kd_loss(s, t, reduction="none", **kwargs)
        (rows.double() * weights.to(rows.device)).sum().backward()
    return rows.detach(), s.grad, t.grad


def _check_against_oracle(student, teacher, *, loss_rtol=None, grad_rtol=None, **kwargs):
    """The CUDA op's per-token losses and both feature gradients (of a random weighting of the
    tokens) against the float64 oracle on the same values."""
    dtype = student.dtype
    weights = torch.randn(student.shape[:2], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows, gs, gt = _rows_and_grads(student, teacher, weights.cuda(), "cuda", **kwargs)
    assert rows.is_cuda and rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gs.dtype == dtype and gt.dtype == dtype

    cpu_kwargs = dict(kwargs)
    if kwargs.get("mask") is not None:
        cpu_kwargs["mask"] = kwargs["mask"].cpu()
    s_ref = student.detach().cpu().double().requires_grad_()
    t_ref = teacher.detach().cpu().double().requires_grad_()
    expected = ref.relation_kd_loss(s_ref, t_ref, reduction="none", **cpu_kwargs)
    (expected * weights).sum().backward()
    # kl's r = sum p (b - a) + lse_s - lse_t cancels terms of the size of the relation entries,
    # which sets its absolute error; the other kinds are bounded by it too
    temperature = kwargs.get("temperature", 1.0)
    normalize = kwargs.get("normalize", True)
    entries = [ref.token_relation(x.detach().cpu(), temperature=temperature, normalize=normalize)
               for x in (student, teacher)]
    scale = max([expected.abs().max().item()] + [e.abs().max().item() for e in entries if e.numel()])
    assert_scaled_close(rows, expected, loss_rtol or LOSS_RTOL[dtype], "row loss", scale=scale)
    if cpu_kwargs.get("mask") is not None:
        assert (rows.cpu()[~cpu_kwargs["mask"]] == 0).all()
    # A gradient that is exactly 0 in exact arithmetic (a singleton infonce row: softmax 1) comes
    # out as rounding noise where the two passes round s_i s_j / tau in different orders (infonce's
    # column pass with normalize). The floor measures that noise against the features' size.
    floor = 1e-3 * max(student.abs().max().item(), teacher.abs().max().item(), 0.0)
    for got, want, name in ((gs, s_ref.grad, "student grad"), (gt, t_ref.grad, "teacher grad")):
        assert_scaled_close(got, want, grad_rtol or GRAD_RTOL[dtype], name,
                      scale=max(want.abs().max().item(), floor) if want.numel() else None)


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
@pytest.mark.parametrize("tokens", [1, 7, 33, 130])
def test_matches_reference(kind, exclude_diagonal, scope, mask_kind, tokens):
    """N = 130: three row tiles and three column tiles per sequence, the last ones partial."""
    widths = (16, 16) if kind == "infonce" else (12, 20)
    s = _feats((3, tokens, widths[0]), seed=tokens)
    t = _feats((3, tokens, widths[1]), seed=tokens + 1)
    _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude_diagonal, scope=scope,
                          mask=_mask(mask_kind, 3, tokens, seed=2), temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_dtypes(dtype, kind, exclude_diagonal):
    """normalize=False, so the oracle sees exactly the features the kernels see. Widths 72 and 136
    end inside a staged chunk (64 16-bit values, 32 fp32, 16 fp64) and span two and three chunks of
    the gradient product; N = 100 is two tiles."""
    widths = (72, 72) if kind == "infonce" else (72, 136)
    s = _feats((2, 100, widths[0]), seed=3, dtype=dtype, scale=0.15)
    t = _feats((2, 100, widths[1]), seed=4, dtype=dtype, scale=0.15)
    _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude_diagonal, normalize=False,
                          mask=_mask("random", 2, 100, seed=5), temperature=1.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
def test_dtypes_normalized(dtype, kind, exclude_diagonal):
    """normalize=True (fused: tiles scaled by s_i s_j, the radial term in backward) with token
    norms spread over a factor of 20, so that a scale applied to the wrong row or column shows;
    the shapes of test_dtypes."""
    widths = (72, 72) if kind == "infonce" else (72, 136)
    spread = torch.empty(2, 100, 1).uniform_(-1.5, 1.5, generator=torch.Generator().manual_seed(8)).exp()
    s = (_feats((2, 100, widths[0]), seed=3).cpu() * spread).to(dtype).cuda()
    t = (_feats((2, 100, widths[1]), seed=4).cpu() * spread.flip(1)).to(dtype).cuda()
    _check_against_oracle(s, t, kind=kind, exclude_diagonal=exclude_diagonal, normalize=True,
                          mask=_mask("random", 2, 100, seed=5), temperature=0.4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_half_precision_normalized(dtype, kind, scope):
    """normalize=True is fused: float32 products of the given 16-bit values scaled by float32
    inverse norms, no normalized token rounded back to 16 bits, so the tolerances of the raw
    features hold (gradients rounded once to the input dtype)."""
    s = _feats((2, 90, 40), seed=6, dtype=dtype)
    t = _feats((2, 90, 40), seed=7, dtype=dtype)
    _check_against_oracle(s, t, kind=kind, scope=scope, temperature=0.5)


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_and_tiny_norm_tokens(kind, dtype):
    """normalize=True at tokens with |F| <= eps = 1e-12 (all-zero tokens, one of norm 1e-13),
    which F.normalize divides by eps: so do the kernels, without the radial term there. Their
    gradients are about 1e12 times the others', so each is checked against its own size and the
    other tokens against theirs; masked zero-padded tokens get zero gradients. N = 70: two tiles."""
    s = _feats((2, 70, 6), seed=64, dtype=torch.float64).cpu()
    t = _feats((2, 70, 6), seed=65, dtype=torch.float64).cpu()
    s[0, 2] = 0
    t[1, 66] = 0
    s[1, 3] *= 1e-13 / s[1, 3].norm()
    clamped = {"student": [(0, 2), (1, 3)], "teacher": [(1, 66)]}
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[0, 69] = mask[1, 0] = False
    s[0, 69] = t[0, 69] = s[1, 0] = t[1, 0] = 0
    weights = torch.randn(2, 70, generator=torch.Generator().manual_seed(66), dtype=torch.float64)
    rows, gs, gt = _rows_and_grads(s.to(dtype).cuda(), t.to(dtype).cuda(), weights.cuda(), "cuda",
                                   kind=kind, mask=mask.cuda(), temperature=0.7)
    s_ref = s.to(dtype).double().requires_grad_()
    t_ref = t.to(dtype).double().requires_grad_()
    expected = ref.relation_kd_loss(s_ref, t_ref, kind=kind, mask=mask, temperature=0.7, reduction="none")
    (expected * weights).sum().backward()
    assert_scaled_close(rows, expected, LOSS_RTOL[dtype], "row loss",
                  scale=max(1 / 0.7, expected.abs().max().item()))
    # a clamped token's gradient is s_i sum_j M_ij u_j alone: float32 sums of 70 terms
    clamped_rtol = GRAD_RTOL[dtype] if dtype == torch.float64 else 1e-3
    for name, got, want in (("student", gs, s_ref.grad), ("teacher", gt, t_ref.grad)):
        others = torch.ones(2, 70, dtype=torch.bool)
        for g, token in clamped[name]:
            others[g, token] = False
            assert_scaled_close(got[g, token], want[g, token], clamped_rtol, f"{name} grad at [{g}, {token}]")
        assert_scaled_close(got.cpu()[others], want[others], GRAD_RTOL[dtype], f"{name} grad, other tokens")
    assert (gs[0, 69] == 0).all() and (gs[1, 0] == 0).all() and (gt[0, 69] == 0).all()


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
def test_small_temperature(kind):
    """tau = 0.05 on unit tokens: entries up to 20, nearly one-hot softmaxes."""
    s = _feats((2, 70, 16), seed=11)
    t = s + 0.3 * _feats((2, 70, 16), seed=12)
    _check_against_oracle(s, t, kind=kind, temperature=0.05, loss_rtol=1e-4, grad_rtol=1e-4)


def test_strided_and_misaligned_features():
    """Group and token strides, and a start that is not 16-byte aligned: the element-load path."""
    wide = _feats((4, 90, 30), seed=19)
    s = wide[::2, ::3, 5:17]
    t = wide[1::2, 1::3, 2:9]
    assert s.stride(-1) == 1 and not s.is_contiguous() and s.data_ptr() % 16 != 0
    _check_against_oracle(s, t, normalize=False, temperature=3.0)
    _check_against_oracle(wide.transpose(1, 2)[:, :9], wide.transpose(1, 2)[:, 9:18], kind="infonce")
    half = _feats((2, 70, 41), seed=20, dtype=torch.bfloat16)[:, :, 1:]  # 16-byte vectors never line up
    _check_against_oracle(half, half.flip(1).contiguous(), kind="mse", normalize=False)


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_cpu_op(kind, exclude_diagonal, dtype, normalize):
    """The registered ops on CUDA and on the CPU: the same outputs (row_stats included, the layout
    every backend shares), gradients and row dots; a forward of one backend and a backward of the
    other give the same gradients and row dots."""
    widths = (40, 40) if kind == "infonce" else (40, 24)
    s = _feats((3, 150, widths[0]), seed=30, dtype=dtype, scale=0.2)
    t = _feats((3, 150, widths[1]), seed=31, dtype=dtype, scale=0.2)
    valid = _mask("random", 3, 150, seed=32)
    acc = torch.float32
    tau = torch.tensor(0.8, dtype=acc)
    args = (kind, exclude_diagonal, normalize)
    rows, stats = OP(s, t, tau, valid, *args)
    rows_cpu, stats_cpu = OP(s.cpu(), t.cpu(), tau, valid.cpu(), *args)
    scale = max(1.0, stats_cpu.abs().max().item())
    assert_scaled_close(rows, rows_cpu, 3e-5, "row loss", scale=scale)
    assert_scaled_close(stats, stats_cpu, 3e-5, "row stats", scale=scale)

    grad = torch.randn(3, 150, generator=torch.Generator().manual_seed(33))
    grad_rtol = 1e-4 if dtype == torch.float32 else 2**-7
    cpu = BACKWARD(grad, s.cpu(), t.cpu(), tau, valid.cpu(), stats_cpu, *args, True, True)
    cuda = BACKWARD(grad.cuda(), s, t, tau, valid, stats, *args, True, True)
    cross = BACKWARD(grad.cuda(), s, t, tau, valid, stats_cpu.cuda(), *args, True, True)
    back = BACKWARD(grad, s.cpu(), t.cpu(), tau, valid.cpu(), stats.cpu(), *args, True, True)
    runs = (("cuda", cuda), ("cpu forward, cuda backward", cross), ("cuda forward, cpu backward", back))
    for name, got in runs:
        for which, g, want in zip(("student", "teacher"), got[:2], cpu[:2]):
            assert g.dtype == dtype
            assert_scaled_close(g, want, grad_rtol, f"{name}: {which} grad")
        # float32 sums of the same entries whatever the input dtype
        assert got[2].dtype == acc and got[2].shape == (3, 150, 2)
        assert_scaled_close(got[2], cpu[2], 1e-4, f"{name}: row dots")
        assert (got[2].cpu()[~valid.cpu()] == 0).all()
    if kind == "infonce":
        assert (cuda[2][..., 1].abs().sum() > 0).item()  # the column pass's c_t


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradient_flags(kind, normalize):
    """Only the gradients asked for are formed; the other is an empty [0] tensor and its slot of
    row_dots stays 0."""
    width = 24
    s = _feats((2, 70, width), seed=40)
    t = _feats((2, 70, width), seed=41)
    tau = torch.tensor(1.1)
    rows, stats = OP(s, t, tau, None, kind, False, normalize)
    grad = torch.randn(2, 70, device="cuda")
    args = (grad, s, t, tau, None, stats, kind, False, normalize)
    both = BACKWARD(*args, True, True)
    only_s = BACKWARD(*args, True, False)
    only_t = BACKWARD(*args, False, True)
    neither = BACKWARD(*args, False, False)
    assert only_s[1].shape == (0,) and only_t[0].shape == (0,)
    assert neither[0].shape == (0,) and neither[1].shape == (0,)
    assert torch.equal(only_s[0], both[0]) and torch.equal(only_t[1], both[1])
    assert torch.equal(only_s[2][..., 0], both[2][..., 0]) and (only_s[2][..., 1] == 0).all()
    assert torch.equal(only_t[2][..., 1], both[2][..., 1]) and (only_t[2][..., 0] == 0).all()
    assert (neither[2] == 0).all() and (both[2] != 0).any(-1).all()


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_row_dots(kind, exclude_diagonal, normalize):
    """Backward's third output: per token <g, u>, g the gradient of the loss with respect to the
    relation tokens u (normalized or not), against float64 autograd through the oracle. N = 90:
    two tiles of rows and of columns, both halves of every row's columns."""
    widths = (5, 5) if kind == "infonce" else (5, 3)
    s = _feats((2, 90, widths[0]), seed=60, dtype=torch.float64)
    t = _feats((2, 90, widths[1]), seed=61, dtype=torch.float64)
    tau = torch.tensor(0.8, dtype=torch.float64)
    mask = _mask("random", 2, 90, seed=62)
    weights = torch.randn(2, 90, generator=torch.Generator().manual_seed(63), dtype=torch.float64)
    rows, stats = OP(s, t, tau, mask, kind, exclude_diagonal, normalize)
    _, _, dots = BACKWARD(weights.cuda(), s, t, tau, mask, stats, kind, exclude_diagonal, normalize,
                          True, True)
    u = [torch.nn.functional.normalize(x.cpu(), dim=-1) if normalize else x.cpu() for x in (s, t)]
    for x in u:
        x.requires_grad_()
    expected = ref.relation_kd_loss(*u, kind=kind, temperature=0.8, normalize=False, mask=mask.cpu(),
                                    exclude_diagonal=exclude_diagonal, reduction="none")
    (expected * weights).sum().backward()
    for slot, x in enumerate(u):
        assert_scaled_close(dots[..., slot], (x.grad * x.detach()).sum(-1), 1e-10, f"row dots {slot}")


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("features_grad", [True, False])
def test_temperature_tensor_gradient(kind, normalize, features_grad):
    """dL/dtau from the row dots, with and without feature gradients asked for (without, backward
    runs the kernels for the dots alone)."""
    s = _feats((2, 80, 5), seed=20).requires_grad_(features_grad)
    t = _feats((2, 80, 7 if kind != "infonce" else 5), seed=21)
    tau = torch.tensor(0.6, device="cuda", requires_grad=True)
    tau_ref = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    with kdops.use_backend("cuda"):
        kdops.relation_kd_loss(s, t, kind=kind, temperature=tau, normalize=normalize).backward()
    ref.relation_kd_loss(s.detach().cpu(), t.cpu(), kind=kind, temperature=tau_ref,
                         normalize=normalize).backward()
    torch.testing.assert_close(tau.grad.double().cpu(), tau_ref.grad, rtol=1e-4, atol=1e-6)


def test_all_masked_and_empty():
    s, t = _feats((2, 70, 8), seed=50).requires_grad_(), _feats((2, 70, 8), seed=51).requires_grad_()
    mask = torch.zeros(2, 70, dtype=torch.bool, device="cuda")
    with kdops.use_backend("cuda"):
        for kind in ("kl", "mse", "infonce"):
            s.grad = t.grad = None
            loss = kdops.relation_kd_loss(s, t, kind=kind, mask=mask)
            loss.backward()
            assert loss.item() == 0 and (s.grad == 0).all() and (t.grad == 0).all()
        empty = kdops.relation_kd_loss(s[:, :0], t[:, :0], reduction="none")
    assert empty.shape == (2, 0)


@pytest.mark.parametrize("kind", ["kl", "mse", "infonce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_repeatable(kind, dtype):
    """No atomics: every block owns its rows, so two runs agree bit for bit (row dots included)."""
    s = _feats((2, 200, 96), seed=60, dtype=dtype)
    t = _feats((2, 200, 96), seed=61, dtype=dtype)
    mask = _mask("random", 2, 200, seed=62)
    weights = torch.randn(2, 200, generator=torch.Generator().manual_seed(63), dtype=torch.float64).cuda()
    one = _rows_and_grads(s, t, weights, "cuda", kind=kind, mask=mask)
    two = _rows_and_grads(s, t, weights, "cuda", kind=kind, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    tau = torch.tensor(0.9)
    _, stats = OP(s, t, tau, mask, kind, False, True)
    grad = weights.float()
    first, second = (BACKWARD(grad, s, t, tau, mask, stats, kind, False, True, True, True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cuda_is_a_backend_for_cuda_tensors():
    assert "cuda" in kdops.available_backends("relation_kd_loss", torch.device("cuda"))


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(kind, exclude_diagonal, normalize):
    widths = (4, 4) if kind == "infonce" else (3, 5)
    s = _feats((2, 6, widths[0]), seed=70, dtype=torch.float64).requires_grad_()
    t = _feats((2, 6, widths[1]), seed=71, dtype=torch.float64).requires_grad_()
    tau = torch.tensor(0.9, dtype=torch.float64, device="cuda", requires_grad=True)
    mask = _mask("random", 2, 6, seed=72)
    mask[1, :3] = True

    def f(s, t, tau):
        with kdops.use_backend("cuda"):
            return kdops.relation_kd_loss(s, t, kind=kind, temperature=tau, mask=mask, reduction="none",
                                          exclude_diagonal=exclude_diagonal, normalize=normalize)

    torch.autograd.gradcheck(f, (s, t, tau))


@pytest.mark.parametrize("kind,exclude_diagonal", KIND_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(kind, exclude_diagonal, normalize):
    widths = (6, 6) if kind == "infonce" else (6, 3)
    s = _feats((2, 7, widths[0]), seed=80).requires_grad_()
    t = _feats((2, 7, widths[1]), seed=81).requires_grad_()
    tau = torch.tensor(0.7, device="cuda")
    mask = _mask("random", 2, 7, seed=82)
    torch.library.opcheck(OP, (s, t, tau, mask, kind, exclude_diagonal, normalize))
    _, stats = OP(s.detach(), t.detach(), tau, mask, kind, exclude_diagonal, normalize)
    grad = torch.randn(2, 7, device="cuda")
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(BACKWARD, (grad, s.detach(), t.detach(), tau, mask, stats, kind,
                                         exclude_diagonal, normalize, *flags))


@pytest.mark.parametrize("kind", ["kl", "infonce"])
def test_normalize_allocates_no_feature_sized_buffer(kind):
    """float32 features: normalize=True adds only the token norms ([G, N] each) to what the op
    allocates, in forward and in backward (whose gradients are feature-sized either way): no
    normalized copy. Measured as the peak of the CUDA caching allocator during each call."""
    s = _feats((2, 512, 2048), seed=84)
    t = _feats((2, 512, 2048), seed=85)
    tau = torch.tensor(0.7, device="cuda")
    grad = torch.ones(2, 512, device="cuda")

    def peak_of(call):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result

    peaks = {}
    for normalize in (False, True, False, True):  # the first round warms up; the second counts
        forward, (_, stats) = peak_of(lambda: OP(s, t, tau, None, kind, False, normalize))
        backward, _ = peak_of(lambda: BACKWARD(grad, s, t, tau, None, stats, kind, False, normalize,
                                               True, True))
        peaks[normalize] = (forward, backward)
    feature_bytes = s.numel() * s.element_size()
    norms_bytes = 2 * 2 * 512 * 4
    for phase, raw, normalized in zip(("forward", "backward"), peaks[False], peaks[True]):
        assert normalized - raw <= norms_bytes + 4096 < feature_bytes // 100, (phase, raw, normalized)


def test_offsets_above_2_31():
    """G N D > 2^31 elements of each feature tensor (bf16): 64-bit offsets (normalize=True: the
    radial term reads the features too), checked on the last groups against the CPU op on the
    same values."""
    groups, tokens, width = 2**31 // (64 * 256) + 2, 64, 256
    needed = groups * tokens * width * (2 * 2 + 2 * 2 + 2 * 4)  # features, gradients, fp32 workspaces
    if torch.cuda.mem_get_info()[0] < needed + 2**30:
        pytest.skip("not enough device memory")
    gen = torch.Generator(device="cuda").manual_seed(90)
    s = torch.randn(groups, tokens, width, generator=gen, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(groups, tokens, width, generator=gen, device="cuda", dtype=torch.bfloat16)
    tau = torch.tensor(0.25)
    rows, stats = OP(s, t, tau, None, "kl", False, True)
    grad = torch.zeros(groups, tokens, device="cuda")
    grad[-2:] = 1
    gs, gt, dots = BACKWARD(grad, s, t, tau, None, stats, "kl", False, True, True, True)
    tail = slice(groups - 2, groups)
    rows_cpu, stats_cpu = OP(s[tail].cpu(), t[tail].cpu(), tau, None, "kl", False, True)
    gs_cpu, gt_cpu, dots_cpu = BACKWARD(grad[tail].cpu(), s[tail].cpu(), t[tail].cpu(), tau, None,
                                        stats_cpu, "kl", False, True, True, True)
    assert_scaled_close(rows[tail], rows_cpu, 3e-5, "row loss tail", scale=max(1.0, stats_cpu.abs().max().item()))
    assert_scaled_close(gs[tail], gs_cpu, 2**-7, "student grad tail")
    assert_scaled_close(gt[tail], gt_cpu, 2**-7, "teacher grad tail")
    assert_scaled_close(dots[tail], dots_cpu, 1e-4, "row dots tail")
    assert (gs[: groups - 2] == 0).all() and (dots[: groups - 2] == 0).all()
