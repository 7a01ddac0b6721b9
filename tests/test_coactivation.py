"""Tests of kdops.coactivation_features and kdops.coactivation_graph (DESIGN.md 3.4) against the
float64 oracle kdops.reference.coactivation, which builds every V x V graph and takes row sums:
values and logit gradients over dtypes, both transforms, normalize, masks (all masked included),
k = 1 and k = V, ties, -inf logits, odd and strided shapes, each CPU instruction-set build;
the graph's row sums; gradcheck; opcheck; argument checks before any kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdops
import kdops.reference.coactivation as ref
from record_ops import RecordKdopsOps
from scaled_close import assert_scaled_close

TRANSFORMS = ("softmax", "logits")

# Tolerances. The oracle runs in float64 on the very same (already rounded) logits and selects the
# same ids, so only arithmetic differs: float32 sums of at most T * k products (values relative
# to the largest feature), and for gradients one more rounding to the input dtype (its eps).
FEATURE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _logits(shape, seed, dtype=torch.float32, neg_inf=0.0, ties=False):
    """Normal(0, 2) logits (integers in [0, 4) with ties=True), cast to dtype; neg_inf: the
    fraction of entries set to -inf (one entry per position always stays finite)."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        z = torch.randint(0, 4, shape, generator=gen).float()
    else:
        z = torch.randn(shape, generator=gen) * 2
    if neg_inf:
        drop = torch.rand(shape, generator=gen) < neg_inf
        drop[..., 0] = False
        z = z.masked_fill(drop, float("-inf"))
    return z.to(dtype)


def _mask(kind, batch, seq, seed):
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(batch, seq, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, seq, generator=gen) < 0.6
    mask[0] = False  # one sequence without any valid position
    return mask


def _check_against_oracle(z, k, *, mask=None, temperature=1.0, transform="softmax", normalize=True,
                          grad=True, grad_scale=None, view=lambda t: t):
    """view: applied to the differentiable leaf, so that strided views reach the op as views."""
    kwargs = dict(mask=mask, temperature=temperature, transform=transform, normalize=normalize)
    x = z.clone().requires_grad_(grad)
    features = kdops.coactivation_features(view(x), k, **kwargs)
    assert features.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert features.shape == (view(z).shape[0], view(z).shape[-1])
    x_ref = z.detach().double().requires_grad_(grad)
    expected = ref.coactivation_features(view(x_ref), k, **kwargs)
    assert_scaled_close(features, expected, FEATURE_RTOL[z.dtype], "features")
    assert torch.isfinite(features).all() or not torch.isfinite(expected).all()
    if not grad:
        return
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (features.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    assert x.grad.dtype == z.dtype
    assert_scaled_close(x.grad, x_ref.grad, GRAD_RTOL[z.dtype], "logit gradient", grad_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
def test_matches_oracle(dtype, transform, normalize, mask_kind):
    z = _logits((3, 6, 37), seed=1, dtype=dtype)
    mask = _mask(mask_kind, 3, 6, seed=2)
    _check_against_oracle(z, 5, mask=mask, temperature=1.7, transform=transform, normalize=normalize)


@pytest.mark.parametrize("vocab,k", [(1, 1), (3, 1), (3, 3), (37, 37), (1271, 1), (1271, 10), (1271, 256)])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_sizes_and_k(vocab, k, transform):
    _check_against_oracle(_logits((2, 3, vocab), seed=vocab + k), k, transform=transform,
                          mask=_mask("random", 2, 3, seed=4), grad=vocab < 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_ties_follow_lower_id_first(dtype, transform):
    z = _logits((2, 8, 19), seed=5, dtype=dtype, ties=True)
    _, ids, _, _ = torch.ops.kdops.coactivation_features(
        z, 6, torch.tensor(1.0), None, transform, True)
    expected_ids, _ = ref.coactivation_topk(z, 6, transform=transform)
    assert torch.equal(ids, expected_ids)
    _check_against_oracle(z, 6, transform=transform)


def test_neg_inf_logits():
    z = _logits((2, 5, 41), seed=6, neg_inf=0.8)  # fewer finite entries than k in most positions
    _check_against_oracle(z, 12, mask=_mask("random", 2, 5, seed=7))


def test_large_logits():
    # The saved statistic is shifted by the row's maximum, so large logits keep their low bits. The
    # softmax is then nearly one-hot and p (dv - D) cancels: the gradient is checked against its
    # terms' natural size, max |dv| <= 2 max |dL/df| (s <= 1, normalized), not its own tiny maximum.
    z = _logits((2, 4, 53), seed=26) * 40 + 300
    weights = torch.randn(2, 53, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _check_against_oracle(z, 6, mask=_mask("random", 2, 4, seed=27),
                          grad_scale=2 * weights.abs().max().item())


def test_strided_logits():
    wide = _logits((4, 7, 50), seed=8)

    def rows(t):  # batch and sequence strides, a contiguous last dim
        return t[::2, 1:6, 3:40]

    assert rows(wide).stride(-1) == 1 and not rows(wide).is_contiguous()
    _check_against_oracle(wide, 4, transform="softmax", view=rows)
    # last dim not contiguous: copied once
    _check_against_oracle(wide, 3, view=lambda t: t.transpose(1, 2)[:, :9])


def test_temperature_tensor():
    z = _logits((2, 4, 23), seed=9)
    _check_against_oracle(z, 3, temperature=torch.tensor(0.5))


def test_every_cpu_build_agrees(monkeypatch):
    z = _logits((3, 9, 301), seed=10)
    builds = ["baseline"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        builds.append("avx2")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        builds.append("avx512")
    for isa in builds:
        monkeypatch.setenv("KDOPS_CPU_ISA", isa)
        _check_against_oracle(z, 8, mask=_mask("random", 3, 9, seed=11))


def test_deterministic_across_thread_counts():
    z = _logits((5, 16, 97), seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kdops.coactivation_features(z, 7)
        torch.set_num_threads(max(2, threads))
        many = kdops.coactivation_features(z, 7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---- coactivation_graph ---------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("normalize", [True, False])
def test_graph_row_sums_are_the_features(transform, normalize):
    z = _logits((2, 6, 29), seed=13)
    mask = _mask("random", 2, 6, seed=14)
    kwargs = dict(mask=mask, transform=transform, normalize=normalize, temperature=1.3)
    graph = kdops.coactivation_graph(z, 5, node_ids=torch.arange(29), **kwargs)
    features = kdops.coactivation_features(z, 5, **kwargs)
    assert graph.shape == (2, 29, 29)
    assert_scaled_close(graph.sum(-1), features.double(), 1e-5, "graph row sums")
    torch.testing.assert_close(graph, graph.transpose(1, 2))


def test_graph_matches_oracle_with_per_sequence_nodes():
    z = _logits((3, 5, 31), seed=15, ties=True)
    nodes = torch.stack([torch.randperm(31, generator=torch.Generator().manual_seed(s))[:6] for s in range(3)])
    x = z.clone().requires_grad_()
    graph = kdops.coactivation_graph(x, 4, node_ids=nodes, mask=_mask("random", 3, 5, seed=16))
    x_ref = z.double().requires_grad_()
    expected = ref.coactivation_graph(x_ref, 4, node_ids=nodes, mask=_mask("random", 3, 5, seed=16))
    assert_scaled_close(graph, expected, 1e-5, "graph")
    graph.sum().backward()
    expected.sum().backward()
    assert_scaled_close(x.grad, x_ref.grad, 1e-5, "graph gradient")


# ---- gradcheck and opcheck ------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(transform, normalize):
    z = _logits((2, 4, 11), seed=17, dtype=torch.float64).requires_grad_()
    mask = _mask("random", 2, 4, seed=18)
    mask[0, 1] = True
    torch.autograd.gradcheck(
        lambda x: kdops.coactivation_features(x, 3, mask=mask, temperature=0.7, transform=transform,
                                              normalize=normalize),
        (z,),
    )


def test_gradcheck_graph():
    z = _logits((2, 3, 9), seed=19, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda x: kdops.coactivation_graph(x, 3, node_ids=torch.tensor([0, 4, 8])), (z,))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_opcheck(transform):
    z = _logits((2, 4, 13), seed=20).requires_grad_()
    mask = _mask("random", 2, 4, seed=21)
    tau = torch.tensor(1.5)
    torch.library.opcheck(torch.ops.kdops.coactivation_features.default, (z, 3, tau, mask, transform, True))
    _, ids, values, lse = torch.ops.kdops.coactivation_features(z.detach(), 3, tau, mask, transform, True)
    grad = torch.randn(2, 13)
    torch.library.opcheck(torch.ops.kdops.coactivation_features_backward.default,
                          (grad, z.detach(), ids, values, lse, tau, mask, transform, True))


# ---- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((8,), {}, "k must be"),                        # k > V
        ((0,), {}, "k must be"),
        ((2.0,), {}, "k must be"),
        ((3,), {"transform": "relu"}, "transform"),
        ((3,), {"temperature": 0.0}, "temperature"),
        ((3,), {"temperature": torch.ones(2)}, "temperature"),
        ((3,), {"mask": torch.ones(2, 3, dtype=torch.bool)}, "mask"),
        ((3,), {"mask": torch.ones(2, 4)}, "mask"),
    ],
)
@pytest.mark.parametrize("fn", ["features", "graph"])
def test_bad_arguments_raise_before_any_kernel(args, kwargs, match, fn):
    z = _logits((2, 4, 7), seed=22)
    with RecordKdopsOps() as recorder, pytest.raises(ValueError, match=match):
        if fn == "features":
            kdops.coactivation_features(z, *args, **kwargs)
        else:
            kdops.coactivation_graph(z, *args, node_ids=torch.arange(3), **kwargs)
    assert recorder.ops == []


def test_k_above_256_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="k must be"):
        kdops.coactivation_features(_logits((1, 2, 300), seed=23), 257)
    with pytest.raises(ValueError, match="B, T, V"):
        kdops.coactivation_features(_logits((4, 7), seed=24), 2)
    with pytest.raises(ValueError, match="node_ids"):
        kdops.coactivation_graph(_logits((2, 4, 7), seed=25), 2, node_ids=torch.tensor([7]))
    with pytest.raises(ValueError, match="node_ids"):
        kdops.coactivation_graph(_logits((2, 4, 7), seed=25), 2, node_ids=torch.zeros(3, 2, dtype=torch.int64))


# ---- CUDA kernels (run only where a CUDA device is present) ------------------------------------


def _features_by_scatter(z64, k, *, mask=None, temperature=1.0, transform="softmax", normalize=True):
    """The oracle's features without the V x V graph, for vocabularies where it does not fit:
    f_b = c_b sum_t x~_t s_t from the oracle's kept entries, in float64, differentiable."""
    ids, values = ref.coactivation_topk(z64, k, temperature=temperature, transform=transform)
    if mask is not None:
        values = values * mask.unsqueeze(-1)
    terms = values * values.sum(-1, keepdim=True)
    features = torch.zeros(z64.shape[0], z64.shape[-1], dtype=torch.float64, device=z64.device)
    features = features.scatter_add(1, ids.flatten(1), terms.flatten(1))
    if normalize:
        counted = torch.full((z64.shape[0],), float(z64.shape[1]), dtype=torch.float64) if mask is None \
            else mask.sum(1).double().clamp_min(1)
        features = features / counted.to(z64.device).unsqueeze(-1)
    return features


def test_scatter_oracle_is_the_graph_oracle():
    """The large-vocabulary oracle of the GPU tests agrees with the graph's row sums."""
    z = _logits((3, 5, 29), seed=30, dtype=torch.float64)
    for transform in TRANSFORMS:
        kwargs = dict(mask=_mask("random", 3, 5, seed=31), temperature=0.8, transform=transform)
        torch.testing.assert_close(_features_by_scatter(z, 4, **kwargs), ref.coactivation_features(z, 4, **kwargs),
                                   rtol=1e-12, atol=1e-12)


def _feature_rtol(dtype, vocab):
    """FEATURE_RTOL (set on V <= 1271) plus what a large vocabulary adds in float32 arithmetic:
    each kept value exp((z - z_max) / tau - lse) inherits the rounding of the float32 statistic
    lse <= log V and of the argument (a few times 2^-24 log V), twice in f = c v s."""
    if dtype == torch.float64:
        return FEATURE_RTOL[dtype]
    return FEATURE_RTOL[dtype] + 6 * 2**-24 * math.log(vocab)


def _check_cuda(z, k, *, mask=None, temperature=1.0, transform="softmax", normalize=True, grad=True,
                grad_scale=None, view=None):
    """The cuda backend on z (CPU, copied to the device) against the float64 oracle: ids exactly,
    features within _feature_rtol, the logit gradient within GRAD_RTOL. view(x) (e.g. a strided
    slice) is applied on the device, so the kernel sees its strides; z is then its input."""
    kwargs = dict(temperature=temperature, transform=transform, normalize=normalize)
    x = z.detach().to("cuda").requires_grad_(grad)
    logits = view(x) if view else x
    with kdops.use_backend("cuda"):
        features = kdops.coactivation_features(logits, k, mask=None if mask is None else mask.cuda(), **kwargs)
    assert features.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    z_ref = (view(z) if view else z).detach().double().requires_grad_(grad)
    expected = _features_by_scatter(z_ref, k, mask=mask, **kwargs)
    assert_scaled_close(features.cpu(), expected, _feature_rtol(z.dtype, z.shape[-1]), "features")
    _, ids, _, _ = torch.ops.kdops.coactivation_features(
        logits.detach(), k, torch.tensor(float(temperature), dtype=features.dtype, device="cuda"),
        None if mask is None else mask.cuda(), transform, normalize)
    expected_ids, _ = ref.coactivation_topk(z_ref.detach(), k, transform=transform)
    counted = torch.ones(ids.shape[:2], dtype=torch.bool) if mask is None else mask
    assert torch.equal(ids.cpu()[counted], expected_ids[counted]), "kept ids"
    assert (ids.cpu()[~counted] == 0).all()
    if not grad:
        return
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (features.double() * weights.cuda()).sum().backward()
    (expected * weights).sum().backward()
    grad_in = view(x.grad).cpu() if view else x.grad.cpu()
    assert x.grad.dtype == z.dtype
    assert_scaled_close(grad_in, z_ref.grad, GRAD_RTOL[z.dtype], "logit gradient", grad_scale)
    if view:  # nothing outside the view
        outside = x.grad.clone()
        view(outside).zero_()
        assert (outside == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
def test_gpu_matches_oracle(dtype, transform, normalize, mask_kind):
    z = _logits((3, 6, 37), seed=1, dtype=dtype)
    _check_cuda(z, 5, mask=_mask(mask_kind, 3, 6, seed=2), temperature=1.7, transform=transform,
                normalize=normalize)


# V up to the LLM vocabularies: many steps of the sweep, head/tail elements, k up to 256 (buffer cuts)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,k", [(1, 1), (3, 3), (1271, 256), (50257, 1), (50257, 10), (50257, 256),
                                     (128256, 10)])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gpu_sizes_and_k(dtype, vocab, k, transform):
    _check_cuda(_logits((2, 3, vocab), seed=vocab + k, dtype=dtype), k, transform=transform,
                mask=_mask("random", 2, 3, seed=4), temperature=0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_ties_follow_lower_id_first(dtype):
    # values in {0, 1, 2, 3}: the kept entries all tie at 3, over several steps of the sweep
    _check_cuda(_logits((2, 8, 5003), seed=5, dtype=dtype, ties=True), 20)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [10, 256])
def test_gpu_ascending_rows(k):
    """Every logit beats the ones before it: the candidate buffer overflows on every step."""
    z = torch.arange(20011, dtype=torch.float32).expand(2, 3, -1).contiguous() / 1000
    _check_cuda(z, k, transform="logits")


@pytest.mark.gpu
def test_gpu_shared_ids_across_positions():
    """Positions that keep the same ids: the scatter adds many entries per id and round in order."""
    base = _logits((1, 1, 3000), seed=32)
    z = base + 1e-3 * _logits((2, 40, 3000), seed=33)
    _check_cuda(z, 24, mask=_mask("random", 2, 40, seed=34))
    _check_cuda(z.to(torch.bfloat16), 24)


@pytest.mark.gpu
def test_gpu_neg_inf_and_large_logits():
    _check_cuda(_logits((2, 5, 4001), seed=6, neg_inf=0.995), 12, mask=_mask("random", 2, 5, seed=7))
    z = _logits((2, 4, 4003), seed=26) * 40 + 300
    weights = torch.randn(2, 4003, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _check_cuda(z, 6, mask=_mask("random", 2, 4, seed=27), grad_scale=2 * weights.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_strided_logits(dtype):
    """Batch and sequence strides, rows starting off a 16-byte boundary (head elements; the
    gradient rows are aligned differently, so the backward sweep goes element by element)."""
    wide = _logits((4, 7, 5050), seed=8, dtype=dtype)
    _check_cuda(wide, 9, view=lambda t: t[::2, 1:6, 3:5003])


@pytest.mark.gpu
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gpu_nan_and_all_neg_inf_rows_match_the_cpu_kernel(transform):
    z = _logits((2, 3, 700), seed=35)
    z[0, 1, [5, 600]] = float("nan")
    z[1, 2] = float("-inf")
    args = (4, torch.tensor(1.3), None, transform, True)
    cpu = torch.ops.kdops.coactivation_features(z, *args)
    gpu = torch.ops.kdops.coactivation_features(z.cuda(), 4, args[1].cuda(), None, transform, True)
    assert torch.equal(gpu[1].cpu(), cpu[1])  # ids
    for name, a, b in zip(("features", "values", "shifted_lse"), (gpu[0], gpu[2], gpu[3]), (cpu[0], cpu[2], cpu[3])):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.gpu
def test_gpu_deterministic():
    """Bitwise identical features and gradients run to run (no float atomics)."""
    base = _logits((1, 1, 32000), seed=36).cuda()
    z = (base + 0.05 * torch.randn(4, 256, 32000, device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
    z = z.to(torch.bfloat16).requires_grad_()
    weights = torch.randn(4, 32000, device="cuda")
    runs = []
    for _ in range(3):
        z.grad = None
        with kdops.use_backend("cuda"):
            features = kdops.coactivation_features(z, 16)
        (features * weights).sum().backward()
        runs.append((features, z.grad.clone()))
    for features, grad in runs[1:]:
        assert torch.equal(features, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.gpu
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gpu_gradcheck(transform):
    z = _logits((2, 4, 11), seed=17, dtype=torch.float64).cuda().requires_grad_()
    mask = _mask("random", 2, 4, seed=18).cuda()
    mask[0, 1] = True
    with kdops.use_backend("cuda"):
        torch.autograd.gradcheck(
            lambda x: kdops.coactivation_features(x, 3, mask=mask, temperature=0.7, transform=transform), (z,))


@pytest.mark.gpu
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gpu_opcheck(transform):
    z = _logits((2, 4, 13), seed=20).cuda().requires_grad_()
    mask = _mask("random", 2, 4, seed=21).cuda()
    tau = torch.tensor(1.5, device="cuda")
    torch.library.opcheck(torch.ops.kdops.coactivation_features.default, (z, 3, tau, mask, transform, True))
    _, ids, values, lse = torch.ops.kdops.coactivation_features(z.detach(), 3, tau, mask, transform, True)
    grad = torch.randn(2, 13, device="cuda")
    torch.library.opcheck(torch.ops.kdops.coactivation_features_backward.default,
                          (grad, z.detach(), ids, values, lse, tau, mask, transform, True))


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """B * T * V > 2^31: 64-bit offsets, the last sequence checked against the CPU kernel (itself
    checked against the oracle above)."""
    V, T = 32768, 8
    B = 2**31 // (T * V) + 2
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("not enough device memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(B, T, V, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
    with kdops.use_backend("cuda"):
        features = kdops.coactivation_features(z, 10)
    weights = torch.randn(B, V, device="cuda")
    (features * weights).sum().backward()
    tail = z[-1:].detach().cpu().requires_grad_()
    expected = kdops.coactivation_features(tail, 10)
    (expected * weights[-1:].cpu()).sum().backward()
    assert_scaled_close(features[-1:].cpu(), expected, 1e-5, "features of the last sequence")
    assert_scaled_close(z.grad[-1:].cpu(), tail.grad, 2**-7, "gradient of the last sequence")
