"""Autograd shared by the fused-gradient ops (kd_loss, topk_kd_loss, sequence_logprob, ...).

These ops return ``(loss, grad_0, grad_1, ...)``: the forward pass already stored each requested
gradient, multiplied by the reduction's scale. Backward only multiplies a stored gradient by
grad_output: in place when the graph will not run again (no second buffer), out of place when it
is kept or traced, and not at all for ``loss.backward()`` on the CPU (grad_output is a CPU 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _backend


@dataclass(frozen=True)
class FusedGradOp:
    """Where an op's schema keeps what backward needs.

    ``grad_inputs``: positions of the differentiable inputs, in the order of the op's gradient
    outputs and of its ``grad_*`` flags; with ``temperature`` the last one is the temperature (one
    value per row, summed for a 0-d temperature). ``reduction``: position of the reduction
    string, or None for an op whose loss output is always per row (as reduction="none").
    ``first_flag``: position of the first ``grad_*`` flag. ``names``: for error messages.
    """

    name: str
    num_args: int
    grad_inputs: tuple[int, ...]
    names: tuple[str, ...]
    reduction: int | None
    first_flag: int
    temperature: bool = True


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


def _mul_rows_(buffer: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """buffer [N, V] *= factor [N, 1], in place, rounded once. A half-precision buffer times a
    float32 factor column promotes to float32, which a plain in-place mul_ does through [N, V]
    float32 temporaries (several times slower on the CPU): here a block of rows at a time."""
    if buffer.dtype == factor.dtype or buffer.dim() != 2 or buffer.shape[0] != factor.shape[0]:
        return buffer.mul_(factor)
    block = max(1, (1 << 18) // max(1, buffer.shape[-1]))  # about 1 MiB of float32 per block
    for rows, row_factor in zip(buffer.split(block), factor.split(block)):
        rows.copy_(rows.to(factor.dtype).mul_(row_factor))
    return buffer


def register_fused_autograd(op, spec: FusedGradOp) -> None:
    """Register the fused-gradient backward for `op` (a C++ op name or a triton_op)."""
    count = len(spec.grad_inputs)

    def setup_context(ctx, inputs, output):
        buffers = output[1:]
        # The gradient outputs are buffers, not results to differentiate: without this autograd
        # would materialize a zero [N, V] grad_output for each of them in backward.
        ctx.mark_non_differentiable(*buffers)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*buffers)
        ctx.per_row = spec.reduction is None or inputs[spec.reduction] == "none"
        ctx.temperature_is_scalar = spec.temperature and inputs[spec.grad_inputs[-1]].dim() == 0
        ctx.flags = inputs[spec.first_flag : spec.first_flag + count]

    def backward(ctx, grad_loss, *_unused):
        buffers = ctx.saved_tensors
        needed = [ctx.needs_input_grad[i] for i in spec.grad_inputs]
        for name, need, flag in zip(spec.names, needed, ctx.flags):
            if need and not flag:
                raise RuntimeError(
                    f"kdops.{spec.name}: {name} requires grad but the op ran with grad_{name}=False; "
                    f"call kdops.{spec.name} (it sets the flags) instead of the raw op"
                )
        grads = [None] * spec.num_args
        if grad_loss is None:
            return tuple(grads)
        traced = _tracing(grad_loss)
        if torch.is_grad_enabled() and not traced:
            # backward runs with grad mode on only under create_graph=True: the stored gradient
            # has no graph of its own, so second derivatives would silently come out as zero
            raise RuntimeError(f"kdops.{spec.name} does not support double backward (create_graph=True)")
        factor = grad_loss.unsqueeze(-1) if ctx.per_row else grad_loss
        # The buffer may be handed out (or scaled in place) only by the last backward through this
        # graph: autograd may keep a returned tensor as .grad, and a later pass would then
        # accumulate into, or rescale, the very buffer it reads.
        in_place = not traced and not _graph_is_kept()
        unit = in_place and _is_cpu_one(grad_loss)

        def scaled(buffer):
            if unit:  # loss.backward() on the CPU: the buffer already is the gradient
                return buffer
            if not in_place:
                return buffer * factor
            if buffer.is_cuda and _backend.triton_available():
                # skips rows whose factor is 1 on the device: no host sync, no pass over the buffer
                from .kernels.scale import scale_rows_unless_one_

                return scale_rows_unless_one_(buffer, grad_loss)
            return _mul_rows_(buffer, factor) if ctx.per_row else buffer.mul_(factor)

        for j, (position, need) in enumerate(zip(spec.grad_inputs, needed)):
            if not need:
                continue
            if spec.temperature and j == count - 1:  # temperature: per-row values
                d_tau = buffers[j] * grad_loss
                grads[position] = d_tau.sum() if ctx.temperature_is_scalar else d_tau
            else:
                grads[position] = scaled(buffers[j])
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def triton_op_with_autograd(op_name: str, spec: FusedGradOp, _registered: set = set()):  # noqa: B006
    """The Triton op for `op_name`, its autograd registered on first use (a triton_op traces
    its own fake kernel; it shares the C++ op's schema, so the same autograd applies)."""
    from .kernels_registry import triton_ops

    op = triton_ops()[op_name]
    if op not in _registered:
        register_fused_autograd(op, spec)
        _registered.add(op)
    return op
