"""implicit_torch.optimality: residuals against hand-written formulas, zeros at known solutions,
and implicit derivatives through them against closed forms."""

import numpy as np
import pytest
import scipy.optimize
import torch
from problems import DT, gen
from problems import regression_data as data

import implicit_torch as it
from implicit_torch import optimality, projection, prox


def least_squares(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum()


def test_stationarity_is_the_gradient_including_pytrees():
    X, y = data()
    w = torch.randn(6, generator=gen(1), dtype=DT)
    F = optimality.make_stationarity_fun(least_squares)
    torch.testing.assert_close(F(w, X, y), X.T @ (X @ w - y))

    def fun(p, X, y, lam):
        return least_squares(p["w"], X, y - p["b"]) + 0.5 * lam * (p["w"] ** 2).sum()

    p = {"w": w, "b": torch.tensor(0.3, dtype=DT)}
    r = optimality.make_stationarity_fun(fun)(p, X, y, 2.0)
    res = X @ w + 0.3 - y
    torch.testing.assert_close(r["w"], X.T @ res + 2.0 * w)
    torch.testing.assert_close(r["b"], res.sum())


def test_fixed_point_residual():
    F = optimality.make_fixed_point_fun(lambda x, a: torch.cos(x) * a)
    x = torch.tensor([0.1, 0.5], dtype=DT)
    torch.testing.assert_close(F(x, 2.0), 2.0 * torch.cos(x) - x)


def lasso_with_known_solution(alpha=0.4, seed=2):
    """min ½‖Xw − y‖² + α‖w‖₁ with solution w* (support {0, 1, 2}) and strict
    complementarity: y is built so that Xᵀ(y − Xw*) = α z with z = sign(w*) on the support and
    |z| ≤ 0.4 off it."""
    X, _ = data(seed, n=30, d=6)
    w = torch.tensor([1.0, -0.7, 0.5, 0.0, 0.0, 0.0], dtype=DT)
    z = torch.tensor([1.0, -1.0, 1.0, 0.3, -0.2, 0.1], dtype=DT)
    y = X @ w + alpha * X @ torch.linalg.solve(X.T @ X, z)
    return X, y, w, alpha


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_proximal_gradient_fun_zero_at_the_lasso_solution_and_its_derivative(eta):
    X, y, w, alpha = lasso_with_known_solution()
    F = optimality.make_proximal_gradient_fun(least_squares, prox.prox_lasso, eta)
    torch.testing.assert_close(F(w, alpha, X, y), torch.zeros(6, dtype=DT), rtol=0, atol=1e-12)
    assert F(w + 0.01, alpha, X, y).abs().max() > 1e-3
    # Implicit derivative through the condition, any η: dw_S/dα = −(X_SᵀX_S)⁻¹ sign(w_S).
    a = torch.tensor(alpha, dtype=DT, requires_grad=True)
    sol = it.implicit_solve(lambda init, *p: w, F, None, a, X, y, solve="lu")
    dw = torch.stack([torch.autograd.grad(sol[i], a, retain_graph=True)[0] for i in range(6)])
    XS = X[:, :3]
    torch.testing.assert_close(dw[:3], -torch.linalg.solve(XS.T @ XS, torch.sign(w[:3])))
    torch.testing.assert_close(dw[3:], torch.zeros(3, dtype=DT))


def test_projected_gradient_fun_box_qp_against_the_active_set_closed_form():
    # min ½‖Xw − y‖² s.t. lo ≤ w ≤ hi, solved by scipy, then polished on its active set A:
    # w_F = (X_FᵀX_F)⁻¹ X_Fᵀ (y − X_A w_A) on the free set F, hence dw_F/dy = (X_FᵀX_F)⁻¹ X_Fᵀ
    # and dw_A/dy = 0 (strict complementarity checked below).
    X, y = data(4)
    lo, hi = -0.2, 0.3
    Xn, yn = X.numpy(), y.numpy()
    res = scipy.optimize.minimize(
        lambda w: 0.5 * np.sum((Xn @ w - yn) ** 2),
        np.zeros(6),
        jac=lambda w: Xn.T @ (Xn @ w - yn),
        bounds=[(lo, hi)] * 6,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 5000},
    )
    w = torch.tensor(res.x, dtype=DT)
    act = (w - lo).abs() < 1e-6
    act |= (w - hi).abs() < 1e-6
    free = ~act
    assert 0 < int(act.sum()) < 6, "test construction: some but not all bounds active"
    w[act] = torch.where(w[act] > 0, torch.tensor(hi, dtype=DT), torch.tensor(lo, dtype=DT))
    XF, XA = X[:, free], X[:, act]
    w[free] = torch.linalg.solve(XF.T @ XF, XF.T @ (y - XA @ w[act]))
    grad = X.T @ (X @ w - y)
    assert (grad[act].abs() > 1e-3).all(), "strict complementarity"
    assert ((w >= lo) & (w <= hi)).all()

    F = optimality.make_projected_gradient_fun(least_squares, projection.projection_box, 0.5)
    torch.testing.assert_close(F(w, (lo, hi), X, y), torch.zeros(6, dtype=DT), rtol=0, atol=1e-12)
    yy = y.clone().requires_grad_()
    sol = it.implicit_solve(lambda init, *p: w, F, None, (lo, hi), X, yy, solve="lu")
    J = torch.stack([torch.autograd.grad(sol[i], yy, retain_graph=True)[0] for i in range(6)])
    expected = torch.zeros(6, 30, dtype=DT)
    expected[free] = torch.linalg.solve(XF.T @ XF, XF.T)
    torch.testing.assert_close(J, expected)


def test_builders_reject_non_positive_steps():
    with pytest.raises(ValueError, match="stepsize"):
        optimality.make_proximal_gradient_fun(least_squares, prox.prox_lasso, 0.0)
    with pytest.raises(ValueError, match="stepsize"):
        optimality.make_projected_gradient_fun(least_squares, projection.projection_box, -1.0)


def test_stationarity_declares_a_symmetric_jacobian_that_the_engine_carries():
    from implicit_torch._root import Problem

    f = lambda x, a: 0.5 * (a * x**2).sum() + x.sum() ** 2  # noqa: E731
    F = it.optimality.make_stationarity_fun(f)
    x, a = torch.ones(3, dtype=torch.float64), torch.arange(1.0, 4.0, dtype=torch.float64)
    problem = Problem(F, x, (a,), "auto", False)
    op = problem.linearize([x], [a], transposed=True)
    assert op.symmetric is True and op.transposed
    H = torch.func.hessian(f)(x, a)
    torch.testing.assert_close(op(torch.eye(3, dtype=torch.float64)[0]), H[0])
    # A plain function says nothing: "auto" probes.
    assert Problem(lambda x, a: a * x, x, (a,), "auto", False).symmetric is None
