"""Float64 oracles for the Gromov-Wasserstein approximations (kdops.gw): explicit sorts and the
O(n^2) double sum, written as the definitions read."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gw import random_directions


def sorted_gw(f_student, f_teacher, *, n_nodes=None, reduction="mean"):
    if n_nodes is None:
        n_nodes = max(f_student.shape[-1], f_teacher.shape[-1])

    def descending_prefix(f):
        g = torch.sort(f.double(), dim=-1, descending=True).values[..., :n_nodes]
        return F.pad(g, (0, n_nodes - g.shape[-1]))

    per_row = (descending_prefix(f_student) - descending_prefix(f_teacher)).abs().sum(-1)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / max(per_row.numel(), 1)


def pair_cost(x, y):
    """(1/n^2) sum_{i,k} ((x_i - x_k)^2 - (y_i - y_k)^2)^2 of x, y [..., n], index to index."""
    dx = (x.unsqueeze(-1) - x.unsqueeze(-2)).square()
    dy = (y.unsqueeze(-1) - y.unsqueeze(-2)).square()
    return (dx - dy).square().sum((-1, -2)) / x.shape[-1] ** 2


def gw_1d(x, y):
    x_sorted = torch.sort(x.double(), dim=-1).values
    y_sorted = torch.sort(y.double(), dim=-1).values
    return torch.minimum(pair_cost(x_sorted, y_sorted), pair_cost(x_sorted, y_sorted.flip(-1)))


def sliced_gw(X, Y, *, n_projections=64, generator=None):
    d = max(X.shape[-1], Y.shape[-1])
    theta = random_directions(n_projections, d, generator=generator, device=X.device).to(X.device)
    x_proj = F.pad(X.double(), (0, d - X.shape[-1])) @ theta.T
    y_proj = F.pad(Y.double(), (0, d - Y.shape[-1])) @ theta.T
    return gw_1d(x_proj.transpose(-1, -2), y_proj.transpose(-1, -2)).mean(-1)
