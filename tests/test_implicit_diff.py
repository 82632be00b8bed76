"""The engine: custom_root, custom_fixed_point, implicit_solve, root_vjp, root_jvp.

Every reference is independent of implicit_torch: closed forms, autograd through
torch.linalg.solve, or dense implicit-function-theorem solves.
"""

import functools
import warnings

import pytest
import torch
from problems import DT, dense_ift, gen, ridge_closed, ridge_data, ridge_F, ridge_gd, tight

import implicit_torch as it

SOLVES = ["cg", "gmres", "bicgstab", "normal_cg", "lu", "cholesky", "auto"]


def close(a, b, rtol=1e-8, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def jacobian_rows(out, inp):
    rows = [
        torch.autograd.grad(out.reshape(-1)[i], inp, retain_graph=True, create_graph=True)[0]
        for i in range(out.numel())
    ]
    return torch.stack(rows)


# --- ridge closed form: dw/dλ = −(XᵀX + λI)⁻¹ w --------------------------------------------------


@pytest.mark.parametrize("solve", SOLVES)
def test_scalar_ridge_first_and_second_derivative(solve):
    X, y, _ = ridge_data(1)
    d = X.shape[1]
    solve_arg = tight(solve) if solve not in ("lu", "cholesky", "auto") else solve
    ridge = it.custom_root(ridge_F, solve=solve_arg)(
        lambda init, lam, X, y: ridge_closed(lam, X, y)
    )
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    w = ridge(None, lam, X, y)
    dw = jacobian_rows(w, lam)  # (d,)
    H = X.T @ X + 0.7 * torch.eye(d, dtype=DT)
    w_ref = torch.linalg.solve(H, X.T @ y)
    close(dw.detach(), -torch.linalg.solve(H, w_ref))
    # d²w/dλ² = 2 H⁻² w: differentiating the backward pass itself.
    d2w = torch.stack([torch.autograd.grad(dw[i], lam, retain_graph=True)[0] for i in range(d)])
    close(d2w, 2 * torch.linalg.solve(H, torch.linalg.solve(H, w_ref)))


def test_per_feature_ridge_first_and_second_order_against_autograd_of_closed_form():
    X, y, lam = ridge_data(2)
    ridge = it.custom_root(ridge_F, solve=tight("cg"))(ridge_gd)
    lam_ = lam.clone().requires_grad_()
    w = ridge(None, lam_, X, y)
    J = jacobian_rows(w, lam_)
    close(
        J.detach(),
        torch.autograd.functional.jacobian(lambda t: ridge_closed(t, X, y), lam),
        rtol=1e-7,
        atol=1e-9,
    )
    # closed form of the first derivative: ∂w/∂λ_j = −H⁻¹ e_j w_j
    H = X.T @ X + torch.diag(lam)
    close(
        J.detach(),
        -torch.linalg.solve(H, torch.diag(ridge_closed(lam, X, y))),
        rtol=1e-7,
        atol=1e-9,
    )
    # second order: the Hessian of a validation loss
    Xv, yv = (
        torch.randn(8, 5, generator=gen(3), dtype=DT),
        torch.randn(8, generator=gen(4), dtype=DT),
    )
    loss = ((Xv @ w - yv) ** 2).sum()
    (g,) = torch.autograd.grad(loss, lam_, create_graph=True)
    Hess = torch.stack([torch.autograd.grad(g[i], lam_, retain_graph=True)[0] for i in range(5)])
    ref = torch.autograd.functional.hessian(
        lambda t: ((Xv @ ridge_closed(t, X, y) - yv) ** 2).sum(), lam
    )
    close(Hess, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solve", ["cg", "lu"])
def test_gradcheck_and_gradgradcheck_with_forward_mode(solve):
    X, y, lam = ridge_data(5, m=10, d=3)
    ridge = it.custom_root(ridge_F, solve=tight(solve) if solve == "cg" else solve)(
        lambda init, lam, X, y: ridge_closed(lam, X, y)
    )
    inputs = (lam.clone().requires_grad_(), X.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: ridge(None, *a), inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda *a: ridge(None, *a), inputs, check_fwd_over_rev=True)


# --- fixed points ------------------------------------------------------------------------------


def cos_T(x, theta):
    return torch.cos(x) + theta


def cos_solver(init, theta):
    x = torch.zeros_like(theta) if init is None else init
    for _ in range(500):  # |d cos| <= sin(1) on the iterates: a contraction, converges
        x = cos_T(x, theta)
    return x


@pytest.mark.parametrize("solve", ["gmres", "bicgstab", "lu", "auto", "cg"])
def test_fixed_point_of_cos_has_the_closed_form_jacobian(solve):
    # x* = cos x* + θ  ⇒  dx*/dθ = diag(1 / (1 + sin x*)); "cg" works too: A = −(I + diag sin x*)
    # is symmetric negative definite.
    theta = torch.tensor([-0.3, 0.0, 0.2, 0.4], dtype=DT, requires_grad=True)
    s = tight(solve) if solve in ("gmres", "bicgstab", "cg") else solve
    x = it.custom_fixed_point(cos_T, solve=s)(cos_solver)(None, theta)
    assert float((x - cos_T(x, theta)).abs().max().detach()) < 1e-13
    J = jacobian_rows(x, theta).detach()
    close(J, torch.diag(1 / (1 + torch.sin(x.detach()))))
    # forward mode agrees
    Jf = torch.func.jacfwd(lambda t: it.custom_fixed_point(cos_T, solve=s)(cos_solver)(None, t))(
        theta.detach()
    )
    close(Jf, J)


# --- an equality-constrained QP through its KKT conditions -------------------------------------
# min ½ xᵀQx + cᵀx  s.t.  Ax = b:  F(x, ν) = (Qx + c + Aᵀν, Ax − b).


def kkt_F(z, Q, c, A, b):
    x, nu = z
    return (Q @ x + c + A.T @ nu, A @ x - b)


def kkt_solver(init, Q, c, A, b):
    n, p = Q.shape[0], A.shape[0]
    K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(p, p, dtype=DT)], 1)], 0)
    sol = torch.linalg.solve(K, torch.cat([-c, b]))
    return (sol[:n], sol[n:])


def qp_data():
    Q = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=DT)
    c = torch.tensor([1.0, 1.0], dtype=DT)
    A = torch.tensor([[1.0, 1.0]], dtype=DT)
    b = torch.tensor([1.0], dtype=DT)
    return Q, c, A, b


@pytest.mark.parametrize("solve", ["lu", "gmres", "bicgstab", "auto"])
def test_equality_constrained_qp(solve):
    Q, c, A, b = qp_data()
    s = tight(solve) if solve in ("gmres", "bicgstab") else solve
    qp = it.custom_root(kkt_F, solve=s)(kkt_solver)
    params = [t.clone().requires_grad_() for t in (Q, c, A, b)]
    x, _nu = qp(None, *params)
    close(x.detach(), torch.tensor([0.25, 0.75], dtype=DT), rtol=0, atol=1e-14)
    weights = torch.tensor([1.0, -2.0], dtype=DT)
    (weights @ x).backward()

    def reference(Q, c, A, b):
        return kkt_solver(None, Q, c, A, b)[0]  # autograd through the KKT solve

    refs = torch.func.grad(lambda *p: weights @ reference(*p), argnums=(0, 1, 2, 3))(Q, c, A, b)
    for p, r in zip(params, refs):
        close(p.grad, r)


def test_cg_on_an_indefinite_kkt_system_is_reported_not_silent():
    Q, c, A, b = qp_data()
    qp = it.custom_root(kkt_F, solve="cg")(kkt_solver)
    cq = c.clone().requires_grad_()
    x, _ = qp(None, Q, cq, A, b)
    with pytest.warns(it.ConvergenceWarning, match="definite"):
        x.sum().backward()
    qp_strict = it.custom_root(kkt_F, solve=functools.partial(it.solve_cg, on_failure="raise"))(
        kkt_solver
    )
    x, _ = qp_strict(None, Q, c.clone().requires_grad_(), A, b)
    with pytest.raises(it.IndefiniteSystemError):
        x.sum().backward()


# --- random smooth problems against the dense IFT reference -------------------------------------


def smooth_F(x, W, theta, s):
    # F(x) = x + 0.3 tanh(W x) ⊙ s − θ: ∂ₓF = I + 0.3 diag(s ⊙ tanh') W, invertible since ‖W‖ < 1.
    return x + 0.3 * torch.tanh(W @ x) * s - theta


def smooth_solver(init, W, theta, s):
    x = torch.zeros_like(theta)
    for _ in range(300):  # Picard iteration on x = θ − 0.3 tanh(Wx) ⊙ s: a contraction
        x = theta - 0.3 * torch.tanh(W @ x) * s
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("solve", ["gmres", "normal_cg", "lu"])
def test_random_smooth_problem_matches_dense_ift(seed, solve):
    n = 7
    g = gen(seed)
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    theta, s = torch.randn(n, generator=g, dtype=DT), 1 + torch.rand(n, generator=g, dtype=DT)
    params = [t.clone().requires_grad_() for t in (W, theta, s)]
    sv = tight(solve) if solve != "lu" else solve
    x = it.custom_root(smooth_F, solve=sv)(smooth_solver)(None, *params)
    refs = dense_ift(smooth_F, x.detach(), (W, theta, s))
    for p, ref in zip(params, refs):
        J = torch.stack([torch.autograd.grad(x[i], p, retain_graph=True)[0] for i in range(n)])
        close(J, ref)


# --- batched problems --------------------------------------------------------------------------


def batched_ridge_F(w, lam, X, y, scale):
    r = torch.einsum("bmd,bd->bm", X, w) - y
    return scale[:, None] * (torch.einsum("bmd,bm->bd", X, r) + lam * w)


def batched_ridge_closed(lam, X, y):
    H = X.transpose(1, 2) @ X + torch.diag_embed(lam.expand(X.shape[0], -1))
    return torch.linalg.solve(H, torch.einsum("bmd,bm->bd", X, y))


@pytest.mark.parametrize(
    "solve", ["cg", "gmres", "bicgstab", "normal_cg", "lu", "cholesky", "auto"]
)
def test_batched_scales_differing_by_1e6_converge_individually(solve):
    B, m, d = 5, 20, 4
    g = gen(7)
    X, y = torch.randn(B, m, d, generator=g, dtype=DT), torch.randn(B, m, generator=g, dtype=DT)
    lam = 0.5 + torch.rand(B, d, generator=g, dtype=DT)
    scale = torch.tensor([1e-3, 1e3, 1.0, 1e-2, 1e2], dtype=DT)  # 1e6 apart
    weights = torch.logspace(-3, 3, B, dtype=DT)[:, None] * torch.randn(B, d, generator=g, dtype=DT)
    lam_ = lam.clone().requires_grad_()
    solver = it.custom_root(batched_ridge_F, solve=solve, batched=True)(
        lambda init, lam, X, y, s: batched_ridge_closed(lam, X, y)
    )
    w = solver(None, lam_, X, y, scale)
    (weights * w).sum().backward()
    ref = torch.func.grad(lambda t: (weights * batched_ridge_closed(t, X, y)).sum())(lam)
    err = torch.linalg.vector_norm(lam_.grad - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)
    assert bool((err < 1e-7).all()), err


def test_batched_shared_parameter_gets_the_sum_of_gradients():
    B, m, d = 4, 15, 3
    g = gen(8)
    X, y = torch.randn(B, m, d, generator=g, dtype=DT), torch.randn(B, m, generator=g, dtype=DT)
    lam = torch.tensor([0.3, 0.9, 1.4], dtype=DT)  # one λ shared by all problems
    ones = torch.ones(B, dtype=DT)
    lam_ = lam.clone().requires_grad_()
    solver = it.custom_root(batched_ridge_F, solve="cg", batched=True)(
        lambda init, lam, X, y, s: batched_ridge_closed(lam, X, y)
    )
    w = solver(None, lam_, X, y, ones)
    (w**2).sum().backward()
    per_problem = [
        torch.func.grad(lambda t, i=i: (ridge_closed(t, X[i], y[i]) ** 2).sum())(lam)
        for i in range(B)
    ]
    close(lam_.grad, torch.stack(per_problem).sum(0))


# --- pytrees, static params, has_aux, root_vjp / root_jvp --------------------------------------


def test_pytree_solution_and_params_with_static_leaves():
    X, y, lam = ridge_data(9)

    def F(sol, hp, data, power, tag):
        assert power == 2 and tag == "ok"
        X, y = data["X"], data["y"]
        r = X @ sol["w"] + sol["b"][0] - y
        return {"w": X.T @ r + hp[0] ** power * sol["w"], "b": [r.sum() + hp[1] * sol["b"][0]]}

    def closed(hp, X, y):
        Z = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], 1)
        D = torch.diag(torch.cat([hp[0] ** 2, hp[1].reshape(1)]))
        z = torch.linalg.solve(Z.T @ Z + D, Z.T @ y)
        return {"w": z[:-1], "b": [z[-1]]}

    def solver(init, hp, data, power, tag):
        return closed(hp, data["X"], data["y"])

    hp = (lam.clone().requires_grad_(), torch.tensor(0.4, dtype=DT, requires_grad=True))
    data = {"X": X.clone().requires_grad_(), "y": y}
    sol = it.custom_root(F, solve=tight("cg"))(solver)(None, hp, data, 2, "ok")
    loss = (sol["w"] ** 3).sum() + sol["b"][0] ** 2
    loss.backward()
    ref = torch.func.grad(
        lambda a, b, Xr: (
            (closed((a, b), Xr, y)["w"] ** 3).sum() + closed((a, b), Xr, y)["b"][0] ** 2
        ),
        argnums=(0, 1, 2),
    )(lam, torch.tensor(0.4, dtype=DT), X)
    close(hp[0].grad, ref[0])
    close(hp[1].grad, ref[1])
    close(data["X"].grad, ref[2])


def test_has_aux_passes_aux_through():
    X, y, lam = ridge_data(10)
    solver = it.custom_root(ridge_F, solve=tight("cg"), has_aux=True)(
        lambda init, lam, X, y: (ridge_closed(lam, X, y), {"iters": 3})
    )
    w, aux = solver(None, lam.clone().requires_grad_(), X, y)
    assert aux == {"iters": 3} and w.requires_grad
    with pytest.raises(TypeError, match="pair"):
        it.custom_root(ridge_F, has_aux=True)(lambda init, lam, X, y: ridge_closed(lam, X, y))(
            None, lam, X, y
        )


def test_root_vjp_and_root_jvp_against_the_dense_reference():
    X, y, lam = ridge_data(11)
    w = ridge_closed(lam, X, y)
    J_lam, J_X, J_y = dense_ift(ridge_F, w, (lam, X, y))
    v = torch.randn(5, generator=gen(12), dtype=DT)
    g_lam, g_X, g_y, g_static = it.root_vjp(
        lambda w, lam, X, y, k: ridge_F(w, lam, X, y), w, (lam, X, y, 3), v, solve=tight("cg")
    )
    close(g_lam, v @ J_lam)
    close(g_X, torch.einsum("i,ijk->jk", v, J_X))
    close(g_y, v @ J_y)
    assert g_static is None
    t_lam, t_y = (
        torch.randn(5, generator=gen(13), dtype=DT),
        torch.randn(25, generator=gen(14), dtype=DT),
    )
    out = it.root_jvp(ridge_F, w, (lam, X, y), (t_lam, None, t_y), solve=tight("gmres"))
    close(out, J_lam @ t_lam + J_y @ t_y)


# --- the forward solver ---------------------------------------------------------------------


def test_solver_runs_without_grad_and_memory_does_not_grow_with_iterations():
    X, y, lam = ridge_data(15)
    saved = {}

    def run(iters):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        lam_ = lam.clone().requires_grad_()
        solver = it.custom_root(ridge_F)(functools.partial(ridge_gd, iters=iters))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            w = solver(None, lam_, X, y)
            loss = (w**2).sum()
        loss.backward()
        saved[iters] = total[0]
        return lam_.grad

    g1, g2 = run(2000), run(6000)
    assert saved[2000] == saved[6000], saved
    close(g1, g2)


def test_init_is_never_differentiated():
    X, y, lam = ridge_data(16)
    init = torch.zeros(5, dtype=DT, requires_grad=True)
    solver = it.custom_root(ridge_F, solve=tight("cg"))(ridge_gd)
    solver(init, lam.clone().requires_grad_(), X, y).sum().backward()
    assert init.grad is None


# --- bad input ---------------------------------------------------------------------------------


def test_closed_over_tensor_requiring_grad_is_an_error():
    X, y, lam = ridge_data(17)
    Xg = X.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"(?i)pass it as an explicit parameter"):
        it.custom_root(lambda w, lam: ridge_F(w, lam, Xg, y))(
            lambda init, lam: ridge_closed(lam, X, y)
        )(None, lam.clone().requires_grad_())


def test_residual_shape_mismatch_is_a_clear_error():
    X, y, lam = ridge_data(18)
    bad = it.custom_root(lambda w, lam: torch.cat([w, w]))(
        lambda init, lam: ridge_closed(lam, X, y)
    )
    with pytest.raises(ValueError, match="output of optimality_fn"):
        bad(None, lam.clone().requires_grad_())


def test_non_floating_solution_is_rejected():
    solver = it.custom_root(lambda x, t: x - t)(lambda init, t: torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        solver(None, torch.ones(3, dtype=DT, requires_grad=True))


def test_mixed_devices_are_rejected():
    solver = it.custom_root(lambda x, t: x - t.sum())(lambda init, t: torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="device"):
        solver(None, torch.ones(3, dtype=DT, device="meta"))


def test_unknown_solve_name_is_rejected():
    with pytest.raises(ValueError, match="unknown solve"):
        it.custom_root(ridge_F, solve="magic")(lambda init, *p: ridge_closed(*p[:1], *p[1:]))(
            None, *ridge_data(19)[2:], *ridge_data(19)[:2]
        )


def test_backward_non_convergence_warns_and_can_raise():
    X, y, lam = ridge_data(20, m=40, d=12)
    X = X @ torch.diag(torch.logspace(0, 3, 12, dtype=DT))  # ill-conditioned
    lam_ = lam[:1].expand(12).clone().requires_grad_()
    cg2 = functools.partial(it.solve_cg, maxiter=2)
    w = it.custom_root(ridge_F, solve=cg2)(lambda init, lam, X, y: ridge_closed(lam, X, y))(
        None, lam_, X, y
    )
    with pytest.warns(it.ConvergenceWarning, match="did not converge"):
        w.sum().backward()
    strict = functools.partial(it.solve_cg, maxiter=2, on_failure="raise")
    w = it.custom_root(ridge_F, solve=strict)(lambda init, lam, X, y: ridge_closed(lam, X, y))(
        None, lam_, X, y
    )
    with pytest.raises(it.ConvergenceError):
        w.sum().backward()


def test_no_warning_when_the_backward_converges():
    X, y, lam = ridge_data(21)
    w = it.custom_root(ridge_F)(lambda init, lam, X, y: ridge_closed(lam, X, y))(
        None, lam.clone().requires_grad_(), X, y
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.sum().backward()
