"""Float64 oracle of ``kdops.kd_loss`` (DESIGN.md sections 2 and 3.1)."""

from __future__ import annotations

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")

_NEG_INF = float("-inf")


def _kl(logx: Tensor, logy: Tensor) -> Tensor:
    """Row-wise KL(x || y) = sum x (log x - log y) from log-probabilities, with 0 * log 0 = 0.

    Where x == 0 the term is 0 and no gradient flows through it (so -inf entries in both
    operands give no NaN); where x > 0 and y == 0 the term is +inf, as it truly is.
    """
    x = logx.exp()
    diff = torch.where(x > 0, logx - logy, torch.zeros_like(logx))
    return (x * diff).sum(-1)


def _log_mix(logx: Tensor, logy: Tensor, w: float) -> Tensor:
    """log(w x + (1 - w) y), stable (logaddexp) and free of NaN gradients where x = y = 0."""
    if w == 0.0:
        return logy
    if w == 1.0:
        return logx
    both_zero = (logx == _NEG_INF) & (logy == _NEG_INF)
    lx = torch.where(both_zero, torch.zeros_like(logx), logx)
    ly = torch.where(both_zero, torch.zeros_like(logy), logy)
    w_t = torch.tensor(w, dtype=torch.float64, device=logx.device)
    mixed = torch.logaddexp(lx + w_t.log(), ly + torch.log1p(-w_t))
    return torch.where(both_zero, torch.full_like(mixed, _NEG_INF), mixed)


def _row_divergence(logq: Tensor, logp: Tensor, divergence: str, beta: float, alpha: float) -> Tensor:
    """Per-row divergence; logq is the student's log-softmax, logp the teacher's."""
    if divergence == "fkl" or (divergence == "jsd" and beta == 0.0):
        return _kl(logp, logq)
    if divergence == "rkl" or (divergence == "jsd" and beta == 1.0):
        return _kl(logq, logp)
    if divergence == "jsd":
        logm = _log_mix(logp, logq, beta)
        return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)
    if divergence == "skew_fkl":
        return _kl(logp, _log_mix(logp, logq, alpha))
    if divergence == "skew_rkl":
        return _kl(logq, _log_mix(logp, logq, 1.0 - alpha))
    if divergence == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def _scaled(z: Tensor, tau: Tensor) -> Tensor:
    """z / tau, keeping -inf logits at -inf without a NaN gradient for tau (0 * inf)."""
    neg_inf = z == _NEG_INF
    z_safe = torch.where(neg_inf, torch.zeros_like(z), z)
    return torch.where(neg_inf, torch.full_like(z, _NEG_INF), z_safe / tau)


def valid_rows(rows: int, device, labels: Tensor | None, ignore_index: int, mask: Tensor | None) -> Tensor:
    """Bool [rows]: label != ignore_index AND mask (either may be None)."""
    valid = torch.ones(rows, dtype=torch.bool, device=device)
    if labels is not None:
        valid = valid & (labels.reshape(-1).to(device) != ignore_index)
    if mask is not None:
        valid = valid & mask.reshape(-1).to(device=device, dtype=torch.bool)
    return valid


def row_temperature(temperature: float | Tensor, rows: int, device) -> Tensor:
    """[rows, 1] float64 temperature from a number, a 0-d tensor or one value per row."""
    if isinstance(temperature, Tensor):
        tau = temperature.double().to(device)
        tau = tau.reshape(1, 1) if tau.dim() == 0 else tau.reshape(rows, 1)
    else:
        tau = torch.tensor([[float(temperature)]], dtype=torch.float64, device=device)
    return tau.expand(rows, 1)


def reduce_rows(rows: Tensor, valid: Tensor, reduction: str, normalizer, lead) -> Tensor:
    """Per-row losses (0 on invalid rows) reduced as every loss op does: none (leading shape),
    sum, or mean over valid rows (0 when none) unless a normalizer replaces the count."""
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        denom = normalizer.double().to(rows.device) if isinstance(normalizer, Tensor) else float(normalizer)
        return total / denom
    return total / valid.sum().clamp(min=1).double()


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "fkl",
    temperature: float | Tensor = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    t2_scale: bool = False,
) -> Tensor:
    """The float64 oracle of ``kdops.kd_loss``: the distillation divergence between the teacher
    distribution p = softmax(teacher_logits / tau) and the student distribution
    q = softmax(student_logits / tau) over the last dimension.

    Divergences (per row): ``fkl`` KL(p||q); ``rkl`` KL(q||p); ``jsd`` beta KL(p||m) +
    (1-beta) KL(q||m) with m = beta p + (1-beta) q, except that beta == 0 is exactly fkl and
    beta == 1 exactly rkl (TRL GKD convention); ``skew_fkl`` KL(p || alpha p + (1-alpha) q);
    ``skew_rkl`` KL(q || (1-alpha) p + alpha q); ``tvd`` 1/2 sum |p - q|.

    ``temperature`` is a float, a 0-d tensor, or a per-row tensor of shape [N] or of the leading
    shape. Rows with ``labels == ignore_index`` or ``mask == False`` are invalid: loss 0 and zero
    gradient, whatever values they hold. ``reduction``: ``mean`` (sum over valid rows / their
    count, 0 when none; ``normalizer`` replaces the count), ``sum``, ``none`` (per row, leading
    shape). ``t2_scale`` multiplies each row by tau^2.

    Everything is computed in float64 (inputs are upcast with ``.double()``, so autograd flows
    back to the inputs in their own dtype) and the float64 loss is returned. Differentiable with
    respect to both logits and a tensor temperature.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    zs = student_logits.double().reshape(-1, V)
    zt = teacher_logits.double().reshape(-1, V)
    N = zs.shape[0]
    device = zs.device

    valid = valid_rows(N, device, labels, ignore_index, mask)
    tau = row_temperature(temperature, N, device)

    # Invalid rows are replaced by harmless values before any arithmetic, so that whatever they
    # hold (NaN, inf, a bad temperature) can reach neither the loss nor any gradient.
    row_ok = valid[:, None]
    zs = torch.where(row_ok, zs, torch.zeros_like(zs))
    zt = torch.where(row_ok, zt, torch.zeros_like(zt))
    tau = torch.where(row_ok, tau, torch.ones_like(tau))

    logq = torch.log_softmax(_scaled(zs, tau), dim=-1)
    logp = torch.log_softmax(_scaled(zt, tau), dim=-1)
    rows = _row_divergence(logq, logp, divergence, float(beta), float(alpha))
    if t2_scale:
        rows = rows * tau[:, 0] ** 2
    return reduce_rows(rows, valid, reduction, normalizer, lead)
