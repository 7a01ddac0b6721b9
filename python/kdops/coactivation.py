"""Top-k co-activation graph of a model's output distribution (InfiGFusion, DESIGN.md 3.4).

Per sequence, the graph over vocabulary ids is A = sum_t x~_t x~_t^T, x~_t the position's k
largest values of x_t = softmax(z_t / tau) (or of the raw logits), zero elsewhere. InfiGFusion
compares models through the node features f = row sums of A, which need only a scatter-add of
k values per position: the kernels never form the V x V graph.

Kept entries: the k largest logits of a position, larger first and, among equal logits, the
lower id first (the order of a stable descending sort; NaN counts as the largest). Every backend
follows this rule, so ties never make backends disagree.
"""

from __future__ import annotations

import numbers

import torch

from . import _backend, _checks, kernels_registry
from . import reference as _reference

TRANSFORMS = ("softmax", "logits")
MAX_K = 256  # kCoactivationMaxK in csrc/coactivation/coactivation.h


def coactivation_features(
    logits: torch.Tensor,
    k: int,
    *,
    mask: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    transform: str = "softmax",
    normalize: bool = True,
) -> torch.Tensor:
    r"""Node features of each sequence's top-k co-activation graph.

    f_b[j] = sum over valid t of x~_t[j] * s_t with s_t = sum_k v_tk, the row sums of
    A_b = sum_t x~_t x~_t^T, divided by the number of valid positions of sequence b when
    ``normalize`` (a sequence without any has f_b = 0).

    Args:
        logits: ``[B, T, V]`` float32 / float64 / bfloat16 / float16; differentiable (the gradient
            flows through the kept values; for softmax it is dense over the vocabulary).
        k: entries kept per position, 1 <= k <= min(V, 256).
        mask: ``[B, T]`` bool, True where a position counts.
        temperature: a float > 0 or a 0-d tensor (not differentiable here); softmax only.
        transform: ``"softmax"`` (x = softmax(z / tau)) or ``"logits"`` (x = z).
        normalize: divide by the number of valid positions.

    Returns:
        ``[B, V]`` float32 (float64 for float64 logits).
    """
    tau, valid = _check_args(logits, k, mask, temperature, transform)
    backend = _select_backend(logits.device, torch.is_grad_enabled() and logits.requires_grad)
    if backend == "reference":
        features = _reference.coactivation_features(
            logits, k, mask=mask, temperature=tau, transform=transform, normalize=normalize
        )
        return features.to(_checks.acc_dtype(logits.dtype))
    features, _, _, _ = _features_op(backend)(_seq_view(logits), k, tau, valid, transform, bool(normalize))
    return features


def coactivation_graph(
    logits: torch.Tensor,
    k: int,
    *,
    node_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    transform: str = "softmax",
    normalize: bool = True,
) -> torch.Tensor:
    r"""The co-activation graph A restricted to ``node_ids``: ``[B, n, n]``.

    A_b[i, j] = sum over valid t of x~_t[node_i] x~_t[node_j] (divided by the valid positions
    when ``normalize``); with node_ids = arange(V) its row sums are
    :func:`coactivation_features`. Memory O(B T k n): meant for analysis and small graphs.

    Args:
        node_ids: int64 ``[n]`` (the same nodes for every sequence) or ``[B, n]``, in [0, V).
        logits, k, mask, temperature, transform, normalize: as in :func:`coactivation_features`.

    Returns:
        ``[B, n, n]`` float32 (float64 for float64 logits); differentiable in the logits.
    """
    tau, valid = _check_args(logits, k, mask, temperature, transform)
    batch, vocab = logits.shape[0], logits.shape[-1]
    if not isinstance(node_ids, torch.Tensor) or node_ids.dtype != torch.int64:
        raise ValueError(f"node_ids must be an int64 tensor; got {getattr(node_ids, 'dtype', type(node_ids))}")
    if node_ids.dim() not in (1, 2) or (node_ids.dim() == 2 and node_ids.shape[0] != batch):
        raise ValueError(f"node_ids must have shape [n] or [{batch}, n]; got {tuple(node_ids.shape)}")
    if node_ids.device != logits.device:
        raise ValueError(f"node_ids is on {node_ids.device} but the logits are on {logits.device}")
    if node_ids.numel() and not bool(((node_ids >= 0) & (node_ids < vocab)).all()):
        raise ValueError(f"node_ids must lie in [0, V) = [0, {vocab})")

    ids, values = _top_entries(logits, k, tau, valid, transform)
    if valid is not None:
        values = values * valid.unsqueeze(-1)
    nodes = node_ids.expand(batch, -1) if node_ids.dim() == 1 else node_ids
    # x~_t restricted to the nodes: [B, T, n] = sum_k v_tk [idx_tk == node_i]
    hits = ids.unsqueeze(-1) == nodes[:, None, None, :]
    on_nodes = (values.unsqueeze(-1) * hits).sum(2)
    graph = on_nodes.transpose(1, 2) @ on_nodes
    if normalize:
        graph = graph / _valid_positions(logits, valid).view(-1, 1, 1)
    return graph


def _select_backend(device: torch.device, needs_grad: bool) -> str:
    """The backend for coactivation_features. A device without a kernel (CUDA tensors without
    triton or the CUDA build) must ask for the float64 oracle explicitly (use_backend("reference")),
    since it builds a V x V matrix per sequence and would silently exhaust memory at LLM
    vocabulary sizes."""
    backend = _backend.select("coactivation_features", device, needs_grad)
    if backend == "reference" and _backend.forced_backend() != "reference":
        raise RuntimeError(
            f"kdops.coactivation_features has no kernel for {device.type} tensors here (the CPU "
            "build, the CUDA build or triton runs it); use CPU tensors, or "
            "kdops.use_backend('reference') for the float64 oracle on small vocabularies (it "
            "builds a V x V matrix per sequence)"
        )
    return backend


def _features_op(backend: str):
    """The forward op of a kernel backend: the Triton op, or the C++ op (the dispatcher picks
    the CPU or CUDA kernel by device)."""
    if backend == "triton":
        return _triton_features_op()
    return torch.ops.kdops.coactivation_features.default


def _top_entries(logits, k, tau, valid, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position kept ids [B, T, k] (by the op's tie rule) and their values [B, T, k] in the
    accumulate dtype, differentiable in the logits through plain torch."""
    acc = _checks.acc_dtype(logits.dtype)
    backend = _select_backend(logits.device, False)
    if backend == "reference":
        ids, _ = _reference.coactivation.coactivation_topk(logits, k, transform=transform)
    else:
        with torch.no_grad():
            _, ids, _, _ = _features_op(backend)(_seq_view(logits.detach()), k, tau, valid, transform, False)
    z = logits.to(acc)
    x = torch.softmax(z / tau.to(z.device), dim=-1) if transform == "softmax" else z
    return ids, x.gather(-1, ids)


def _valid_positions(logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Valid positions per sequence [B] in the accumulate dtype, at least 1."""
    acc = _checks.acc_dtype(logits.dtype)
    if valid is None:
        return torch.full((logits.shape[0],), float(logits.shape[1]), dtype=acc, device=logits.device)
    return valid.sum(1).to(acc).clamp_min(1)


def _check_args(logits, k, mask, temperature, transform) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every check before any kernel; returns the 0-d accumulate-dtype temperature and the mask."""
    _checks.check_logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V]; got {tuple(logits.shape)}")
    _checks.check_choice("transform", transform, TRANSFORMS)
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= min(vocab, MAX_K):
        raise ValueError(f"k must be an integer in [1, min(V, {MAX_K})] = [1, {min(vocab, MAX_K)}]; got {k!r}")
    valid = _checks.valid_rows(logits.shape[:-1], logits.device, None, -100, mask)
    if isinstance(temperature, torch.Tensor) and temperature.dim() != 0:
        raise ValueError(f"temperature must be a float or a 0-d tensor; got shape {tuple(temperature.shape)}")
    acc = _checks.acc_dtype(logits.dtype)
    tau = _checks.row_temperature(temperature, logits.shape[:-1], 1, acc, logits.device).detach()
    return tau, None if valid is None else valid.reshape(logits.shape[:-1])


def _seq_view(logits: torch.Tensor) -> torch.Tensor:
    """The op's [B, T, V] layout: any batch and sequence strides, a contiguous last dim."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


# ---- registration: fake kernels and autograd ----------------------------------------------


@torch.library.register_fake("kdops::coactivation_features")
def _features_fake(logits, k, temperature, valid, transform, normalize):
    batch, seq, vocab = logits.shape
    acc = _checks.acc_dtype(logits.dtype)
    return (
        logits.new_empty((batch, vocab), dtype=acc),
        logits.new_empty((batch, seq, k), dtype=torch.int64),
        logits.new_empty((batch, seq, k), dtype=acc),
        logits.new_empty((batch, seq), dtype=acc),
    )


@torch.library.register_fake("kdops::coactivation_features_backward")
def _features_backward_fake(grad_features, logits, top_ids, top_values, shifted_lse, temperature, valid,
                            transform, normalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, k, temperature, valid, transform, normalize = inputs
    _, top_ids, top_values, shifted_lse = output
    ctx.save_for_backward(logits, top_ids, top_values, shifted_lse, temperature, valid)
    ctx.transform = transform
    ctx.normalize = normalize
    ctx.mark_non_differentiable(top_ids, top_values, shifted_lse)


def _backward_through(backward_op):
    """The autograd formula of a forward op whose logit gradient `backward_op` computes."""

    def backward(ctx, grad_features, _grad_ids, _grad_values, _grad_lse):
        logits, top_ids, top_values, shifted_lse, temperature, valid = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = backward_op(
                grad_features.to(top_values.dtype).contiguous(), logits, top_ids, top_values, shifted_lse,
                temperature, valid, ctx.transform, ctx.normalize,
            )
        return grad_logits, None, None, None, None, None

    return backward


torch.library.register_autograd(
    "kdops::coactivation_features",
    _backward_through(torch.ops.kdops.coactivation_features_backward.default),
    setup_context=_setup_context,
)


_TRITON_AUTOGRAD_REGISTERED: set = set()


def _triton_features_op():
    """The Triton forward op, its autograd registered on first use (kdops.kernels needs triton, an
    optional dependency): the C++ op's formula through the Triton backward op. A set, not
    functools.cache, remembers the registration: torch.compile ignores cache wrappers and would
    trace the registration again."""
    ops = kernels_registry.triton_ops()
    forward = ops["coactivation_features"]
    if forward not in _TRITON_AUTOGRAD_REGISTERED:
        torch.library.register_autograd(
            forward, _backward_through(ops["coactivation_features_backward"]), setup_context=_setup_context
        )
        _TRITON_AUTOGRAD_REGISTERED.add(forward)
    return forward
