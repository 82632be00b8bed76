"""LBFGS, GaussNewton, LevenbergMarquardt, Broyden and Bisection: solutions and derivatives
against closed forms, scikit-learn, finite differences and dense implicit-function-theorem
references; implicit vs unrolled; failure reporting; bad input; float32."""

import pytest
import torch
from problems import DT, assert_failure_is_reported, assert_implicit_matches_unrolled, gen
from problems import regression_data as data

from implicit_torch import projection
from implicit_torch.solvers.bisection import Bisection
from implicit_torch.solvers.broyden import Broyden
from implicit_torch.solvers.gauss_newton import GaussNewton
from implicit_torch.solvers.lbfgs import LBFGS
from implicit_torch.solvers.levenberg_marquardt import LevenbergMarquardt


def jac(out, inp):
    rows = [torch.autograd.grad(o, inp, retain_graph=True)[0] for o in out.reshape(-1)]
    return torch.stack(rows).reshape(*out.shape, *inp.shape)


def ridge(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam * w * w).sum()


def ridge_residual(w, lam, X, y):
    return torch.cat([X @ w - y, lam.sqrt() * w])


# --- ridge: w* = (XᵀX + diag λ)⁻¹ Xᵀy, dw/dλ = −(XᵀX + diag λ)⁻¹ diag(w) ------------------------


RIDGE_SOLVERS = {
    "lbfgs": lambda **kw: LBFGS(ridge, **kw),
    "lbfgs_backtracking": lambda **kw: LBFGS(ridge, linesearch="backtracking", **kw),
    "lbfgs_fixed_step": lambda **kw: LBFGS(ridge, stepsize=0.5, **kw),
    "gauss_newton": lambda **kw: GaussNewton(ridge_residual, **kw),
    "gauss_newton_cg": lambda **kw: GaussNewton(ridge_residual, solver="cg", **kw),
    "levenberg_marquardt": lambda **kw: LevenbergMarquardt(ridge_residual, **kw),
}


@pytest.mark.parametrize("name", list(RIDGE_SOLVERS))
def test_ridge_solution_and_jacobian_against_closed_form(name):
    X, y = data(1)
    lam = torch.linspace(0.2, 1.5, 6, dtype=DT).requires_grad_()
    yy = y.clone().requires_grad_()
    H = X.T @ X + torch.diag(lam.detach())
    solver = RIDGE_SOLVERS[name](maxiter=500, tol=1e-11)
    out = solver.run(torch.zeros(6, dtype=DT), lam, X, yy)
    w_ref = torch.linalg.solve(H, X.T @ y)
    torch.testing.assert_close(out.params.detach(), w_ref, rtol=1e-9, atol=1e-10)
    assert out.state.error <= 1e-11 and 0 < int(out.state.iter_num) < 500
    torch.testing.assert_close(jac(out.params, lam), -torch.linalg.solve(H, torch.diag(w_ref)))
    torch.testing.assert_close(jac(out.params, yy), torch.linalg.solve(H, X.T))


def test_gauss_newton_solves_a_linear_least_squares_in_one_step():
    X, y = data(2)
    lam = torch.full((6,), 0.3, dtype=DT)
    out = GaussNewton(ridge_residual, tol=1e-10).run(torch.zeros(6, dtype=DT), lam, X, y)
    # Step 1 lands on the solution; step 2 measures a zero gradient there.
    assert int(out.state.iter_num) == 2


# --- nonlinear least squares: dense implicit-function-theorem reference ------------------------


def exp_fit_residual(p, t, y):
    """r_i = a exp(−b t_i) + c − y_i, unknowns as a pytree {"ab": (a, b), "c": c}."""
    a, b = p["ab"][0], p["ab"][1]
    return a * torch.exp(-b * t) + p["c"] - y


def exp_fit_problem():
    t = torch.linspace(0, 3, 25, dtype=DT)
    noise = 0.05 * torch.randn(25, generator=gen(3), dtype=DT)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 + noise
    return t, y


def exp_fit_reference(t, y, p_star):
    """dp*/dy = −H⁻¹ ∂²f/∂p∂y for f = ½‖r‖², with p flattened as (a, b, c)."""

    def f(v, y):
        return 0.5 * (exp_fit_residual({"ab": v[:2], "c": v[2]}, t, y) ** 2).sum()

    v = torch.cat([p_star["ab"], p_star["c"].reshape(1)]).detach()
    H = torch.func.hessian(f)(v, y)
    cross = torch.func.jacrev(torch.func.grad(f), argnums=1)(v, y)
    return v, -torch.linalg.solve(H, cross)


@pytest.mark.parametrize("cls", [LBFGS, GaussNewton, LevenbergMarquardt], ids=["lbfgs", "gn", "lm"])
def test_nonlinear_least_squares_pytree_against_dense_ift(cls):
    t, y = exp_fit_problem()
    yy = y.clone().requires_grad_()
    if cls is LBFGS:

        def obj(p, t, y):
            return 0.5 * (exp_fit_residual(p, t, y) ** 2).sum()

        solver = LBFGS(obj, maxiter=500, tol=1e-10)
    else:
        solver = cls(exp_fit_residual, maxiter=100, tol=1e-10)
    init = {"ab": torch.tensor([1.0, 1.0], dtype=DT), "c": torch.tensor(0.0, dtype=DT)}
    p = solver.run(init, t, yy).params
    v, ref = exp_fit_reference(t, y, p)
    grad = solver.optimality_fun({"ab": v[:2], "c": v[2]}, t, y)
    assert max(g.abs().max() for g in grad.values()) < 1e-9
    assert abs(v[1] - 1.3) < 0.1, "test construction: the fit finds the generating decay"
    got = torch.cat([jac(p["ab"], yy), jac(p["c"], yy)[None]])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def test_levenberg_marquardt_and_lbfgs_on_rosenbrock():
    # Rosenbrock as least squares: r = (10 (x₂ − x₁²), 1 − x₁), minimum (1, 1).
    def residual(x, s):
        return torch.stack([10 * (x[1] - x[0] ** 2), s - x[0]])

    s = torch.tensor(1.0, dtype=DT, requires_grad=True)
    out = LevenbergMarquardt(residual, maxiter=200, tol=1e-12).run(
        torch.tensor([-1.2, 1.0], dtype=DT), s
    )
    torch.testing.assert_close(out.params.detach(), torch.tensor([1.0, 1.0], dtype=DT))
    # x* = (s, s²): dx*/ds = (1, 2s).
    torch.testing.assert_close(jac(out.params, s), torch.tensor([1.0, 2.0], dtype=DT))
    lbfgs = LBFGS(lambda x, s: 0.5 * (residual(x, s) ** 2).sum(), maxiter=500, tol=1e-10)
    out = lbfgs.run(torch.tensor([-1.2, 1.0], dtype=DT), s)
    torch.testing.assert_close(out.params.detach(), torch.tensor([1.0, 1.0], dtype=DT))
    torch.testing.assert_close(jac(out.params, s), torch.tensor([1.0, 2.0], dtype=DT))


# --- LBFGS: ℓ2 multiclass logistic regression on digits, hypergradient vs finite differences ----


def digits_problem():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=DT).reshape(-1, 8, 8)
    # 2×2 average pooling: 16 features in [0, 1].
    X = X.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(-1, 16) / 16
    y = torch.tensor(y)
    return X[:200], y[:200], X[200:400], y[200:400]


def logreg(p, log_lam, X, y):
    logits = X @ p["W"] + p["b"]
    ce = torch.nn.functional.cross_entropy(logits, y)
    return ce + 0.5 * torch.exp(log_lam) * (p["W"] ** 2).sum()


def test_lbfgs_digits_logistic_regression_hypergradient():
    Xtr, ytr, Xval, yval = digits_problem()
    solver = LBFGS(logreg, maxiter=1000, tol=1e-9)
    init = {"W": torch.zeros(16, 10, dtype=DT), "b": torch.zeros(10, dtype=DT)}

    def val_loss(log_lam):
        p = solver.run(init, log_lam, Xtr, ytr).params
        return torch.nn.functional.cross_entropy(Xval @ p["W"] + p["b"], yval)

    log_lam = torch.tensor(-4.0, dtype=DT, requires_grad=True)
    out = solver.run(init, log_lam, Xtr, ytr)
    assert out.state.error <= 1e-9
    # The solution agrees with scikit-learn's: C = 1 / (n λ) for sklearn's C·ΣCE + ½‖W‖².
    linear_model = pytest.importorskip("sklearn.linear_model")
    n = Xtr.shape[0]
    ref = linear_model.LogisticRegression(C=1 / (n * float(torch.exp(log_lam.detach()))), tol=1e-12)
    ref.fit(Xtr.numpy(), ytr.numpy())
    W = torch.tensor(ref.coef_.T, dtype=DT)
    torch.testing.assert_close(out.params["W"].detach(), W, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(val_loss(log_lam), log_lam)
    eps = 1e-4
    with torch.no_grad():
        precise = LBFGS(logreg, maxiter=3000, tol=1e-12)
        vals = []
        for d in (eps, -eps):
            p = precise.run(init, log_lam + d, Xtr, ytr).params
            vals.append(torch.nn.functional.cross_entropy(Xval @ p["W"] + p["b"], yval))
        fd = (vals[0] - vals[1]) / (2 * eps)
    assert abs(float(g)) > 1e-3, "test construction: the hypergradient is not negligible"
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


# --- Broyden -----------------------------------------------------------------------------------


def nonlinear_system(x, A, theta):
    """F(x) = A x + 0.3 tanh(x) + x³/10 − θ: a root for every θ, Jacobian nonsingular."""
    return A @ x + 0.3 * torch.tanh(x) + x**3 / 10 - theta


@pytest.mark.parametrize("jacobian_init", [None, 2.0], ids=["exact_init", "scaled_identity"])
def test_broyden_against_dense_ift(jacobian_init):
    g = gen(4)
    A = 2.0 * torch.eye(5, dtype=DT) + 0.4 * torch.randn(5, 5, generator=g, dtype=DT)
    theta = torch.randn(5, generator=g, dtype=DT, requires_grad=True)
    solver = Broyden(nonlinear_system, jacobian_init=jacobian_init, maxiter=200, tol=1e-12)
    out = solver.run(torch.zeros(5, dtype=DT), A, theta)
    x = out.params.detach()
    assert nonlinear_system(x, A, theta.detach()).abs().max() < 1e-12
    assert out.state.error <= 1e-12
    Jx = torch.func.jacrev(nonlinear_system)(x, A, theta.detach())
    Jt = torch.func.jacrev(nonlinear_system, argnums=2)(x, A, theta.detach())
    torch.testing.assert_close(jac(out.params, theta), -torch.linalg.solve(Jx, Jt))


def test_broyden_pytree_fixed_point_residual():
    theta = torch.linspace(-0.5, 0.5, 6, dtype=DT, requires_grad=True)

    def F(p, theta):  # x = cos x + θ as a root of T(x) − x, split into two leaves
        return {
            "a": torch.cos(p["a"]) + theta[:3] - p["a"],
            "b": torch.cos(p["b"]) + theta[3:] - p["b"],
        }

    solver = Broyden(F, jacobian_init=-1.0, maxiter=100, tol=1e-12)
    p = solver.run({"a": torch.zeros(3, dtype=DT), "b": torch.zeros(3, dtype=DT)}, theta).params
    x = torch.cat([p["a"], p["b"]])
    torch.testing.assert_close(
        x.detach(), torch.cos(x.detach()) + theta.detach(), rtol=0, atol=1e-11
    )
    torch.testing.assert_close(jac(x, theta), torch.diag(1 / (1 + torch.sin(x.detach()))))


# --- Bisection ---------------------------------------------------------------------------------


def test_bisection_scalar_roots_closed_form_derivative():
    # x³ + θ = 0: x = −θ^(1/3), dx/dθ = −1 / (3 x²); the second half is decreasing in x.
    theta = torch.tensor([0.3, -0.2, 1.0, 5.0, -0.7, 0.05], dtype=DT, requires_grad=True)
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=DT)
    solver = Bisection(
        lambda x, th: sign * (x**3 + th), lower=-2.0, upper=2.0, maxiter=100, tol=1e-14
    )
    out = solver.run(None, theta)
    x = out.params
    t = theta.detach()
    expected = -torch.sign(t) * t.abs() ** (1 / 3)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-13)
    assert out.state.error <= 1e-14 and x.shape == (6,) and x.dtype == DT
    torch.testing.assert_close(jac(x, theta), torch.diag(-1 / (3 * expected**2)))
    # The direction given instead of read from the bracket.
    down = Bisection(
        lambda x, th: -(x**3) - th, lower=-2.0, upper=2.0, increasing=False, maxiter=100, tol=1e-14
    )
    torch.testing.assert_close(down.run(None, t).params, expected, rtol=1e-12, atol=1e-13)
    # Forward mode too.
    tangent = torch.ones(6, dtype=DT)
    _, jvp = torch.func.jvp(lambda th: solver.run(None, th).params, (t,), (tangent,))
    torch.testing.assert_close(jvp, -1 / (3 * expected**2))


def test_bisection_simplex_projection_threshold_and_jacobian():
    # p = max(z − τ, 0) with Σ p = 1: τ is the root of Σ max(z − τ, 0) − 1, decreasing in τ.
    g = gen(5)
    Z = torch.randn(4, 7, generator=g, dtype=DT)
    Zg = Z.clone().requires_grad_()

    def F(tau, z):
        return torch.relu(z - tau).sum(-1, keepdim=True) - 1

    solver = Bisection(
        F,
        lower=Z.min(-1, keepdim=True).values - 1,
        upper=Z.max(-1, keepdim=True).values,
        maxiter=200,
        tol=1e-14,
    )
    tau = solver.run(None, Zg).params
    assert tau.shape == (4, 1)
    P = torch.relu(Zg - tau)
    for i in range(4):
        ref = projection.projection_simplex(Z[i])
        torch.testing.assert_close(P[i].detach(), ref, rtol=1e-12, atol=1e-13)
        s = (ref > 0).to(DT)
        expected = torch.diag(s) - torch.outer(s, s) / s.sum()
        J = jac(P[i], Zg)[:, i]
        torch.testing.assert_close(J, expected)
        for j in range(4):
            if j != i:
                assert jac(P[i], Zg)[:, j].abs().max() == 0


def test_bisection_bad_bracket_and_inputs():
    with pytest.raises(ValueError, match="does not bracket a root"):
        Bisection(lambda x: x**2 + 1, lower=-1.0, upper=1.0).run()
    with pytest.raises(ValueError, match="one value per root"):
        Bisection(lambda x: x.sum(), lower=torch.zeros(3) - 1, upper=torch.ones(3)).run()
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        Bisection(lambda x: x, lower=1.0, upper=-1.0).run()
    with pytest.raises(TypeError, match="init_params must be None or a floating-point tensor"):
        Bisection(lambda x: x, lower=-1.0, upper=1.0).run([0.0])
    # check_bracket=False: no error, the iteration converges to an end instead.
    out = Bisection(
        lambda x: x**2 + 1, lower=-1.0, upper=1.0, check_bracket=False, on_failure="ignore"
    ).run()
    assert out.state.error > 0.5


# --- implicit vs unrolled ----------------------------------------------------------------------


def _fixed_point_F(x, X, y, t):
    return X.T @ (X @ x - y) + t * x


CASES = {
    "lbfgs": lambda **kw: (LBFGS(ridge, maxiter=500, tol=1e-12, **kw), lambda X, y, t: (t, X, y)),
    "gauss_newton": lambda **kw: (
        GaussNewton(ridge_residual, maxiter=50, tol=1e-12, **kw),
        lambda X, y, t: (t, X, y),
    ),
    "levenberg_marquardt": lambda **kw: (
        LevenbergMarquardt(ridge_residual, maxiter=100, tol=1e-12, **kw),
        lambda X, y, t: (t, X, y),
    ),
    "broyden": lambda **kw: (
        Broyden(_fixed_point_F, jacobian_init=1.0, maxiter=200, tol=1e-12, **kw),
        lambda X, y, t: (X, y, t),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_implicit_and_unrolled_gradients_agree_at_convergence(name):
    assert_implicit_matches_unrolled(CASES[name])


# --- failures, bad input, dtypes ---------------------------------------------------------------

FAIL_CASES = dict(CASES)
FAIL_CASES["bisection"] = lambda **kw: (
    Bisection(lambda x, X, y, t: x**3 + t, lower=-1.0, upper=1.0, tol=1e-12, **kw),
    lambda X, y, t: (X, y, t),
)


@pytest.mark.parametrize("name", list(FAIL_CASES))
def test_non_convergence_warns_raises_or_is_ignored(name):
    assert_failure_is_reported(FAIL_CASES[name], maxiter=1)


def test_bad_input_gives_clear_errors():
    X, y = data(9)
    lam = torch.full((6,), 0.2, dtype=DT)
    w0 = torch.zeros(6, dtype=DT)
    with pytest.raises(ValueError, match="scalar"):
        LBFGS(lambda w, X, y: X @ w - y).run(w0, X, y)
    with pytest.raises(ValueError, match="linesearch"):
        LBFGS(ridge, linesearch="wolfe").run(w0, lam, X, y)
    with pytest.raises(ValueError, match="c1 < c2"):
        LBFGS(ridge, c1=0.5, c2=0.1).run(w0, lam, X, y)
    with pytest.raises(ValueError, match="history_size"):
        LBFGS(ridge, history_size=0).run(w0, lam, X, y)
    with pytest.raises(ValueError, match="unknown solve"):
        GaussNewton(ridge_residual, solver="qr").run(w0, lam, X, y)
    with pytest.raises(ValueError, match="damping_parameter"):
        LevenbergMarquardt(ridge_residual, damping_parameter=0.0).run(w0, lam, X, y)
    with pytest.raises(TypeError, match="residual_fun must return"):
        GaussNewton(lambda w: None).run(w0)
    with pytest.raises(ValueError, match="the output of fun"):
        Broyden(lambda x: x[:3]).run(w0)
    with pytest.raises(ValueError, match="jacobian_init"):
        Broyden(lambda x: x, jacobian_init=0.0).run(w0)
    with pytest.raises(TypeError, match="floating-point"):
        LBFGS(ridge).run(torch.zeros(6, dtype=torch.int64), lam, X, y)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_stays_float32(name):
    X, y = data(9)
    X, y = X.float(), y.float()
    t = torch.full((6,), 0.2, requires_grad=True)
    solver, args = CASES[name]()
    solver.tol = 1e-4
    out = solver.run(torch.zeros(6), *args(X, y, t))
    (g,) = torch.autograd.grad(out.params.sum(), t)
    assert out.params.dtype == torch.float32 and g.dtype == torch.float32
    assert out.state.error.dtype == torch.float32 and out.state.error <= 1e-4
    H = X.T @ X + 0.2 * torch.eye(6)
    ref = torch.linalg.solve(H, X.T @ y)
    torch.testing.assert_close(out.params.detach(), ref, rtol=1e-3, atol=1e-4)
    # d(Σw)/dt_j = −(H⁻¹1)_j w_j for the per-feature ridge.
    torch.testing.assert_close(g, -torch.linalg.solve(H, torch.ones(6)) * ref, rtol=1e-3, atol=1e-4)


def test_bisection_float32():
    theta = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    out = Bisection(lambda x, th: x**3 + th, lower=-2.0, upper=2.0, tol=1e-5).run(None, theta)
    assert out.params.dtype == torch.float32 and out.state.error <= 1e-5
    (g,) = torch.autograd.grad(out.params.sum(), theta)
    x = out.params.detach()
    torch.testing.assert_close(g, -1 / (3 * x**2), rtol=1e-5, atol=1e-6)


def rosenbrock(x, a):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (a - x[:-1]) ** 2).sum()


@pytest.mark.parametrize("linesearch", ["zoom", "backtracking"])
def test_lbfgs_line_searches(linesearch):
    a = torch.tensor(1.0, dtype=DT)
    solver = LBFGS(rosenbrock, linesearch=linesearch, maxiter=300, tol=1e-9)
    x = -1.2 * torch.ones(6, dtype=DT)
    state = solver.init_state(x, a)
    for _ in range(15):
        x_new, new = solver.update(x, state, a)
        t = new.stepsize
        assert t > 0
        step = x_new - x
        slope = torch.dot(state.grad, step) / t
        # Sufficient decrease (both searches); strong curvature condition (zoom).
        assert new.value <= state.value + solver.c1 * t * slope + 1e-12
        if linesearch == "zoom":
            assert torch.dot(new.grad, step).abs() / t <= solver.c2 * slope.abs() + 1e-12
        x, state = x_new, new
    out = solver.run(-1.2 * torch.ones(6, dtype=DT), a)
    torch.testing.assert_close(out.params, torch.ones(6, dtype=DT))


def test_lbfgs_update_and_init_state_step_by_step():
    X, y = data(9)
    lam = torch.full((6,), 0.2, dtype=DT)
    solver = LBFGS(ridge, stepsize=0.1)
    w = torch.zeros(6, dtype=DT)
    state = solver.init_state(w, lam, X, y)
    g0 = -(X.T @ y)
    assert int(state.iter_num) == 0
    torch.testing.assert_close(state.error, torch.linalg.vector_norm(g0))
    # No history: d = −g / max(1, ‖g‖).
    w1, state = solver.update(w, state, lam, X, y)
    torch.testing.assert_close(w1, -0.1 * g0 / torch.linalg.vector_norm(g0).clamp(min=1))
    assert int(state.iter_num) == 1 and float(state.rho_history[-1].detach()) > 0


def test_lbfgs_under_vmap_over_a_hyperparameter():
    X, y = data(9)
    lams = torch.tensor([0.1, 0.5, 2.0], dtype=DT)
    solver = LBFGS(lambda w, lam, X, y: ridge(w, lam, X, y), maxiter=40, tol=1e-10)

    def solve(lam):  # under vmap all iterations run (masked) and the line search is masked
        return solver.run(torch.zeros(6, dtype=DT), lam, X, y).params

    batched = torch.func.vmap(solve)(lams)
    for lam, w in zip(lams, batched):
        ref = torch.linalg.solve(X.T @ X + lam * torch.eye(6, dtype=DT), X.T @ y)
        torch.testing.assert_close(w, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_masking_makes_the_check_interval_irrelevant(name):
    # check_every > 1 is the accelerator's path: converged iterations are frozen by masking.
    X, y = data(9)
    t = torch.full((6,), 0.2, dtype=DT)
    outs = []
    for check_every in (1, 10):
        solver, args = CASES[name](check_every=check_every)
        outs.append(solver.run(torch.zeros(6, dtype=DT), *args(X, y, t)))
    assert int(outs[0].state.iter_num) == int(outs[1].state.iter_num)
    torch.testing.assert_close(outs[0].params, outs[1].params, rtol=0, atol=0)


VMAP_CASES = {
    "levenberg_marquardt": LevenbergMarquardt(ridge_residual, maxiter=30, tol=1e-12),
    "gauss_newton_cg": GaussNewton(ridge_residual, solver="cg", maxiter=5, tol=1e-12),
    "broyden": Broyden(_fixed_point_F, maxiter=30, tol=1e-12),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_and_grad_over_a_hyperparameter(name):
    X, y = data(9)
    solver = VMAP_CASES[name]
    args = (lambda lam: (lam.expand(6), X, y)) if name != "broyden" else (lambda lam: (X, y, lam))

    def total(lam):
        return solver.run(torch.zeros(6, dtype=DT), *args(lam)).params.sum()

    lams = torch.tensor([0.1, 0.5], dtype=DT)
    values = torch.func.vmap(total)(lams)
    grads = torch.func.vmap(torch.func.grad(total))(lams)
    for lam, v, g in zip(lams, values, grads):
        H = X.T @ X + lam * torch.eye(6, dtype=DT)
        w = torch.linalg.solve(H, X.T @ y)
        torch.testing.assert_close(v, w.sum())
        torch.testing.assert_close(g, -torch.linalg.solve(H, w).sum())


def test_bisection_under_vmap():
    theta = torch.tensor([0.3, -0.2, 1.0], dtype=DT)
    solver = Bisection(lambda x, t: x**3 + t, lower=-2.0, upper=2.0, maxiter=60, tol=1e-14)

    def root(t):
        return solver.run(None, t).params

    x = torch.func.vmap(root)(theta)
    torch.testing.assert_close(x, -torch.sign(theta) * theta.abs() ** (1 / 3))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(root))(theta), -1 / (3 * x**2))


def test_limited_memory_broyden_matches_dense_broyden_root():
    from implicit_torch.solvers.broyden import Broyden

    g = torch.Generator().manual_seed(70)
    W = torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    theta = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)

    def F(x, theta):  # fixed point of the contraction tanh(W x + θ), as a root
        return torch.tanh(W @ x + theta) - x

    x0 = torch.zeros(12, dtype=torch.float64)
    dense = Broyden(fun=F, jacobian_init=-1.0, tol=1e-12, maxiter=200).run(x0, theta)
    limited = Broyden(fun=F, jacobian_init=-1.0, memory_size=6, tol=1e-12, maxiter=200)
    sol, state = limited.run(x0, theta)
    torch.testing.assert_close(sol, dense.params.detach(), rtol=1e-10, atol=1e-11)
    assert state.low_rank_u.shape == (6, 12) and int(state.iter_num) < 200
    (g1,) = torch.autograd.grad(sol.sum(), theta)
    (g2,) = torch.autograd.grad(dense.params.sum(), theta)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="memory_size"):
        Broyden(fun=F, memory_size=3).run(x0, theta)
