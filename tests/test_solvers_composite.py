"""MirrorDescent and BlockCoordinateDescent: solutions against independent solvers and strong
duality, hypergradients against finite differences of high-precision solves, closed forms and
the dense implicit-function-theorem reference; implicit vs unrolled; failure reporting."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import implicit_torch.objective as objective
from implicit_torch import ConvergenceError, ConvergenceWarning, projection, prox
from implicit_torch.solvers.block_coordinate_descent import BlockCoordinateDescent
from implicit_torch.solvers.mirror_descent import (
    MirrorDescent,
    projection_grad_kl_simplex,
    projection_kl_simplex,
    safe_log,
)
from implicit_torch.solvers.proximal_gradient import ProximalGradient

DT = torch.float64
K = 3
SIMPLEX_PROX = prox.make_prox_from_projection(projection.projection_simplex)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def jac(out, inp):
    rows = [torch.autograd.grad(o, inp, retain_graph=True)[0] for o in out.reshape(-1)]
    return torch.stack(rows).reshape(*out.shape, *inp.shape)


# --- the multiclass SVM dual ----------------------------------------------------------------


def svm_data(seed=0, n=10, d=25):
    """Three Gaussian classes in d > n dimensions (so the dual has a unique solution), and a
    validation set of the same size."""
    g = gen(seed)
    y = torch.arange(2 * n) % K
    means = torch.randn(K, d, generator=g, dtype=DT)
    X = (0.7 * means[y] + torch.randn(2 * n, d, generator=g, dtype=DT)) / d**0.5
    Y = F.one_hot(y[:n], K).to(DT)
    return X[:n], Y, X[n:], y[n:]


def svm_step(X, lam):
    return 1.0 / (torch.linalg.eigvalsh(X @ X.T).max().item() / lam)


def md_solver(X, lam, **kw):
    kw = {"maxiter": 5000, "tol": 1e-12, **kw}
    return MirrorDescent(
        fun=objective.multiclass_linear_svm_dual,
        projection_grad=projection_grad_kl_simplex,
        stepsize=4 * svm_step(X, lam),
        **kw,
    )


def bcd_svm(beta0, lam, X, Y, tol=1e-13):
    solver = BlockCoordinateDescent(
        fun=objective.multiclass_linear_svm_dual, block_prox=SIMPLEX_PROX, maxiter=5000, tol=tol
    )
    return solver.run(beta0, 1.0, lam, (X, Y))


def uniform(n):
    return torch.full((n, K), 1.0 / K, dtype=DT)


def svm_primal(W, lam, X, Y):
    margins = 1 - Y + X @ W - (X @ W * Y).sum(1, keepdim=True)
    return 0.5 * lam * (W * W).sum() + margins.max(1).values.sum()


def val_loss(beta, lam, X, Y, Xv, yv):
    W = X.T @ (Y - beta) / lam
    return F.cross_entropy(Xv @ W, yv)


def test_mirror_descent_svm_dual_solution_simplex_duality_and_bcd():
    X, Y, _, _ = svm_data()
    lam = 3.0
    out = md_solver(X, lam).run(uniform(10), None, lam, (X, Y))
    beta = out.params
    assert out.state.error <= 1e-12 and 0 < int(out.state.iter_num) < 5000
    assert bool((beta >= 0).all())
    torch.testing.assert_close(beta.sum(1), torch.ones(10, dtype=DT), rtol=0, atol=1e-13)
    # an independent solver (block coordinate descent with Euclidean projections)
    ref = bcd_svm(uniform(10), lam, X, Y).params
    torch.testing.assert_close(beta, ref, rtol=0, atol=1e-9)
    assert int((ref < 1e-12).sum()) >= 5  # the solution has active constraints
    # strong duality: primal(W*) = dual(β*) = n − f(β*), W* = Xᵀ(Y − β*)/λ
    W = X.T @ (Y - ref) / lam
    dual = 10 - objective.multiclass_linear_svm_dual(ref, lam, (X, Y))
    torch.testing.assert_close(svm_primal(W, lam, X, Y), dual, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed,lam0", [(0, 3.0), (1, 2.0)])
def test_mirror_descent_svm_hypergradient_vs_finite_differences(seed, lam0):
    X, Y, Xv, yv = svm_data(seed)
    lam = torch.tensor(lam0, dtype=DT, requires_grad=True)
    beta = md_solver(X, lam0).run(uniform(10), None, lam, (X, Y)).params
    (g,) = torch.autograd.grad(val_loss(beta, lam, X, Y, Xv, yv), lam)

    def L(v):
        b = bcd_svm(uniform(10), v, X, Y).params
        return val_loss(b, v, X, Y, Xv, yv).item()

    eps = 1e-5
    fd = (L(lam0 + eps) - L(lam0 - eps)) / (2 * eps)
    assert abs(fd) > 1e-3  # a non-trivial hypergradient
    torch.testing.assert_close(g.item(), fd, rtol=1e-5, atol=1e-8)


def test_mirror_descent_jacobian_vs_dense_ift_and_unrolled():
    X, Y, _, _ = svm_data(1)
    lam0 = 3.0
    lam = torch.tensor(lam0, dtype=DT, requires_grad=True)
    solver = md_solver(X, lam0)
    beta = solver.run(uniform(10), None, lam, (X, Y)).params
    J = jac(beta, lam)
    # dense reference: −(∂_β F)⁻¹ ∂_λ F of the mirror-descent fixed point at β*
    b = beta.detach()
    lam_d = lam.detach()
    A = torch.autograd.functional.jacobian(
        lambda v: solver.optimality_fun(v, None, lam_d, (X, Y)), b
    )
    B = torch.autograd.functional.jacobian(
        lambda t: solver.optimality_fun(b, None, t, (X, Y)), lam_d
    )
    ref = -torch.linalg.solve(A.reshape(30, 30), B.reshape(30)).reshape(10, K)
    torch.testing.assert_close(J, ref, rtol=1e-7, atol=1e-9)
    assert solver.optimality_fun(b, None, lam_d, (X, Y)).abs().max() < 1e-11
    # unrolled through the iterations: the same Jacobian at convergence
    unrolled = md_solver(X, lam0, unroll=True).run(uniform(10), None, lam, (X, Y)).params
    torch.testing.assert_close(unrolled.detach(), b, rtol=0, atol=1e-12)
    torch.testing.assert_close(jac(unrolled, lam), J, rtol=1e-6, atol=1e-8)


def test_mirror_descent_projection_grad_builders_and_schedule():
    g = gen(3)
    x = torch.softmax(torch.randn(4, 5, generator=g, dtype=DT), -1)
    x[0, 1] = 0.0  # a zero coordinate stays zero, with no NaN
    x[0] = x[0] / x[0].sum()
    grad = torch.randn(4, 5, generator=g, dtype=DT)
    built = MirrorDescent.make_projection_grad(projection_kl_simplex, safe_log)
    out = projection_grad_kl_simplex(x, grad, 0.3, 2.0)
    torch.testing.assert_close(built(x, grad, 0.3, 2.0), out)
    ref = x * torch.exp(-0.3 * grad)
    torch.testing.assert_close(out, 2.0 * ref / ref.sum(1, keepdim=True))
    assert out[0, 1] == 0
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(projection_grad_kl_simplex(xr, grad, 0.3).sum(), xr)
    assert torch.isfinite(gx).all()
    # a step-size schedule: η_t = η / √(t + 1), here on a separable problem min ⟨c, p⟩ + ½‖p‖²
    c = torch.tensor([0.3, 0.0, 0.6, 0.1], dtype=DT)

    def fun(p, c):
        return (c * p).sum() + 0.5 * (p * p).sum()

    solver = MirrorDescent(
        fun=fun, stepsize=lambda t: 2.0 / torch.sqrt(t + 1.0), maxiter=20000, tol=1e-9
    )
    out = solver.run(torch.full((4,), 0.25, dtype=DT), None, c)
    # closed form: projection of −c onto the simplex
    torch.testing.assert_close(out.params, projection.projection_simplex(-c), rtol=0, atol=1e-7)
    assert out.state.stepsize < 2.0


# --- block coordinate descent ---------------------------------------------------------------


def logistic_data(seed=4, n=40, d=8):
    g = gen(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ w)).to(DT)
    return X, y


def bcd(fun, block_prox, **kw):
    return BlockCoordinateDescent(
        fun=fun, block_prox=block_prox, **{"maxiter": 3000, "tol": 1e-12, **kw}
    )


def test_bcd_l1_logistic_regression_vs_proximal_gradient_and_fd():
    X, y = logistic_data()
    alpha0 = 0.12
    alpha = torch.tensor(alpha0, dtype=DT, requires_grad=True)
    out = bcd(objective.binary_logistic_regression, prox.prox_lasso).run(
        torch.zeros(8, dtype=DT), alpha, (X, y)
    )
    w = out.params
    S = w.detach() != 0
    assert 2 <= int(S.sum()) <= 6  # a sparse solution with a non-trivial support
    L = torch.linalg.eigvalsh(X.T @ X).max().item() / (4 * 40)
    pg = ProximalGradient(
        fun=objective.binary_logistic_regression,
        prox=prox.prox_lasso,
        stepsize=1 / L,
        maxiter=20000,
        tol=1e-12,
    )
    w_pg = pg.run(torch.zeros(8, dtype=DT), alpha, (X, y)).params
    torch.testing.assert_close(w.detach(), w_pg.detach(), rtol=0, atol=1e-10)
    J = jac(w, alpha)
    torch.testing.assert_close(J, jac(w_pg, alpha), rtol=1e-7, atol=1e-9)
    assert (J[~S] == 0).all()
    solver = bcd(objective.binary_logistic_regression, prox.prox_lasso, tol=1e-14)

    def solve(a):
        return solver.run(torch.zeros(8, dtype=DT), a, (X, y)).params

    eps = 1e-6
    fd = (solve(alpha0 + eps) - solve(alpha0 - eps)) / (2 * eps)
    torch.testing.assert_close(J, fd, rtol=1e-5, atol=1e-7)


def test_bcd_l2_logistic_regression_closed_form_ift():
    # ∇f(w) + λw = 0  ⇒  dw/dλ = −(∇²f(w) + λI)⁻¹ w
    X, y = logistic_data(5)
    lam = torch.tensor(0.05, dtype=DT, requires_grad=True)
    w = (
        bcd(objective.binary_logistic_regression, prox.prox_ridge)
        .run(torch.zeros(8, dtype=DT), lam, (X, y))
        .params
    )
    wd = w.detach()
    H = torch.autograd.functional.hessian(
        lambda v: objective.binary_logistic_regression(v, (X, y)), wd
    )
    grad = torch.func.grad(objective.binary_logistic_regression)(wd, (X, y))
    torch.testing.assert_close(grad + 0.05 * wd, torch.zeros(8, dtype=DT), rtol=0, atol=1e-11)
    expected = -torch.linalg.solve(H + 0.05 * torch.eye(8, dtype=DT), wd)
    torch.testing.assert_close(jac(w, lam), expected, rtol=1e-7, atol=1e-10)


def test_bcd_rows_multiclass_logistic_l2_closed_form_and_unrolled():
    # W of shape (d, k): the blocks are rows; dW/dλ = −(∇²f + λI)⁻¹ vec(W)
    g = gen(6)
    X = torch.randn(30, 5, generator=g, dtype=DT)
    y = torch.randint(0, K, (30,), generator=g)
    lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
    solver = bcd(objective.multiclass_logistic_regression, prox.prox_ridge)
    W = solver.run(torch.zeros(5, K, dtype=DT), lam, (X, y)).params
    Wd = W.detach()
    H = torch.autograd.functional.hessian(
        lambda v: objective.multiclass_logistic_regression(v, (X, y)), Wd
    ).reshape(15, 15)
    expected = -torch.linalg.solve(H + 0.1 * torch.eye(15, dtype=DT), Wd.reshape(15))
    J = jac(W, lam)
    torch.testing.assert_close(J.reshape(15), expected, rtol=1e-7, atol=1e-10)
    unrolled = bcd(objective.multiclass_logistic_regression, prox.prox_ridge, unroll=True)
    Wu = unrolled.run(torch.zeros(5, K, dtype=DT), lam, (X, y)).params
    torch.testing.assert_close(Wu.detach(), Wd, rtol=0, atol=1e-11)
    torch.testing.assert_close(jac(Wu, lam), J, rtol=1e-6, atol=1e-9)


def test_bcd_lasso_least_squares_closed_form_on_support():
    # ½ mean((Xw − y)²) + α‖w‖₁: on the support S, dw_S/dα = −n (X_Sᵀ X_S)⁻¹ sign(w_S)
    g = gen(7)
    n, d = 40, 8
    X = torch.randn(n, d, generator=g, dtype=DT) / n**0.5 + 0.3 * torch.eye(n, d, dtype=DT)
    w_star = torch.zeros(d, dtype=DT)
    w_star[:4] = torch.tensor([1.5, -2.0, 0.8, -1.2], dtype=DT)
    z = torch.empty(d, dtype=DT)
    z[:4] = torch.sign(w_star[:4])
    z[4:] = torch.rand(d - 4, generator=g, dtype=DT) - 0.5
    a = 0.5  # ½‖Xw − y‖² + a‖w‖₁, i.e. α = a / n in the mean-scaled objective
    y = X @ w_star + a * X @ torch.linalg.solve(X.T @ X, z)
    alpha = torch.tensor(a / n, dtype=DT, requires_grad=True)
    w = bcd(objective.least_squares, prox.prox_lasso).run(torch.zeros(d, dtype=DT), alpha, (X, y))
    torch.testing.assert_close(w.params.detach(), w_star, rtol=0, atol=1e-9)
    S = w_star != 0
    expected = torch.zeros(d, dtype=DT)
    expected[S] = -n * torch.linalg.solve(X[:, S].T @ X[:, S], torch.sign(w_star[S]))
    torch.testing.assert_close(jac(w.params, alpha), expected, rtol=1e-7, atol=1e-8)


def test_bcd_svm_dual_hypergradient_implicit_vs_unrolled():
    X, Y, Xv, yv = svm_data(2)
    grads = []
    for unroll in (False, True):
        lam = torch.tensor(3.0, dtype=DT, requires_grad=True)
        solver = BlockCoordinateDescent(
            fun=objective.multiclass_linear_svm_dual,
            block_prox=SIMPLEX_PROX,
            maxiter=500,
            tol=1e-12,
            unroll=unroll,
        )
        beta = solver.run(uniform(10), 1.0, lam, (X, Y)).params
        grads.append(torch.autograd.grad(val_loss(beta, lam, X, Y, Xv, yv), lam)[0])
    assert abs(grads[0].item()) > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-10)


def test_float32_and_vmap_over_the_hyperparameter():
    X, Y, Xv, yv = svm_data()
    lam64 = torch.tensor(3.0, dtype=DT, requires_grad=True)
    beta64 = md_solver(X, 3.0).run(uniform(10), None, lam64, (X, Y)).params
    (g64,) = torch.autograd.grad(val_loss(beta64, lam64, X, Y, Xv, yv), lam64)
    X32, Y32, Xv32 = X.float(), Y.float(), Xv.float()
    for solver, hp in (
        (md_solver(X, 3.0, tol=1e-5), None),
        (
            BlockCoordinateDescent(
                fun=objective.multiclass_linear_svm_dual, block_prox=SIMPLEX_PROX, tol=1e-5
            ),
            1.0,
        ),
    ):
        lam = torch.tensor(3.0, requires_grad=True)
        beta = solver.run(uniform(10).float(), hp, lam, (X32, Y32)).params
        assert beta.dtype == torch.float32
        (g,) = torch.autograd.grad(val_loss(beta, lam, X32, Y32, Xv32, yv), lam)
        torch.testing.assert_close(g.double(), g64, rtol=1e-2, atol=1e-5)
    # torch.func.vmap over λ: the same solutions as one solve per λ
    lams = torch.tensor([2.0, 3.0], dtype=DT)

    def solve(lam):
        return bcd_svm(uniform(10), lam, X, Y, tol=1e-11).params

    batched = torch.func.vmap(solve)(lams)
    for i in range(2):
        torch.testing.assert_close(batched[i], solve(lams[i]), rtol=0, atol=1e-9)


# --- failures --------------------------------------------------------------------------------


def test_non_convergence_reported():
    X, Y, _, _ = svm_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = md_solver(X, 1.0, maxiter=5).run(uniform(10), None, 1.0, (X, Y))
    assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert int(out.state.iter_num) == 5 and out.state.error > 1e-12
    x, yl = logistic_data()
    solver = bcd(
        objective.binary_logistic_regression, prox.prox_lasso, maxiter=2, on_failure="raise"
    )
    with pytest.raises(ConvergenceError, match="BlockCoordinateDescent did not converge"):
        solver.run(torch.zeros(8, dtype=DT), 0.01, (x, yl))
    quiet = bcd(
        objective.binary_logistic_regression, prox.prox_lasso, maxiter=2, on_failure="ignore"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = quiet.run(torch.zeros(8, dtype=DT), 0.01, (x, yl)).state
    assert int(state.iter_num) == 2 and state.error > 1e-12


def test_bcd_needs_a_composite_linear_function():
    with pytest.raises(TypeError, match="CompositeLinearFunction"):
        BlockCoordinateDescent(fun=lambda w, data: (w * w).sum(), block_prox=prox.prox_lasso).run(
            torch.zeros(3, dtype=DT), 0.1, (None, None)
        )
