"""Float64 oracle of ``kdops.relation_kd_loss`` and ``kdops.token_relation`` (DESIGN.md 3.6).

Materializes every relation matrix (N x N per sequence, (B N) x (B N) for scope="batch") and
follows the per-row formulas literally; small N only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("kl", "mse", "infonce")
SCOPES = ("sequence", "batch")
REDUCTIONS = ("mean", "sum", "none")


def _tokens(feats: Tensor, normalize: bool) -> Tensor:
    x = feats.double()
    return F.normalize(x, dim=-1, eps=1e-12) if normalize else x


def token_relation(feats: Tensor, *, temperature: float | Tensor = 1.0, normalize: bool = True) -> Tensor:
    """R = F F^T / tau per sequence: [B, N, N] float64 (F L2-normalized per token when asked)."""
    f = _tokens(feats, normalize)
    return f @ f.transpose(-1, -2) / _tau(temperature)


def _tau(temperature: float | Tensor) -> float | Tensor:
    return temperature.double() if isinstance(temperature, Tensor) else float(temperature)


def _masked_rows(x: Tensor, columns: Tensor) -> Tensor:
    """x with the entries outside `columns` at -inf; a row without any column is left at 0 (its
    value is zeroed later), so no softmax over an empty set makes NaN values or gradients."""
    empty = ~columns.any(-1, keepdim=True)
    return torch.where(columns, x, torch.where(empty, 0.0, float("-inf")))


def relation_row_loss(
    student_feats: Tensor,
    teacher_feats: Tensor,
    *,
    kind: str = "kl",
    temperature: float | Tensor = 1.0,
    normalize: bool = True,
    mask: Tensor | None = None,
    exclude_diagonal: bool = False,
    scope: str = "sequence",
) -> Tensor:
    """r_i per token, [B, N] float64, 0 at tokens that do not count.

    Row i's columns are the valid tokens of its set (its sequence, or the whole batch for
    scope="batch"), less i itself when ``exclude_diagonal``; a = R_s[i], b = R_t[i] on them,
    q = softmax(a), p = softmax(b):
      kl: sum_j p_j (log p_j - log q_j);  mse: (1/n_i) sum_j (p_j - q_j)^2;
      infonce: logsumexp_j C_ij - C_ii with C = F_s F_t^T / tau.
    A row without columns has r_i = 0.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    batch, tokens = student_feats.shape[:2]
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=student_feats.device) if mask is None else mask
    fs, ft = _tokens(student_feats, normalize), _tokens(teacher_feats, normalize)
    if scope == "batch":
        fs, ft, valid = fs.reshape(1, batch * tokens, -1), ft.reshape(1, batch * tokens, -1), valid.reshape(1, -1)
    tau = _tau(temperature)
    n = valid.shape[-1]
    columns = valid.unsqueeze(-1) & valid.unsqueeze(-2)  # [G, N, N]: row i valid and column j valid
    if exclude_diagonal:
        columns = columns & ~torch.eye(n, dtype=torch.bool, device=valid.device)

    if kind == "infonce":
        c = _masked_rows(fs @ ft.transpose(-1, -2) / tau, columns)
        rows = torch.logsumexp(c, -1) - torch.diagonal(c, dim1=-2, dim2=-1)
    else:
        a = _masked_rows(fs @ fs.transpose(-1, -2) / tau, columns)
        b = _masked_rows(ft @ ft.transpose(-1, -2) / tau, columns)
        log_q, log_p = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        p, q = log_p.exp(), log_q.exp()
        if kind == "kl":
            # the difference is taken only on the columns: outside them both logs are -inf
            log_ratio = torch.where(columns, log_p - log_q, 0.0)
            rows = (p * log_ratio).sum(-1)
        else:
            count = columns.sum(-1).clamp_min(1).double()
            rows = torch.where(columns, (p - q) ** 2, 0.0).sum(-1) / count
    rows = torch.where(columns.any(-1), rows, 0.0)
    return rows.reshape(batch, tokens)


def relation_kd_loss(
    student_feats: Tensor,
    teacher_feats: Tensor,
    *,
    kind: str = "kl",
    temperature: float | Tensor = 1.0,
    normalize: bool = True,
    mask: Tensor | None = None,
    exclude_diagonal: bool = False,
    scope: str = "sequence",
    reduction: str = "mean",
) -> Tensor:
    """The float64 oracle of ``kdops.relation_kd_loss``: relation_row_loss reduced over the valid
    tokens (mean: their sum over their number, 0 when there are none; sum; none: [B, N])."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    rows = relation_row_loss(
        student_feats, teacher_feats, kind=kind, temperature=temperature, normalize=normalize,
        mask=mask, exclude_diagonal=exclude_diagonal, scope=scope,
    )
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.numel() if mask is None else mask.sum()
    return total / torch.as_tensor(count, dtype=torch.float64, device=rows.device).clamp_min(1)
