"""The solver classes: solutions and hypergradients against closed forms, finite differences
and dense implicit-function-theorem references; implicit vs unrolled; failure reporting;
float32; vmap."""

import pytest
import torch
from problems import DT, assert_failure_is_reported, assert_implicit_matches_unrolled, gen
from problems import regression_data as data

import implicit_torch as it
from implicit_torch import projection, prox
from implicit_torch.adjoint import ImplicitAdjoint, UnrolledAdjoint
from implicit_torch.solvers.qp import KKTLinearSolve


def least_squares(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum()


def ridge(w, lam, X, y):
    return least_squares(w, X, y) + 0.5 * (lam * w * w).sum()


def lipschitz(X, extra=0.0):
    return torch.linalg.eigvalsh(X.T @ X).max().item() + extra


def jac(out, inp):
    rows = [torch.autograd.grad(o, inp, retain_graph=True)[0] for o in out.reshape(-1)]
    return torch.stack(rows).reshape(*out.shape, *inp.shape)


# --- GradientDescent: per-feature ridge, dw/dλ = −(XᵀX + diag λ)⁻¹ diag(w) -----------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(acceleration=True),
        dict(acceleration=False),
        dict(stepsize=0.0, acceleration=True),
        dict(stepsize=0.0, acceleration=False),
    ],
    ids=["fista", "plain", "fista_linesearch", "plain_linesearch"],
)
def test_gradient_descent_per_feature_ridge_jacobian(kw):
    X, y = data(1)
    lam = torch.linspace(0.2, 1.5, 6, dtype=DT).requires_grad_()
    H = X.T @ X + torch.diag(lam.detach())
    kw = {"stepsize": 1 / lipschitz(X, 1.5), **kw}
    solver = it.GradientDescent(ridge, maxiter=5000, tol=1e-11, **kw)
    out = solver.run(torch.zeros(6, dtype=DT), lam, X, y)
    w_ref = torch.linalg.solve(H, X.T @ y)
    torch.testing.assert_close(out.params.detach(), w_ref, rtol=1e-9, atol=1e-10)
    assert out.state.error <= 1e-11 and 0 < int(out.state.iter_num) < 5000
    torch.testing.assert_close(jac(out.params, lam), -torch.linalg.solve(H, torch.diag(w_ref)))


def test_gradient_descent_pytree_params_and_optimality_fun():
    X, y = data(2)

    def fun(p, X, y, lam):
        return least_squares(p["w"], X, y - p["b"]) + 0.5 * lam * (p["w"] ** 2).sum()

    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    init = {"w": torch.zeros(6, dtype=DT), "b": torch.zeros((), dtype=DT)}
    solver = it.GradientDescent(
        fun, stepsize=1 / (lipschitz(X, 0.5) + 30), maxiter=20000, tol=1e-11
    )
    p = solver.run(init, X, y, lam).params
    # Reference: augmented least squares with an unpenalised intercept column.
    Z = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
    D = torch.diag(torch.tensor([1.0] * 6 + [0.0], dtype=DT))
    sol = torch.linalg.solve(Z.T @ Z + 0.5 * D, Z.T @ y)
    torch.testing.assert_close(p["w"].detach(), sol[:6], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(p["b"].detach(), sol[6], rtol=1e-8, atol=1e-9)
    dsol = -torch.linalg.solve(Z.T @ Z + 0.5 * D, D @ sol)
    (g,) = torch.autograd.grad(p["w"].sum() + p["b"], lam)
    torch.testing.assert_close(g, dsol.sum())
    r = solver.optimality_fun(p, X, y, lam)
    assert max(v.abs().max() for v in r.values()) < 1e-10


# --- ProximalGradient: lasso with a known solution --------------------------------------------


def lasso_problem(alpha=0.3, seed=3):
    """min ½‖Xw − y‖² + α‖w‖₁ with known w* (support {0, 2, 3}) and strict complementarity."""
    X, _ = data(seed, n=30, d=7)
    w = torch.tensor([0.9, 0.0, -1.1, 0.6, 0.0, 0.0, 0.0], dtype=DT)
    z = torch.tensor([1.0, 0.35, -1.0, 1.0, -0.3, 0.1, 0.45], dtype=DT)
    y = X @ w + alpha * X @ torch.linalg.solve(X.T @ X, z)
    return X, y, w, alpha


@pytest.mark.parametrize("acceleration", [True, False])
def test_proximal_gradient_lasso_jacobians_on_the_support(acceleration):
    X, y, w_star, alpha = lasso_problem()
    S = w_star != 0
    XS = X[:, S]
    a = torch.tensor(alpha, dtype=DT, requires_grad=True)
    yy = y.clone().requires_grad_()
    solver = it.ProximalGradient(
        least_squares,
        prox.prox_lasso,
        stepsize=1 / lipschitz(X),
        maxiter=20000,
        tol=1e-12,
        acceleration=acceleration,
    )
    w = solver.run(torch.zeros(7, dtype=DT), a, X, yy).params
    torch.testing.assert_close(w.detach(), w_star, rtol=1e-9, atol=1e-10)
    # On S: X_Sᵀ(X_S w_S − y) + α sign(w_S) = 0.
    dw_da = jac(w, a)
    expected = torch.zeros(7, dtype=DT)
    expected[S] = -torch.linalg.solve(XS.T @ XS, torch.sign(w_star[S]))
    torch.testing.assert_close(dw_da, expected)
    dw_dy = jac(w, yy)
    expected = torch.zeros(7, 30, dtype=DT)
    expected[S] = torch.linalg.solve(XS.T @ XS, XS.T)
    torch.testing.assert_close(dw_dy, expected)


def test_proximal_gradient_elastic_net_with_line_search_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y = data(5, n=40, d=8)
    n = X.shape[0]
    alpha, l1_ratio = 0.02, 0.6
    ref = sklearn.ElasticNet(
        alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False, tol=1e-14, max_iter=100000
    ).fit(X.numpy(), y.numpy())
    # sklearn: 1/(2n)‖y − Xw‖² + α ρ ‖w‖₁ + α(1 − ρ)/2 ‖w‖².
    hp = (alpha * l1_ratio, alpha * (1 - l1_ratio))
    solver = it.ProximalGradient(
        lambda w, X, y: least_squares(w, X, y) / n,
        prox.prox_elastic_net,
        stepsize=0.0,
        maxiter=5000,
        tol=1e-9,
    )
    out = solver.run(torch.zeros(8, dtype=DT), hp, X, y)
    torch.testing.assert_close(out.params, torch.tensor(ref.coef_, dtype=DT), rtol=1e-6, atol=1e-7)


# --- ProjectedGradient onto an ℓ2 ball: central finite differences ------------------------------


def test_projected_gradient_l2_ball_against_finite_differences():
    X, y = data(6)
    step = 1 / lipschitz(X)
    solver = it.ProjectedGradient(
        least_squares, projection.projection_l2_ball, stepsize=step, maxiter=20000, tol=1e-12
    )

    def solve(r, y):
        return solver.run(torch.zeros(6, dtype=DT), r, X, y).params

    r = torch.tensor(0.5, dtype=DT, requires_grad=True)
    yy = y.clone().requires_grad_()
    w = solve(r, yy)
    unconstrained = torch.linalg.lstsq(X, y).solution
    assert unconstrained.norm() > 0.6, "test construction: the ball constraint is active"
    torch.testing.assert_close(w.norm().detach(), torch.tensor(0.5, dtype=DT))
    eps = 1e-6
    with torch.no_grad():
        fd_r = (solve(r + eps, y) - solve(r - eps, y)) / (2 * eps)
        E = torch.eye(30, dtype=DT)
        fd_y = torch.stack([(solve(r, y + eps * e) - solve(r, y - eps * e)) / (2 * eps) for e in E])
    torch.testing.assert_close(jac(w, r), fd_r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(jac(w, yy), fd_y.T, rtol=1e-6, atol=1e-7)


def test_projected_gradient_simplex_with_line_search_and_optimality():
    # min ½‖p − c‖² over the simplex is the simplex projection of c.
    c = torch.tensor([0.5, 1.2, -0.3, 0.8], dtype=DT, requires_grad=True)
    solver = it.ProjectedGradient(
        lambda p, c: 0.5 * ((p - c) ** 2).sum(),
        projection.projection_simplex,
        maxiter=500,
        tol=1e-10,
    )
    p = solver.run(torch.full((4,), 0.25, dtype=DT), 1.0, c).params
    ref = projection.projection_simplex(c, 1.0)
    torch.testing.assert_close(p, ref)
    torch.testing.assert_close(jac(p, c), jac(ref, c))
    assert solver.optimality_fun(p.detach(), 1.0, c.detach()).abs().max() < 1e-10


# --- fixed points ------------------------------------------------------------------------------


def contraction(x, W, theta):
    return 0.5 * torch.tanh(W @ x + theta)


@pytest.mark.parametrize("cls", [it.FixedPointIteration, it.AndersonAcceleration])
def test_fixed_point_solvers_against_dense_ift(cls):
    g = gen(8)
    W = torch.randn(5, 5, generator=g, dtype=DT) / 5**0.5
    theta = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    x = cls(contraction, maxiter=500, tol=1e-13).run(torch.zeros(5, dtype=DT), W, theta).params
    xs = x.detach()
    torch.testing.assert_close(xs, contraction(xs, W, theta.detach()), rtol=0, atol=1e-12)
    # Dense reference: dx/dθ = (I − ∂ₓT)⁻¹ ∂_θT.
    Jx = torch.autograd.functional.jacobian(lambda v: contraction(v, W, theta.detach()), xs)
    Jt = torch.autograd.functional.jacobian(lambda t: contraction(xs, W, t), theta.detach())
    torch.testing.assert_close(jac(x, theta), torch.linalg.solve(torch.eye(5, dtype=DT) - Jx, Jt))


def test_anderson_needs_fewer_iterations_and_handles_pytrees():
    theta = torch.linspace(-0.5, 0.5, 6, dtype=DT)

    def T(x, theta):  # x = cos x + θ: slow for plain iteration (|sin x*| up to ~0.9)
        return torch.cos(x) + theta

    fpi = it.FixedPointIteration(T, maxiter=2000, tol=1e-12).run(torch.zeros(6, dtype=DT), theta)
    aa = it.AndersonAcceleration(T, maxiter=2000, tol=1e-12).run(torch.zeros(6, dtype=DT), theta)
    torch.testing.assert_close(aa.params, fpi.params, rtol=0, atol=1e-11)
    assert int(aa.state.iter_num) * 4 < int(fpi.state.iter_num)
    # A pytree unknown, mixing every other iteration, damped.
    th = theta.clone().requires_grad_()

    def T2(p, theta):
        return {"a": torch.cos(p["a"]) + theta[:3], "b": torch.cos(p["b"]) + theta[3:]}

    solver = it.AndersonAcceleration(T2, mixing_frequency=2, beta=0.8, maxiter=500, tol=1e-12)
    p = solver.run({"a": torch.zeros(3, dtype=DT), "b": torch.zeros(3, dtype=DT)}, th).params
    x = torch.cat([p["a"], p["b"]])
    torch.testing.assert_close(x.detach(), fpi.params, rtol=0, atol=1e-11)
    expected = torch.diag(1 / (1 + torch.sin(x.detach())))
    torch.testing.assert_close(jac(x, th), expected)


# --- implicit vs unrolled ----------------------------------------------------------------------


SOLVER_CASES = {
    "gd": lambda **kw: (
        it.GradientDescent(ridge, stepsize=0.3, maxiter=3000, tol=1e-12, **kw),
        lambda X, y, t: (t, X, y),
    ),
    "proxgrad": lambda **kw: (
        it.ProximalGradient(
            least_squares, prox.prox_elastic_net, stepsize=0.3, maxiter=3000, tol=1e-12, **kw
        ),
        lambda X, y, t: ((0.2 * t[0], t[1]), X, y),
    ),
    "projgrad": lambda **kw: (
        it.ProjectedGradient(
            least_squares, projection.projection_box, stepsize=0.3, maxiter=3000, tol=1e-12, **kw
        ),
        lambda X, y, t: ((-t[0], t[1]), X, y),
    ),
    "fpi": lambda **kw: (
        it.FixedPointIteration(
            lambda x, X, y, t: x - 0.3 * (X.T @ (X @ x - y) + t * x), maxiter=3000, tol=1e-12, **kw
        ),
        lambda X, y, t: (X, y, t),
    ),
    "anderson": lambda **kw: (
        it.AndersonAcceleration(
            lambda x, X, y, t: x - 0.3 * (X.T @ (X @ x - y) + t * x), maxiter=3000, tol=1e-12, **kw
        ),
        lambda X, y, t: (X, y, t),
    ),
}


@pytest.mark.parametrize("name", list(SOLVER_CASES))
def test_implicit_and_unrolled_gradients_agree_at_convergence(name):
    assert_implicit_matches_unrolled(SOLVER_CASES[name])


# --- failures, dtypes, transforms, masking ------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVER_CASES))
def test_non_convergence_warns_raises_or_is_ignored(name):
    assert_failure_is_reported(SOLVER_CASES[name], maxiter=3)
    X, y = data(9)
    solver, args = SOLVER_CASES[name](on_failure="sometimes")
    with pytest.raises(ValueError, match="on_failure"):
        solver.run(torch.zeros(6, dtype=DT), *args(X, y, torch.full((6,), 0.2, dtype=DT)))


@pytest.mark.parametrize("name", list(SOLVER_CASES))
def test_float32_stays_float32(name):
    X, y = data(9)
    X, y = X.float(), y.float()
    t = torch.full((6,), 0.2, requires_grad=True)
    solver, args = SOLVER_CASES[name]()
    solver.tol = 1e-4
    out = solver.run(torch.zeros(6), *args(X, y, t))
    (g,) = torch.autograd.grad(out.params.sum(), t)
    assert out.params.dtype == torch.float32 and g.dtype == torch.float32
    assert out.state.error.dtype == torch.float32 and out.state.error <= 1e-4
    ref = torch.linalg.solve(X.T @ X + 0.2 * torch.eye(6), X.T @ y)
    if name in ("gd", "fpi", "anderson"):
        torch.testing.assert_close(out.params, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("check_every", [1, 7])
def test_masking_makes_the_check_interval_irrelevant(check_every):
    X, y = data(9)
    lam = torch.full((6,), 0.2, dtype=DT)
    solver = it.GradientDescent(ridge, stepsize=0.3, maxiter=3000, tol=1e-10)
    ref = solver.run(torch.zeros(6, dtype=DT), lam, X, y)
    solver.check_every = check_every
    out = solver.run(torch.zeros(6, dtype=DT), lam, X, y)
    assert int(out.state.iter_num) == int(ref.state.iter_num)
    torch.testing.assert_close(out.params, ref.params, rtol=0, atol=0)


def test_vmap_over_a_hyperparameter():
    X, y, _, _ = lasso_problem()
    alphas = torch.tensor([0.1, 0.3, 0.8], dtype=DT)
    solver = it.ProximalGradient(
        least_squares, prox.prox_lasso, stepsize=1 / lipschitz(X), maxiter=150, tol=1e-10
    )

    def solve(a):  # under vmap all maxiter iterations run, converged problems frozen
        return solver.run(torch.zeros(7, dtype=DT), a, X, y).params

    batched = torch.func.vmap(solve)(alphas)
    loop = torch.stack([solve(a) for a in alphas])
    torch.testing.assert_close(batched, loop, rtol=1e-8, atol=1e-9)
    jb = torch.func.vmap(torch.func.jacrev(solve))(alphas)
    jl = torch.stack([jac(solve(a), a) for a in alphas.clone().requires_grad_().unbind()])
    torch.testing.assert_close(jb, jl, rtol=1e-7, atol=1e-9)


def test_update_and_init_state_step_by_step():
    X, y = data(9)
    lam = torch.full((6,), 0.2, dtype=DT)
    solver = it.GradientDescent(ridge, stepsize=0.3, acceleration=False)
    w = torch.zeros(6, dtype=DT)
    state = solver.init_state(w, lam, X, y)
    assert int(state.iter_num) == 0 and torch.isinf(state.error)
    w1, state = solver.update(w, state, lam, X, y)
    torch.testing.assert_close(w1, w - 0.3 * (X.T @ (X @ w - y) + lam * w))
    torch.testing.assert_close(state.error, torch.linalg.vector_norm(X.T @ y))
    assert isinstance(solver.run(w, lam, X, y), it.OptStep)


def test_default_linear_solver_and_adjoint_follow_the_fields():
    def T(w, lam, X, y):
        return w - 0.1 * (X.T @ (X @ w - y) + lam * w)

    assert it.GradientDescent(ridge).default_implicit_diff_solve() == "cg"
    assert it.LBFGS(ridge).default_implicit_diff_solve() == "cg"
    assert it.FixedPointIteration(T).default_implicit_diff_solve() == "gmres"
    assert it.ProximalGradient(least_squares).default_implicit_diff_solve() == "gmres"
    assert it.EqualityConstrainedQP().default_implicit_diff_solve() == "lu"
    assert isinstance(it.QP().default_implicit_diff_solve(), KKTLinearSolve)
    assert it.GradientDescent(ridge).adjoint == ImplicitAdjoint(None)
    assert it.GradientDescent(ridge, implicit_diff_solve="lu").adjoint == ImplicitAdjoint("lu")
    for flags in (dict(unroll=True), dict(implicit_diff=False)):
        assert it.GradientDescent(ridge, **flags).adjoint == UnrolledAdjoint()


def test_tol_may_be_a_tensor():
    # e.g. a tolerance relative to the data, or one per problem under vmap.
    X, y = data(9)
    lam = torch.full((6,), 0.2, dtype=DT)
    tol = 1e-10 * torch.linalg.vector_norm(X.T @ y)
    out = it.GradientDescent(ridge, stepsize=0.3, maxiter=3000, tol=tol).run(
        torch.zeros(6, dtype=DT), lam, X, y
    )
    assert out.state.error <= tol
    with pytest.warns(it.ConvergenceWarning, match="did not converge"):
        it.GradientDescent(ridge, stepsize=0.3, maxiter=2, tol=tol).run(
            torch.zeros(6, dtype=DT), lam, X, y
        )
