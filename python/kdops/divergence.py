"""kd_loss: temperature-softmax divergences between student and teacher logits (DESIGN.md 3.1).

The kernels compute the loss and, for every input that requires grad, its gradient in the same
sweep over the logits, already scaled by the reduction. Backward then only multiplies the stored
gradient by grad_output, in place when the graph is not kept (retain_graph=False), so the whole
step holds one gradient buffer per differentiable input and nothing else of size [N, V].
"""

from __future__ import annotations

import torch

from . import _backend, _checks, _fused_grad
from . import reference as _reference

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "fkl",
    temperature: float | torch.Tensor = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    t2_scale: bool = False,
) -> torch.Tensor:
    r"""Divergence between the tempered softmaxes of student and teacher logits, per row.

    With a = z_s / tau, b = z_t / tau, q = softmax(a) (student), p = softmax(b) (teacher):

    ============  =============================================================================
    fkl           KL(p || q)
    rkl           KL(q || p)
    jsd           beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q. beta = 0
                  is exactly fkl and beta = 1 exactly rkl (TRL's GKD convention: the endpoints
                  are the plain KLs, not the vanishing limits of the mixture formula)
    skew_fkl      KL(p || alpha p + (1 - alpha) q)  (DistiLLM)
    skew_rkl      KL(q || (1 - alpha) p + alpha q)
    tvd           1/2 sum |p - q|, subgradient sign(0) = 0
    ============  =============================================================================

    Args:
        student_logits, teacher_logits: ``[..., V]``, same shape, dtype (float32, float64,
            bfloat16, float16) and device. Rows may be strided; the last dim is copied once if it
            is not contiguous. ``-inf`` entries are allowed (0 log 0 = 0).
        temperature: a number > 0, a tensor of the leading shape or ``[N]`` (one per row), or a
            0-d tensor; a tensor that requires grad gets its gradient.
        beta: jsd mixing weight in [0, 1].  alpha: skew weight in [0, 1].
        labels, ignore_index: rows whose label equals ignore_index do not count.
        mask: bool, leading shape; False rows do not count (combined with labels by AND).
        reduction: ``"mean"`` (over counted rows; 0 when none count), ``"sum"`` or ``"none"``
            (per row, leading shape, 0 for rows that do not count).
        normalizer: replaces the mean's denominator (e.g. ``num_items_in_batch``); a number > 0
            or a 0-d tensor (a tensor is not checked, to avoid a device sync).
        t2_scale: multiply each row's loss by tau^2 (Hinton's scaling).

    Returns:
        The loss in float32 (float64 for float64 logits); gradients come back in the logits' dtype.

    Arithmetic is float32 for every low-precision input. Backward through the same graph twice
    (``retain_graph=True``) is supported; double backward (``create_graph=True``) is not.

    Example::

        >>> s = torch.randn(8, 32000, requires_grad=True); t = torch.randn(8, 32000)
        >>> loss = kdops.kd_loss(s, t, divergence="jsd", beta=0.5, temperature=2.0)
        >>> loss.backward()
    """
    _checks.check_logits("student_logits", student_logits)
    _checks.check_logits("teacher_logits", teacher_logits)
    _checks.check_pair(student_logits, teacher_logits, "teacher_logits")
    _checks.check_choice("divergence", divergence, DIVERGENCES)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    _checks.check_unit_interval("beta", beta)
    _checks.check_unit_interval("alpha", alpha)

    lead_shape = student_logits.shape[:-1]
    device = student_logits.device
    acc = _checks.acc_dtype(student_logits.dtype)
    rows = lead_shape.numel()
    valid = _checks.valid_rows(lead_shape, device, labels, ignore_index, mask)
    tau = _checks.row_temperature(temperature, lead_shape, rows, acc, device)
    norm = _checks.normalizer_tensor(normalizer)

    grad_on = torch.is_grad_enabled()
    grad_student = grad_on and student_logits.requires_grad
    grad_teacher = grad_on and teacher_logits.requires_grad
    grad_temperature = grad_on and tau.requires_grad
    backend = _backend.select("kd_loss", device, grad_student or grad_teacher or grad_temperature)
    if backend == "reference":
        loss = _reference.kd_loss(
            student_logits, teacher_logits, divergence=divergence, temperature=temperature,
            beta=beta, alpha=alpha, labels=labels, ignore_index=ignore_index, mask=mask,
            reduction=reduction, normalizer=normalizer, t2_scale=t2_scale,
        )
        return loss.to(acc)

    op = _kd_loss_op(backend)
    loss, _, _, _ = op(
        _checks.rows_view(student_logits),
        _checks.rows_view(teacher_logits),
        tau,
        valid,
        norm,
        divergence,
        float(beta),
        float(alpha),
        reduction,
        bool(t2_scale),
        grad_student,
        grad_teacher,
        grad_temperature,
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss


KD_LOSS = _fused_grad.FusedGradOp(
    name="kd_loss", num_args=13, grad_inputs=(0, 1, 2), names=("student", "teacher", "temperature"),
    reduction=8, first_flag=10,
)


def _kd_loss_op(backend: str):
    if backend == "triton":
        return _fused_grad.triton_op_with_autograd("kd_loss", KD_LOSS)
    return torch.ops.kdops.kd_loss.default  # cpu and cuda: the dispatcher picks by device


def kd_loss_fake(student, teacher, temperature, valid, normalizer, divergence, beta, alpha,
                 reduction, t2_scale, grad_student, grad_teacher, grad_temperature):
    rows, vocab = student.shape
    acc = _checks.acc_dtype(student.dtype)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=acc)

    def grad(wanted):
        return student.new_empty((rows, vocab) if wanted else (0,))

    grad_tau = student.new_empty((rows,) if grad_temperature else (0,), dtype=acc)
    return loss, grad(grad_student), grad(grad_teacher), grad_tau


torch.library.register_fake("kdops::kd_loss")(kd_loss_fake)
_fused_grad.register_fused_autograd("kdops::kd_loss", KD_LOSS)
