"""kdops.sorted_gw, kdops.gw_1d and kdops.sliced_gw against the float64 oracles in
kdops.reference.gw, brute force over permutations, and (when installed) POT's GW solver."""

from __future__ import annotations

import itertools

import pytest
import torch

import kdops
from kdops import reference
from kdops.reference.gw import pair_cost

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------------------------------
# sorted_gw


@pytest.mark.parametrize("n_s,n_t", [(5, 5), (7, 3), (3, 7), (1, 9)])
@pytest.mark.parametrize("n_nodes", [None, 2, 12])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sorted_gw_matches_reference(n_s, n_t, n_nodes, reduction):
    f_s, f_t = randn(2, 3, n_s, seed=n_s), randn(2, 3, n_t, seed=100 + n_t)
    got = kdops.sorted_gw(f_s, f_t, n_nodes=n_nodes, reduction=reduction)
    want = reference.sorted_gw(f_s, f_t, n_nodes=n_nodes, reduction=reduction)
    assert got.shape == want.shape == ((2, 3) if reduction == "none" else ())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_nodes", [None, 3, 10])
def test_sorted_gw_gradient_is_sign_through_the_sort(n_nodes):
    # the gradient of sum_i |g_s[i] - g_t[i]| is sign(g_s - g_t) at the sorted positions
    f_s = randn(4, 6, seed=1).requires_grad_(True)
    f_t = randn(4, 8, seed=2).requires_grad_(True)
    kdops.sorted_gw(f_s, f_t, n_nodes=n_nodes, reduction="sum").backward()
    k = n_nodes or 8

    def sorted_prefix(f):
        values, order = f.detach().sort(dim=-1, descending=True)
        pad = k - min(k, f.shape[-1])
        return torch.nn.functional.pad(values[..., :k], (0, pad)), order[..., :k]

    (g_s, order_s), (g_t, order_t) = sorted_prefix(f_s), sorted_prefix(f_t)
    sign = torch.sign(g_s - g_t)
    want_s = torch.zeros_like(f_s).scatter_(-1, order_s, sign[..., :order_s.shape[-1]])
    want_t = torch.zeros_like(f_t).scatter_(-1, order_t, -sign[..., :order_t.shape[-1]])
    torch.testing.assert_close(f_s.grad, want_s)
    torch.testing.assert_close(f_t.grad, want_t)


def test_sorted_gw_gradient_is_zero_where_the_sides_agree():
    f = randn(3, 5, seed=3).requires_grad_(True)
    loss = kdops.sorted_gw(f, f.detach().flip(-1))  # same sorted values
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(f.grad) == 0


@pytest.mark.parametrize("n_nodes", [None, 4])
def test_sorted_gw_gradcheck(n_nodes):
    f_s = randn(2, 5, seed=4).requires_grad_(True)
    f_t = randn(2, 7, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kdops.sorted_gw(a, b, n_nodes=n_nodes,
                                                                  reduction="none"), (f_s, f_t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sorted_gw_low_precision(dtype):
    f_s = randn(4, 300, seed=6, dtype=dtype).requires_grad_(True)
    f_t = randn(4, 200, seed=7, dtype=dtype)
    loss = kdops.sorted_gw(f_s, f_t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert f_s.grad.dtype == dtype
    # the inputs are the rounded values, so the loss is exact up to float32 summation
    torch.testing.assert_close(loss.double(), reference.sorted_gw(f_s.detach(), f_t),
                               rtol=1e-5, atol=1e-5)


def test_sorted_gw_no_rows_is_zero():
    loss = kdops.sorted_gw(torch.empty(0, 4), torch.empty(0, 3))
    assert loss.item() == 0


def test_sorted_gw_rejects_bad_input():
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="leading shape"):
        kdops.sorted_gw(a, b)
    with pytest.raises(ValueError, match="n_nodes"):
        kdops.sorted_gw(a, a, n_nodes=0)
    with pytest.raises(ValueError, match="reduction"):
        kdops.sorted_gw(a, a, reduction="max")
    with pytest.raises(ValueError, match="f_teacher"):
        kdops.sorted_gw(a, torch.ones(2, 4, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# gw_1d


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 31, 100, 1000])
def test_gw_1d_matches_quadratic_oracle(n):
    # translated and scaled samples: the centering inside gw_1d must not change the value
    x = randn(3, n, seed=n) * 2 + 5
    y = randn(3, n, seed=1000 + n).exp() - 7
    torch.testing.assert_close(kdops.gw_1d(x, y), reference.gw_1d(x, y), rtol=1e-10, atol=1e-10)


def test_gw_1d_float32():
    x, y = randn(2, 4096, seed=8), randn(2, 4096, seed=9) * 3
    got = kdops.gw_1d(x.float(), y.float())
    assert got.dtype == torch.float32
    want = reference.gw_1d(x.float(), y.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_gw_1d_invariances():
    x, y = randn(4, 50, seed=10), randn(4, 50, seed=11)
    assert torch.equal(kdops.gw_1d(x, x), torch.zeros(4, dtype=F64))  # exactly 0, not rounding
    value = kdops.gw_1d(x, y)
    perm = torch.randperm(50, generator=gen(12))
    for x2, y2 in [(x, -y), (-x, y), (x + 3, y - 1), (x[:, perm], y)]:
        torch.testing.assert_close(kdops.gw_1d(x2, y2), value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
def test_gw_1d_against_all_permutations(n):
    """gw_1d evaluates the two monotone matchings, an upper bound on the GW value over
    permutations. On Gaussian draws they are optimal almost always (counterexamples exist from
    n = 7 on, but a few hundred draws seldom meet one): we assert the bound on every draw and
    equality on at least 95% of them."""
    draws = 40 if n == 7 else 200  # n = 7: 5040 permutations x 49 pairs per draw
    x, y = randn(draws, n, seed=20 + n), randn(draws, n, seed=40 + n)
    perms = torch.tensor(list(itertools.permutations(range(n))))
    brute = pair_cost(x.unsqueeze(1), y[:, perms]).min(dim=1).values  # [draws]
    value = kdops.gw_1d(x, y)
    assert bool((value >= brute - 1e-10 * (1 + brute)).all())
    equal = torch.isclose(value, brute, rtol=1e-9, atol=1e-12)
    assert equal.double().mean() >= 0.95


def test_gw_1d_gradcheck():
    x = randn(2, 6, seed=13).requires_grad_(True)
    y = randn(2, 6, seed=14).requires_grad_(True)
    assert torch.autograd.gradcheck(kdops.gw_1d, (x, y))


def test_gw_1d_compiles_whole():
    x, y = randn(3, 64, seed=15), randn(3, 64, seed=16)
    compiled = torch.compile(kdops.gw_1d, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), kdops.gw_1d(x, y))


def test_gw_1d_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        kdops.gw_1d(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="n >= 1"):
        kdops.gw_1d(torch.randn(3, 0), torch.randn(3, 0))


def test_gw_1d_is_at_most_pot():
    """POT's gromov_wasserstein2 is a local (conditional-gradient) solver over couplings. On
    these 1-D cases its value was never below ours in our runs (ours was lower on about a fifth
    of them), so we assert ours <= POT's + tolerance."""
    ot = pytest.importorskip("ot")
    g = gen(17)
    for _ in range(20):
        n = int(torch.randint(3, 25, (1,), generator=g))
        x = torch.randn(n, generator=g, dtype=F64)
        y = torch.randn(n, generator=g, dtype=F64) * 1.5
        uniform = torch.full((n,), 1.0 / n, dtype=F64)
        c_x, c_y = (x[:, None] - x).square().numpy(), (y[:, None] - y).square().numpy()
        pot = ot.gromov_wasserstein2(c_x, c_y, uniform.numpy(), uniform.numpy(),
                                     loss_fun="square_loss")
        assert kdops.gw_1d(x, y).item() <= float(pot) + 1e-9 * (1 + float(pot))


# --------------------------------------------------------------------------------------------------
# sliced_gw


def test_sliced_gw_reproducible_and_matches_reference():
    X, Y = randn(2, 30, 3, seed=18), randn(2, 30, 5, seed=19)  # X is padded to d = 5
    a = kdops.sliced_gw(X, Y, n_projections=16, generator=gen(0))
    b = kdops.sliced_gw(X, Y, n_projections=16, generator=gen(0))
    c = kdops.sliced_gw(X, Y, n_projections=16, generator=gen(1))
    assert a.shape == (2,) and torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, reference.sliced_gw(X, Y, n_projections=16, generator=gen(0)),
                               rtol=1e-10, atol=1e-10)


def test_sliced_gw_in_one_dimension_is_gw_1d():
    # in R^1 every unit direction is +1 or -1, and gw_1d(-x, -y) = gw_1d(x, y)
    x, y = randn(4, 20, seed=21), randn(4, 20, seed=22)
    got = kdops.sliced_gw(x.unsqueeze(-1), y.unsqueeze(-1), n_projections=5, generator=gen(2))
    torch.testing.assert_close(got, kdops.gw_1d(x, y), rtol=1e-12, atol=1e-12)


def test_sliced_gw_gradcheck():
    X = randn(2, 6, 2, seed=23).requires_grad_(True)
    Y = randn(2, 6, 3, seed=24).requires_grad_(True)
    fn = lambda a, b: kdops.sliced_gw(a, b, n_projections=4, generator=gen(3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (X, Y))


def test_sliced_gw_rejects_bad_input():
    with pytest.raises(ValueError, match="leading shape"):
        kdops.sliced_gw(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="n_projections"):
        kdops.sliced_gw(torch.randn(5, 2), torch.randn(5, 2), n_projections=0)
