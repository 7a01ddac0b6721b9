"""kd_loss: temperature-softmax divergences between student and teacher logits (DESIGN.md 3.1).

The kernels compute the loss and, for every input that requires grad, its gradient in the same
sweep over the logits, already scaled by the reduction. Backward then only multiplies the stored
gradient by grad_output, in place when the graph is not kept (retain_graph=False), so the whole
step holds one gradient buffer per differentiable input and nothing else of size [N, V].
"""

from __future__ import annotations

import torch

from . import _backend, _checks
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


def _kd_loss_op(backend: str):
    if backend == "triton":
        from .kernels_registry import triton_ops

        op = triton_ops()["kd_loss"]
        if op not in _triton_registered:
            # same contract as the C++ op, so the same autograd (a triton_op traces its own fake)
            register_autograd(op)
            _triton_registered.add(op)
        return op
    return torch.ops.kdops.kd_loss.default  # cpu and cuda: the dispatcher picks by device


_triton_registered: set = set()


# --- op registration: fake kernel and autograd (shared by the C++ and Triton ops) -------------


def kd_loss_fake(student, teacher, temperature, valid, normalizer, divergence, beta, alpha,
                 reduction, t2_scale, grad_student, grad_teacher, grad_temperature):
    rows, vocab = student.shape
    acc = _checks.acc_dtype(student.dtype)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=acc)

    def grad(wanted):
        return student.new_empty((rows, vocab) if wanted else (0,))

    grad_tau = student.new_empty((rows,) if grad_temperature else (0,), dtype=acc)
    return loss, grad(grad_student), grad(grad_teacher), grad_tau


def _setup_context(ctx, inputs, output):
    student, teacher, temperature = inputs[:3]
    reduction = inputs[8]
    _, grad_student, grad_teacher, grad_temperature = output
    # The gradient outputs are buffers, not results to differentiate: without this autograd
    # would materialize a zero [N, V] grad_output for each of them in backward.
    ctx.mark_non_differentiable(grad_student, grad_teacher, grad_temperature)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_student, grad_teacher, grad_temperature)
    ctx.per_row = reduction == "none"
    ctx.temperature_is_scalar = temperature.dim() == 0
    ctx.flags = inputs[10:13]


def _graph_is_kept() -> bool:
    """True when this backward may run again (retain_graph / create_graph), or when unsure."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):
        return True


def _tracing(tensor: torch.Tensor) -> bool:
    """Inside torch.compile / AOT tracing: the backward becomes a graph, so nothing may be
    mutated in place or read on the host (functionalization would reject it)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (
        torch.compiler.is_compiling()
        or isinstance(tensor, (FakeTensor, FunctionalTensor))
        or torch._is_functional_tensor(tensor)
    )


def _is_cpu_one(grad: torch.Tensor) -> bool:
    """grad_output is a CPU scalar equal to 1 (reading it costs nothing there; never on a GPU)."""
    return grad.device.type == "cpu" and grad.dim() == 0 and bool(grad == 1)


def _backward(ctx, grad_loss, _grad_s, _grad_t, _grad_tau):
    grad_student, grad_teacher, grad_temperature = ctx.saved_tensors
    names = ("student", "teacher", "temperature")
    for i, name in enumerate(names):
        if ctx.needs_input_grad[i] and not ctx.flags[i]:
            raise RuntimeError(
                f"kdops.kd_loss: {name} requires grad but the op ran with grad_{name}=False; "
                "call kdops.kd_loss (it sets the flags) instead of the raw op"
            )
    if grad_loss is None:
        return (None,) * 13
    traced = _tracing(grad_loss)
    if torch.is_grad_enabled() and not traced:
        # backward runs with grad mode on only under create_graph=True: the stored gradient has
        # no graph of its own, so second derivatives would silently come out as zero
        raise RuntimeError("kdops.kd_loss does not support double backward (create_graph=True)")
    factor = grad_loss.unsqueeze(-1) if ctx.per_row else grad_loss
    in_place = not traced and not _graph_is_kept()
    unit = not traced and _is_cpu_one(grad_loss)

    def scaled(buffer):
        if unit:  # loss.backward() on the CPU: the buffer already is the gradient
            return buffer
        if not in_place:
            return buffer * factor
        if buffer.is_cuda and _backend.triton_available():
            # skips rows whose factor is 1 on the device: no host sync, no pass over the buffer
            from .kernels.scale import scale_rows_unless_one_

            return scale_rows_unless_one_(buffer, grad_loss)
        return buffer.mul_(factor)

    d_student = scaled(grad_student) if ctx.needs_input_grad[0] else None
    d_teacher = scaled(grad_teacher) if ctx.needs_input_grad[1] else None
    d_tau = None
    if ctx.needs_input_grad[2]:
        d_tau = grad_temperature * grad_loss
        if ctx.temperature_is_scalar:
            d_tau = d_tau.sum()
    return (d_student, d_teacher, d_tau) + (None,) * 10


def register_autograd(op) -> None:
    """Autograd for an op with the kd_loss schema of csrc/registration.cpp (C++ and Triton)."""
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


torch.library.register_fake("kdops::kd_loss")(kd_loss_fake)
register_autograd("kdops::kd_loss")
