"""fused_linear_kd_loss: the divergence of logits = hidden @ weight.T, a chunk of rows at a time
(DESIGN.md 3.3).

A language model's logits are [tokens, vocab]: at 8192 tokens and a 128256-token vocabulary that
is 2 GiB in bf16 per model, before log-softmaxes and gradients. This op never holds more than one
chunk of rows of them. For each chunk it forms the student (and teacher) logits with a matmul,
runs the fused divergence op on the chunk with the student gradient requested (the op returns
dL/dlogits already scaled by the global reduction), and folds that gradient straight into the
gradients of the hidden states, the weight and the bias. The forward pass therefore ends with
every gradient computed; backward only scales them by grad_output, as for kd_loss.

The op is a composite of torch matmuls and the kdops divergence ops, registered for the CPU and
CUDA dispatch keys; the divergence runs on the backend kdops._backend.select picks for it.
"""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F

from . import _backend, _checks, _fused_grad
from . import reference as _reference
from .divergence import DIVERGENCES, KD_LOSS, REDUCTIONS
from .topk import TOPK_KD_LOSS, _check_ids_in_range, _check_teacher

# The default chunk keeps one float32 [chunk, V] buffer near this many bytes. A chunk holds a few
# such buffers at once (student and teacher logits, the student gradient, and the float tanh of
# each softcapped side), so the extra memory is a small multiple of it, whatever N is.
CHUNK_BUDGET_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}
# Chunks are a multiple of CHUNK_ROW_MULTIPLE rows and never fewer than MIN_CHUNK_ROWS (unless N
# is), whatever V: thin matmuls are slow. On this project's CPU (torch 2.13, 2 vCPUs) the
# [rows, 1024] x [1024, 32000] linear runs at 66 GFLOP/s with 256 rows and 138 with 512; a GPU
# needs a few hundred rows to fill its SMs (Liger's rule of about N H / V rows makes N = 1024
# several times slower than eager there).
CHUNK_ROW_MULTIPLE = 64
MIN_CHUNK_ROWS = 512


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
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
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Distillation loss on ``student_hidden @ student_weight.T (+ student_bias)`` without
    materializing the logits.

    Equals :func:`kdops.kd_loss` (dense teacher) or :func:`kdops.topk_kd_loss` (top-k teacher)
    on the materialized logits, but holds at most ``chunk_size`` rows of logits at a time: the
    extra memory is O(chunk_size * V) whatever the number of rows N. The gradients of the
    student's hidden states, weight and bias (and of a learnable temperature) are computed in
    the forward pass, chunk by chunk; backward only scales them by grad_output.

    Logits are formed as ``F.linear`` forms them, in the inputs' dtype (float32 accumulation
    inside the matmul), exactly the logits a user would materialize; the divergence is then
    computed in float32 (float64 for float64 inputs).

    Exactly one teacher form must be given:

    * ``teacher_logits``: ``[..., V]`` dense logits, used as given (any float dtype; converted
      chunk by chunk to the student's dtype). ``softcap`` does not apply to them.
    * ``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]`` (+ ``teacher_bias``
      ``[V]``): the teacher's logits are formed chunk by chunk like the student's (H_t may
      differ from the student's H; they are converted to the student's dtype).
    * ``teacher_ids`` + ``teacher_logprobs``: ``[..., K]`` top-k log-probabilities, as in
      :func:`kdops.topk_kd_loss` (``renormalize`` applies).

    The teacher is a constant: a teacher tensor that requires grad raises ValueError (detach
    it; distilling into the teacher too needs the materialized :func:`kdops.kd_loss`).

    Args:
        student_hidden: ``[..., H]`` float32 / float64 / bfloat16 / float16.
        student_weight: ``[V, H]`` (an ``nn.Linear`` / LM-head weight), same dtype and device.
        student_bias: optional ``[V]``, same dtype and device.
        divergence, temperature, beta, alpha, labels, ignore_index, mask, normalizer, t2_scale:
            as in :func:`kdops.kd_loss` (``temperature`` may be per row or a learnable 0-d tensor).
        renormalize: top-k teacher only, as in :func:`kdops.topk_kd_loss`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``. With ``"none"`` the per-row losses can be
            weighted arbitrarily in backward, and the weight and bias gradients (sums over rows)
            cannot be formed in the forward pass: the student weight and bias must then not
            require grad (ValueError); use ``"sum"`` / ``"mean"`` with ``mask`` / ``normalizer``.
        softcap: ``logits = softcap * tanh(logits / softcap)`` (Gemma-2 style), applied to the
            student's logits and to a teacher given as hidden + weight; None (default) is off.
        chunk_size: rows per chunk; None picks about ``CHUNK_BUDGET_BYTES / (4 V)`` rows (64 MiB
            of float32 logits per buffer on the CPU, 256 MiB on a GPU), a multiple of 64 rows and
            at least 512 (or N).

    Returns:
        The loss in float32 (float64 for float64 inputs); ``"none"``: per row, leading shape.
        Gradients come back in the inputs' dtypes; the weight and bias gradients are accumulated
        over chunks in float32 and rounded once.

    Backward through the same graph twice (``retain_graph=True``) is supported; double backward
    is not.

    Example::

        >>> h = model(**batch).last_hidden_state                     # [B, T, H]
        >>> with torch.no_grad():
        ...     th = teacher(**batch).last_hidden_state               # [B, T, H_t]
        >>> loss = kdops.fused_linear_kd_loss(
        ...     h, model.lm_head.weight, teacher_hidden=th, teacher_weight=teacher.lm_head.weight,
        ...     divergence="jsd", temperature=2.0, labels=batch["labels"])
        >>> loss.backward()
    """
    _checks.check_choice("divergence", divergence, DIVERGENCES)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    _checks.check_unit_interval("beta", beta)
    _checks.check_unit_interval("alpha", alpha)
    _check_features("student_hidden", student_hidden)
    lead_shape = student_hidden.shape[:-1]
    hidden_size = student_hidden.shape[-1]
    device = student_hidden.device
    _check_linear("student", student_hidden, student_weight, student_bias)
    vocab = student_weight.shape[0]
    rows = lead_shape.numel()
    acc = _checks.acc_dtype(student_hidden.dtype)
    cap = _check_softcap(softcap)
    chunk = _check_chunk_size(chunk_size)

    _check_teacher_form(
        lead_shape, vocab, device, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
        teacher_ids, teacher_logprobs,
    )
    valid = _checks.valid_rows(lead_shape, device, labels, ignore_index, mask)
    tau = _checks.row_temperature(temperature, lead_shape, rows, acc, device)
    norm = _checks.normalizer_tensor(normalizer)
    if teacher_ids is not None:
        k = teacher_ids.shape[-1]
        teacher_ids = teacher_ids.reshape(rows, k)
        _check_ids_in_range(teacher_ids, vocab, valid)
        teacher_logprobs = teacher_logprobs.reshape(rows, k).to(acc)

    grad_on = torch.is_grad_enabled()
    grad_hidden = grad_on and student_hidden.requires_grad
    grad_weight = grad_on and student_weight.requires_grad
    grad_bias = grad_on and student_bias is not None and student_bias.requires_grad
    grad_temperature = grad_on and tau.requires_grad
    if reduction == "none" and (grad_weight or grad_bias):
        raise ValueError(
            "reduction='none' with a student_weight or student_bias that requires grad: their "
            "gradients sum over rows, weighted by a grad_output the forward pass cannot know; use "
            "reduction='sum' or 'mean' (with mask / normalizer), or detach them"
        )

    def rows_of(x):
        return None if x is None else x.reshape(rows, x.shape[-1])

    op_name = "kd_loss" if teacher_ids is None else "topk_kd_loss"
    if _backend.select(op_name, device, grad_hidden or grad_weight or grad_bias or grad_temperature) == "reference":
        loss = _reference.fused_linear_kd_loss(
            student_hidden, student_weight, student_bias=student_bias, teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, divergence=divergence,
            temperature=temperature, beta=beta, alpha=alpha, renormalize=renormalize, labels=labels,
            ignore_index=ignore_index, mask=mask, reduction=reduction, normalizer=normalizer,
            t2_scale=t2_scale, softcap=softcap,
        )
        return loss.to(acc)

    loss, *_ = torch.ops.kdops.fused_linear_kd_loss.default(
        rows_of(student_hidden), student_weight, student_bias,
        None if teacher_logits is None else _checks.rows_view(teacher_logits),
        rows_of(teacher_hidden), teacher_weight, teacher_bias,
        None if teacher_ids is None else teacher_ids.contiguous(),
        None if teacher_logprobs is None else teacher_logprobs.contiguous(),
        tau, valid, norm, divergence, float(beta), float(alpha), bool(renormalize), reduction,
        bool(t2_scale), cap, chunk, grad_hidden, grad_weight, grad_bias, grad_temperature,
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Argument checks (all before any kernel)
# --------------------------------------------------------------------------------------------


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., hidden] with hidden >= 1; got {tuple(x.shape)}")


def _check_linear(side: str, hidden: torch.Tensor, weight, bias) -> None:
    """weight [V, H] and bias [V] match `hidden` [..., H] in dtype and device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{side}_weight must be a tensor; got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"{side}_weight must have shape [V, {hidden.shape[-1]}] (V >= 1, the hidden size of "
            f"{side}_hidden); got {tuple(weight.shape)}"
        )
    tensors = [(f"{side}_weight", weight)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{side}_bias must be a tensor of shape [{weight.shape[0]}]; got "
                f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
            )
        tensors.append((f"{side}_bias", bias))
    for name, t in tensors:
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from {side}_hidden's {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but {side}_hidden is on {hidden.device}")


def _check_constant(name: str, t: torch.Tensor | None) -> None:
    if t is not None and torch.is_grad_enabled() and t.requires_grad:
        raise ValueError(
            f"{name} requires grad, but fused_linear_kd_loss treats the teacher as a constant "
            f"and returns no gradient for it: pass {name}.detach() (or use kdops.kd_loss on "
            f"materialized logits to train the teacher too)"
        )


def _check_teacher_form(lead_shape, vocab, device, logits, hidden, weight, bias, ids, logprobs) -> None:
    """Exactly one teacher form, well shaped and constant."""
    forms = {
        "teacher_logits": logits is not None,
        "teacher_hidden + teacher_weight": hidden is not None or weight is not None or bias is not None,
        "teacher_ids + teacher_logprobs": ids is not None or logprobs is not None,
    }
    given = [name for name, present in forms.items() if present]
    if len(given) != 1:
        raise ValueError(
            "give exactly one teacher: teacher_logits, teacher_hidden + teacher_weight "
            f"(+ teacher_bias), or teacher_ids + teacher_logprobs; got {', '.join(given) or 'none'}"
        )
    for name, t in (("teacher_logits", logits), ("teacher_hidden", hidden), ("teacher_weight", weight),
                    ("teacher_bias", bias), ("teacher_logprobs", logprobs)):
        _check_constant(name, t)
    if logits is not None:
        _checks.check_logits("teacher_logits", logits)
        if logits.shape != lead_shape + (vocab,):
            raise ValueError(
                f"teacher_logits must have shape {tuple(lead_shape + (vocab,))} (the student's rows "
                f"and vocabulary); got {tuple(logits.shape)}"
            )
        if logits.device != device:
            raise ValueError(f"teacher_logits is on {logits.device} but student_hidden is on {device}")
        return
    if given[0].startswith("teacher_hidden"):
        if hidden is None or weight is None:
            raise ValueError("a teacher given by its hidden states needs both teacher_hidden and teacher_weight")
        _check_features("teacher_hidden", hidden)
        if hidden.shape[:-1] != lead_shape:
            raise ValueError(
                f"teacher_hidden must have shape [..., H_t] with the student's leading shape "
                f"{tuple(lead_shape)}; got {tuple(hidden.shape)}"
            )
        if hidden.device != device:
            raise ValueError(f"teacher_hidden is on {hidden.device} but student_hidden is on {device}")
        _check_linear("teacher", hidden, weight, bias)
        if weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_weight must have the student's vocabulary: shape [{vocab}, "
                f"{hidden.shape[-1]}]; got {tuple(weight.shape)}"
            )
        return
    if ids is None or logprobs is None:
        raise ValueError("a top-k teacher needs both teacher_ids and teacher_logprobs")
    _check_teacher(ids, logprobs, lead_shape, vocab, device)


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0.0 < float(softcap) < float("inf"):
        raise ValueError(f"softcap must be None (off) or a finite number > 0; got {softcap!r}")
    return float(softcap)


def _check_chunk_size(chunk_size) -> int:
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None (automatic) or an integer >= 1; got {chunk_size!r}")
    return int(chunk_size)


def default_chunk_rows(rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk when chunk_size is None (see CHUNK_BUDGET_BYTES)."""
    budget = CHUNK_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
    chunk = budget // (4 * vocab) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(1, min(rows, max(chunk, MIN_CHUNK_ROWS)))


# --------------------------------------------------------------------------------------------
# The kernel: chunks of rows through linear -> softcap -> divergence -> gradient matmuls
# --------------------------------------------------------------------------------------------


def _linear_logits(hidden, weight, bias, softcap: float, acc: torch.dtype):
    """(logits in hidden's dtype, tanh(raw / softcap) in acc dtype or None) of one chunk.

    The tanh is kept in the accumulate dtype for the softcap chain rule: 1 - tanh^2 from
    rounded bf16 logits would lose most of its digits where tanh is close to 1."""
    logits = F.linear(hidden, weight, bias)
    if not softcap:
        return logits, None
    tanh = logits.to(acc).div_(softcap).tanh_()  # in place when logits already are acc
    return (tanh * softcap).to(logits.dtype), tanh


@functools.cache
def _cuda_addmm_has_float32_out(device_index: int) -> bool:
    """Whether this torch's CUDA addmm accumulates bf16 products into a float32 `out` that is
    also its `self` (torch.addmm(..., out_dtype=torch.float32)); older versions require `self`
    in the inputs' dtype."""
    a = torch.ones(2, 2, device=torch.device("cuda", device_index), dtype=torch.bfloat16)
    acc = torch.zeros(2, 2, device=a.device, dtype=torch.float32)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _add_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc += grad_logits.T @ hidden, accumulated in acc's dtype (float32 or float64)."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.T, hidden)
    elif grad_logits.is_cuda and _cuda_addmm_has_float32_out(grad_logits.device.index or 0):
        torch.addmm(acc, grad_logits.T, hidden, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype matmul here (the CPU): a float32 copy of the chunk's operands
        acc.addmm_(grad_logits.T.to(acc.dtype), hidden.to(acc.dtype))


def _grad_accumulator(wanted: bool, like: torch.Tensor | None) -> torch.Tensor | None:
    """A zero buffer to accumulate a gradient of `like` over chunks: `like`'s own dtype when it
    is float32 / float64 (the result is accumulated in place), else float32 (rounded once)."""
    if not wanted or like is None:
        return None
    return torch.zeros_like(like, dtype=_checks.acc_dtype(like.dtype))


def _divergence_step(backend, student, teacher_logits, teacher_ids, teacher_logprobs, tau, valid,
                     normalizer, options, grad_student, grad_temperature):
    """(loss, dL/dstudent or None, dL/dtau per row or None) of one chunk of logits."""
    divergence, beta, alpha, renormalize, reduction, t2_scale = options
    if teacher_ids is None:
        op = (_fused_grad.triton_op_with_autograd("kd_loss", KD_LOSS) if backend == "triton"
              else torch.ops.kdops.kd_loss.default)
        loss, grad, _, grad_tau = op(student, teacher_logits, tau, valid, normalizer, divergence, beta,
                                     alpha, reduction, t2_scale, grad_student, False, grad_temperature)
    else:
        op = (_fused_grad.triton_op_with_autograd("topk_kd_loss", TOPK_KD_LOSS) if backend == "triton"
              else torch.ops.kdops.topk_kd_loss.default)
        loss, grad, _, grad_tau = op(student, teacher_ids, teacher_logprobs, tau, valid, normalizer,
                                     divergence, beta, alpha, renormalize, reduction, t2_scale,
                                     grad_student, False, grad_temperature)
    return loss, grad if grad_student else None, grad_tau if grad_temperature else None


def fused_linear_kd_loss_kernel(
    hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_ids,
    teacher_logprobs, temperature, valid, normalizer, divergence, beta, alpha, renormalize, reduction,
    t2_scale, softcap, chunk_size, grad_hidden, grad_weight, grad_bias, grad_temperature,
):
    rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc = _checks.acc_dtype(hidden.dtype)
    chunk = chunk_size or default_chunk_rows(rows, vocab, device)
    grad_logits_wanted = grad_hidden or grad_weight or grad_bias
    op_name = "kd_loss" if teacher_ids is None else "topk_kd_loss"
    backend = _backend.select(op_name, device, grad_logits_wanted or grad_temperature)
    if backend == "reference":
        raise RuntimeError(
            f"kdops::fused_linear_kd_loss needs a {op_name} kernel for {device.type} tensors; the "
            f"reference backend runs kdops.fused_linear_kd_loss through its float64 oracle instead"
        )
    # A Python-number temperature or normalizer arrives as a CPU scalar: move it to the device
    # once here rather than once per chunk inside the divergence op.
    temperature = temperature.to(device)
    if normalizer is not None:
        normalizer = normalizer.to(device=device, dtype=acc)

    # Each chunk is reduced with the global scale, so that the chunks' losses and gradients add
    # up to the whole batch's: "mean" divides every chunk by the normalizer or by the number of
    # valid rows in the whole batch, counted on the device (no host synchronisation).
    if reduction == "mean" and normalizer is None:
        if valid is None:
            normalizer = torch.full((), float(max(rows, 1)), dtype=acc, device=device)
        else:
            normalizer = valid.sum().to(acc).clamp_(min=1)
    options = (divergence, beta, alpha, renormalize, reduction, t2_scale)

    loss = torch.zeros((rows,) if reduction == "none" else (), dtype=acc, device=device)
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else None
    d_weight = _grad_accumulator(grad_weight, weight)
    d_bias = _grad_accumulator(grad_bias, bias)
    d_tau = torch.empty(rows, dtype=acc, device=device) if grad_temperature else None

    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        h = hidden[part]
        student, student_tanh = _linear_logits(h, weight, bias, softcap, acc)
        if teacher_hidden is not None:
            teacher, _ = _linear_logits(teacher_hidden[part], teacher_weight, teacher_bias, softcap, acc)
        else:
            teacher = None if teacher_logits is None else teacher_logits[part]
        if teacher is not None and teacher.dtype != student.dtype:
            teacher = teacher.to(student.dtype)
        chunk_loss, grad, grad_tau = _divergence_step(
            backend, student, teacher,
            None if teacher_ids is None else teacher_ids[part],
            None if teacher_logprobs is None else teacher_logprobs[part],
            temperature if temperature.dim() == 0 else temperature[part],
            None if valid is None else valid[part],
            normalizer, options, grad_logits_wanted, grad_temperature,
        )
        del student, teacher
        if reduction == "none":
            loss[part] = chunk_loss
        else:
            loss += chunk_loss
        if grad_temperature:
            d_tau[part] = grad_tau
        if grad is None:
            continue
        if student_tanh is not None:  # d softcap*tanh(x/softcap) / dx = 1 - tanh^2
            grad = student_tanh.square_().neg_().add_(1).mul_(grad).to(grad.dtype)
            del student_tanh
        if grad_hidden:
            torch.mm(grad, weight, out=d_hidden[part])
        if grad_weight:
            _add_weight_grad(d_weight, grad, h)
        if grad_bias:
            d_bias += grad.sum(0, dtype=d_bias.dtype)
        del grad

    def result(buffer, like):
        if buffer is None:
            return hidden.new_empty(0) if like is None else like.new_empty(0)
        return buffer.to(like.dtype)  # no copy when accumulated in like's own dtype

    return (loss, result(d_hidden, hidden), result(d_weight, weight), result(d_bias, bias),
            d_tau if grad_temperature else hidden.new_empty(0, dtype=acc))


def fused_linear_kd_loss_fake(
    hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_ids,
    teacher_logprobs, temperature, valid, normalizer, divergence, beta, alpha, renormalize, reduction,
    t2_scale, softcap, chunk_size, grad_hidden, grad_weight, grad_bias, grad_temperature,
):
    rows = hidden.shape[0]
    acc = _checks.acc_dtype(hidden.dtype)
    loss = hidden.new_empty((rows,) if reduction == "none" else (), dtype=acc)

    def grad(wanted, like):
        if not wanted or like is None:
            return hidden.new_empty(0) if like is None else like.new_empty(0)
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    grad_tau = hidden.new_empty((rows,) if grad_temperature else (0,), dtype=acc)
    return loss, grad(grad_hidden, hidden), grad(grad_weight, weight), grad(grad_bias, bias), grad_tau


FUSED_LINEAR_KD_LOSS = _fused_grad.FusedGradOp(
    name="fused_linear_kd_loss", num_args=24, grad_inputs=(0, 1, 2, 9),
    names=("hidden", "weight", "bias", "temperature"), reduction=16, first_flag=20,
)

torch.library.register_kernel("kdops::fused_linear_kd_loss", ("cpu", "cuda"), fused_linear_kd_loss_kernel)
torch.library.register_fake("kdops::fused_linear_kd_loss")(fused_linear_kd_loss_fake)
_fused_grad.register_fused_autograd("kdops::fused_linear_kd_loss", FUSED_LINEAR_KD_LOSS)
