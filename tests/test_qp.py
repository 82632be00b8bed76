"""implicit_torch.solvers.qp: EqualityConstrainedQP against JAXopt's example and a dense KKT
solve; the batched inequality QP against an independent active-set KKT reference and central
finite differences; shared parameters (sum of gradients); simplex projection through the QP;
implicit vs unrolled gradients; forward mode; failure reporting and shape errors."""

import functools

import pytest
import torch
from problems import infeasible_qp as infeasible
from problems import random_qp

import implicit_torch as it
from implicit_torch import projection as P
from implicit_torch._errors import ConvergenceError, ConvergenceWarning
from implicit_torch.linear import LinearOperator
from implicit_torch.projection import projection_polyhedron
from implicit_torch.solvers import _kkt as kkt_module
from implicit_torch.solvers._qp_data import _Data, _kkt_residual
from implicit_torch.solvers.qp import QP, EqualityConstrainedQP, KKTLinearSolve, KKTSolution

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def grads(out, inputs, weights):
    loss = sum((w * o).sum() for w, o in zip(weights, out) if o is not None)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def kkt_dense(Q, c, A, b):
    """[x; ν] of min ½xᵀQx + cᵀx s.t. Ax = b by torch.linalg.solve (autograd reference)."""
    n, p = c.shape[-1], b.shape[-1]
    Qs = 0.5 * (Q + Q.mT)
    K = torch.cat(
        [torch.cat([Qs, A.mT], -1), torch.cat([A, torch.zeros(p, p, dtype=Q.dtype)], -1)], -2
    )
    sol = torch.linalg.solve(K, torch.cat([-c, b]))
    return sol[:n], sol[n:]


# --- EqualityConstrainedQP -------------------------------------------------------------------


def test_equality_qp_jaxopt_example_and_gradients():
    Q = 2 * torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    c = torch.tensor([1.0, 1.0], dtype=DT)
    A = torch.tensor([[1.0, 1.0]], dtype=DT)
    b = torch.tensor([1.0], dtype=DT)
    args = leaves(Q, c, A, b)
    sol = EqualityConstrainedQP().run(None, (args[0], args[1]), (args[2], args[3])).params
    assert isinstance(sol, KKTSolution) and sol.dual_ineq is None
    torch.testing.assert_close(sol.primal, torch.tensor([0.25, 0.75], dtype=DT), atol=1e-12, rtol=0)
    w = (torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.5], dtype=DT))
    got = grads((sol.primal, sol.dual_eq), args, w)
    ref_args = leaves(Q, c, A, b)
    x, nu = kkt_dense(*ref_args)
    want = grads((x, nu), ref_args, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    # The optimality function vanishes at the solution.
    res = EqualityConstrainedQP().optimality_fun(sol, (Q, c), (A, b))
    assert res.primal.abs().max() < 1e-12 and res.dual_eq.abs().max() < 1e-12


def test_equality_qp_batched_matches_per_problem():
    Q, c, A, b, _, _ = random_qp(1, B=4, n=5, p=2)
    out = EqualityConstrainedQP().run(None, (Q, c[0]), (A, b)).params.primal  # c shared
    for i in range(4):
        torch.testing.assert_close(out[i], kkt_dense(Q[i], c[0], A[i], b[i])[0])


# --- QP: values and gradients against an active-set KKT reference ----------------------------


def active_set_reference(Q, c, A, b, G, h, lam):
    """The QP solution as the equality-constrained QP on the active set (λ > 0), solved
    densely with autograd: an independent reference for values and gradients, valid under
    strict complementarity. Returns (x, ν, λ) with λ zero off the active set."""
    active = lam > 1e-7
    Aa = torch.cat([A, G[active]])
    ba = torch.cat([b, h[active]])
    x, mult = kkt_dense(Q, c, Aa, ba)
    p = b.shape[-1]
    lam_full = torch.zeros_like(h).masked_scatter(active, mult[p:])
    return x, mult[:p], lam_full


@pytest.mark.parametrize("p", [0, 2])
def test_qp_matches_active_set_reference(p):
    Q, c, A, b, G, h = random_qp(2, B=3, n=6, m=10, p=max(p, 1))
    A, b = A[:, :p], b[:, :p]
    has_eq = p > 0
    args = leaves(Q, c, A, b, G, h)
    eq = (args[2], args[3]) if has_eq else None
    out = QP().run(None, (args[0], args[1]), eq, (args[4], args[5]))
    sol = out.params
    assert bool(out.state.converged.all()) and out.state.error.max() < 1e-9
    assert sol.primal.shape == (3, 6) and sol.dual_ineq.shape == (3, 10)
    assert (sol.dual_eq is None) == (not has_eq)
    g = gen(3)
    w = [torch.randn(3, k, generator=g, dtype=DT) for k in (6, p, 10)]
    got = grads((sol.primal, sol.dual_eq, sol.dual_ineq), args, w)
    for i in range(3):
        ref_args = leaves(*(t[i] for t in (Q, c, A, b, G, h)))
        x, nu, lam = active_set_reference(*ref_args, sol.dual_ineq[i].detach())
        # There must be both active and inactive constraints for the test to mean something.
        n_active = int((lam != 0).sum())
        assert 0 < n_active < 10
        torch.testing.assert_close(sol.primal[i], x, atol=1e-8, rtol=0)
        torch.testing.assert_close(sol.dual_ineq[i], lam, atol=1e-8, rtol=0)
        want = grads((x, nu, lam), ref_args, [wk[i] for wk in w])
        for k, (gk, wk) in enumerate(zip(got, want)):
            if k in (2, 3) and not has_eq:
                continue
            wk = torch.zeros_like(ref_args[k]) if wk is None else wk
            torch.testing.assert_close(gk[i], wk, atol=1e-6, rtol=1e-6)


def test_qp_gradient_vs_central_finite_differences():
    Q, c, A, b, G, h = random_qp(4, B=2, n=5, m=7, p=1)
    g = gen(5)
    w = torch.randn(2, 5, generator=g, dtype=DT)
    solver = QP(tol=1e-11)

    def loss(c, h):
        x = solver.run(None, (Q, c), (A, b), (G, h)).params.primal
        return (w * x).sum()

    cr, hr = leaves(c, h)
    gc, gh = torch.autograd.grad(loss(cr, hr), (cr, hr))
    eps = 1e-5
    for t, grad, which in ((c, gc, 0), (h, gh, 1)):
        for idx in [(0, 0), (1, 3), (1, 4)]:
            e = torch.zeros_like(t)
            e[idx] = eps
            with torch.no_grad():
                plus = loss(c + e, h) if which == 0 else loss(c, h + e)
                minus = loss(c - e, h) if which == 0 else loss(c, h - e)
            fd = (plus - minus) / (2 * eps)
            torch.testing.assert_close(grad[idx], fd, atol=1e-6, rtol=1e-5)


def test_shared_parameter_gets_sum_of_per_problem_gradients():
    Q, c, A, b, G, h = random_qp(6, B=4, n=5, m=8, p=1)
    G0, A0 = G[0], A[0]  # shared by the four problems
    b = (A0 @ torch.linalg.lstsq(A0, b[0]).solution).expand(4, 1).clone()
    g = gen(7)
    w = torch.randn(4, 5, generator=g, dtype=DT)
    Gs, As = leaves(G0, A0)
    x = QP().run(None, (Q, c), (As, b), (Gs, h)).params.primal
    gG, gA = torch.autograd.grad((w * x).sum(), (Gs, As))
    Gb, Ab = leaves(G0.expand(4, 8, 5), A0.expand(4, 1, 5))
    x2 = QP().run(None, (Q, c), (Ab, b), (Gb, h)).params.primal
    torch.testing.assert_close(x, x2)
    gGb, gAb = torch.autograd.grad((w * x2).sum(), (Gb, Ab))
    torch.testing.assert_close(gG, gGb.sum(0), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gA, gAb.sum(0), atol=1e-9, rtol=1e-9)


def test_single_problem_is_unbatched():
    Q, c, A, b, G, h = random_qp(8, n=4, m=6, p=1, batched=False)
    out = QP().run(None, (Q, c), (A, b), (G, h))
    assert out.params.primal.shape == (4,) and out.params.dual_ineq.shape == (6,)
    assert out.state.error.shape == () and bool(out.state.converged)
    batched = QP().run(None, (Q, c.unsqueeze(0)), (A, b), (G, h)).params.primal
    torch.testing.assert_close(out.params.primal, batched[0])
    res = QP().optimality_fun(out.params, (Q, c), (A, b), (G, h))
    assert max(float(r.abs().max()) for r in res) < 1e-9


# --- Projection onto a polyhedron --------------------------------------------------------


def test_simplex_projection_through_the_qp():
    n = 7
    x = torch.randn(3, n, generator=gen(9), dtype=DT)
    A = torch.ones(1, n, dtype=DT)
    b = torch.ones(1, dtype=DT)
    G = -torch.eye(n, dtype=DT)
    h = torch.zeros(n, dtype=DT)
    proj = functools.partial(projection_polyhedron, hyperparams=(A, b, G, h))
    y = proj(x)
    for i in range(3):
        torch.testing.assert_close(y[i], P.projection_simplex(x[i]), atol=1e-7, rtol=0)
        J = torch.autograd.functional.jacobian(proj, x[i])
        s = (P.projection_simplex(x[i]) > 0).to(DT)
        torch.testing.assert_close(
            J, torch.diag(s) - torch.outer(s, s) / s.sum(), atol=1e-6, rtol=0
        )


def test_polyhedron_projection_without_inequalities_is_affine_projection():
    x = torch.randn(4, generator=gen(10), dtype=DT)
    A = torch.randn(2, 4, generator=gen(11), dtype=DT)
    b = torch.randn(2, generator=gen(12), dtype=DT)
    y = projection_polyhedron(x, (A, b, None, None))
    torch.testing.assert_close(y, P.projection_affine_set(x, (A, b)))


# --- Differentiation modes -------------------------------------------------------------------


def test_implicit_and_unrolled_gradients_agree():
    Q, c, A, b, G, h = random_qp(13, B=2, n=5, m=7, p=1)
    w = torch.randn(2, 5, generator=gen(14), dtype=DT)
    out = []
    for solver in (QP(tol=1e-10), QP(tol=1e-10, unroll=True)):
        args = leaves(Q, c, G, h)
        x = solver.run(None, (args[0], args[1]), (A, b), (args[2], args[3])).params.primal
        out.append(torch.autograd.grad((w * x).sum(), args))
    for gi, gu in zip(*out):
        torch.testing.assert_close(gi, gu, atol=1e-6, rtol=1e-5)


def test_closed_form_kkt_solve_matches_generic_lu_and_forward_mode():
    Q, c, A, b, G, h = random_qp(15, B=2, n=4, m=6, p=1)
    w = torch.randn(2, 4, generator=gen(16), dtype=DT)

    def x_of(h, solve=None):
        return QP(implicit_diff_solve=solve).run(None, (Q, c), (A, b), (G, h)).params.primal

    hr = leaves(h)[0]
    g_fast = torch.autograd.grad((w * x_of(hr)).sum(), hr)[0]
    g_lu = torch.autograd.grad((w * x_of(hr, "lu")).sum(), hr)[0]
    torch.testing.assert_close(g_fast, g_lu, atol=1e-10, rtol=1e-10)
    # Forward mode: the tangent along direction t equals the gradient's inner product with it.
    t = torch.randn(2, 6, generator=gen(17), dtype=DT)
    _, x_dot = torch.func.jvp(x_of, (h,), (t,))
    torch.testing.assert_close((w * x_dot).sum(), (g_fast * t).sum(), atol=1e-9, rtol=1e-9)


def bound_kkt_solve(seed, p=1):
    """A KKTLinearSolve bound to the solution of a random batch, and the KKT residual there."""
    Q, c, A, b, G, h = random_qp(seed, B=2, n=4, m=5, p=p)
    A, b = (A, b) if p else (None, None)
    solver = QP(tol=1e-12)
    data = _Data(Q, c, A, b, G, h)
    z, _, ipm = solver._solve(data, (Q, c, A, b, G, h))
    kkt = solver.default_implicit_diff_solve()
    kkt.bind(z, ipm)
    return kkt, z, functools.partial(_kkt_residual, Q=Q, c=c, A=A, b=b, G=G, h=h)


@pytest.mark.parametrize("p", [0, 1])
def test_kkt_linear_solve_reads_the_operators_transposed_flag(p, monkeypatch):
    kkt, z, F = bound_kkt_solve(30, p)
    r = torch.randn(z.shape, generator=gen(31), dtype=DT)
    _, vjp = torch.func.vjp(F, z)

    def jvp(v):
        return torch.func.jvp(F, (z,), (v,))[1]

    def no_lu(*args, **kwargs):
        raise AssertionError("the structured solve should not fall back to LU")

    monkeypatch.setattr(kkt_module, "solve_lu", no_lu)
    u = kkt(LinearOperator(lambda v: vjp(v)[0], batched=True, transposed=True), r)
    torch.testing.assert_close(vjp(u)[0], r, atol=1e-10, rtol=1e-10)  # Jᵀ u = r
    w = kkt(LinearOperator(jvp, batched=True, transposed=False), r)
    torch.testing.assert_close(jvp(w), r, atol=1e-10, rtol=1e-10)  # J w = r
    monkeypatch.undo()
    # A plain function says nothing of which it applies: solved by LU on the function.
    torch.testing.assert_close(vjp(kkt(lambda v: vjp(v)[0], r))[0], r, atol=1e-10, rtol=1e-10)


def test_run_does_not_modify_the_solver_and_runs_keep_their_own_factorisation():
    # One KKTLinearSolve passed by the user: each run still differentiates at its own solution,
    # whatever the order of the backward passes.
    Q, c, A, b, G, h = random_qp(32, B=2, n=4, m=5, p=1)
    solver = QP(implicit_diff_solve=KKTLinearSolve())
    before = repr(solver)
    c1, c2 = leaves(c, 2 * c)
    x1 = solver.run(None, (Q, c1), (A, b), (G, h)).params.primal
    x2 = solver.run(None, (Q, c2), (A, b), (G, 0.5 * h)).params.primal
    g1 = torch.autograd.grad(x1.sum(), c1)[0]
    g2 = torch.autograd.grad(x2.sum(), c2)[0]
    assert repr(solver) == before
    for (cr, hr), g in (((c, h), g1), ((2 * c, 0.5 * h), g2)):
        cr = leaves(cr)[0]
        x = QP(implicit_diff_solve="lu").run(None, (Q, cr), (A, b), (G, hr)).params.primal
        torch.testing.assert_close(g, torch.autograd.grad(x.sum(), cr)[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_float32(compute_dtype):
    """float32 data; by default the iterations run in float64 on the CPU, and with
    compute_dtype=float32 in float32 arithmetic (what runs on an accelerator)."""
    Q, c, A, b, G, h = random_qp(22, B=8, n=10, m=12, p=1, dtype=torch.float32)
    args = leaves(c, h)
    out = QP(compute_dtype=compute_dtype).run(None, (Q, args[0]), (A, b), (G, args[1]))
    assert out.params.primal.dtype == torch.float32 and out.state.error.dtype == torch.float32
    assert bool(out.state.converged.all())
    g32 = torch.autograd.grad(out.params.primal.sum(), args)
    args64 = leaves(*(t.double() for t in (c, h)))
    Q64, A64, b64, G64 = (t.double() for t in (Q, A, b, G))
    x64 = QP().run(None, (Q64, args64[0]), (A64, b64), (G64, args64[1])).params.primal
    # In float32 arithmetic the KKT residual is ~1e-6 relative, so solutions and gradients are
    # accurate to ~1e-3, less where an active constraint has a tiny multiplier (near
    # degeneracy); computed in float64, to float32 rounding.
    tol = 2e-2 if compute_dtype == torch.float32 else 1e-5
    torch.testing.assert_close(out.params.primal.double(), x64, atol=tol / 2, rtol=tol / 2)
    g64 = torch.autograd.grad(x64.sum(), args64)
    for a, r in zip(g32, g64):
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol)


# --- Failures and errors ---------------------------------------------------------------------


def test_non_convergence_is_reported():
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        out = QP(maxiter=30).run(None, *infeasible())
    assert not bool(out.state.converged)
    with pytest.raises(ConvergenceError, match="did not converge"):
        QP(maxiter=30, on_failure="raise").run(None, *infeasible())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(Q=torch.eye(3, dtype=DT)), "Q must be"),
        (dict(A=torch.ones(1, 3, dtype=DT)), "A must have n = 4 columns"),
        (dict(b=torch.ones(2, dtype=DT)), "b must have 1 entries"),
        (dict(h=torch.ones(5, 3, dtype=DT)), "different batch sizes"),
        (dict(G=torch.ones(2, 2, 3, 4, dtype=DT)), "G must have shape"),
        (dict(h=torch.ones(3, dtype=torch.float32)), "one dtype"),
    ],
)
def test_bad_shapes_raise_clear_errors(change, match):
    Q, c, A, b, G, h = random_qp(19, n=4, m=3, p=1, batched=False)
    d = dict(Q=Q, c=c.expand(2, 4), A=A, b=b, G=G, h=h) | change
    with pytest.raises((ValueError, TypeError), match=match):
        QP().run(None, (d["Q"], d["c"]), (d["A"], d["b"]), (d["G"], d["h"]))


def test_missing_or_malformed_arguments():
    Q, c, A, b, G, h = random_qp(20, n=4, m=3, p=1, batched=False)
    with pytest.raises(ValueError, match="params_ineq is required"):
        QP().run(None, (Q, c), (A, b))
    with pytest.raises(ValueError, match="params_obj must be a pair"):
        QP().run(None, Q, (A, b), (G, h))
    with pytest.raises(ValueError, match="both G and h"):
        QP().run(None, (Q, c), None, (G, None))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    data = random_qp(21, B=16, n=8, m=10, p=1)
    cpu = QP().run(None, data[:2], data[2:4], data[4:]).params.primal
    dev = [t.cuda() for t in data]
    args = leaves(*dev)
    x = QP().run(None, args[:2], args[2:4], args[4:]).params.primal
    torch.testing.assert_close(x.cpu(), cpu, atol=1e-8, rtol=0)
    x.sum().backward()
    assert all(a.grad is not None and a.grad.is_cuda for a in args)


def test_second_order_matches_active_set_reference():
    Q, c, A, b, G, h = random_qp(23, B=1, n=5, m=8, p=1)
    sol = QP().run(None, (Q, c), (A, b), (G, h)).params

    def loss_qp(h):
        return (QP().run(None, (Q, c), (A, b), (G, h)).params.primal ** 2).sum()

    def loss_ref(h):
        x, _, _ = active_set_reference(Q[0], c[0], A[0], b[0], G[0], h[0], sol.dual_ineq[0])
        return (x**2).sum()

    hr = leaves(h)[0]
    (g,) = torch.autograd.grad(loss_qp(hr), hr, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[0, i], hr, retain_graph=True)[0] for i in range(8)])
    H_ref = torch.autograd.functional.hessian(loss_ref, h)
    torch.testing.assert_close(
        H.squeeze(1), H_ref.reshape(8, 1, 8).squeeze(1), atol=1e-5, rtol=1e-5
    )


def test_torch_func_transforms():
    Q, c, A, b, G, h = random_qp(24, B=3, n=4, m=6, p=1)

    def x_of(hh):
        return QP().run(None, (Q[0], c[0]), (A[0], b[0]), (G[0], hh)).params.primal

    torch.testing.assert_close(torch.func.vmap(x_of)(h), torch.stack([x_of(hh) for hh in h]))
    J = torch.autograd.functional.jacobian(x_of, h[0])
    torch.testing.assert_close(torch.func.jacrev(x_of)(h[0]), J, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.func.jacfwd(x_of)(h[0]), J, atol=1e-10, rtol=1e-10)


def test_equality_qp_singular_kkt_is_reported():
    Q = torch.eye(2, dtype=DT)
    A = torch.ones(2, 2, dtype=DT)  # dependent rows: singular KKT matrix
    b = torch.ones(2, dtype=DT)
    with pytest.raises(ConvergenceError, match="did not converge"):
        EqualityConstrainedQP(on_failure="raise").run(None, (Q, torch.zeros(2, dtype=DT)), (A, b))


def test_exact_active_set_gives_exact_zeros_on_a_relu_layer():
    """x* = argmin ½‖x − y‖² s.t. x ≥ 0 is relu(y), with ∂x*/∂y = 1[y > 0] exactly. The
    interior point's complementarity leaves terms of the size of its last multiplier or slack
    (issue 14: up to ~1e-6); the frozen active set gives the exact derivative."""
    g = gen(91)
    B, n = 8, 6
    y = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    Q, G, h = torch.eye(n, dtype=DT), -torch.eye(n, dtype=DT), torch.zeros(n, dtype=DT)
    exact = (y > 0).to(DT).detach()
    errors = {}
    for frozen in (False, True):
        x = it.nn.QPLayer(exact_active_set=frozen)(Q, -y, G, h)
        torch.testing.assert_close(x, torch.relu(y), rtol=0, atol=1e-7)
        (gy,) = torch.autograd.grad(x.sum(), y)
        errors[frozen] = float((gy - exact).abs().max())
    assert errors[True] <= 1e-14, errors
    assert errors[False] > errors[True]  # what the option is for


def test_exact_active_set_matches_the_default_gradient_on_a_generic_qp():
    """Away from degeneracy both backwards give the same gradient (to the forward's accuracy)
    and the frozen one agrees with central finite differences of the solution."""
    g = gen(92)
    n, m = 5, 7
    L = torch.randn(n, n, generator=g, dtype=DT)
    Q = L @ L.T + torch.eye(n, dtype=DT)
    c = torch.randn(n, generator=g, dtype=DT, requires_grad=True)
    G = torch.randn(m, n, generator=g, dtype=DT)
    h = (G @ torch.randn(n, generator=g, dtype=DT)).abs() * 0.1
    w = torch.randn(n, generator=g, dtype=DT)
    grads = []
    for frozen in (False, True):
        x = it.QP(exact_active_set=frozen).run(None, (Q, c), None, (G, h)).params.primal
        grads.append(torch.autograd.grad((w * x).sum(), c)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)

    def solution(cc):
        return it.QP().run(None, (Q, cc), None, (G, h)).params.primal

    eps = 1e-6
    fd = torch.stack(
        [
            (
                (w * solution(c.detach() + eps * e)).sum()
                - (w * solution(c.detach() - eps * e)).sum()
            )
            / (2 * eps)
            for e in torch.eye(n, dtype=DT)
        ]
    )
    torch.testing.assert_close(grads[1], fd, rtol=1e-5, atol=1e-7)
