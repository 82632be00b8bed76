"""implicit_torch.nn: ImplicitLayer and DEQ against closed forms, unrolled iterations and
finite differences; autocast, torch.compile and DistributedDataParallel."""

import datetime
import functools
import os
import socket
import warnings

import pytest
import torch
from problems import DT, gen
from torch import nn

import implicit_torch as it
from implicit_torch.adjoint import ImplicitAdjoint, PhantomAdjoint, UnrolledAdjoint
from implicit_torch.nn import (
    DEQ,
    ArgminLayer,
    BirkhoffProjection,
    ImplicitLayer,
    QPLayer,
    SimplexProjection,
    Sparsemax,
)


class RidgeLayer(ImplicitLayer):
    """w* = argmin ½‖Xw − y‖² + ½ Σ exp(log_lam) w²: a closed form to compare with."""

    def __init__(self, d, dtype=DT, **kw):
        super().__init__(**kw)
        self.log_lam = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=dtype))
        self.solves = 0

    def solve_forward(self, init, X, y):
        self.solves += 1
        return torch.linalg.solve(X.T @ X + torch.diag(self.log_lam.exp()), X.T @ y)

    def optimality(self, w, X, y):
        return X.T @ (X @ w - y) + self.log_lam.exp() * w


def ridge_closed(log_lam, X, y):
    return torch.linalg.solve(X.T @ X + torch.diag(log_lam.exp()), X.T @ y)


def data(m=30, d=5, seed=0, dtype=DT):
    g = gen(seed)
    return torch.randn(m, d, generator=g, dtype=dtype), torch.randn(m, generator=g, dtype=dtype)


def test_implicit_layer_gradients_match_the_closed_form():
    X, y = data()
    layer = RidgeLayer(5)
    Xr = X.clone().requires_grad_()
    weights = torch.randn(5, generator=gen(1), dtype=DT)
    (weights * layer(Xr, y)).sum().backward()
    lam = layer.log_lam.detach().clone().requires_grad_()
    Xc = X.clone().requires_grad_()
    (weights * ridge_closed(lam, Xc, y)).sum().backward()
    torch.testing.assert_close(layer.log_lam.grad, lam.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Xr.grad, Xc.grad, rtol=1e-9, atol=1e-12)


def test_implicit_layer_gradcheck_in_inputs():
    X, y = data(m=12, d=3)
    layer = RidgeLayer(3, adjoint=ImplicitAdjoint("lu"))
    inputs = (X.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda X, y: layer(X, y), inputs)
    assert torch.autograd.gradgradcheck(lambda X, y: layer(X, y), inputs)


def test_implicit_layer_is_an_ordinary_module():
    X, y = data()
    layer = RidgeLayer(5)
    with torch.no_grad():
        layer.log_lam.add_(0.3)
    other = RidgeLayer(5)
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(X, y), layer(X, y))
    assert [n for n, _ in layer.named_parameters()] == ["log_lam"]
    layer32 = layer.to(torch.float32)
    out = layer32(X.float(), y.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), other(X, y), rtol=1e-4, atol=1e-5)
    layer.eval()
    assert not layer.training


def test_warm_start_reuses_the_last_solution():
    class Iterative(RidgeLayer):
        def solve_forward(self, init, X, y):
            w = torch.zeros(X.shape[1], dtype=X.dtype) if init is None else init
            H = X.T @ X + torch.diag(self.log_lam.exp())
            step = 1.0 / torch.linalg.eigvalsh(H).max()
            self.iterations = 0
            while torch.linalg.vector_norm(g := H @ w - X.T @ y) >= 1e-10:
                w = w - step * g
                self.iterations += 1
            return w

    X, y = data()
    layer = Iterative(5, warm_start=True)
    first = layer(X, y)
    cold = layer.iterations
    second = layer(X, y)
    assert layer.warm_starts == 1 and layer.iterations < cold // 10
    torch.testing.assert_close(first, second, rtol=1e-8, atol=1e-10)
    layer.reset_warm_start()
    layer(X, y)
    assert layer.iterations == cold


def test_subclass_without_methods_fails_clearly():
    with pytest.raises(NotImplementedError, match="solve_forward"):
        ImplicitLayer()(torch.ones(2))


# --- ArgminLayer, projections ------------------------------------------------------------------


class RidgeArgmin(ArgminLayer):
    def __init__(self, d):
        super().__init__(tol=1e-10, maxiter=5000)
        self.log_lam = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=DT))

    def objective(self, w, X, y):
        return 0.5 * (X @ w - y).square().sum() + 0.5 * (self.log_lam.exp() * w.square()).sum()

    def initial(self, X, y):
        return torch.zeros(X.shape[1], dtype=X.dtype)


def test_argmin_layer_matches_the_closed_form():
    X, y = data()
    layer = RidgeArgmin(5)
    Xr = X.clone().requires_grad_()
    w = layer(Xr, y)
    lam = layer.log_lam.detach().clone().requires_grad_()
    Xc = X.clone().requires_grad_()
    w_ref = ridge_closed(lam, Xc, y)
    torch.testing.assert_close(w, w_ref, rtol=1e-8, atol=1e-9)
    weights = torch.randn(5, generator=gen(12), dtype=DT)
    (weights * w).sum().backward()
    (weights * w_ref).sum().backward()
    torch.testing.assert_close(layer.log_lam.grad, lam.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(Xr.grad, Xc.grad, rtol=1e-7, atol=1e-9)
    assert int(layer.last_state.iter_num) < 5000


def test_argmin_layer_without_initial_guess_says_what_to_do():
    class NoInitial(ArgminLayer):
        def objective(self, x, c):
            return (x - c).square().sum()

    c = torch.tensor([1.0, -2.0, 3.0])
    with pytest.raises(NotImplementedError, match="init="):
        NoInitial()(c)
    torch.testing.assert_close(NoInitial()(c, init=torch.zeros(3)), c)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_sparsemax_rows_are_simplex_projections_with_exact_jacobians(dim):
    x = torch.randn(4, 6, 5, generator=gen(13), dtype=DT)
    p = Sparsemax(dim=dim)(x)
    moved_x, moved_p = x.movedim(dim, -1), p.movedim(dim, -1)
    for row_x, row_p in zip(
        moved_x.reshape(-1, moved_x.shape[-1]), moved_p.reshape(-1, moved_p.shape[-1])
    ):
        torch.testing.assert_close(row_p, it.projection.projection_simplex(row_x))
    torch.testing.assert_close(p.sum(dim), torch.ones_like(p.sum(dim)))
    # Jacobian of one row: diag(s) − s sᵀ/|s| on the support s
    row = x[0, :, 0] if dim in (1,) else x[0, 0] if dim == -1 else x[:, 0, 0]
    J = torch.func.jacrev(lambda r: Sparsemax()(r))(row)
    s = (Sparsemax()(row) > 0).to(DT)
    torch.testing.assert_close(J, torch.diag(s) - torch.outer(s, s) / s.sum())
    assert torch.autograd.gradcheck(Sparsemax(dim=dim), (x[:2, :3, :3].clone().requires_grad_(),))


def test_simplex_projection_layer_value():
    x = torch.randn(3, 7, generator=gen(14), dtype=DT)
    p = SimplexProjection(value=2.5)(x)
    torch.testing.assert_close(p.sum(-1), torch.full((3,), 2.5, dtype=DT))
    assert bool((p >= 0).all())


# --- QPLayer ------------------------------------------------------------------------------------


def qp_data(B=3, n=4, m=6, seed=20):
    g = gen(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    Q = M @ M.T + n * torch.eye(n, dtype=DT)
    p = torch.randn(B, n, generator=g, dtype=DT)
    G = torch.randn(m, n, generator=g, dtype=DT)
    h = torch.rand(m, generator=g, dtype=DT) + 0.1  # x = 0 strictly feasible
    return Q, p, G, h


def test_qp_layer_gradcheck_per_problem_data():
    Q, p, G, h = qp_data()
    layer = QPLayer()
    inputs = (p.clone().requires_grad_(), h.expand(3, -1).clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda p, h: layer(Q, p, G, h), inputs, atol=1e-6)


def test_qp_layer_shared_data_gets_the_sum_of_per_problem_gradients():
    Q, p, G, h = qp_data(seed=21)
    layer = QPLayer()
    Gs = G.clone().requires_grad_()
    weights = torch.randn(3, 4, generator=gen(22), dtype=DT)
    (g_batched,) = torch.autograd.grad((weights * layer(Q, p, Gs, h)).sum(), Gs)
    g_loop = sum(
        torch.autograd.grad((weights[i] * layer(Q, p[i], Gs, h)).sum(), Gs)[0] for i in range(3)
    )
    torch.testing.assert_close(g_batched, g_loop, rtol=1e-8, atol=1e-10)


def test_qp_layer_reports_infeasible_problems_and_bad_arguments():
    Q, p, G, _ = qp_data(seed=23)
    G2 = torch.cat([G[:1], -G[:1]])  # g x ≤ −1 and −g x ≤ −1: empty
    with pytest.raises(it.ConvergenceError):
        QPLayer(on_failure="raise")(Q, p, G2, -torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="G with h"):
        QPLayer()(Q, p, G, None)


# --- DEQ -----------------------------------------------------------------------------------------


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ‖W‖₂ = 0.5: a contraction, so z* is unique."""

    def __init__(self, d, dtype=DT, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.W = nn.Linear(d, d, bias=False, dtype=dtype)
        self.U = nn.Linear(d, d, dtype=dtype)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


def unrolled(f, x, steps=300):
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = f(z, x)
    return z


@pytest.mark.parametrize("forward_solver", ["anderson", "broyden", "fixed_point"])
@pytest.mark.parametrize("solve", ["gmres", "lu", "neumann"])
def test_deq_implicit_gradient_matches_converged_unrolling(forward_solver, solve):
    f = Cell(6)
    x = torch.randn(4, 6, generator=gen(2), dtype=DT).requires_grad_()
    deq = DEQ(
        f, forward_solver=forward_solver, tol=1e-12, maxiter=300, adjoint=ImplicitAdjoint(solve)
    )
    weights = torch.randn(4, 6, generator=gen(3), dtype=DT)
    params = [x, *f.parameters()]
    grads = torch.autograd.grad((weights * deq(x)).sum(), params)
    refs = torch.autograd.grad((weights * unrolled(f, x)).sum(), params)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    assert int(deq.last_state.iter_num) < 300


def test_deq_one_step_gradient_is_the_jacobian_free_gradient():
    f = Cell(5)
    x = torch.randn(3, 5, generator=gen(4), dtype=DT)
    deq = DEQ(f, tol=1e-12, maxiter=300, adjoint=PhantomAdjoint())
    grads = torch.autograd.grad(deq(x).sum(), list(f.parameters()))
    z_star = unrolled(f, x).detach()
    refs = torch.autograd.grad(f(z_star, x).sum(), list(f.parameters()))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_deq_phantom_gradient_approaches_the_implicit_one_with_more_steps():
    f = Cell(5)
    x = torch.randn(3, 5, generator=gen(5), dtype=DT)
    params = list(f.parameters())
    exact = torch.autograd.grad(DEQ(f, tol=1e-12, maxiter=300)(x).sum(), params)

    def error(steps):
        deq = DEQ(f, tol=1e-12, maxiter=300, adjoint=PhantomAdjoint(steps))
        approx = torch.autograd.grad(deq(x).sum(), params)
        return sum(float(torch.linalg.vector_norm(a - e)) for a, e in zip(approx, exact))

    errors = [error(k) for k in (1, 3, 10, 30)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6 * (1 + errors[0])


def test_deq_reports_non_convergence():
    f = Cell(5)
    x = torch.randn(3, 5, generator=gen(6), dtype=DT)
    with pytest.warns(it.ConvergenceWarning):
        DEQ(f, tol=1e-14, maxiter=2)(x)
    with pytest.raises(it.ConvergenceError):
        DEQ(f, tol=1e-14, maxiter=2, on_failure="raise")(x)


def test_deq_warm_start_saves_iterations():
    f = Cell(8)
    x = torch.randn(4, 8, generator=gen(7), dtype=DT)
    deq = DEQ(f, tol=1e-10, maxiter=200, warm_start=True, adjoint=ImplicitAdjoint("bicgstab"))
    assert isinstance(deq.adjoint.solve, it.WarmStart)
    deq(x).sum().backward()
    cold = int(deq.last_state.iter_num)
    deq(x + 1e-4).sum().backward()
    assert deq.warm_starts == 1 and int(deq.last_state.iter_num) < cold
    first, second = deq.adjoint.solve.iterations
    assert second < first
    deq.reset_warm_start()
    assert deq.adjoint.solve.last is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(forward_solver="newton"), "forward_solver"),
        (dict(maxiter=-1), "maxiter"),
        (dict(tol=-1.0), "tol"),
        (dict(on_failure="crash"), "on_failure"),
    ],
)
def test_deq_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEQ(Cell(3), **kwargs)
    with pytest.raises(ValueError, match="damping"):
        PhantomAdjoint(2, damping=0.0)


# --- adjoint objects -----------------------------------------------------------------------------


def test_implicit_layer_adjoints_agree_with_the_closed_form():
    # solve_forward is torch.linalg.solve, so unrolling it is exact too: implicit (by CG or
    # LU), unrolled and the closed form all give the same gradient.
    X, y = data()
    weights = torch.randn(5, generator=gen(30), dtype=DT)
    lam = torch.linspace(-1.0, 1.0, 5, dtype=DT).requires_grad_()
    (ref,) = torch.autograd.grad((weights * ridge_closed(lam, X, y)).sum(), lam)
    for adjoint in (ImplicitAdjoint(), ImplicitAdjoint("lu"), UnrolledAdjoint()):
        layer = RidgeLayer(5, adjoint=adjoint)
        (grad,) = torch.autograd.grad((weights * layer(X, y)).sum(), layer.log_lam)
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)


class HalfCosine(ImplicitLayer):
    """x* = T(x*) with T(x) = ½ cos(x) + θ a: a contraction (|T'| ≤ ½), not a DEQ."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.theta = nn.Parameter(torch.tensor([0.3, -0.7, 1.1], dtype=DT))

    def fixed_point(self, x, a):
        return 0.5 * torch.cos(x) + self.theta * a

    def optimality(self, x, a):
        return self.fixed_point(x, a) - x

    def solve_forward(self, init, a):
        x = torch.zeros_like(a) if init is None else init
        for _ in range(100):  # ½¹⁰⁰: converged in float64
            x = self.fixed_point(x, a)
        return x


@pytest.mark.parametrize("layer", ["deq", "custom"])
def test_adjoints_agree_in_their_limits_on_a_contraction(layer):
    # Implicit (exact at the fixed point), unrolled through a converged forward, and phantom
    # with many damped steps (their map contracts by 1 − λ + λ·½ = ¾ per step) agree.
    if layer == "deq":
        f, x = Cell(5), torch.randn(3, 5, generator=gen(31), dtype=DT)

        def make(adjoint):  # the same cell (parameters) every time
            return DEQ(f, forward_solver="fixed_point", tol=1e-13, maxiter=300, adjoint=adjoint)
    else:
        x = torch.randn(3, generator=gen(32), dtype=DT)

        def make(adjoint):
            return HalfCosine(adjoint=adjoint)

    def grads(adjoint):
        module = make(adjoint)
        xr = x.clone().requires_grad_()
        return torch.autograd.grad(module(xr).square().sum(), [xr, *module.parameters()])

    exact = grads(ImplicitAdjoint("lu"))
    for adjoint in (ImplicitAdjoint("gmres"), UnrolledAdjoint(), PhantomAdjoint(120, 0.5)):
        for g, e in zip(grads(adjoint), exact):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    one_step = grads(PhantomAdjoint(1, 0.5))  # an approximation, visibly different
    assert max(float((g - e).abs().max()) for g, e in zip(one_step, exact)) > 1e-3


@pytest.mark.parametrize(
    "make", [lambda a: RidgeLayer(3, adjoint=a), lambda a: DEQ(Cell(3), adjoint=a)]
)
def test_a_bad_adjoint_is_a_type_error(make):
    with pytest.raises(TypeError, match=r"adjoint must be .*ImplicitAdjoint\('gmres'\)"):
        make("gmres")
    with pytest.raises(TypeError, match="adjoint must be"):
        make(it.solve_cg)


def test_phantom_adjoint_needs_a_fixed_point():
    with pytest.raises(TypeError, match="fixed_point"):
        RidgeLayer(3, adjoint=PhantomAdjoint())
    assert HalfCosine(adjoint=PhantomAdjoint()).is_fixed_point()


# --- warm-start state ----------------------------------------------------------------------------


def test_warm_start_state_is_in_non_persistent_buffers():
    f = Cell(4)
    x = torch.randn(3, 4, generator=gen(33), dtype=DT)
    deq = DEQ(f, tol=1e-5, maxiter=200, warm_start=True)  # 1e-5: reached in float32 too
    keys = set(deq.state_dict())
    z = deq(x)
    (name, stored), *rest = deq.named_buffers()
    assert name == "warm_start_state.solution_0" and not rest
    torch.testing.assert_close(stored, z.detach())
    # Out of state_dict: a checkpoint is the same with or without a stored solution.
    assert set(deq.state_dict()) == keys
    other = DEQ(Cell(4), warm_start=True)
    other.load_state_dict(deq.state_dict())
    assert not list(other.named_buffers())
    # .to(dtype) casts the stored solution with the module; it still fits the next solve.
    deq.float()
    assert stored.dtype == DT and deq.warm_start_state.solution_0.dtype == torch.float32
    deq(x.float())
    assert deq.warm_starts == 1
    # A batch of another shape starts cold (and then replaces the stored solution).
    deq(x[:2].float())
    assert deq.warm_starts == 1 and deq.warm_start_state.solution_0.shape == (2, 4)
    deq.reset_warm_start()
    assert not list(deq.named_buffers())
    deq(x[:2].float())
    assert deq.warm_starts == 1


def test_warm_start_of_a_pytree_solution_and_of_the_backward():
    class Pair(RidgeLayer):
        def solve_forward(self, init, X, y):
            w = super().solve_forward(init, X, y)
            return {"w": w, "s": w.sum()}

        def optimality(self, x, X, y):
            return {"w": super().optimality(x["w"], X, y), "s": x["s"] - x["w"].sum()}

    X, y = data()
    layer = Pair(5, adjoint=ImplicitAdjoint("gmres"), warm_start=True)
    assert isinstance(layer.adjoint.solve, it.WarmStart)  # the backward's warm start
    out = layer(X, y)
    (out["w"].sum() + out["s"]).backward()
    assert [n for n, _ in layer.named_buffers()] == [
        "warm_start_state.solution_0",
        "warm_start_state.solution_1",
    ]
    layer(X, y)
    assert layer.warm_starts == 1 and layer.adjoint.solve.last is not None
    layer.reset_warm_start()
    assert not list(layer.named_buffers()) and layer.adjoint.solve.last is None
    # A user's linear solver is left alone (it may not take init).
    lu = ImplicitAdjoint(lambda matvec, b: it.solve_lu(matvec, b))
    assert Pair(5, adjoint=lu, warm_start=True).adjoint is lu


def test_warm_start_keeps_nothing_inside_torch_func():
    X, y = data()
    layer = RidgeLayer(5, warm_start=True)
    torch.func.grad(lambda X: layer(X, y).sum())(X)
    assert not list(layer.named_buffers()) and layer.warm_starts == 0


# --- autocast, torch.compile ---------------------------------------------------------------------


def test_autocast_does_not_lower_the_backward_precision():
    # Under bfloat16 autocast the optimality function's matmuls would run in bfloat16 (errors
    # ~1e-2); the engine turns autocast off for its derivative computations, so the gradient
    # equals the float32 one.
    class FullPrecisionForward(RidgeLayer):
        def solve_forward(self, init, X, y):
            with torch.autocast("cpu", enabled=False):  # the forward's precision is the user's
                return super().solve_forward(init, X, y)

    X, y = data(m=40, d=6, dtype=torch.float32)
    layer = FullPrecisionForward(6, dtype=torch.float32)
    ref = torch.autograd.grad(layer(X, y).sum(), layer.log_lam)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer(X, y)
        grad = torch.autograd.grad(w.sum(), layer.log_lam)[0]
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_low_precision_solution_is_differentiated_in_float32():
    class HalfSolution(RidgeLayer):
        def solve_forward(self, init, X, y):
            return super().solve_forward(init, X, y).to(torch.bfloat16)

        def optimality(self, w, X, y):
            return super().optimality(w.to(X.dtype), X, y).to(w.dtype)

    X, y = data(m=40, d=6, dtype=torch.float32)
    layer = HalfSolution(6, dtype=torch.float32)
    w = layer(X, y)
    assert w.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(w.float().sum(), layer.log_lam)
    lam = layer.log_lam.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(ridge_closed(lam, X.double(), y.double()).sum(), lam)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), ref, rtol=2e-2, atol=2e-2)


def test_torch_compile_of_a_model_with_layers():
    # Dynamo traces the solver loop iteration by iteration (the convergence check is a graph
    # break): a few iterations keep the test quick; the gradients compared are the layer's
    # (implicit, at whatever point the forward stopped) with and without compilation.
    f = Cell(5)
    deq = DEQ(f, forward_solver="fixed_point", tol=1e-10, maxiter=4, on_failure="ignore")
    head = nn.Linear(5, 2, dtype=DT)
    x = torch.randn(3, 5, generator=gen(8), dtype=DT)

    def model(x):
        return head(deq(x)).square().sum()

    params = [*f.parameters(), *head.parameters()]
    ref = torch.autograd.grad(model(x), params)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notices
        out = torch.autograd.grad(compiled(x), params)
    for g, r in zip(out, ref):
        torch.testing.assert_close(g, r)


def test_projection_layers_compile_with_fullgraph():
    x = torch.randn(5, 7, generator=gen(15), dtype=DT, requires_grad=True)
    layer = Sparsemax()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    (g,) = torch.autograd.grad((out * torch.arange(7.0, dtype=DT)).sum(), x)
    (r,) = torch.autograd.grad((layer(x) * torch.arange(7.0, dtype=DT)).sum(), x)
    torch.testing.assert_close(g, r)


# --- DistributedDataParallel ---------------------------------------------------------------------


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.deq = DEQ(Cell(4, seed=11), tol=1e-12, maxiter=300)
        self.head = nn.Linear(4, 1, dtype=DT)

    def forward(self, x):
        return self.head(self.deq(x)).squeeze(-1)


def _ddp_worker(rank, world, port, x, y, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Bounded: a rank that dies makes the other fail within a minute instead of hanging.
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Model())
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        loss = ((model(x[shard]) - y[shard]) ** 2).mean()
        loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_path)
        # Every rank reaches this point before any tears the group down: destroying it while
        # the other rank's gloo threads still talk to this one aborted rank 1 under load.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    x = torch.randn(8, 4, generator=gen(9), dtype=DT)
    y = torch.randn(8, generator=gen(10), dtype=DT)
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, y, str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    torch.manual_seed(0)
    model = Model()
    ((model(x) - y) ** 2).mean().backward()  # equal shards: the mean of shard means
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-9, atol=1e-12)


# --- CUDA (run by scripts/gpu_check.sh; skipped without a GPU) -----------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_gpu
def test_layers_on_cuda_match_cpu():
    f = Cell(6)
    x = torch.randn(4, 6, generator=gen(40), dtype=DT)
    deq = DEQ(f, tol=1e-12, maxiter=300)
    params = list(f.parameters())
    ref = torch.autograd.grad(deq(x).square().sum(), params)
    f_gpu = f.to("cuda")
    out = torch.autograd.grad(deq(x.cuda()).square().sum(), list(f_gpu.parameters()))
    for g, r in zip(out, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-7, atol=1e-9)

    Q, p, G, h = qp_data(seed=41)
    pr = p.clone().requires_grad_()
    (g_cpu,) = torch.autograd.grad(QPLayer()(Q, pr, G, h).square().sum(), pr)
    pg = p.cuda().requires_grad_()
    (g_gpu,) = torch.autograd.grad(QPLayer()(Q.cuda(), pg, G.cuda(), h.cuda()).square().sum(), pg)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-6, atol=1e-8)

    X, y = data()
    layer = RidgeLayer(5)
    w_cpu = layer(X, y)
    torch.testing.assert_close(layer.to("cuda")(X.cuda(), y.cuda()).cpu(), w_cpu)

    warm = DEQ(Cell(6), tol=1e-10, maxiter=300, warm_start=True)
    warm(x)
    warm.to("cuda")  # the stored solution moves with the module and fits the next solve
    assert warm.warm_start_state.solution_0.is_cuda
    warm(x.cuda())
    assert warm.warm_starts == 1


@pytest.mark.parametrize("kind", ["kl", "euclidean"])
def test_birkhoff_projection_layer(kind):
    S = torch.randn(2, 4, 4, generator=gen(50), dtype=DT)
    layer = BirkhoffProjection(kind, tol=1e-10)
    P = layer(S)
    ones = torch.ones(2, 4, dtype=DT)
    torch.testing.assert_close(P.sum(-1), ones, atol=1e-8, rtol=0)
    torch.testing.assert_close(P.sum(-2), ones, atol=1e-8, rtol=0)
    project = (
        it.projection.kl_projection_birkhoff if kind == "kl" else it.projection.projection_birkhoff
    )
    torch.testing.assert_close(P[1], project(S[1], 1000, 1e-10))
    Sr = S[:1].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: layer(s), (Sr,), atol=1e-6)


def test_birkhoff_projection_layer_rejects_non_square_scores():
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        BirkhoffProjection()(torch.ones(3, 4))


# --- DEQ in a training loop: the backward's budget, thinned-out warnings, plain functions -------


def _expanding_cell(d=6, seed=3):
    """f(z, x) = tanh(W z + x) with ‖W‖₂ = 3: not a contraction, so the forward misses its
    tolerance and the backward system (I − ∂f/∂z) is hard."""
    cell = Cell(d, seed=seed)
    with torch.no_grad():
        cell.W.weight.mul_(6.0)
    return cell


def test_deq_backward_budget_follows_the_forward():
    deq = DEQ(_expanding_cell(), maxiter=7, tol=1e-12)
    assert deq.backward_maxiter == 14
    solve = deq.adjoint.solve
    assert solve.keywords == {"maxiter": 14, "on_failure": "warn"} and solve.func is it.solve_gmres
    assert DEQ(Cell(4), maxiter=7, backward_maxiter=3).adjoint.solve.keywords["maxiter"] == 3
    # A callable of the user's is left alone.
    mine = functools.partial(it.solve_gmres, maxiter=500)
    assert DEQ(Cell(4), adjoint=ImplicitAdjoint(mine)).adjoint.solve is mine
    # The budget is what the backward gets: GMRES stops after 14 Arnoldi steps.
    x = torch.randn(5, 6, generator=gen(31), dtype=DT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deq(x).sum().backward()
    backward = [str(w.message) for w in caught if "solve_gmres" in str(w.message)]
    assert backward, [str(w.message)[:80] for w in caught]
    assert "after 14 iterations" in backward[0] and "backward_maxiter=14" in backward[0]


def test_deq_failures_are_counted_and_warnings_thinned_out():
    deq = DEQ(_expanding_cell(), maxiter=5, tol=1e-12)
    x = torch.randn(5, 6, generator=gen(32), dtype=DT)
    steps = 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            deq(x).sum().backward()
    shown = [w for w in caught if issubclass(w.category, it.ConvergenceWarning)]
    kinds = len(deq.failures.counts)
    assert kinds >= 2  # the forward solver and the backward solve
    assert all(n == steps for n in deq.failures.counts.values()), deq.failures.counts
    # The 1st and the 10th of each kind: 2 per kind instead of 12.
    assert len(shown) == 2 * kinds, [str(w.message)[:80] for w in shown]
    assert any("failure 10 of this kind" in str(w.message) for w in shown)
    deq.failures.reset()
    assert deq.failures.total == 0


def test_deq_raise_is_not_thinned_out():
    deq = DEQ(_expanding_cell(), maxiter=5, tol=1e-12, on_failure="raise")
    x = torch.randn(5, 6, generator=gen(33), dtype=DT)
    for _ in range(3):
        with pytest.raises(it.ConvergenceError):
            deq(x)


def test_deq_accepts_a_plain_function():
    """A callable f(z, x) that is not a module: no parameters of its own (its closure is not
    differentiated: a closed-over tensor requiring grad is an error, as for custom_root)."""
    W = 0.4 * torch.eye(4, dtype=DT)

    def f(z, x):
        return torch.tanh(z @ W + x)

    deq = DEQ(f, tol=1e-12, maxiter=200)
    x = torch.randn(3, 4, generator=gen(34), dtype=DT, requires_grad=True)
    z = deq(x)
    torch.testing.assert_close(z, f(z, x))
    (g,) = torch.autograd.grad(z.sum(), x)
    zz = z.detach()
    J = torch.diag_embed(1 - torch.tanh(zz @ W + x.detach()) ** 2)  # ∂f/∂x per sample
    A = torch.eye(4, dtype=DT) - W.T @ J  # (I − ∂f/∂z)ᵀ for z @ W: ∂f/∂z = J Wᵀ
    u = torch.linalg.solve(A, torch.ones(3, 4, 1, dtype=DT))
    torch.testing.assert_close(g, (J @ u).squeeze(-1))
    W_leaf = W.clone().requires_grad_()
    with pytest.raises(ValueError, match="closes over"):
        DEQ(lambda z, x: torch.tanh(z @ W_leaf + x))(x)


def test_qplayer_shared_grad_mean_is_qpths_convention():
    """``shared_grad="mean"`` divides a shared tensor's gradient by the batch size (qpth);
    per-sample tensors are unaffected, and the solution is the same."""
    B, n, m = 4, 3, 2
    g = gen(41)
    L = torch.randn(n, n, generator=g, dtype=DT)
    Q = (L @ L.T + n * torch.eye(n, dtype=DT)).requires_grad_()
    p = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    G = torch.randn(m, n, generator=g, dtype=DT, requires_grad=True)
    h = torch.ones(m, dtype=DT, requires_grad=True)
    grads = {}
    for mode in ("sum", "mean"):
        x = QPLayer(shared_grad=mode)(Q, p, G, h)
        grads[mode] = torch.autograd.grad((x**2).sum(), (Q, p, G, h))
        grads[mode + "_x"] = x.detach()
    torch.testing.assert_close(grads["sum_x"], grads["mean_x"], rtol=0, atol=0)
    for k, (s, mean) in enumerate(zip(grads["sum"], grads["mean"])):
        expected = s if k == 1 else s / B  # p is per sample
        torch.testing.assert_close(mean, expected)
    with pytest.raises(ValueError, match="shared_grad"):
        QPLayer(shared_grad="avg")


def test_a_failed_step_does_not_poison_later_warm_starts():
    """Issue 13: a NaN solution was kept as the next initial guess, so every later clean call
    of a warm-started layer returned NaN until reset_warm_start()."""

    class Iterative(ImplicitLayer):  # gradient descent from init: the guess matters
        def solve_forward(self, init, X, y):
            w = torch.zeros(X.shape[1], dtype=X.dtype) if init is None else init
            step = 1.0 / (X**2).sum()  # ≤ 1/‖X‖₂²: a safe step (no SVD, NaN-tolerant)
            for _ in range(2000):
                w = w - step * self.optimality(w, X, y)
            return w

        def optimality(self, w, X, y):
            return X.T @ (X @ w - y) + 0.1 * w

    X, y = data()
    for layer in (
        Iterative(warm_start=True),
        DEQ(Cell(5), tol=1e-10, maxiter=200, warm_start=True),
    ):
        args = (X, y) if isinstance(layer, Iterative) else (X[:4],)
        bad = tuple(torch.full_like(a, float("nan")) for a in args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert not bool(torch.isfinite(layer(*bad)).all())
        with warnings.catch_warnings():
            warnings.simplefilter("error", it.ConvergenceWarning)
            clean = layer(*args)
        assert bool(torch.isfinite(clean).all()), type(layer).__name__
