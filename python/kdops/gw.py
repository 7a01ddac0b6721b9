"""Gromov-Wasserstein approximations (DESIGN.md 3.5): ``sorted_gw``, ``gw_1d``, ``sliced_gw``.

All three are a sort followed by elementwise work and reductions, so they are written as
composites of torch ops, differentiated by autograd. ``torch.sort`` is the best sort PyTorch has on
both devices (a radix/segmented sort on CUDA); a hand-written kernel would have to beat it and then
fuse a few O(n) passes whose cost is small next to the sort's, which is not worth it at this stage.
The functions contain no ``.item()`` and no Python loops over data, so ``torch.compile`` traces
them whole (``sliced_gw`` draws its directions from a generator, which may break the graph there).

Arithmetic is in float32 for float32/bfloat16/float16 inputs and in float64 for float64 inputs;
the loss comes back in that dtype and gradients in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks

REDUCTIONS = ("mean", "sum", "none")


def _check_features(name: str, t: torch.Tensor, trailing: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    if t.dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16; got {t.dtype}")
    if t.dim() < trailing or t.shape[-trailing] < 1:
        raise ValueError(f"{name} must have at least {trailing} dims with n >= 1 points; "
                         f"got shape {tuple(t.shape)}")


def _check_same_batch(a: torch.Tensor, b: torch.Tensor, lead: int, what: str) -> None:
    if a.shape[:-lead] != b.shape[:-lead]:
        raise ValueError(f"{what} must have the same leading shape; got {tuple(a.shape[:-lead])} "
                         f"and {tuple(b.shape[:-lead])}")
    if a.device != b.device:
        raise ValueError(f"{what} must be on the same device; got {a.device} and {b.device}")


def _compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(_checks.acc_dtype(a.dtype), _checks.acc_dtype(b.dtype))


# --------------------------------------------------------------------------------------------------
# sorted_gw


def sorted_gw(
    f_student: torch.Tensor,
    f_teacher: torch.Tensor,
    *,
    n_nodes: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfiGFusion's closed-form graph distance between two rows of node features.

    Each row of ``f_student`` [..., n_s] and ``f_teacher`` [..., n_t] is sorted in descending order
    and cut to its first ``n_nodes`` entries (default ``max(n_s, n_t)``); a row shorter than
    ``n_nodes`` is padded with zeros at the end. The loss of a row is
    ``sum_i |g_s[i] - g_t[i]|``; ``reduction`` is "mean" over rows, "sum", or "none" (the
    leading shape). The gradient is ``sign(g_s - g_t)`` (0 where they are equal) sent back
    through the sort permutation, to each side that requires grad.
    """
    _check_features("f_student", f_student, 1)
    _check_features("f_teacher", f_teacher, 1)
    _check_same_batch(f_student, f_teacher, 1, "f_student and f_teacher")
    if n_nodes is None:
        n_nodes = max(f_student.shape[-1], f_teacher.shape[-1])
    elif isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes must be a positive int or None; got {n_nodes!r}")
    _checks.check_choice("reduction", reduction, REDUCTIONS)

    dtype = _compute_dtype(f_student, f_teacher)
    g_s = _descending_prefix(f_student.to(dtype), n_nodes)
    g_t = _descending_prefix(f_teacher.to(dtype), n_nodes)
    per_row = (g_s - g_t).abs().sum(-1)  # d|u|/du = sign(u), 0 at 0
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    # mean over rows; with no rows at all the loss is 0, not NaN
    return per_row.sum() / max(per_row.numel(), 1)


def _descending_prefix(f: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """The n_nodes largest entries of each row in descending order, zero-padded to n_nodes."""
    if n_nodes < f.shape[-1]:
        # topk of a short prefix is cheaper than sorting the whole row
        return f.topk(n_nodes, dim=-1, largest=True, sorted=True).values
    g = f.sort(dim=-1, descending=True).values
    return F.pad(g, (0, n_nodes - g.shape[-1]))


# --------------------------------------------------------------------------------------------------
# gw_1d


def gw_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Gromov-Wasserstein cost of two uniform n-point samples on the line, in O(n log n).

    ``x`` and ``y`` are [..., n] (the same n, batched over the leading shape); the cost between
    two points of one sample is their squared distance. Returns [...]::

        (1/n^2) * min(S(x_sorted, y_sorted), S(x_sorted, y_reversed)),
        S(x, y) = sum_{i,k} ((x_i - x_k)^2 - (y_i - y_k)^2)^2,

    where ``y_reversed`` is ``y_sorted`` in descending order. This is the GW objective of the two
    monotone matchings (identity and anti-identity after sorting), so it is an *upper bound* on
    the GW value over all permutations, min_pi (1/n^2) sum_{i,k} ((x_i-x_k)^2 -
    (y_pi(i)-y_pi(k))^2)^2. It equals it for most samples but not for all: there are
    counterexamples from n = 7 on (the monotone matchings are not always optimal).

    Evaluation of S in O(n). S is unchanged when x or y is translated, so both are centered
    first (sum_i x_i = sum_i y_i = 0), which also keeps the power sums below small and removes
    the cancelling odd terms. Write a_ik = (x_i - x_k)^2, b_ik = (y_i - y_k)^2 and
    P_x = sum_i x_i^2, P_y = sum_i y_i^2, C = sum_i x_i y_i. Then S = sum a^2 + sum b^2 - 2 sum ab,
    with sums over all (i, k):

    - sum a^2 = sum (x_i - x_k)^4
              = sum (x_i^4 - 4 x_i^3 x_k + 6 x_i^2 x_k^2 - 4 x_i x_k^3 + x_k^4)
              = 2n sum_i x_i^4 + 6 P_x^2          (the x_i^3 x_k terms carry a factor sum_k x_k = 0)
      and likewise sum b^2 = 2n sum_i y_i^4 + 6 P_y^2;
    - sum ab = sum (x_i^2 - 2 x_i x_k + x_k^2)(y_i^2 - 2 y_i y_k + y_k^2). Of the nine products,
      x_i^2 y_i^2 and x_k^2 y_k^2 give n sum_i x_i^2 y_i^2 each; x_i^2 y_k^2 and x_k^2 y_i^2 give
      P_x P_y each; 4 x_i x_k y_i y_k gives 4 C^2; the four with a single x_k or y_k factor
      vanish with the centering. So sum ab = 2n sum_i x_i^2 y_i^2 + 2 P_x P_y + 4 C^2.

    Together:  S = 2n sum_i (x_i^2 - y_i^2)^2 + 6 P_x^2 + 6 P_y^2 - 4 P_x P_y - 8 C^2
                 = 2n sum_i (x_i^2 - y_i^2)^2 + 6 (P_x - P_y)^2 + 8 (P_x P_y - C^2).

    Each of the three terms is >= 0 (the last by Cauchy-Schwarz), which is why S is evaluated in
    this form: for x = y every term is exactly 0 in floating point. The last term is a
    difference, so it loses relative accuracy when y is close to a multiple of x.

    Gradients flow through the closed form and the sort (autograd); where the two matchings
    tie, torch.minimum shares the gradient between them.
    """
    _check_features("x", x, 1)
    _check_features("y", y, 1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape [..., n]; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    _check_same_batch(x, y, 1, "x and y")
    dtype = _compute_dtype(x, y)
    n = x.shape[-1]
    x_sorted = _centered(x.to(dtype)).sort(dim=-1).values
    y_sorted = _centered(y.to(dtype)).sort(dim=-1).values
    s_identity = _matching_cost(x_sorted, y_sorted, n)
    s_anti = _matching_cost(x_sorted, y_sorted.flip(-1), n)
    return torch.minimum(s_identity, s_anti) / (n * n)


def _centered(t: torch.Tensor) -> torch.Tensor:
    return t - t.mean(dim=-1, keepdim=True)


def _matching_cost(x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """S(x, y) of centered x, y [..., n] matched index to index (derivation in gw_1d)."""
    x2, y2 = x * x, y * y
    p_x, p_y = x2.sum(-1), y2.sum(-1)
    c = (x * y).sum(-1)
    return 2 * n * (x2 - y2).square().sum(-1) + 6 * (p_x - p_y).square() + 8 * (p_x * p_y - c * c)


# --------------------------------------------------------------------------------------------------
# sliced_gw


def sliced_gw(
    X: torch.Tensor,
    Y: torch.Tensor,
    *,
    n_projections: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced Gromov-Wasserstein cost of two point clouds X [..., n, d_x] and Y [..., n, d_y].

    The smaller dimension is padded with zero coordinates to d = max(d_x, d_y); both clouds are
    projected on the same ``n_projections`` random unit directions of R^d and the result [...] is
    the mean of :func:`gw_1d` over the projections. The directions are drawn from ``generator``
    (the global RNG when None) as normal float64 vectors on the generator's device, normalized,
    then cast to the arithmetic dtype, so a seeded generator gives the same result on every call
    and in :func:`kdops.reference.sliced_gw`.
    """
    _check_features("X", X, 2)
    _check_features("Y", Y, 2)
    _check_same_batch(X, Y, 1, "X [..., n, d_x] and Y [..., n, d_y]")
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive int; got {n_projections!r}")
    dtype = _compute_dtype(X, Y)
    d = max(X.shape[-1], Y.shape[-1])
    directions = random_directions(n_projections, d, generator=generator, device=X.device)
    directions = directions.to(device=X.device, dtype=dtype)
    # [..., n, d] @ [d, P] -> [..., n, P] -> [..., P, n]: one gw_1d row per projection
    x_proj = (F.pad(X.to(dtype), (0, d - X.shape[-1])) @ directions.T).transpose(-1, -2)
    y_proj = (F.pad(Y.to(dtype), (0, d - Y.shape[-1])) @ directions.T).transpose(-1, -2)
    return gw_1d(x_proj, y_proj).mean(-1)


def random_directions(
    n_projections: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[n_projections, dim] float64 unit vectors, uniform on the sphere (normalized Gaussians).

    Drawn on the generator's device when one is given (a generator only draws on its own device),
    else on ``device`` from the global RNG.
    """
    if generator is not None:
        device = generator.device
    g = torch.randn(n_projections, dim, generator=generator, device=device, dtype=torch.float64)
    return g / g.norm(dim=-1, keepdim=True)
