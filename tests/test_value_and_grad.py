"""``value_and_grad=True`` (JAXopt's option: ``fun`` returns its value and an analytic gradient)
in GradientDescent, ProximalGradient, ProjectedGradient, LBFGS and MirrorDescent: the same
solution and hypergradients as the autograd gradient, implicitly and unrolled, checked against
the ridge closed form; a ``fun`` that returns a scalar is refused clearly."""

import pytest
import torch
from problems import DT, gen
from problems import regression_data as data

from implicit_torch import optimality, projection, prox
from implicit_torch.solvers.gradient_descent import GradientDescent
from implicit_torch.solvers.lbfgs import LBFGS
from implicit_torch.solvers.mirror_descent import MirrorDescent
from implicit_torch.solvers.projected_gradient import ProjectedGradient
from implicit_torch.solvers.proximal_gradient import ProximalGradient


def ridge(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()


def ridge_value_and_grad(w, lam, X, y):
    r = X @ w - y
    return 0.5 * (r * r).sum() + 0.5 * (lam * w * w).sum(), X.T @ r + lam * w


def ridge_closed(lam, X, y):
    return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)


def simplex_objective(x, theta):  # min ½‖x − θ‖² over the simplex
    return 0.5 * ((x - theta) ** 2).sum()


def simplex_value_and_grad(x, theta):
    return simplex_objective(x, theta), x - theta


SMOOTH = {
    "gradient_descent": lambda f, **kw: GradientDescent(fun=f, stepsize=0.5, **kw),
    "proximal_gradient": lambda f, **kw: ProximalGradient(fun=f, stepsize=0.5, **kw),
    "proximal_gradient_line_search": lambda f, **kw: ProximalGradient(fun=f, **kw),
    "lbfgs": lambda f, **kw: LBFGS(fun=f, **kw),
}


def run_ridge(name, value_and_grad, unroll):
    X, y = data(0)
    lam = torch.full((X.shape[1],), 0.5, dtype=DT, requires_grad=True)
    fun = ridge_value_and_grad if value_and_grad else ridge
    solver = SMOOTH[name](fun, value_and_grad=value_and_grad, tol=1e-12, maxiter=5000)
    solver.unroll = unroll
    init = torch.zeros(X.shape[1], dtype=DT)
    args = (None, lam, X, y) if name.startswith("proximal") else (lam, X, y)
    w = solver.run(init, *args).params
    (g,) = torch.autograd.grad(w.sum(), lam)
    return w.detach(), g, lam, X, y


@pytest.mark.parametrize("name", list(SMOOTH))
@pytest.mark.parametrize("unroll", [False, True])
def test_smooth_solvers_match_autograd_and_closed_form(name, unroll):
    w1, g1, lam, X, y = run_ridge(name, True, unroll)
    w0, g0, *_ = run_ridge(name, False, unroll)
    torch.testing.assert_close(w1, w0, atol=1e-10, rtol=0)
    torch.testing.assert_close(g1, g0, atol=1e-8, rtol=1e-8)
    lam_ = lam.detach().clone().requires_grad_()
    w_ref = ridge_closed(lam_, X, y)
    (g_ref,) = torch.autograd.grad(w_ref.sum(), lam_)
    torch.testing.assert_close(w1, w_ref.detach(), atol=1e-9, rtol=0)
    torch.testing.assert_close(g1, g_ref, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("solver_name", ["projected_gradient", "mirror_descent"])
def test_simplex_solvers_match_the_simplex_jacobian(solver_name):
    theta = torch.randn(6, generator=gen(1), dtype=DT).requires_grad_()
    init = torch.full((6,), 1.0 / 6, dtype=DT)
    outs = []
    for given in (True, False):
        fun = simplex_value_and_grad if given else simplex_objective
        if solver_name == "projected_gradient":
            solver = ProjectedGradient(
                fun=fun,
                projection=lambda v, hp: projection.projection_simplex(v),
                stepsize=1.0,
                value_and_grad=given,
                tol=1e-12,
                maxiter=500,
            )
        else:
            solver = MirrorDescent(fun=fun, stepsize=0.5, value_and_grad=given, tol=1e-12,
                                   maxiter=20000)  # fmt: skip
        x = solver.run(init, None, theta).params
        outs.append((x.detach(), torch.autograd.grad(x[0], theta)[0]))
    (x1, g1), (x0, g0) = outs
    torch.testing.assert_close(x1, x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(g1, g0, atol=1e-7, rtol=1e-7)
    # Reference: the projection onto the simplex and its Jacobian row diag(s) − s sᵀ/|s|.
    p = projection.projection_simplex(theta.detach())
    torch.testing.assert_close(x1, p, atol=1e-8, rtol=0)
    s = (p > 0).to(DT)
    row0 = s[0] * (torch.eye(6, dtype=DT)[0] - s / s.sum())
    torch.testing.assert_close(g1, row0, atol=1e-6, rtol=0)


def test_optimality_builders_accept_value_and_grad():
    X, y = data(2)
    lam = torch.full((X.shape[1],), 0.3, dtype=DT)
    w = torch.randn(X.shape[1], generator=gen(3), dtype=DT)
    F1 = optimality.make_stationarity_fun(ridge_value_and_grad, value_and_grad=True)
    F0 = optimality.make_stationarity_fun(ridge)
    torch.testing.assert_close(F1(w, lam, X, y), F0(w, lam, X, y))
    P1 = optimality.make_proximal_gradient_fun(
        ridge_value_and_grad, prox.prox_lasso, 0.1, value_and_grad=True
    )
    P0 = optimality.make_proximal_gradient_fun(ridge, prox.prox_lasso, 0.1)
    torch.testing.assert_close(P1(w, 0.2, lam, X, y), P0(w, 0.2, lam, X, y))


def test_fun_returning_a_scalar_is_refused():
    X, y = data(0)
    lam = torch.full((X.shape[1],), 0.5, dtype=DT)
    init = torch.zeros(X.shape[1], dtype=DT)
    for solver in (
        GradientDescent(fun=ridge, value_and_grad=True, stepsize=0.5),
        LBFGS(fun=ridge, value_and_grad=True),
    ):
        with pytest.raises(TypeError, match="must return a pair"):
            solver.run(init, lam, X, y)


def composite_cases():
    X = torch.randn(12, 5, generator=gen(7), dtype=DT)
    labels = torch.randint(0, 3, (12,), generator=gen(8))
    Y = torch.nn.functional.one_hot(labels, 3).to(DT)
    beta = torch.softmax(torch.randn(12, 3, generator=gen(9), dtype=DT), -1)
    return {
        "least_squares": (torch.randn(5, generator=gen(10), dtype=DT), ((X, X[:, 0]),)),
        "binary_logistic_regression": (
            torch.randn(5, generator=gen(11), dtype=DT),
            ((X, (labels > 0).to(DT)),),
        ),
        "multiclass_logistic_regression": (
            torch.randn(5, 3, generator=gen(12), dtype=DT),
            ((X, labels),),
        ),
        "multiclass_linear_svm_dual": (beta, (0.7, (X, Y))),
    }


@pytest.mark.parametrize("name", list(composite_cases()))
def test_composite_objectives_value_and_grad_match_autograd(name):
    from implicit_torch import objective

    fun = getattr(objective, name)
    W, args = composite_cases()[name]
    value, grad = fun.value_and_grad(W, *args)
    Wg = W.clone().requires_grad_()
    ref = fun(Wg, *args)
    (ref_grad,) = torch.autograd.grad(ref, Wg)
    torch.testing.assert_close(value, ref.detach())
    torch.testing.assert_close(grad, ref_grad)


def test_mirror_descent_svm_dual_with_value_and_grad():
    from implicit_torch import objective
    from implicit_torch.solvers.mirror_descent import projection_grad_kl_simplex

    _, (lam0, (X, Y)) = composite_cases()["multiclass_linear_svm_dual"]
    init = torch.full_like(Y, 1.0 / 3)
    grads = []
    for given in (True, False):
        f = objective.multiclass_linear_svm_dual
        solver = MirrorDescent(
            fun=f.value_and_grad if given else f,
            value_and_grad=given,
            projection_grad=projection_grad_kl_simplex,
            stepsize=0.2,
            maxiter=5000,
            tol=1e-10,
        )
        lam = torch.tensor(lam0, dtype=DT, requires_grad=True)
        beta = solver.run(init, None, lam, (X, Y)).params
        grads.append((beta.detach(), torch.autograd.grad((beta * Y).sum(), lam)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-8, rtol=1e-6)
