"""Float64 oracle of the top-k co-activation graph (DESIGN.md 3.4): builds every A_b = sum_t
x~_t x~_t^T explicitly (V x V per sequence, so small vocabularies only) and takes row sums.

Kept entries: the k largest logits of each position, larger first and, among equal logits, the
lower id first (a stable descending sort; NaN counts as the largest). Selection is on the logits,
which for softmax is the order of the probabilities.
"""

from __future__ import annotations

import torch

TRANSFORMS = ("softmax", "logits")


def coactivation_topk(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float | torch.Tensor = 1.0,
    transform: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position kept entries: ids int64 [B, T, k] (best first) and values float64 [B, T, k],
    x = softmax(z / tau) or z at those ids. Differentiable through the values."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}; got {transform!r}")
    z = logits.double()
    ids = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    x = torch.softmax(z / temperature, dim=-1) if transform == "softmax" else z
    return ids, x.gather(-1, ids)


def _kept_dense(logits, k, mask, temperature, transform) -> torch.Tensor:
    """x~ [B, T, V] float64: the kept values, 0 elsewhere and at positions that are masked out."""
    ids, values = coactivation_topk(logits, k, temperature=temperature, transform=transform)
    dense = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    dense = dense.scatter(-1, ids, values)
    if mask is not None:
        dense = dense * mask.unsqueeze(-1)
    return dense


def _positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Valid positions per sequence [B], at least 1 (a sequence without any has A = 0 anyway)."""
    if mask is None:
        return torch.full((logits.shape[0],), float(logits.shape[1]), dtype=torch.float64, device=logits.device)
    return mask.sum(1).double().clamp_min(1)


def coactivation_adjacency(
    logits: torch.Tensor,
    k: int,
    *,
    mask: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    transform: str = "softmax",
    normalize: bool = True,
) -> torch.Tensor:
    """A [B, V, V] float64 = sum over valid t of x~_t x~_t^T (divided by the valid count)."""
    dense = _kept_dense(logits, k, mask, temperature, transform)
    adjacency = torch.einsum("btv,btw->bvw", dense, dense)
    if normalize:
        adjacency = adjacency / _positions(logits, mask).view(-1, 1, 1)
    return adjacency


def coactivation_features(
    logits: torch.Tensor,
    k: int,
    *,
    mask: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    transform: str = "softmax",
    normalize: bool = True,
) -> torch.Tensor:
    """Node features f [B, V] float64: the row sums of coactivation_adjacency."""
    return coactivation_adjacency(
        logits, k, mask=mask, temperature=temperature, transform=transform, normalize=normalize
    ).sum(-1)


def coactivation_graph(
    logits: torch.Tensor,
    k: int,
    *,
    node_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    transform: str = "softmax",
    normalize: bool = True,
) -> torch.Tensor:
    """A restricted to node_ids ([n] or [B, n]): [B, n, n] float64."""
    adjacency = coactivation_adjacency(
        logits, k, mask=mask, temperature=temperature, transform=transform, normalize=normalize
    )
    nodes = node_ids.expand(logits.shape[0], -1) if node_ids.dim() == 1 else node_ids
    rows = adjacency.gather(1, nodes.unsqueeze(-1).expand(-1, -1, adjacency.shape[2]))
    return rows.gather(2, nodes.unsqueeze(1).expand(-1, nodes.shape[1], -1))
