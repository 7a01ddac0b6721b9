"""sequence_logprob: log-probabilities of label sequences under a model's logits (DESIGN.md 3.8).

Scoring a corpus with a language model (MiniPLM's difference sampling, perplexity filters,
reward baselines) needs log softmax(z)[label] per token and nothing else of the [N, V]
log-probabilities. The kernels make one online max / sum-exp sweep over each row and read the
label's logit, so the only traffic is the logits themselves; when the logits require grad, the
same launch also writes d logprob / d logits = onehot(label) - softmax, and backward only scales
those rows by grad_output.
"""

from __future__ import annotations

import torch

from . import _backend, _checks, _fused_grad
from . import reference as _reference

REDUCTIONS = ("mean", "sum", "none")


def sequence_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Per-sequence log-probability of ``labels`` under ``logits``.

    Per position t: ``log_softmax(logits[..., t, :])[labels[..., t]]``, 0 where the label is
    ``ignore_index``. ``labels`` are the targets of the positions as given: for a causal LM score
    ``logits[:, :-1]`` against ``input_ids[:, 1:]`` (shift them yourself, as for the usual
    cross-entropy; a position whose target should not count gets ``ignore_index``).

    Args:
        logits: ``[..., T, V]`` float32 / float64 / bfloat16 / float16 (e.g. ``[B, T, V]``). Rows
            may be strided (a slice of a wider buffer); the last dim is copied once if it is not
            contiguous. ``-inf`` entries are legal (a padded vocabulary).
        labels: ``[..., T]`` integer tensor (int64 or int32 are used as they are). Every label
            that is not ``ignore_index`` must lie in [0, V): CPU tensors are checked before any
            kernel (ValueError); CUDA tensors by a device-side assert (no host sync), and the
            kernels give such a position NaN without reading out of bounds.
        ignore_index: the label of positions that do not count.
        reduction: ``"mean"`` (default): per sequence, the mean over its valid positions, shape
            ``[...]``; a sequence without a valid position gives 0 (never NaN). ``"sum"``: their
            sum, ``[...]``. ``"none"``: the per-token log-probabilities ``[..., T]`` (0 at ignored
            positions).

    Returns:
        float32 (float64 for float64 logits). Differentiable with respect to ``logits``: the
        gradient is computed in the forward pass when (and only when) the logits require grad.

    Example::

        >>> logits = model(input_ids).logits                       # [B, T, V]
        >>> score = kdops.sequence_logprob(logits[:, :-1], input_ids[:, 1:])   # [B]
    """
    _checks.check_logits("logits", logits)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [..., T, V]; got {tuple(logits.shape)}")
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    _check_labels(labels, lead_shape, logits.device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int; got {ignore_index!r}")
    rows = lead_shape.numel()
    flat_labels = labels.reshape(rows)
    if flat_labels.dtype not in (torch.int64, torch.int32):
        flat_labels = flat_labels.long()
    _check_labels_in_range(flat_labels, vocab, ignore_index)

    grad = torch.is_grad_enabled() and logits.requires_grad
    backend = _backend.select("sequence_logprob", logits.device, grad)
    if backend == "reference":
        token = _reference.sequence_logprob(logits, labels, ignore_index=ignore_index, reduction="none")
        token = token.to(_checks.acc_dtype(logits.dtype))
    else:
        token, _ = _sequence_op(backend)(_checks.rows_view(logits), flat_labels.contiguous(), ignore_index, grad)
        token = token.reshape(lead_shape)
    if reduction == "none":
        return token
    total = token.sum(-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(-1)
    return total / count.clamp_min(1).to(total.dtype)


def _check_labels(labels, lead_shape: torch.Size, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != lead_shape:
        raise ValueError(
            f"labels must be a tensor of the logits' leading shape {tuple(lead_shape)}; got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")


def _check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label that is not ignore_index in [0, V). On the CPU a ValueError before any kernel;
    on a GPU (or while compiling) a device-side assert, so no host synchronisation."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "sequence_logprob: labels must lie in [0, V) or equal ignore_index")
    elif bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels must lie in [0, V) = [0, {vocab}) or equal ignore_index ({ignore_index}); got {first}"
        )


# The op's "loss" is token_logprob [rows]: always per row, so backward scales each stored
# gradient row by its own grad_output.
SEQUENCE_LOGPROB = _fused_grad.FusedGradOp(
    name="sequence_logprob", num_args=4, grad_inputs=(0,), names=("logits",), reduction=None,
    first_flag=3, temperature=False,
)


def _sequence_op(backend: str):
    if backend == "triton":
        return _fused_grad.triton_op_with_autograd("sequence_logprob", SEQUENCE_LOGPROB)
    return torch.ops.kdops.sequence_logprob.default  # cpu and cuda: the dispatcher picks by device


def sequence_logprob_fake(logits, labels, ignore_index, grad):
    rows, vocab = logits.shape
    token = logits.new_empty((rows,), dtype=_checks.acc_dtype(logits.dtype))
    grad_logits = logits.new_empty((rows, vocab) if grad else (0,))
    return token, grad_logits


torch.library.register_fake("kdops::sequence_logprob")(sequence_logprob_fake)
_fused_grad.register_fused_autograd("kdops::sequence_logprob", SEQUENCE_LOGPROB)
