"""Token relation distillation (DESIGN.md 3.6; TRG's relation losses, relation KD).

A relation matrix compares every token of a set with every other: R = F F^T / tau over the
(optionally L2-normalized) token features F. Relation distillation matches the student's rows to
the teacher's after a softmax, so student and teacher may have different widths. The kernels tile
R as flash attention tiles its scores: blocks of rows at a time, the per-row softmax statistics
and loss accumulated per row, and a backward that recomputes the tiles from the saved statistics.
No N x N matrix is stored, and L2 normalization is fused (the kernels scale each relation entry by
its two tokens' inverse norms; no normalized copy is made): extra memory is O(B N) besides the
gradients themselves, a few block-sized strips per thread on the CPU, and on CUDA for bf16/fp16
inputs an fp32 accumulator of the gradient's size in backward.

Matrix products: BLAS on the CPU (one thread per task: results do not depend on the thread count),
tensor cores for bf16/fp16 on CUDA (wmma) and Triton (tl.dot), fp32 accumulation everywhere; fp32
inputs stay IEEE fp32 (no TF32) on CUDA C++, and follow torch.get_float32_matmul_precision() in
Triton ("high" opts in to TF32).
"""

from __future__ import annotations

import numbers

import torch

from . import _backend, _checks
from . import reference as _reference

KINDS = ("kl", "mse", "infonce")
SCOPES = ("sequence", "batch")
REDUCTIONS = ("mean", "sum", "none")
NUM_ROW_STATS = 4  # kRelationStats in csrc/relation/relation.h
NUM_ROW_DOTS = 2  # kRelationDots


def relation_kd_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    kind: str = "kl",
    temperature: float | torch.Tensor = 1.0,
    normalize: bool = True,
    mask: torch.Tensor | None = None,
    exclude_diagonal: bool = False,
    scope: str = "sequence",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Distance between the student's and the teacher's token relations, per token.

    For each token i that counts, its columns J_i are the valid tokens of its set (its own
    sequence for ``scope="sequence"``; every valid token of the batch for ``scope="batch"``),
    less i itself when ``exclude_diagonal``; n_i = |J_i|. With a = R_s[i], b = R_t[i] on those
    columns, q = softmax(a) (student) and p = softmax(b) (teacher):

    ===========  ================================================================================
    ``kl``       r_i = KL(p || q) = sum_j p_j (log p_j - log q_j)
    ``mse``      r_i = (1/n_i) sum_j (p_j - q_j)^2
    ``infonce``  r_i = logsumexp_j C_ij - C_ii,  C = F_s F_t^T / tau (the diagonal is the positive)
    ===========  ================================================================================

    Args:
        student_feats: ``[B, N, D_s]`` float32 / float64 / bfloat16 / float16 token features.
        teacher_feats: ``[B, N, D_t]``, the student's dtype and device. D_t may differ from D_s
            for ``kl`` and ``mse``; ``infonce`` needs D_s == D_t (project one side first).
        kind: ``"kl"``, ``"mse"`` or ``"infonce"``.
        temperature: a number > 0 or a 0-d tensor; a tensor that requires grad gets its gradient.
            TRG's contextual loss uses tau = sqrt(D) with ``normalize=False``.
        normalize: use L2-normalized tokens (``F.normalize``'s rule, eps 1e-12). Fused: the
            kernels multiply each raw inner product by the two tokens' 1 / max(|F|, eps),
            computed in float32 (float64 for float64 features); the normalized features are
            never formed, so bf16 / fp16 inputs are not rounded again after normalization.
        mask: ``[B, N]`` bool, True where a token counts (as a row and as a column). Tokens that
            do not count get zero weights, but their features still enter the matrix products:
            keep them finite (zero padding is fine; NaN padding would spread).
        exclude_diagonal: leave each token out of its own row (``kl``, ``mse`` only).
        scope: ``"sequence"`` or ``"batch"`` (all valid tokens of the batch form one set).
        reduction: ``"mean"`` (sum of r_i over the tokens that count / their number; 0, never
            NaN, when none count), ``"sum"``, or ``"none"`` (``[B, N]``, 0 where a token does
            not count).

    Returns:
        float32 (float64 for float64 features); differentiable with respect to both features
        and a tensor temperature.

    Decisions:

    - A token that counts but has no columns (``exclude_diagonal`` with a single valid token in
      its set) has r_i = 0 and gradient 0, and still counts in the ``"mean"`` denominator.
    - ``mse`` divides each row by its own n_i, so ``"mean"`` is the mean over (i, j) pairs within
      a sequence, and across sequences of different lengths every token weighs the same.
    - Arithmetic in float32 (float64 for float64 features): the relation strips are formed by
      BLAS in that type (bf16 / fp16 features are converted once), softmax statistics and losses
      accumulate in it, gradients are rounded once to the input dtype.
    - The temperature's gradient comes from per-token dot products the backward kernels return
      along with the feature gradients: the loss depends on the tokens u (normalized or not) only
      through u u^T / tau, so dL/dtau = -(sum_i <g_s,i, u_s,i> + <g_t,i, u_t,i>) / (2 tau)
      (kl, mse) or -sum_i <g_s,i, u_s,i> / tau (infonce), g the gradients with respect to u.
      A temperature that requires grad therefore makes backward run the feature-gradient
      kernels even when the features themselves do not require grad.
    - Results do not depend on the number of threads.
    """
    tau, valid, acc = _check_loss_args(student_feats, teacher_feats, kind, temperature, mask,
                                       exclude_diagonal, scope, reduction)
    batch, tokens = student_feats.shape[:2]
    needs_grad = torch.is_grad_enabled() and (
        student_feats.requires_grad or teacher_feats.requires_grad or tau.requires_grad)
    backend = _backend.select("relation_kd_loss", student_feats.device, needs_grad)
    if backend == "reference":
        rows = _reference.relation.relation_row_loss(
            student_feats, teacher_feats, kind=kind, temperature=temperature, normalize=normalize,
            mask=mask, exclude_diagonal=exclude_diagonal, scope=scope,
        ).to(acc)
    else:
        student = _last_dim_contiguous(student_feats)
        teacher = _last_dim_contiguous(teacher_feats)
        if scope == "batch":
            student = student.reshape(1, batch * tokens, student.shape[-1])
            teacher = teacher.reshape(1, batch * tokens, teacher.shape[-1])
            valid = None if valid is None else valid.reshape(1, batch * tokens)
        rows, _ = _relation_op(backend)(student, teacher, tau, valid, kind, exclude_diagonal,
                                        normalize)
        rows = rows.reshape(batch, tokens)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(rows.numel(), 1)
    return total / mask.sum().clamp_min(1).to(acc)


def token_relation(
    feats: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    r"""The relation matrix R = F F^T / tau of each sequence, ``[B, N, N]``, materialized.

    F is ``feats`` ``[B, N, D]``, L2-normalized per token when ``normalize`` (as in
    :func:`relation_kd_loss`). For small N, analysis and tests: it stores B N^2 values, which is
    what :func:`relation_kd_loss` avoids. float32 (float64 for float64 features); differentiable
    in ``feats`` and a tensor temperature.
    """
    _check_features("feats", feats)
    acc = _checks.acc_dtype(feats.dtype)
    tau = _temperature(temperature, acc, feats.device)
    f = feats.to(acc)
    if normalize:
        f = torch.nn.functional.normalize(f, dim=-1, eps=_NORMALIZE_EPS)
    return f @ f.transpose(-1, -2) / tau.to(f.device)


def _last_dim_contiguous(feats: torch.Tensor) -> torch.Tensor:
    """The features as the op takes them: any batch and token strides, a contiguous last dim."""
    return feats if feats.stride(-1) == 1 or feats.shape[-1] == 1 else feats.contiguous()


_NORMALIZE_EPS = 1e-12  # F.normalize's default; kRelationNormEps in csrc/relation/relation.h


def _check_features(name: str, feats) -> None:
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(feats).__name__}")
    if feats.dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16; got {feats.dtype}")
    if feats.dim() != 3 or feats.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [B, N, D] with D >= 1; got {tuple(feats.shape)}")


def _temperature(temperature, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """The temperature as the op takes it: a 0-d accumulate-type tensor (autograd kept)."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() != 0:
        raise ValueError(f"temperature must be a number or a 0-d tensor; got shape "
                         f"{tuple(temperature.shape)}")
    if not isinstance(temperature, (torch.Tensor, numbers.Real)) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number > 0 or a 0-d tensor; got {temperature!r}")
    return _checks.row_temperature(temperature, torch.Size([]), 1, acc, device)


def _check_loss_args(student, teacher, kind, temperature, mask, exclude_diagonal, scope, reduction):
    """Every check before any kernel; returns the temperature tensor, the [B, N] mask (or None)
    and the accumulate dtype."""
    _check_features("student_feats", student)
    _check_features("teacher_feats", teacher)
    _checks.check_choice("kind", kind, KINDS)
    _checks.check_choice("scope", scope, SCOPES)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    if teacher.shape[:2] != student.shape[:2]:
        raise ValueError(f"teacher_feats must have the student's [B, N] = {list(student.shape[:2])}; "
                         f"got {list(teacher.shape[:2])}")
    if teacher.dtype != student.dtype:
        raise ValueError(f"teacher_feats dtype {teacher.dtype} differs from the student's {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_feats is on {teacher.device} but student_feats is on {student.device}")
    if kind == "infonce" and teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"infonce needs equal widths; got student D = {student.shape[-1]} and teacher D = "
            f"{teacher.shape[-1]}: project the student (or the teacher) to a common width first")
    if not isinstance(exclude_diagonal, bool):
        raise ValueError(f"exclude_diagonal must be a bool; got {exclude_diagonal!r}")
    if kind == "infonce" and exclude_diagonal:
        raise ValueError("exclude_diagonal must be False for infonce: the diagonal is the positive pair")
    valid = _checks.valid_rows(student.shape[:2], student.device, None, -100, mask)
    acc = _checks.acc_dtype(student.dtype)
    tau = _temperature(temperature, acc, student.device)
    return tau, None if valid is None else valid.reshape(student.shape[:2]), acc


# ---- backends, fake kernels and autograd ---------------------------------------------------


def _relation_op(backend: str):
    """The forward op of `backend` (cpu and cuda: the C++ op, the dispatcher picks by device)."""
    if backend == "triton":
        from .kernels_registry import triton_ops

        ops = triton_ops()
        forward = ops["relation_kd_loss"]
        if forward not in _TRITON_AUTOGRAD:
            _register_autograd(forward, ops["relation_kd_loss_backward"])
            _TRITON_AUTOGRAD.add(forward)
        return forward
    return torch.ops.kdops.relation_kd_loss.default


_TRITON_AUTOGRAD: set = set()


@torch.library.register_fake("kdops::relation_kd_loss")
def _relation_fake(student, teacher, temperature, valid, kind, exclude_diagonal, normalize):
    groups, tokens = student.shape[:2]
    acc = _checks.acc_dtype(student.dtype)
    return (student.new_empty((groups, tokens), dtype=acc),
            student.new_empty((groups, tokens, NUM_ROW_STATS), dtype=acc))


@torch.library.register_fake("kdops::relation_kd_loss_backward")
def _relation_backward_fake(grad_row_loss, student, teacher, temperature, valid, row_stats, kind,
                            exclude_diagonal, normalize, student_grad, teacher_grad):
    groups, tokens = student.shape[:2]
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)),
            row_stats.new_empty((groups, tokens, NUM_ROW_DOTS)))


def _register_autograd(forward_op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        student, teacher, temperature, valid, kind, exclude_diagonal, normalize = inputs
        _, row_stats = output
        ctx.save_for_backward(student, teacher, temperature, valid, row_stats)
        ctx.kind = kind
        ctx.exclude_diagonal = exclude_diagonal
        ctx.normalize = normalize
        ctx.mark_non_differentiable(row_stats)

    def backward(ctx, grad_row_loss, _grad_row_stats):
        student, teacher, temperature, valid, row_stats = ctx.saved_tensors
        need_student, need_teacher, need_tau = ctx.needs_input_grad[:3]
        infonce = ctx.kind == "infonce"
        # dL/dtau comes from the feature gradients: both for self relations, the student's for C
        student_grad = need_student or need_tau
        teacher_grad = need_teacher or (need_tau and not infonce)
        if not (student_grad or teacher_grad):
            return None, None, None, None, None, None, None
        acc = row_stats.dtype
        grad_student, grad_teacher, row_dots = backward_op(
            grad_row_loss.to(acc).contiguous(), student, teacher, temperature, valid, row_stats,
            ctx.kind, ctx.exclude_diagonal, ctx.normalize, student_grad, teacher_grad,
        )
        grad_tau = None
        if need_tau:
            # relation.h: infonce's sum is the student's slot alone (the teacher's, when asked
            # for, holds the same total by columns); self relations count every entry twice
            inner = row_dots[..., 0].sum() if infonce else row_dots.sum() / 2
            grad_tau = (-inner / temperature.to(inner.device)).to(temperature.device)
        return (grad_student if need_student else None, grad_teacher if need_teacher else None,
                grad_tau, None, None, None, None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


_register_autograd("kdops::relation_kd_loss", torch.ops.kdops.relation_kd_loss_backward.default)
