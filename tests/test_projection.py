"""implicit_torch.projection: values against brute-force constrained minimisation (scipy SLSQP),
Jacobians against closed forms and finite differences."""

import numpy as np
import pytest
import scipy.optimize
import torch

from implicit_torch import projection as P

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def brute_force(x, constraints, n=None, split=False):
    """argmin_p ½‖p − x‖² subject to scipy constraints, by SLSQP from a feasible-ish start.

    With ``split``, p = u − v with u, v ≥ 0 (for ℓ1 constraints), constraints on z = (u, v).
    """
    x = np.asarray(x, dtype=float)
    if split:
        d = x.size
        obj = lambda z: 0.5 * np.sum((z[:d] - z[d:] - x) ** 2)  # noqa: E731
        z0 = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)]) * 0.1
        res = scipy.optimize.minimize(
            obj,
            z0,
            method="SLSQP",
            constraints=constraints,
            bounds=[(0, None)] * (2 * d),
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        return res.x[:d] - res.x[d:]
    res = scipy.optimize.minimize(
        lambda p: 0.5 * np.sum((p - x) ** 2),
        np.zeros_like(x) if n is None else n,
        jac=lambda p: p - x,
        method="SLSQP",
        constraints=constraints,
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


X = [0.9, -0.3, 0.45, 1.2, 0.05, -1.0, 0.7]


def _a():
    return np.array([1.0, -2.0, 0.5, 0.3, 0.0, 1.5, -0.7])


CASES = {
    "non_negative": (
        lambda x: P.projection_non_negative(x),
        [{"type": "ineq", "fun": lambda p: p}],
    ),
    "box": (
        lambda x: P.projection_box(x, (-0.2, 0.5)),
        [{"type": "ineq", "fun": lambda p: p + 0.2}, {"type": "ineq", "fun": lambda p: 0.5 - p}],
    ),
    "hypercube": (
        lambda x: P.projection_hypercube(x, 0.6),
        [{"type": "ineq", "fun": lambda p: p}, {"type": "ineq", "fun": lambda p: 0.6 - p}],
    ),
    "simplex": (
        lambda x: P.projection_simplex(x, 1.5),
        [{"type": "ineq", "fun": lambda p: p}, {"type": "eq", "fun": lambda p: p.sum() - 1.5}],
    ),
    "l2_ball": (
        lambda x: P.projection_l2_ball(x, 1.1),
        [{"type": "ineq", "fun": lambda p: 1.1**2 - np.sum(p**2)}],
    ),
    "linf_ball": (
        lambda x: P.projection_linf_ball(x, 0.4),
        [{"type": "ineq", "fun": lambda p: 0.4 - np.abs(p)}],
    ),
    "hyperplane": (
        lambda x: P.projection_hyperplane(x, (torch.tensor(_a(), dtype=DT), 0.8)),
        [{"type": "eq", "fun": lambda p: _a() @ p - 0.8}],
    ),
    "halfspace": (
        lambda x: P.projection_halfspace(x, (torch.tensor(_a(), dtype=DT), -0.5)),
        [{"type": "ineq", "fun": lambda p: -0.5 - _a() @ p}],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_projection_matches_brute_force(name):
    op, constraints = CASES[name]
    x = torch.tensor(X, dtype=DT)
    got = op(x).numpy()
    ref = brute_force(X, constraints)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_l1_ball_matches_brute_force():
    d = len(X)
    cons = [{"type": "ineq", "fun": lambda z: 1.3 - z.sum()}]
    got = P.projection_l1_ball(torch.tensor(X, dtype=DT), 1.3).numpy()
    np.testing.assert_allclose(got, brute_force(X, cons, split=True), atol=1e-6)
    assert abs(np.abs(got).sum() - 1.3) < 1e-12 and d == got.size
    inside = torch.tensor([0.1, -0.2, 0.3], dtype=DT)
    torch.testing.assert_close(P.projection_l1_ball(inside, 1.0), inside)


def test_affine_set_matches_brute_force():
    g = gen(3)
    A = torch.randn(3, 7, generator=g, dtype=DT)
    b = torch.randn(3, generator=g, dtype=DT)
    x = torch.tensor(X, dtype=DT)
    got = P.projection_affine_set(x, (A, b))
    An, bn = A.numpy(), b.numpy()
    ref = brute_force(X, [{"type": "eq", "fun": lambda p: An @ p - bn}])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    torch.testing.assert_close(A @ got, b)


def test_l2_sphere():
    x = torch.tensor(X, dtype=DT)
    p = P.projection_l2_sphere(x, 2.0)
    torch.testing.assert_close(torch.linalg.vector_norm(p), torch.tensor(2.0, dtype=DT))
    # The nearest point of a sphere is along x: p = c·x with c > 0.
    torch.testing.assert_close(p, x * (2.0 / torch.linalg.vector_norm(x)))
    z = torch.zeros(3, dtype=DT, requires_grad=True)
    out = P.projection_l2_sphere(z)
    (g,) = torch.autograd.grad(out.sum(), z)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("value", [1.0, 0.4, 3.0])
def test_simplex_jacobian_closed_form(value):
    x = torch.randn(9, generator=gen(int(10 * value)), dtype=DT)
    p = P.projection_simplex(x, value)
    s = (p > 0).to(DT)
    J = torch.autograd.functional.jacobian(lambda z: P.projection_simplex(z, value), x)
    torch.testing.assert_close(J, torch.diag(s) - torch.outer(s, s) / s.sum())
    # d p / d value = s / |S|.
    v = torch.tensor(value, dtype=DT, requires_grad=True)
    dv = torch.autograd.functional.jacobian(lambda t: P.projection_simplex(x, t), v)
    torch.testing.assert_close(dv, s / s.sum())


def test_simplex_shapes_vmap_and_float32():
    x = torch.randn(4, 6, generator=gen(5))
    p = P.projection_simplex(x)  # the whole tensor is one vector
    assert p.shape == x.shape and p.dtype == torch.float32
    assert abs(p.sum().item() - 1.0) < 1e-6
    rows = torch.func.vmap(P.projection_simplex)(x)
    torch.testing.assert_close(rows, torch.stack([P.projection_simplex(r) for r in x]))
    torch.testing.assert_close(rows.sum(1), torch.ones(4))


GRADCHECK = {
    "simplex": (lambda x, r: P.projection_simplex(x, r), 1.0),
    "l1_ball": (lambda x, r: P.projection_l1_ball(x, r), 1.0),
    "l2_ball": (lambda x, r: P.projection_l2_ball(x, r), 1.0),
    "l2_sphere": (lambda x, r: P.projection_l2_sphere(x, r), 1.0),
    "linf_ball": (lambda x, r: P.projection_linf_ball(x, r), 0.5),
    "box": (lambda x, r: P.projection_box(x, (-r, r**2)), 0.5),
    "hypercube": (lambda x, r: P.projection_hypercube(x, r), 0.5),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_jacobians_by_finite_differences(name):
    op, r = GRADCHECK[name]
    x = torch.tensor([0.93, -0.31, 0.47, 1.21, 0.06, -1.07], dtype=DT, requires_grad=True)
    r = torch.tensor(r, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x, r))


def test_hyperplane_halfspace_affine_jacobians_by_finite_differences():
    g = gen(7)
    x = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    a = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    b = torch.tensor(0.3, dtype=DT, requires_grad=True)
    A = torch.randn(2, 5, generator=g, dtype=DT, requires_grad=True)
    bb = torch.randn(2, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: P.projection_hyperplane(t[0], t[1:]), (x, a, b))
    # Active halfspace (⟨a, x⟩ > b) and inactive (b large).
    assert torch.autograd.gradcheck(lambda *t: P.projection_halfspace(t[0], t[1:]), (x, a, b))
    big = torch.tensor(50.0, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: P.projection_halfspace(t[0], t[1:]), (x, a, big))
    assert torch.autograd.gradcheck(lambda *t: P.projection_affine_set(t[0], t[1:]), (x, A, bb))


def test_pytree_projections():
    x = {"w": torch.tensor([3.0, 4.0], dtype=DT), "b": torch.tensor([-12.0], dtype=DT)}
    p = P.projection_l2_ball(x, 1.0)  # ‖x‖ = 13
    torch.testing.assert_close(p["w"], x["w"] / 13)
    torch.testing.assert_close(p["b"], x["b"] / 13)
    q = P.projection_box(x, (0.0, 3.5))
    torch.testing.assert_close(q["w"], torch.tensor([3.0, 3.5], dtype=DT))
    torch.testing.assert_close(P.projection_non_negative(x)["b"], torch.zeros(1, dtype=DT))
    inside = P.projection_l2_ball(x, 20.0)
    torch.testing.assert_close(inside["w"], x["w"])


def test_polyhedron_projection_is_reachable_from_the_projection_module():
    # the simplex as a polyhedron: {1ᵀy = 1, −y ≤ 0}
    x = torch.tensor([[0.8, -0.3, 0.6, 0.1], [2.0, 1.5, -1.0, 0.0]], dtype=torch.float64)
    n = x.shape[1]
    A, b = torch.ones(1, n, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    G, h = -torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    p = P.projection_polyhedron(x, (A, b, G, h))
    ref = torch.stack([P.projection_simplex(row) for row in x])
    torch.testing.assert_close(p, ref, rtol=1e-7, atol=1e-8)
