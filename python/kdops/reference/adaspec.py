"""Float64 oracles of ``kdops.adaspec_loss`` and its statistics op (DESIGN.md 3.7)."""

from __future__ import annotations

import torch
from torch import Tensor

from .divergence import valid_rows


def _rows_and_valid(logits: Tensor, labels, ignore_index, mask) -> tuple[int, Tensor]:
    rows = logits.shape[:-1].numel()
    return rows, valid_rows(rows, logits.device, labels, ignore_index, mask)


def adaspec_token_kl(
    draft_logits: Tensor,
    reference_logits: Tensor,
    target_logits: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per row, KL(p || q_draft) and KL(p || q_reference) in float64, leading shape, 0 for rows
    that do not count; p = softmax(target / tau), q = softmax(logits / tau). ``temperature``: a
    number, a 0-d tensor or one value per row."""
    lead = draft_logits.shape[:-1]
    vocab = draft_logits.shape[-1]
    rows, valid = _rows_and_valid(draft_logits, labels, ignore_index, mask)
    tau = torch.as_tensor(temperature, dtype=torch.float64, device=draft_logits.device)
    tau = tau.reshape(1, 1) if tau.dim() == 0 else tau.reshape(rows, 1)

    def log_softmax(logits: Tensor) -> Tensor:
        # invalid rows replaced before any arithmetic: whatever they hold reaches no output
        z = torch.where(valid[:, None], logits.double().reshape(rows, vocab), 0.0)
        return torch.log_softmax(z / tau, dim=-1)

    log_p = log_softmax(target_logits)
    p = log_p.exp()

    def kl(log_q: Tensor) -> Tensor:
        terms = torch.where(p > 0, p * (log_p - log_q), 0.0)  # 0 log 0 = 0
        return torch.where(valid, terms.sum(-1), 0.0).reshape(lead)

    return kl(log_softmax(draft_logits)), kl(log_softmax(reference_logits))


def adaspec_loss(
    draft_logits: Tensor,
    reference_logits: Tensor,
    target_logits: Tensor,
    *,
    fraction: float = 0.4,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    temperature: float | Tensor = 1.0,
    return_details: bool = False,
):
    """The float64 oracle of ``kdops.adaspec_loss``: keep the valid tokens whose
    KL(p || q_draft) - KL(p || q_reference) is >= torch.quantile(those scores, 1 - fraction),
    and return the sum of their draft KLs over ``normalizer`` (their mean when it is None; 0
    when none is kept). Differentiable with respect to the draft logits only; the selection is
    taken without gradient."""
    draft_kl, reference_kl = adaspec_token_kl(
        draft_logits, reference_logits.detach(), target_logits.detach(), temperature=temperature,
        labels=labels, ignore_index=ignore_index, mask=mask,
    )
    _, valid = _rows_and_valid(draft_logits, labels, ignore_index, mask)
    with torch.no_grad():
        scores = (draft_kl - reference_kl).reshape(-1)
        kept = torch.zeros_like(valid)
        if bool(valid.any()):
            threshold = torch.quantile(scores[valid], 1.0 - fraction)
            kept = valid & (scores >= threshold)
    total = torch.where(kept, draft_kl.reshape(-1), 0.0).sum()
    if normalizer is not None:
        loss = total / torch.as_tensor(normalizer, dtype=torch.float64, device=total.device)
    else:
        loss = total / kept.sum().clamp(min=1)
    if return_details:
        lead = draft_logits.shape[:-1]
        return loss, kept.reshape(lead), draft_kl, reference_kl
    return loss
