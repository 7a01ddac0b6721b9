"""Tests of kdops.coactivation_features and kdops.coactivation_graph (DESIGN.md 3.4) against the
float64 oracle kdops.reference.coactivation, which builds every V x V graph and takes row sums:
values and logit gradients over dtypes, both transforms, normalize, masks (all masked included),
k = 1 and k = V, ties, -inf logits, odd and strided shapes, each CPU instruction-set build;
the graph's row sums; gradcheck; opcheck; argument checks before any kernel.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdops
import kdops.reference.coactivation as ref

TRANSFORMS = ("softmax", "logits")

# Tolerances. The oracle runs in float64 on the very same (already rounded) logits and selects the
# same ids, so only arithmetic differs: float32 sums of at most T * k products (values relative
# to the largest feature), and for gradients one more rounding to the input dtype (its eps).
FEATURE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


class RecordKdopsOps(TorchDispatchMode):
    """Records every kdops::* operator that reaches the dispatcher inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kdops":
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


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


def _assert_close(actual, expected, rtol, what, scale=None):
    """Max error within rtol of `scale`, by default the largest expected magnitude."""
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30) + 1e-300, f"{what}: max error {err} vs scale {scale}"


def _check_against_oracle(z, k, *, mask=None, temperature=1.0, transform="softmax", normalize=True,
                          grad=True, grad_scale=None):
    kwargs = dict(mask=mask, temperature=temperature, transform=transform, normalize=normalize)
    x = z.clone().requires_grad_(grad)
    features = kdops.coactivation_features(x, k, **kwargs)
    assert features.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert features.shape == (z.shape[0], z.shape[-1])
    x_ref = z.detach().double().requires_grad_(grad)
    expected = ref.coactivation_features(x_ref, k, **kwargs)
    _assert_close(features, expected, FEATURE_RTOL[z.dtype], "features")
    assert torch.isfinite(features).all() or not torch.isfinite(expected).all()
    if not grad:
        return
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (features.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    assert x.grad.dtype == z.dtype
    _assert_close(x.grad, x_ref.grad, GRAD_RTOL[z.dtype], "logit gradient", grad_scale)


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
    z = wide[::2, 1:6, 3:40]  # batch and sequence strides, a contiguous last dim
    assert z.stride(-1) == 1 and not z.is_contiguous()
    _check_against_oracle(z, 4, transform="softmax")
    _check_against_oracle(wide.transpose(1, 2)[:, :9], 3)  # last dim not contiguous: copied once


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
    _assert_close(graph.sum(-1), features.double(), 1e-5, "graph row sums")
    torch.testing.assert_close(graph, graph.transpose(1, 2))


def test_graph_matches_oracle_with_per_sequence_nodes():
    z = _logits((3, 5, 31), seed=15, ties=True)
    nodes = torch.stack([torch.randperm(31, generator=torch.Generator().manual_seed(s))[:6] for s in range(3)])
    x = z.clone().requires_grad_()
    graph = kdops.coactivation_graph(x, 4, node_ids=nodes, mask=_mask("random", 3, 5, seed=16))
    x_ref = z.double().requires_grad_()
    expected = ref.coactivation_graph(x_ref, 4, node_ids=nodes, mask=_mask("random", 3, 5, seed=16))
    _assert_close(graph, expected, 1e-5, "graph")
    graph.sum().backward()
    expected.sum().backward()
    _assert_close(x.grad, x_ref.grad, 1e-5, "graph gradient")


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


@pytest.mark.gpu
def test_gpu_tensors_raise_until_a_kernel_exists():
    """No CUDA kernel yet: a clear error rather than the V x V float64 oracle by default."""
    logits = torch.randn(1, 4, 50, device="cuda")
    with pytest.raises(RuntimeError, match="no kernel for cuda"):
        kdops.coactivation_features(logits, 3)
    with kdops.use_backend("reference"):
        assert kdops.coactivation_features(logits, 3).shape == (1, 50)
