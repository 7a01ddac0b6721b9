"""topk_kd_loss: distillation from a teacher known only on K token ids per row (DESIGN.md 3.2).

vLLM and SGLang return a teacher's top-k log-probabilities, not its logits; storing those is how
large-scale offline distillation keeps the teacher's signal at K numbers per token. The kernels
never build a dense teacher: one sweep over the student row gives its softmax statistics, the K
entries give the loss, and the gradient is written in one more sweep (the dense softmax term plus
K sparse corrections).
"""

from __future__ import annotations

import torch

from . import _backend, _checks, _fused_grad
from . import reference as _reference

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
MAX_K = 4096  # kTopKMaxK in csrc/topk/topk.h: the GPU kernels hold a row's K entries on chip


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: str = "fkl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    renormalize: bool = True,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    t2_scale: bool = False,
) -> torch.Tensor:
    r"""Divergence between the student's softmax and a teacher given on K ids per row.

    Per row, with a = student_logits / tau and b_k = teacher_logprobs_k / tau: the teacher is
    lp = log_softmax(b) over its K entries when ``renormalize`` (default), else lp = b as given,
    and p = exp(lp). Dividing stored log-probabilities by tau and renormalizing gives exactly the
    tempered teacher softmax(z_t / tau) restricted to the K ids, whatever temperature the
    log-probabilities were taken at 1. Without renormalization p is used as given (meant for
    tau = 1: log-probabilities that already are the teacher's at the distillation temperature).

    ``fkl`` is exact against the student's full-vocabulary softmax:
    sum_k p_k (lp_k - log q[id_k]), q = softmax(a) over all V; its gradient is the dense term
    q * sum_k p_k minus p at the ids. ``rkl``, ``jsd``, ``skew_fkl``, ``skew_rkl`` and ``tvd``
    are kd_loss's formulas on the K support, with the student renormalized over the K ids
    (jsd with beta = 0 / 1 is KL(p || q) / KL(q || p) on that support). Their student gradient
    is zero off the ids.

    Args:
        student_logits: ``[..., V]`` float32 / float64 / bfloat16 / float16.
        teacher_ids: ``[..., K]`` int64 or int32, 1 <= K <= min(V, 4096). Every id of a counted
            row must lie in [0, V): CPU tensors are checked before the kernel (ValueError); CUDA
            tensors by a device-side assert (no host sync), and the kernel also gives such a row a
            NaN loss. Duplicate ids count as separate entries (their gradients add up).
        teacher_logprobs: ``[..., K]`` floating point; ``-inf`` marks an empty slot (p = 0).
            Converted to float32 (float64 for float64 logits); differentiable.
        temperature, labels, ignore_index, mask, reduction, normalizer, t2_scale, beta, alpha:
            as in :func:`kdops.kd_loss`.

    Returns:
        The loss in float32 (float64 for float64 logits).

    Example::

        >>> ids, lp = teacher_topk_ids, teacher_topk_logprobs       # [B, T, 64] each, from vLLM
        >>> loss = kdops.topk_kd_loss(student_logits, ids, lp, temperature=2.0, labels=labels)
    """
    _checks.check_logits("student_logits", student_logits)
    _checks.check_choice("divergence", divergence, DIVERGENCES)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    _checks.check_unit_interval("beta", beta)
    _checks.check_unit_interval("alpha", alpha)
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    device = student_logits.device
    acc = _checks.acc_dtype(student_logits.dtype)
    rows = lead_shape.numel()
    k = _check_teacher(teacher_ids, teacher_logprobs, lead_shape, vocab, device)
    valid = _checks.valid_rows(lead_shape, device, labels, ignore_index, mask)
    tau = _checks.row_temperature(temperature, lead_shape, rows, acc, device)
    norm = _checks.normalizer_tensor(normalizer)
    ids = teacher_ids.reshape(rows, k)
    _check_ids_in_range(ids, vocab, valid)
    logprobs = teacher_logprobs.reshape(rows, k).to(acc)

    grad_on = torch.is_grad_enabled()
    grad_student = grad_on and student_logits.requires_grad
    grad_teacher = grad_on and logprobs.requires_grad
    grad_temperature = grad_on and tau.requires_grad
    backend = _backend.select("topk_kd_loss", device, grad_student or grad_teacher or grad_temperature)
    if backend == "reference":
        loss = _reference.topk_kd_loss(
            student_logits, teacher_ids, teacher_logprobs, divergence=divergence,
            temperature=temperature, beta=beta, alpha=alpha, renormalize=renormalize,
            labels=labels, ignore_index=ignore_index, mask=mask, reduction=reduction,
            normalizer=normalizer, t2_scale=t2_scale,
        )
        return loss.to(acc)

    op = _topk_op(backend)
    loss, _, _, _ = op(
        _checks.rows_view(student_logits), ids.contiguous(), logprobs.contiguous(), tau, valid, norm,
        divergence, float(beta), float(alpha), bool(renormalize), reduction, bool(t2_scale),
        grad_student, grad_teacher, grad_temperature,
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss


def _check_teacher(ids, logprobs, lead_shape, vocab, device) -> int:
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
        if t.dim() < 1 or t.shape[:-1] != lead_shape:
            raise ValueError(
                f"{name} must have shape [..., K] with the logits' leading shape {tuple(lead_shape)}; "
                f"got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the logits are on {device}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_ids must be int64 or int32; got {ids.dtype}")
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher_logprobs must have teacher_ids' shape {tuple(ids.shape)}; got {tuple(logprobs.shape)}"
        )
    if not logprobs.dtype.is_floating_point:
        raise ValueError(f"teacher_logprobs must be floating point; got {logprobs.dtype}")
    k = ids.shape[-1]
    if not 1 <= k <= min(vocab, MAX_K):
        raise ValueError(f"K = teacher_ids.shape[-1] must be in [1, min(V, {MAX_K})] = "
                         f"[1, {min(vocab, MAX_K)}]; got {k}")
    return k


def _check_ids_in_range(ids: torch.Tensor, vocab: int, valid: torch.Tensor | None) -> None:
    """Every id of a counted row in [0, V). On the CPU a ValueError before any kernel; on a GPU
    (or while compiling) a device-side assert, so no host synchronisation."""
    bad = (ids < 0) | (ids >= vocab)
    if valid is not None:
        bad = bad & valid.unsqueeze(-1)
    if ids.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "topk_kd_loss: teacher_ids must lie in [0, V)")
    elif bool(bad.any()):
        first = ids[bad][0].item()
        raise ValueError(f"teacher_ids must lie in [0, V) = [0, {vocab}) on counted rows; got {first}")


TOPK_KD_LOSS = _fused_grad.FusedGradOp(
    name="topk_kd_loss", num_args=15, grad_inputs=(0, 2, 3),
    names=("student", "teacher", "temperature"), reduction=10, first_flag=12,
)


def _topk_op(backend: str):
    if backend == "triton":
        return _fused_grad.triton_op_with_autograd("topk_kd_loss", TOPK_KD_LOSS)
    return torch.ops.kdops.topk_kd_loss.default  # cpu and cuda: the dispatcher picks by device


def topk_kd_loss_fake(student, teacher_ids, teacher_logprobs, temperature, valid, normalizer,
                      divergence, beta, alpha, renormalize, reduction, t2_scale, grad_student,
                      grad_teacher, grad_temperature):
    rows, vocab = student.shape
    k = teacher_ids.shape[1]
    acc = _checks.acc_dtype(student.dtype)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    grad_s = student.new_empty((rows, vocab) if grad_student else (0,))
    grad_t = student.new_empty((rows, k) if grad_teacher else (0,), dtype=acc)
    grad_tau = student.new_empty((rows,) if grad_temperature else (0,), dtype=acc)
    return loss, grad_s, grad_t, grad_tau


torch.library.register_fake("kdops::topk_kd_loss")(topk_kd_loss_fake)
_fused_grad.register_fused_autograd("kdops::topk_kd_loss", TOPK_KD_LOSS)
