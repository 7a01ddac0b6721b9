"""Float64 oracle of ``kdops.topk_kd_loss`` (DESIGN.md 3.2): distillation from a teacher known
only on K token ids per row (stored top-k log-probabilities)."""

from __future__ import annotations

import torch
from torch import Tensor

from .divergence import _row_divergence, _scaled, reduce_rows, row_temperature, valid_rows

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
REDUCTIONS = ("mean", "sum", "none")


def _xlogratio(x: Tensor, logx: Tensor, logy: Tensor) -> Tensor:
    """x (log x - log y) with 0 log 0 = 0 and no NaN gradient where x == 0."""
    diff = torch.where(x > 0, logx - logy, torch.zeros_like(logx))
    return x * diff


def topk_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    divergence: str = "fkl",
    temperature: float | Tensor = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    renormalize: bool = True,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    t2_scale: bool = False,
) -> Tensor:
    """The float64 oracle of ``kdops.topk_kd_loss``.

    Per row, with a = student_logits / tau over the full vocabulary and b_k = teacher_logprobs_k /
    tau on the K ids: the teacher's log-probabilities are lp = log_softmax(b) over the K entries
    when ``renormalize``, else lp = b as given; p = exp(lp).

    ``fkl`` is exact against the student's full-vocabulary softmax:
    sum_k p_k (lp_k - log_softmax(a)[id_k]). Every other divergence is kd_loss's formula on the K
    support, with the student renormalized over the K ids: lq = log_softmax(a[ids]) over K
    (jsd with beta 0 / 1 is KL(p || q) / KL(q || p) on that support).

    Duplicate ids count as separate entries (their gradients add up). Rows masked by labels /
    mask have loss 0 and gradient 0 whatever they hold. Differentiable w.r.t. the student logits,
    the teacher log-probabilities and a tensor temperature.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    K = teacher_ids.shape[-1]
    zs = student_logits.double().reshape(-1, V)
    N = zs.shape[0]
    device = zs.device
    ids = teacher_ids.reshape(N, K).to(device=device, dtype=torch.int64)
    lt = teacher_logprobs.double().reshape(N, K).to(device)

    valid = valid_rows(N, device, labels, ignore_index, mask)
    tau = row_temperature(temperature, N, device)

    # masked rows: harmless values before any arithmetic (their ids may be anything)
    row_ok = valid[:, None]
    zs = torch.where(row_ok, zs, torch.zeros_like(zs))
    lt = torch.where(row_ok, lt, torch.zeros_like(lt))
    ids = torch.where(row_ok, ids, torch.zeros_like(ids))
    tau = torch.where(row_ok, tau, torch.ones_like(tau))

    a = _scaled(zs, tau)
    b = _scaled(lt, tau)
    logp = torch.log_softmax(b, dim=-1) if renormalize else b
    if divergence == "fkl":
        logq = torch.log_softmax(a, dim=-1).gather(1, ids)
        rows = _xlogratio(logp.exp(), logp, logq).sum(-1)
    else:
        logq = torch.log_softmax(a.gather(1, ids), dim=-1)
        rows = _row_divergence(logq, logp, divergence, float(beta), float(alpha))
    if t2_scale:
        rows = rows * tau[:, 0] ** 2
    return reduce_rows(rows, valid, reduction, normalizer, lead)
