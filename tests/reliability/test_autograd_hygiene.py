"""Autograd hygiene (issue 13): the implicit solution behaves like any torch op.

* ``backward`` twice fails as torch does without ``retain_graph``, and accumulates exactly with
  it; an in-place change of a saved tensor after the forward is torch's version-counter error,
  never a silently wrong gradient;
* ``no_grad`` / ``inference_mode`` forwards build no graph and raise nothing;
* ``init`` never receives a gradient, and the forward solver runs without recording;
* gradients are right in float64: ``gradcheck`` / ``gradgradcheck`` (reverse, forward and
  forward-over-reverse) for every linear solver, batched problems against per-problem loops,
  ``torch.func`` transforms against the dense implicit-function-theorem reference;
* a step's graph is freed by reference counting alone (no reference cycle keeps it alive).
"""

from __future__ import annotations

import functools
import gc
import warnings
import weakref

import pytest
import torch
from _refs import DT, EPS, assert_within, gen, gradient_bound, ift_vjp, jacobians

import implicit_torch as it

SOLVES = ["cg", "normal_cg", "gmres", "bicgstab", "lu", "cholesky", "auto"]
TOL = 1e-13  # the iterative backward solves' tolerance in the gradient checks


def tight(name):
    if name in ("lu", "cholesky", "auto"):
        return name
    return functools.partial(it.linear.SOLVERS[name], tol=TOL, maxiter=200)


# A nonlinear, well-posed problem: F(x, a, c) = x³ + a ⊙ x − c, a > 0 (unique root per entry;
# ∂ₓF = diag(3x² + a) is symmetric positive definite, so every solver applies).
def cubic_F(x, a, c):
    return x**3 + a * x - c


def newton(init, a, c):
    x = torch.zeros_like(c)
    for _ in range(60):
        x = x - cubic_F(x, a, c) / (3 * x**2 + a)
    return x


def cubic_inputs(seed=0, n=4):
    g = gen(seed)
    a = (1 + torch.rand(n, generator=g, dtype=DT)).requires_grad_()
    c = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    return a, c


# A coupled fixed point x = tanh(W x + u) with ‖W‖₂ = 0.4 (a contraction).
def fp_T(x, W, u):
    return torch.tanh(W @ x + u)


def fp_solver(init, W, u):
    x = torch.zeros_like(u)
    for _ in range(200):
        x = fp_T(x, W, u)
    return x


def fp_inputs(seed=1, n=4):
    g = gen(seed)
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = 0.4 * W / torch.linalg.matrix_norm(W, 2)
    return W, torch.randn(n, generator=g, dtype=DT)


def fp_F(x, W, u):
    return fp_T(x, W, u) - x


fixed_point = it.custom_fixed_point(fp_T, solve=tight("gmres"))(fp_solver)


def ridge_F(w, lam, X, y):
    return X.T @ (X @ w - y) + lam * w


def ridge_solver(init, lam, X, y):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)


def ridge_data(seed=2, m=12, d=4):
    g = gen(seed)
    return torch.randn(m, d, generator=g, dtype=DT), torch.randn(m, generator=g, dtype=DT)


@pytest.fixture(autouse=True)
def _convergence_warnings_are_errors():
    # Every solve here is well posed: a convergence warning would be a defect.
    with warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        yield


# ------------------------------------------------------------------------------------------
# backward twice, retain_graph, in-place modification
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solve", ["cg", "gmres", "lu"])
def test_backward_twice_without_retain_graph_is_torch_s_error(solve):
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    w = it.implicit_solve(ridge_solver, ridge_F, None, lam * 1.0, X, y, solve=solve)
    loss = (w**2).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("solve", ["cg", "gmres", "lu"])
def test_backward_twice_with_retain_graph_accumulates_exactly(solve):
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    w = it.implicit_solve(ridge_solver, ridge_F, None, lam, X, y, solve=tight(solve))
    loss = (w**2).sum()
    loss.backward(retain_graph=True)
    first = lam.grad.clone()
    loss.backward()
    assert torch.equal(lam.grad, 2 * first)  # g + g = 2g exactly in floating point
    # and the gradient is the dense implicit-function-theorem reference (= −2 wᵀ H⁻¹ w)
    wd = w.detach()
    (expected,), (scale,), kappa = ift_vjp(
        lambda w, lam: ridge_F(w, lam, X, y), wd, (lam.detach(),), 2 * wd
    )
    H = X.T @ X + 0.7 * torch.eye(4, dtype=DT)
    torch.testing.assert_close(expected, -2 * wd @ torch.linalg.solve(H, wd))
    tol = 0.0 if solve == "lu" else TOL
    assert_within(first, expected, gradient_bound(scale, kappa, 4, tol))


@pytest.mark.parametrize(
    "modify",
    ["leaf-parameter", "non-leaf-parameter", "solution"],
)
def test_in_place_change_after_forward_is_the_version_counter_error(modify):
    X, y = ridge_data()
    lam = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))
    Xp = X.clone().requires_grad_()
    X_used = Xp * 1.0
    w = it.implicit_solve(ridge_solver, ridge_F, None, lam, X_used, y)
    out = w
    with torch.no_grad():
        if modify == "leaf-parameter":
            lam.mul_(2.0)
        elif modify == "non-leaf-parameter":
            X_used.mul_(2.0)
    if modify == "solution":
        out = w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), (lam, Xp))


# ------------------------------------------------------------------------------------------
# no_grad, inference_mode, requires_grad=False
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_without_grad_builds_no_graph_and_equals_the_grad_forward(mode):
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ref = it.implicit_solve(ridge_solver, ridge_F, None, lam, X, y)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        w = it.implicit_solve(ridge_solver, ridge_F, None, lam, X, y)
    assert not w.requires_grad and w.grad_fn is None
    assert w.is_inference() == (mode == "inference_mode")
    assert torch.equal(w, ref.detach())


def test_no_parameter_requiring_grad_gives_a_solution_without_grad():
    X, y = ridge_data()
    w = it.implicit_solve(ridge_solver, ridge_F, None, torch.tensor(0.7, dtype=DT), X, y)
    assert not w.requires_grad


def test_integer_and_static_params_get_no_gradient_and_no_error():
    X, y = ridge_data()
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    k = torch.tensor(3)  # an integer tensor parameter: static for differentiation

    def F(w, lam, X, y, k, scale):
        return ridge_F(w, lam, X, y) * (k - 2) * scale

    def solver(init, lam, X, y, k, scale):
        return ridge_solver(init, lam, X, y)

    w = it.implicit_solve(solver, F, None, lam, X, y, k, 1.0)
    (g,) = torch.autograd.grad(w.sum(), lam)
    # the default backward solve: CG at tol 1e-10
    ones = torch.ones(4, dtype=DT)
    (expected,), (scale,), kappa = ift_vjp(
        lambda w, lam: ridge_F(w, lam, X, y), w.detach(), (lam.detach(),), ones
    )
    assert_within(g, expected, gradient_bound(scale, kappa, 4, 1e-10))


# ------------------------------------------------------------------------------------------
# init, and the forward solver's own graph
# ------------------------------------------------------------------------------------------


def test_init_never_receives_a_gradient():
    a, c = cubic_inputs()
    init = torch.zeros(4, dtype=DT, requires_grad=True)

    def warm_newton(init, a, c):
        x = init
        for _ in range(60):
            x = x - cubic_F(x, a, c) / (3 * x**2 + a)
        return x

    x = it.custom_root(cubic_F, solve=tight("cg"))(warm_newton)(init, a, c)
    ga, gi = torch.autograd.grad(x.sum(), (a, init), allow_unused=True)
    assert gi is None
    # ∂x*/∂a = −diag(x / (3x² + a)): the other gradient is right
    xd = x.detach()
    torch.testing.assert_close(ga, -xd / (3 * xd**2 + a.detach()), rtol=1e-9, atol=1e-12)


def test_init_never_receives_a_gradient_through_a_layer():
    class Root(it.nn.ImplicitLayer):
        def solve_forward(self, init, a, c):
            return newton(init, a, c)

        def optimality(self, x, a, c):
            return cubic_F(x, a, c)

    a, c = cubic_inputs()
    init = torch.ones(4, dtype=DT, requires_grad=True)
    x = Root()(a, c, init=init)
    x.sum().backward()
    assert init.grad is None and a.grad is not None


def test_forward_solver_runs_without_recording():
    seen = []

    def solver(init, a, c):
        seen.append(torch.is_grad_enabled())
        return newton(init, a, c)

    a, c = cubic_inputs()
    x = it.custom_root(cubic_F)(solver)(None, a, c)
    assert seen == [False]
    # the solution's graph is one node deep: the engine's Function, not Newton's iterations
    assert type(x.grad_fn).__name__.startswith("_ImplicitRoot")


# ------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64, every solver
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solve", SOLVES)
def test_gradcheck_reverse_and_forward_mode(solve):
    f = it.custom_root(cubic_F, solve=tight(solve))(newton)
    a, c = cubic_inputs()
    assert torch.autograd.gradcheck(lambda a, c: f(None, a, c), (a, c), check_forward_ad=True)


@pytest.mark.parametrize("solve", ["cg", "gmres", "lu"])
def test_gradgradcheck_with_forward_over_reverse(solve):
    f = it.custom_root(cubic_F, solve=tight(solve))(newton)
    a, c = cubic_inputs()
    assert torch.autograd.gradgradcheck(lambda a, c: f(None, a, c), (a, c), check_fwd_over_rev=True)


def test_gradcheck_of_a_coupled_fixed_point():
    W, u = fp_inputs()
    inputs = (W.clone().requires_grad_(), u.clone().requires_grad_())
    f = functools.partial(fixed_point, None)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_of_a_pytree_solution_with_static_params():
    # sol = {"x": x, "s": Σx} with x = c / a; the param tuple holds a dict and a float.
    def F(sol, p, scale):
        return {"x": p["a"] * sol["x"] - p["c"] * scale, "s": sol["s"] - sol["x"].sum()}

    def solver(init, p, scale):
        x = p["c"] * scale / p["a"]
        return {"x": x, "s": x.sum()}

    f = it.custom_root(F, solve=tight("gmres"))(solver)
    a, c = cubic_inputs(3)

    def g(a, c):
        out = f(None, {"a": a, "c": c}, 2.0)
        return out["x"], out["s"]

    assert torch.autograd.gradcheck(g, (a, c), check_forward_ad=True)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_anomaly_mode_backward_is_clean():
    a, c = cubic_inputs()
    with torch.autograd.detect_anomaly():
        x = it.custom_root(cubic_F)(newton)(None, a, c)
        x.sum().backward()
    assert bool(torch.isfinite(a.grad).all())


# ------------------------------------------------------------------------------------------
# batched problems against per-problem loops and the dense reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solve", ["cg", "gmres", "lu", "auto"])
def test_batched_gradients_equal_per_problem_gradients(solve):
    B, n = 5, 4
    g = gen(4)
    a = (1 + torch.rand(B, n, generator=g, dtype=DT)).requires_grad_()
    c = torch.randn(B, n, generator=g, dtype=DT) * torch.logspace(-3, 3, B, dtype=DT)[:, None]
    c.requires_grad_()
    shared = torch.tensor(0.5, dtype=DT, requires_grad=True)  # one parameter for all problems

    def F(x, a, c, s):
        return x**3 + (a + s) * x - c

    def solver(init, a, c, s):
        x = torch.zeros_like(c)
        for _ in range(100):
            x = x - F(x, a, c, s) / (3 * x**2 + a + s)
        return x

    v = torch.randn(B, n, generator=g, dtype=DT)
    x = it.custom_root(F, solve=tight(solve), batched=True)(solver)(None, a, c, shared)
    ga, gc_, gs = torch.autograd.grad((v * x).sum(), (a, c, shared))
    total_s = torch.zeros((), dtype=DT)
    bound_s = 0.0
    for i in range(B):
        xi = x[i].detach()
        params = (a[i].detach(), c[i].detach(), shared.detach())
        (ra, rc, rs), scales, kappa = ift_vjp(F, xi, params, v[i])
        for got, ref, sc in ((ga[i], ra, scales[0]), (gc_[i], rc, scales[1])):
            assert_within(got, ref, gradient_bound(sc, kappa, n, TOL), f"problem {i}")
        total_s = total_s + rs
        bound_s += gradient_bound(scales[2], kappa, n, TOL)
    # a shared parameter gets the sum of the per-problem gradients (the errors add up)
    assert_within(gs, total_s, bound_s, "shared")


# ------------------------------------------------------------------------------------------
# torch.func transforms against the dense reference
# ------------------------------------------------------------------------------------------


def _fp_reference(W, u):
    x = fp_solver(None, W, u)
    A, (BW, Bu) = jacobians(fp_F, x, (W, u))
    return x, -torch.linalg.solve(A, BW).reshape(4, 4, 4), -torch.linalg.solve(A, Bu), A


@pytest.mark.parametrize(
    "transform", [torch.func.jacrev, torch.func.jacfwd], ids=["jacrev", "jacfwd"]
)
@pytest.mark.parametrize("wrt", ["W", "u"])
def test_func_jacobians_equal_the_dense_reference(transform, wrt):
    W, u = fp_inputs()
    _, JW, Ju, A = _fp_reference(W, u)
    kappa = torch.linalg.cond(A).item()
    if wrt == "W":
        got, ref = transform(lambda W: fixed_point(None, W, u))(W), JW
    else:
        got, ref = transform(lambda u: fixed_point(None, W, u))(u), Ju
    assert_within(got, ref, 10 * kappa * (TOL + 16 * EPS) * float(ref.norm()) + EPS)


def test_func_grad_and_hessian_equal_the_dense_reference():
    W, u = fp_inputs()
    v = torch.randn(4, generator=gen(5), dtype=DT)

    def loss(u):
        return v @ fixed_point(None, W, u)

    _, _, Ju, A = _fp_reference(W, u)
    kappa = torch.linalg.cond(A).item()
    g = torch.func.grad(loss)(u)
    assert_within(g, v @ Ju, 10 * kappa * (TOL + 16 * EPS) * float(Ju.norm() * v.norm()))
    # the Hessian by central differences of the (exact) reference gradient
    h = 1e-5
    cols = []
    for j in range(4):
        e = torch.zeros(4, dtype=DT)
        e[j] = h
        cols.append((v @ _fp_reference(W, u + e)[2] - v @ _fp_reference(W, u - e)[2]) / (2 * h))
    H_fd = torch.stack(cols, dim=1)
    H = torch.func.hessian(loss)(u)
    # central differences: O(h²) truncation + O(eps/h) rounding, times the scale of H
    assert_within(H, H_fd, 1e3 * (h**2 + EPS / h) * (1 + float(H_fd.norm())))


def test_func_vmap_equals_a_loop_and_the_batched_engine():
    W, _ = fp_inputs()
    U = torch.randn(6, 4, generator=gen(6), dtype=DT)
    vm = torch.func.vmap(lambda u: fixed_point(None, W, u))(U)
    loop = torch.stack([fp_solver(None, W, u) for u in U])
    batched = it.custom_fixed_point(lambda X, W, U: torch.tanh(X @ W.T + U), batched=True)(
        lambda init, W, U: torch.stack([fp_solver(None, W, u) for u in U])
    )(None, W, U)
    assert torch.equal(vm, loop)
    assert torch.equal(batched, loop)
    # and per-sample Jacobians through vmap(jacrev) equal the per-problem dense references
    J = torch.func.vmap(torch.func.jacrev(lambda u: fixed_point(None, W, u)))(U)
    for i in range(6):
        _, _, Ju, A = _fp_reference(W, U[i])
        kappa = torch.linalg.cond(A).item()
        assert_within(J[i], Ju, 10 * kappa * (TOL + 16 * EPS) * float(Ju.norm()) + EPS)


def test_forward_ad_dual_numbers_equal_the_dense_reference():
    import torch.autograd.forward_ad as fwAD

    W, u = fp_inputs()
    t = torch.randn(4, generator=gen(7), dtype=DT)
    _, _, Ju, A = _fp_reference(W, u)
    with fwAD.dual_level():
        x = fixed_point(None, W, fwAD.make_dual(u, t))
        tangent = fwAD.unpack_dual(x).tangent
    kappa = torch.linalg.cond(A).item()
    assert_within(tangent, Ju @ t, 10 * kappa * (TOL + 16 * EPS) * float(Ju.norm() * t.norm()))


# ------------------------------------------------------------------------------------------
# the graph of a step is freed by reference counting (no cycle keeps it alive)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solve", ["cg", "gmres", "lu", "auto"])
@pytest.mark.parametrize("backward", [True, False], ids=["backward", "forward-only"])
def test_a_step_s_tensors_are_freed_without_the_cycle_collector(solve, backward):
    X, y = ridge_data()
    scale = torch.ones((), dtype=DT, requires_grad=True)

    def step():
        Xs = X * scale  # a fresh tensor, saved by the engine's Function
        ref = weakref.ref(Xs)
        w = it.implicit_solve(ridge_solver, ridge_F, None, torch.tensor(0.7, dtype=DT), Xs, y,
                              solve=solve)  # fmt: skip
        if backward:
            w.sum().backward()
        return ref

    step()  # the first call may import lazily (torch keeps some import-time frames alive)
    gc.collect()
    gc.disable()
    try:
        ref = step()
        alive = ref() is not None
    finally:
        gc.enable()
    assert not alive, "a reference cycle keeps the step's saved tensors alive until gc runs"
