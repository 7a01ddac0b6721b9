"""The Triton coactivation_features ops (kernels/coactivation.py) against the C++ op and the float64
oracle ``kdops.reference.coactivation`` (DESIGN.md 3.4 and 4): the kept ids identical to the C++
op's (the tie rule ranks_before: larger logit first, equal logits lower id first, NaN largest),
values, statistics, features and logit gradients, both transforms, normalize, masks, -inf, NaN
and signed zeros, k = 1 and k = V, strided logits, bitwise-repeatable features, autograd through
the public function, gradcheck and opcheck.

Run on the CPU under the Triton interpreter (a separate pytest run; the variable must be set before
triton is imported):

    TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests/test_coactivation_triton.py

Without TRITON_INTERPRET=1 the same tests run on CUDA tensors where a GPU is present (with bfloat16
and float16 too, and the @pytest.mark.gpu cases), and the module is skipped elsewhere. Shapes are
tiny and the tiles small (several vocabulary tiles, scatter chunks and rank blocks per problem):
the interpreter executes every program in numpy.
"""

from __future__ import annotations

import pytest
import torch

from triton_device import triton_device_or_skip

DEVICE = triton_device_or_skip()

import kdops  # noqa: E402
import kdops.reference.coactivation as ref  # noqa: E402
from kdops.kernels import TRITON_OPS  # noqa: E402
from kdops.kernels import coactivation as triton_coactivation  # noqa: E402
from record_ops import RecordKdopsOps
from scaled_close import assert_scaled_close

pytestmark = [
    pytest.mark.triton_interpret,
    # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

OP = TRITON_OPS["coactivation_features"]
BACKWARD = TRITON_OPS["coactivation_features_backward"]
TRANSFORMS = ("softmax", "logits")
INF = float("inf")
NAN = float("nan")
# the full matrix in half precision on CUDA only (test_half_precision_storage runs it everywhere)
DTYPES = (torch.float32, torch.float64) + ((torch.bfloat16, torch.float16) if DEVICE == "cuda" else ())

# Tolerances, relative to the largest expected magnitude. The oracle runs in float64 on the same
# (already rounded) logits and keeps the same ids, so only arithmetic differs: float32 sums of at
# most T * k products, and for gradients one more rounding to the input dtype (its eps). Against
# the C++ op: the same arithmetic type with sums in another order (and on a GPU, its exp).
FEATURE_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
CPU_RTOL = {torch.float64: 1e-13, torch.float32: 1e-5}

# the launch shapes the kernels use unless a test shrinks them
LAUNCH_SHAPES = ("MAX_BLOCK_V", "SCATTER_CHUNK", "RANK_BLOCK")
DEFAULT_LAUNCH = {name: getattr(triton_coactivation, name) for name in LAUNCH_SHAPES}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Several vocabulary tiles (16 wide, ragged last), scatter chunks and rank blocks."""
    monkeypatch.setattr(triton_coactivation, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(triton_coactivation, "SCATTER_CHUNK", 16)
    monkeypatch.setattr(triton_coactivation, "RANK_BLOCK", 4)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(shape, seed, dtype=torch.float32, neg_inf=0.0, ties=False):
    """Normal(0, 2) logits (integers in [0, 4) with ties=True) on the CPU, cast to dtype; neg_inf:
    the fraction of entries set to -inf (entry 0 of each position stays finite)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 4, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen) * 2
    if neg_inf:
        drop = torch.rand(shape, generator=gen) < neg_inf
        drop[..., 0] = False
        z = z.masked_fill(drop, -INF)
    return z.to(dtype)


def _mask(kind, batch, seq, seed):
    if kind == "none":
        return None
    if kind == "all_masked":
        return torch.zeros(batch, seq, dtype=torch.bool)
    mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[0] = False  # one sequence without any valid position
    return mask


def _run_op(z, k, mask=None, temperature=1.0, transform="softmax", normalize=True):
    """The Triton op on DEVICE and the C++ op on the CPU, both [features, ids, values, lse]."""
    tau = torch.tensor(temperature, dtype=_acc(z.dtype))
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = OP(z.to(DEVICE), k, dev(tau), dev(mask), transform, normalize)
    cpu = torch.ops.kdops.coactivation_features(z.cpu(), k, tau, mask, transform, normalize)
    return [t.cpu() for t in out], cpu


def _check(z, k, *, mask=None, temperature=1.0, transform="softmax", normalize=True, grad=True):
    """Forward: ids identical to the C++ op's (and to the oracle's at valid positions); values,
    statistics and features close to the C++ op's; features close to the oracle's. Backward (for
    random dL/df): the logit gradient close to the oracle's autograd."""
    kwargs = dict(mask=mask, temperature=temperature, transform=transform, normalize=normalize)
    (features, ids, values, lse), (cpu_features, cpu_ids, cpu_values, cpu_lse) = _run_op(z, k, **kwargs)
    acc = _acc(z.dtype)
    assert features.dtype == values.dtype == lse.dtype == acc and ids.dtype == torch.int64
    assert torch.equal(ids, cpu_ids)
    ref_ids, _ = ref.coactivation_topk(z, k, transform=transform)
    counted = torch.ones(z.shape[:2], dtype=torch.bool) if mask is None else mask
    assert torch.equal(ids[counted], ref_ids[counted])
    for name, actual, expected in (("values", values, cpu_values), ("shifted_lse", lse, cpu_lse),
                                   ("features", features, cpu_features)):
        assert_scaled_close(actual, expected, CPU_RTOL[acc], name)
    z64 = z.double().requires_grad_(grad)
    expected = ref.coactivation_features(z64, k, **kwargs)
    assert_scaled_close(features, expected, FEATURE_RTOL[z.dtype], "features")
    if not grad:
        return
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (expected * weights).sum().backward()
    tau = torch.tensor(temperature, dtype=acc, device=DEVICE)
    grad_logits = BACKWARD(weights.to(device=DEVICE, dtype=acc), z.to(DEVICE), ids.to(DEVICE),
                           values.to(DEVICE), lse.to(DEVICE), tau, None if mask is None else mask.to(DEVICE),
                           transform, normalize)
    assert grad_logits.dtype == z.dtype and grad_logits.shape == z.shape
    assert_scaled_close(grad_logits, z64.grad, GRAD_RTOL[z.dtype], "logit gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("mask_kind,normalize", [("random", True), ("none", False), ("all_masked", True)])
def test_matches_cpu_op_and_oracle(dtype, transform, mask_kind, normalize):
    z = _logits((2, 4, 37), seed=1, dtype=dtype)
    _check(z, 5, mask=_mask(mask_kind, 2, 4, seed=2), temperature=1.7, transform=transform,
           normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_storage(dtype):
    """bfloat16 / float16 logits (float32 arithmetic, the gradient rounded to the dtype once) run
    under the interpreter too: the kernels widen every load before any arithmetic."""
    z = _logits((2, 3, 29), seed=3, dtype=dtype)
    _check(z, 4, mask=_mask("random", 2, 3, seed=3), temperature=0.8)


@pytest.mark.parametrize("vocab,k", [(1, 1), (3, 3), (37, 37), (53, 1), (300, 256)])
def test_sizes_and_k(vocab, k, monkeypatch):
    """k = 1, k = V, V = 1, and the largest k (in 4 rank blocks)."""
    monkeypatch.setattr(triton_coactivation, "RANK_BLOCK", 64)
    z = _logits((2, 2, vocab), seed=vocab + k)
    _check(z, k, mask=_mask("random", 2, 2, seed=4) if vocab > 3 else None,
           transform="logits" if k == vocab else "softmax", grad=vocab < 100)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_ties_follow_lower_id_first(transform):
    """Integer logits in [0, 4) (many ties at the k-th value and above it) and a constant row."""
    z = _logits((2, 4, 19), seed=5, ties=True)
    z[1, 2] = 1.5
    _check(z, 6, transform=transform)


def test_neg_inf_logits():
    """Fewer finite logits than k at most positions: the kept -inf entries come lowest id first."""
    z = _logits((2, 4, 41), seed=6, neg_inf=0.8)
    _check(z, 12, mask=_mask("random", 2, 4, seed=7))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_signed_zeros_nan_and_infinities(transform):
    """-0.0 ties with +0.0 (lower id first); NaN ranks above +inf; a NaN or an all -inf position
    gives NaN values and statistics there, as the C++ op does; the ids still follow the rule."""
    rows = torch.tensor([
        [0.0, -0.0, -1.0, 0.0, -0.0, 2.0, -0.0, -3.0],
        [1.0, NAN, INF, -INF, NAN, 3.0, -2.0, 0.0],
        [-INF] * 8,
        [-INF, -5.0, -INF, -5.0, -INF, -INF, -5.0, -INF],
    ])
    z = rows.view(2, 2, 8)
    (features, ids, values, lse), cpu = _run_op(z, 4, transform=transform)
    cpu_features, cpu_ids, cpu_values, cpu_lse = cpu
    assert torch.equal(ids, cpu_ids)
    assert torch.equal(ids, ref.coactivation_topk(z, 4)[0])
    assert ids[0, 0].tolist() == [5, 0, 1, 3]
    assert ids[0, 1].tolist() == [1, 4, 2, 5]
    for name, actual, expected in (("values", values, cpu_values), ("lse", lse, cpu_lse),
                                   ("features", features, cpu_features)):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_radix_level(dtype, sign):
    """Logits one ulp apart around +-1 share every key bit but the last few, so the select needs
    every digit level (6 for float64 keys) and ends on ties at the last one."""
    eps = torch.finfo(dtype).eps
    steps = torch.randint(0, 6, (1, 3, 40), generator=torch.Generator().manual_seed(8))
    z = (sign * (1.0 + steps.to(torch.float64) * eps)).to(dtype)
    assert z.unique().numel() == 6
    _check(z, 9, transform="logits", grad=False)


def test_strided_logits():
    """Batch and sequence strides with a contiguous last dim reach the kernels as they are."""
    wide = _logits((4, 5, 40), seed=9)
    z = wide.to(DEVICE)[::2, 1:4, 3:35]
    assert z.stride(-1) == 1 and not z.is_contiguous()
    tau = torch.tensor(0.7, device=DEVICE)
    features, ids, values, lse = OP(z, 4, tau, None, "softmax", True)
    contiguous = OP(z.contiguous(), 4, tau, None, "softmax", True)
    for actual, expected in zip((features, ids, values, lse), contiguous):
        assert torch.equal(actual, expected)
    cpu = torch.ops.kdops.coactivation_features(wide[::2, 1:4, 3:35], 4, tau.cpu(), None, "softmax", True)
    assert torch.equal(ids.cpu(), cpu[1])
    torch.testing.assert_close(features.cpu(), cpu[0], rtol=1e-6, atol=1e-6)
    grad_features = torch.randn(2, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    grad = BACKWARD(grad_features, z, ids, values, lse, tau, None, "softmax", True)
    expected = BACKWARD(grad_features, z.contiguous(), ids, values, lse, tau, None, "softmax", True)
    assert grad.is_contiguous() and torch.equal(grad, expected)


def test_features_bitwise_repeatable(monkeypatch):
    """The scatter adds each sequence's positions in order, whatever the chunking: the features
    are bitwise identical across runs and scatter chunk widths."""
    z = _logits((2, 5, 29), seed=10)
    mask = _mask("random", 2, 5, seed=11)
    mask[0, 1] = True
    first = _run_op(z, 7, mask=mask)[0][0]
    again = _run_op(z, 7, mask=mask)[0][0]
    monkeypatch.setattr(triton_coactivation, "SCATTER_CHUNK", 4096)
    one_chunk = _run_op(z, 7, mask=mask)[0][0]
    assert torch.equal(first, again) and torch.equal(first, one_chunk)


def test_public_functions_and_autograd():
    """kdops.coactivation_features under use_backend("triton") runs the Triton ops forward and
    backward and matches the oracle; coactivation_graph takes its ids from the Triton op."""
    z = _logits((2, 4, 23), seed=12)
    mask = _mask("random", 2, 4, seed=13)
    x = z.to(DEVICE).requires_grad_()
    with kdops.use_backend("triton"), RecordKdopsOps() as recorder:
        features = kdops.coactivation_features(x, 3, mask=mask.to(DEVICE), temperature=1.3)
        weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(14)).to(DEVICE)
        (features * weights).sum().backward()
        graph = kdops.coactivation_graph(z.to(DEVICE), 3, node_ids=torch.arange(23, device=DEVICE),
                                         mask=mask.to(DEVICE), temperature=1.3)
    assert recorder.ops == ["kdops.coactivation_features_triton.default",
                            "kdops.coactivation_features_backward_triton.default",
                            "kdops.coactivation_features_triton.default"]
    z64 = z.detach().double().requires_grad_()
    expected = ref.coactivation_features(z64, 3, mask=mask, temperature=1.3)
    (expected * weights.double().cpu()).sum().backward()
    assert_scaled_close(features, expected, FEATURE_RTOL[torch.float32], "features")
    assert_scaled_close(x.grad, z64.grad, GRAD_RTOL[torch.float32], "logit gradient")
    assert_scaled_close(graph.sum(-1), expected, 1e-5, "graph row sums")


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradcheck(transform):
    z = _logits((2, 3, 6), seed=15, dtype=torch.float64).to(DEVICE).requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, True]], device=DEVICE)

    def features(x):
        with kdops.use_backend("triton"):
            return kdops.coactivation_features(x, 3, mask=mask, temperature=0.7, transform=transform,
                                               normalize=transform == "softmax")

    torch.autograd.gradcheck(features, (z,), fast_mode=True)


def test_opcheck():
    """Schema, fake kernels and the autograd registration of the Triton ops (the AOT-dispatch
    check traces the kernels through wrap_triton, which the interpreter cannot: CUDA only)."""
    kdops.coactivation._triton_features_op()  # registers the autograd formula on the Triton op
    z = _logits((2, 3, 13), seed=16).to(DEVICE)
    mask = _mask("random", 2, 3, seed=17).to(DEVICE)
    tau = torch.tensor(1.5, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if DEVICE == "cuda" else ())
    torch.library.opcheck(OP, (z.requires_grad_(), 3, tau, mask, "softmax", True), test_utils=utils)
    _, ids, values, lse = OP(z.detach(), 3, tau, mask, "logits", False)
    grad = torch.randn(2, 13).to(DEVICE)
    torch.library.opcheck(BACKWARD, (grad, z.detach(), ids, values, lse, tau, mask, "logits", False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=torch.zeros(3, 5)), "3-D"),
        (dict(z=torch.zeros(2, 3, 5, dtype=torch.int32)), "float32, float64"),
        (dict(z=torch.zeros(2, 5, 3).transpose(1, 2)), "contiguous"),
        (dict(k=6), "k must be"),
        (dict(k=0), "k must be"),
        (dict(tau=torch.tensor(1.0, dtype=torch.float64)), "temperature"),
        (dict(tau=torch.ones(2)), "temperature"),
        (dict(transform="relu"), "transform"),
        (dict(valid=torch.ones(2, 4, dtype=torch.bool)), "valid"),
        (dict(valid=torch.ones(2, 3)), "valid"),
    ],
)
def test_bad_input(change, match):
    args = dict(z=torch.zeros(2, 3, 5), k=2, tau=torch.tensor(1.0), valid=None, transform="softmax")
    args.update(change)
    to_dev = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    a = {name: to_dev(value) for name, value in args.items()}
    with pytest.raises(ValueError, match=match):
        OP(a["z"], a["k"], a["tau"], a["valid"], a["transform"], True)


def test_bad_backward_input():
    z = torch.zeros(2, 3, 5, device=DEVICE)
    tau = torch.tensor(1.0, device=DEVICE)
    _, ids, values, lse = OP(z, 2, tau, None, "softmax", True)
    grad = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="top_ids"):
        BACKWARD(grad, z, ids[0], values, lse, tau, None, "softmax", True)
    with pytest.raises(ValueError, match="top_values"):
        BACKWARD(grad, z, ids, values[:, :, :1], lse, tau, None, "softmax", True)
    with pytest.raises(ValueError, match="shifted_lse"):
        BACKWARD(grad, z, ids, values, lse.double(), tau, None, "softmax", True)
    with pytest.raises(ValueError, match="grad_features"):
        BACKWARD(grad[:, :4], z, ids, values, lse, tau, None, "softmax", True)


# ---- GPU only ---------------------------------------------------------------------------------


def _gpu_check_against_cpu(batch, seq, vocab, k, dtype, transform):
    """A large problem on the GPU against the C++ op on the CPU: ids identical, features and the
    logit gradient (for random dL/df) close."""
    torch.manual_seed(vocab + k)
    z = (torch.randn(batch, seq, vocab) * 3).to(dtype)
    mask = torch.rand(batch, seq) < 0.9
    tau = torch.tensor(1.3)
    (features, ids, values, lse), (cpu_features, cpu_ids, cpu_values, cpu_lse) = _run_op(
        z, k, mask=mask, temperature=1.3, transform=transform)
    assert torch.equal(ids, cpu_ids)
    assert_scaled_close(features, cpu_features, 1e-5, "features")
    assert_scaled_close(values, cpu_values, 1e-5, "values")
    weights = torch.randn(batch, vocab)
    grad = BACKWARD(weights.to(DEVICE), z.to(DEVICE), ids.to(DEVICE), values.to(DEVICE), lse.to(DEVICE),
                    tau.to(DEVICE), mask.to(DEVICE), transform, True)
    cpu_grad = torch.ops.kdops.coactivation_features_backward(
        weights, z, cpu_ids, cpu_values, cpu_lse, tau, mask, transform, True)
    assert_scaled_close(grad, cpu_grad, 2 * GRAD_RTOL[dtype], "logit gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [10, 256])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gpu_llama3_vocab_bf16(k, transform, monkeypatch):
    """Llama-3 sized rows: V = 128256 bf16 logits, 2 x 96 positions, the default launch shapes."""
    for name, value in DEFAULT_LAUNCH.items():
        monkeypatch.setattr(triton_coactivation, name, value)
    _gpu_check_against_cpu(2, 96, 128256, k, torch.bfloat16, transform)


@pytest.mark.gpu
def test_gpu_torch_compile():
    """torch.compile (fullgraph) traces the public function through wrap_triton, forward and
    backward, and matches eager."""
    z0 = _logits((2, 8, 1031), seed=18, dtype=torch.bfloat16).to(DEVICE)
    mask = _mask("random", 2, 8, seed=19).to(DEVICE)

    def f(x):
        return kdops.coactivation_features(x, 16, mask=mask, temperature=1.3).square().sum()

    def run(fn):
        x = z0.clone().requires_grad_()
        with kdops.use_backend("triton"):
            out = fn(x)
        out.backward()
        return out.detach(), x.grad

    torch._dynamo.reset()
    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b, what in zip(eager, compiled, ("value", "logit gradient")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
