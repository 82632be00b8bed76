"""Failure modes of the solver classes, the QP, the projections, the proxes and the losses
(issue 13): a collapsed line search, a non-convex, unbounded or infeasible QP, a rank-deficient
Gauss–Newton system, an empty polyhedron, edge values (NaN, ±inf, empty, 0-d) and bad options.

Every case asserts the clear error, the reported failure with the true error, or the right
result against a float64 reference.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import implicit_torch as it
from implicit_torch import loss, projection, prox
from implicit_torch._result import Status
from implicit_torch.ops import _registration
from implicit_torch.solvers import qp as qp_module
from implicit_torch.solvers.mirror_descent import projection_grad_kl_simplex

DT = torch.float64
INF, NAN = math.inf, math.nan


def no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


# ------------------------------------------------------------------------------------------
# 1. A collapsed line search (or step) is reported, with the true error
# ------------------------------------------------------------------------------------------


def nan_beyond_one(x, *args):
    """−1.5 Σx for x ≤ 1, NaN beyond: its gradient is (−1.5, −1.5) wherever it is defined, and
    every descent step from x near 1 leaves the domain."""
    return torch.where(x <= 1, -1.5 * x, torch.nan).sum()


def log_barrier_beyond_one(x, *args):
    return (-1.5 * x + 0 * torch.log(1 - x)).sum()


TRUE_GRAD_NORM = 1.5 * math.sqrt(2)

LINE_SEARCH_SOLVERS = {
    "gd_fista": lambda f, **kw: (it.GradientDescent(f, **kw), ()),
    "gd_plain": lambda f, **kw: (it.GradientDescent(f, acceleration=False, **kw), ()),
    "proximal": lambda f, **kw: (it.ProximalGradient(f, prox=prox.prox_none, **kw), (None,)),
    "projected": lambda f, **kw: (
        it.ProjectedGradient(f, projection=projection.projection_box, **kw),
        ((-10.0, 10.0),),
    ),
    "lbfgs_zoom": lambda f, **kw: (it.LBFGS(f, **kw), ()),
    "lbfgs_backtracking": lambda f, **kw: (it.LBFGS(f, linesearch="backtracking", **kw), ()),
}


@pytest.mark.parametrize("fun", [nan_beyond_one, log_barrier_beyond_one], ids=["nan", "log"])
@pytest.mark.parametrize("name", list(LINE_SEARCH_SOLVERS))
def test_a_collapsed_line_search_is_reported_with_the_true_error(name, fun):
    solver, args = LINE_SEARCH_SOLVERS[name](fun, maxiter=200)
    with pytest.warns(it.ConvergenceWarning, match=r"stalled.*line search"):
        out = solver.run(torch.zeros(2, dtype=DT), *args)
    x = out.params
    # Stopped early, inside the domain, with the true gradient-based error (not 0).
    assert int(out.state.iter_num) < 200
    assert torch.isfinite(fun(x)) and bool((x <= 1).all())
    torch.testing.assert_close(out.state.error, torch.tensor(TRUE_GRAD_NORM, dtype=DT))
    assert bool(out.state.stalled)
    solver.on_failure = "raise"
    with pytest.raises(it.ConvergenceError, match="stalled"):
        solver.run(torch.zeros(2, dtype=DT), *args)


def test_a_line_search_that_needs_more_than_maxls_halvings_still_converges():
    # L = 2e6: the first search from step 1 needs 21 halvings (maxls = 15); it fails, takes no
    # step, and the next iteration goes on from the smaller step.
    A = torch.tensor([1e6, 4e5], dtype=DT)

    def fun(x):
        return (A * x * x).sum()

    ctx = no_warnings()
    try:
        out = it.GradientDescent(fun, acceleration=False, maxiter=5000, tol=1e-8).run(
            torch.ones(2, dtype=DT)
        )
    finally:
        ctx.__exit__(None, None, None)
    assert out.state.error <= 1e-8 and not bool(out.state.stalled)


def test_a_vanishing_mirror_descent_step_is_reported():
    c = torch.tensor([[0.0, 1.0, 2.0]], dtype=DT)

    def fun(x):
        return (c * x).sum()

    solver = it.MirrorDescent(fun, projection_grad=projection_grad_kl_simplex,
                              stepsize=lambda k: 1e-30, maxiter=50)  # fmt: skip
    with pytest.warns(it.ConvergenceWarning, match="stalled"):
        out = solver.run(torch.full((1, 3), 1 / 3, dtype=DT))
    # The error at the differentiation step (1), not ‖x⁺ − x‖/η = 0.
    x = torch.full((1, 3), 1 / 3, dtype=DT)
    ref = (projection_grad_kl_simplex(x, c, 1.0) - x).norm()
    torch.testing.assert_close(out.state.error, ref)
    assert int(out.state.iter_num) < 50


def test_levenberg_marquardt_stops_when_its_step_no_longer_moves():
    def residual(x):
        return torch.where(x <= 1, x - 2, torch.nan)

    solver = it.LevenbergMarquardt(residual, maxiter=500)
    with pytest.warns(it.ConvergenceWarning, match="stalled"):
        out = solver.run(torch.zeros(1, dtype=DT))
    assert int(out.state.iter_num) < 500
    # ‖Jᵀr‖ = |x − 2| at the returned x ≤ 1.
    assert float(out.params) <= 1
    torch.testing.assert_close(out.state.error, (2 - out.params).abs().reshape(()))


# ------------------------------------------------------------------------------------------
# 2. QP: non-convex, singular, infeasible; the compiled kernel and the loop agree
# ------------------------------------------------------------------------------------------

PATHS = [False] + ([True] if _registration.qp_ipm_available() else [])


@pytest.fixture(params=PATHS, ids=lambda k: "kernel" if k else "loop")
def qp_path(request, monkeypatch):
    monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", request.param)
    return request.param


BOX_X0 = (torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT), torch.ones(2, dtype=DT))


def test_qp_with_an_indefinite_q_reports_non_convexity(qp_path):
    Q = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))  # unbounded below along x1
    c = torch.zeros(2, dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="not convex"):
        out = it.QP().run(None, (Q, c), None, BOX_X0)
    assert int(out.state.status) == Status.UNBOUNDED and not bool(out.state.converged)
    assert bool(torch.isnan(out.params.primal).all())  # never a saddle point
    with pytest.raises(it.ConvergenceError, match="not positive semidefinite"):
        it.QP(on_failure="raise").run(None, (Q, c), None, BOX_X0)


def test_qp_with_a_singular_psd_q_says_it_needs_a_positive_definite_q(qp_path):
    Q = torch.diag(torch.tensor([1.0, 0.0], dtype=DT))
    c = torch.tensor([0.0, -1.0], dtype=DT)  # unbounded below along x1
    with pytest.warns(it.ConvergenceWarning, match="positive definite"):
        out = it.QP().run(None, (Q, c), None, BOX_X0)
    assert int(out.state.status) == Status.SINGULAR


def test_qp_with_dependent_equality_constraints_says_so(qp_path):
    A = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)  # A Q⁻¹ Aᵀ exactly singular
    b = torch.tensor([1.0, 1.0], dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="linearly dependent"):
        out = it.QP().run(None, (torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT)), (A, b),
                          BOX_X0)  # fmt: skip
    assert int(out.state.status) == Status.SINGULAR


def infeasible_box():
    # x0 ≤ −1 and x0 ≥ 1.
    return torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT), torch.tensor([-1.0, -1.0], dtype=DT)


def test_an_infeasible_qp_is_reported_as_infeasible(qp_path):
    with pytest.warns(it.ConvergenceWarning, match="infeasible"):
        out = it.QP().run(None, (torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT)), None,
                          infeasible_box())  # fmt: skip
    assert int(out.state.status) == Status.INFEASIBLE


def test_random_infeasible_qps_get_a_certificate(qp_path):
    g = torch.Generator().manual_seed(3)
    n = 5
    for trial in range(5):
        a = torch.randn(n, generator=g, dtype=DT)
        G = torch.cat([torch.randn(8, n, generator=g, dtype=DT), a[None], -a[None]])
        h = torch.cat([torch.rand(8, generator=g, dtype=DT), torch.tensor([-1.0, -0.5])])
        A = b = None
        if trial % 2:
            A, b = torch.randn(2, n, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT)
        c = torch.randn(n, generator=g, dtype=DT)
        eq = None if A is None else (A, b)
        out = it.QP(on_failure="ignore").run(None, (torch.eye(n, dtype=DT), c), eq, (G, h))
        assert int(out.state.status) == Status.INFEASIBLE, trial


def test_a_batch_reports_each_problem_and_solves_the_others(qp_path):
    Q = torch.stack([torch.eye(2, dtype=DT), torch.diag(torch.tensor([1.0, -1.0], dtype=DT)),
                     torch.eye(2, dtype=DT)])  # fmt: skip
    c = torch.tensor([[2.0, -1.0], [0.0, 0.0], [0.0, 0.0]], dtype=DT)
    G0, h0 = BOX_X0
    G1, h1 = infeasible_box()
    G = torch.stack([G0, G0, G1])
    h = torch.stack([h0, h0, h1])
    with pytest.warns(it.ConvergenceWarning, match="2 of 3"):
        out = it.QP().run(None, (Q, c), None, (G, h))
    assert out.state.status.tolist() == [Status.CONVERGED, Status.UNBOUNDED, Status.INFEASIBLE]
    torch.testing.assert_close(out.params.primal[0], torch.tensor([-1.0, 1.0], dtype=DT))


@pytest.mark.skipif(not _registration.qp_ipm_available(), reason="no compiled qp_ipm kernel")
def test_the_kernel_and_the_loop_report_the_same(monkeypatch):
    Q = torch.stack(
        [
            torch.eye(2, dtype=DT),
            torch.diag(torch.tensor([1.0, -1.0], dtype=DT)),
            torch.diag(torch.tensor([1.0, 0.0], dtype=DT)),
            torch.eye(2, dtype=DT),
        ]
    )
    c = torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.0, -1.0], [0.0, 0.0]], dtype=DT)
    G = torch.stack([BOX_X0[0]] * 3 + [infeasible_box()[0]])
    h = torch.stack([BOX_X0[1]] * 3 + [infeasible_box()[1]])  # fmt: skip
    states, messages = [], []
    for kernel in (True, False):
        monkeypatch.setattr(qp_module, "_USE_COMPILED_KERNEL", kernel)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            states.append(it.QP().run(None, (Q, c), None, (G, h)).state)
        messages.append([str(w.message) for w in caught])
    assert states[0].status.tolist() == states[1].status.tolist()
    assert states[0].converged.tolist() == states[1].converged.tolist()
    assert messages[0] == messages[1]


def test_a_feasible_qp_reports_nothing(qp_path):
    ctx = no_warnings()
    try:
        out = it.QP().run(None, (torch.eye(2, dtype=DT), torch.tensor([1.0, -1.0], dtype=DT)),
                          None, BOX_X0)  # fmt: skip
    finally:
        ctx.__exit__(None, None, None)
    assert int(out.state.status) == Status.CONVERGED


def test_qp_rejects_a_bad_acceptable_tol():
    with pytest.raises(ValueError, match="acceptable_tol"):
        it.QP(acceptable_tol=-1.0).run(None, (torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT)),
                                       None, BOX_X0)  # fmt: skip


# ------------------------------------------------------------------------------------------
# 3. Sparsemax and the simplex: NaN, ±inf, empty, 0-d, bad value
# ------------------------------------------------------------------------------------------

ROWWISE = {
    "sparsemax": loss.sparsemax,
    "Sparsemax": it.nn.Sparsemax(),
    "SimplexProjection": it.nn.SimplexProjection(),
    "simplex_rows": projection.simplex_rows,
}


@pytest.mark.parametrize("name", list(ROWWISE))
def test_rowwise_simplex_edge_values(name):
    f = ROWWISE[name]
    x = torch.tensor(
        [[NAN, 1.0, 2.0], [INF, 1.0, 2.0], [INF, INF, 2.0], [-INF, 1.0, 2.0], [1.0, 2.0, 2.5]],
        dtype=DT,
    )
    p = f(x)
    assert bool(torch.isnan(p[0]).all())  # NaN propagates, in its row only
    torch.testing.assert_close(p[1], torch.tensor([1.0, 0.0, 0.0], dtype=DT))
    torch.testing.assert_close(p[2], torch.tensor([0.5, 0.5, 0.0], dtype=DT))
    torch.testing.assert_close(p[3], torch.tensor([0.0, 0.0, 1.0], dtype=DT))
    torch.testing.assert_close(p[4], torch.tensor([0.0, 0.25, 0.75], dtype=DT))


@pytest.mark.parametrize("name", list(ROWWISE))
def test_rowwise_simplex_rejects_empty_and_0d_input(name):
    f = ROWWISE[name]
    with pytest.raises(ValueError, match="empty"):
        f(torch.empty(3, 0, dtype=DT))
    with pytest.raises(ValueError, match="empty"):
        f(torch.empty(0, dtype=DT))
    with pytest.raises(ValueError, match="0-d"):
        f(torch.tensor(1.0, dtype=DT))


@pytest.mark.parametrize("value", [-1.0, NAN, INF, torch.tensor(-1.0, dtype=DT)])
def test_simplex_rejects_a_bad_value(value):
    x = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    with pytest.raises(ValueError, match="value"):
        projection.projection_simplex(x, value)
    with pytest.raises(ValueError, match="value"):
        it.nn.SimplexProjection(value=value)(x)


def test_projection_simplex_of_infinities_and_empty():
    torch.testing.assert_close(
        projection.projection_simplex(torch.tensor([INF, 0.0, -INF], dtype=DT), 2.0),
        torch.tensor([2.0, 0.0, 0.0], dtype=DT),
    )
    with pytest.raises(ValueError, match="empty"):
        projection.projection_simplex(torch.empty(0, dtype=DT))
    # A 0-d tensor is one vector of one entry, as every shape is.
    torch.testing.assert_close(projection.projection_simplex(torch.tensor(5.0, dtype=DT), 0.5),
                               torch.tensor(0.5, dtype=DT))  # fmt: skip


def test_sparsemax_gradient_is_finite_with_minus_infinity():
    x = torch.tensor([-INF, 1.0, 2.0, 1.5], dtype=DT, requires_grad=True)
    (loss.sparsemax(x) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad[0]) == 0.0


def test_multiclass_sparsemax_loss_edge_values():
    torch.testing.assert_close(
        loss.multiclass_sparsemax_loss(0, torch.tensor([0.0, 0.0, -INF], dtype=DT)),
        loss.multiclass_sparsemax_loss(0, torch.tensor([0.0, 0.0], dtype=DT)),
    )
    torch.testing.assert_close(
        loss.multiclass_sparsemax_loss(0, torch.tensor([0.0, 0.0, -INF], dtype=DT)),
        torch.tensor(0.25, dtype=DT),
    )
    assert float(loss.multiclass_sparsemax_loss(0, torch.tensor([INF, 0.0], dtype=DT))) == 0.0
    assert float(loss.multiclass_sparsemax_loss(1, torch.tensor([INF, 0.0], dtype=DT))) == INF
    # Two classes at +inf share the mass: the loss of either is 1/4.
    torch.testing.assert_close(
        loss.multiclass_sparsemax_loss(0, torch.tensor([INF, INF, 0.0], dtype=DT)),
        torch.tensor(0.25, dtype=DT),
    )
    assert bool(torch.isnan(loss.multiclass_sparsemax_loss(0, torch.tensor([NAN, 0.0]))))
    s = torch.tensor([0.0, 0.0, -INF], dtype=DT, requires_grad=True)
    loss.multiclass_sparsemax_loss(0, s).backward()
    torch.testing.assert_close(s.grad, torch.tensor([-0.5, 0.5, 0.0], dtype=DT))
    with pytest.raises(ValueError, match="empty"):
        loss.multiclass_sparsemax_loss(0, torch.empty(0, dtype=DT))
    with pytest.raises(ValueError, match="0-d"):
        loss.multiclass_sparsemax_loss(0, torch.tensor(1.0, dtype=DT))


# ------------------------------------------------------------------------------------------
# 4. Gauss–Newton with a rank-deficient Jacobian
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "residual",
    [
        lambda x: (x[0] + x[1] - 1).reshape(1),  # one residual, two unknowns
        lambda x: torch.stack([x[0] + x[1] - 1, 2 * (x[0] + x[1]) - 3]),  # dependent columns
    ],
    ids=["scalar", "dependent"],
)
def test_gauss_newton_says_the_jacobian_needs_full_column_rank(residual):
    solver = it.GaussNewton(residual)
    with pytest.warns(it.ConvergenceWarning, match=r"full column rank.*LevenbergMarquardt"):
        out = solver.run(torch.zeros(2, dtype=DT))
    assert bool(torch.isfinite(out.params).all()) and bool(out.state.singular)
    solver.on_failure = "raise"
    with pytest.raises(it.ConvergenceError, match="full column rank"):
        solver.run(torch.zeros(2, dtype=DT))


def test_gauss_newton_with_cg_takes_minimum_norm_steps_on_an_underdetermined_problem():
    # JᵀJ δ = −Jᵀr is singular but consistent: CG from 0 finds its minimum-norm solution.
    ctx = no_warnings()
    try:
        out = it.GaussNewton(lambda x: (x[0] + x[1] - 1).reshape(1), solver="cg",
                             tol=1e-10).run(torch.zeros(2, dtype=DT))  # fmt: skip
    finally:
        ctx.__exit__(None, None, None)
    torch.testing.assert_close(out.params, torch.tensor([0.5, 0.5], dtype=DT))


def test_levenberg_marquardt_solves_the_rank_deficient_problem():
    out = it.LevenbergMarquardt(lambda x: (x[0] + x[1] - 1).reshape(1), tol=1e-10).run(
        torch.zeros(2, dtype=DT)
    )
    torch.testing.assert_close(out.params.sum(), torch.tensor(1.0, dtype=DT))


# ------------------------------------------------------------------------------------------
# 5. An empty polyhedron
# ------------------------------------------------------------------------------------------


def test_projection_onto_an_empty_polyhedron_says_it_is_empty(qp_path):
    G, h = infeasible_box()
    x = torch.zeros(2, dtype=DT)
    with pytest.warns(it.ConvergenceWarning, match="polyhedron is empty"):
        projection.projection_polyhedron(x, (None, None, G, h))
    with pytest.raises(it.ConvergenceError, match="polyhedron is empty"):
        projection.projection_polyhedron(x, (None, None, G, h), check_feasible=True)


def test_projection_onto_inconsistent_equalities_says_the_polyhedron_is_empty():
    A = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    b = torch.tensor([1.0, 2.0], dtype=DT)
    with pytest.raises(it.ConvergenceError, match="polyhedron is empty"):
        projection.projection_polyhedron(torch.zeros(2, dtype=DT), (A, b, None, None),
                                         check_feasible=True)  # fmt: skip


# ------------------------------------------------------------------------------------------
# 6. Hyperparameters of None mean a projection's defaults
# ------------------------------------------------------------------------------------------

DEFAULTS = {
    "simplex": (projection.projection_simplex, dict(value=1.0)),
    "l1_ball": (projection.projection_l1_ball, dict(max_norm=1.0)),
    "l2_ball": (projection.projection_l2_ball, dict(max_norm=1.0)),
    "linf_ball": (projection.projection_linf_ball, dict(max_value=1.0)),
    "l2_sphere": (projection.projection_l2_sphere, dict(value=1.0)),
    "hypercube": (projection.projection_hypercube, dict(scale=1.0)),
    "non_negative": (projection.projection_non_negative, dict()),
    "kl_simplex": (projection.kl_projection_simplex, dict(value=1.0)),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_make_prox_from_projection_reads_none_as_the_defaults(name):
    proj, defaults = DEFAULTS[name]
    x = torch.tensor([0.3, -2.0, 1.7], dtype=DT)
    p = prox.make_prox_from_projection(proj)
    torch.testing.assert_close(p(x), proj(x, **defaults))
    torch.testing.assert_close(p(x, None, 0.5), proj(x, **defaults))


def test_a_projection_without_a_default_still_gets_its_none():
    seen = []

    def proj(x, hyperparams):  # JAXopt's convention: hyperparams passed through as given
        seen.append(hyperparams)
        return projection.projection_simplex(x)

    x = torch.tensor([0.3, -2.0, 1.7], dtype=DT)
    torch.testing.assert_close(prox.make_prox_from_projection(proj)(x), proj(x, None))
    assert seen == [None, None]
    with pytest.raises(TypeError, match="hyperparams"):
        prox.make_prox_from_projection(projection.projection_box)(x)


def test_projected_gradient_and_mirror_descent_read_none_as_the_defaults():
    target = torch.tensor([0.2, 0.5, 2.0], dtype=DT)

    def fun(x):
        return 0.5 * ((x - target) ** 2).sum()

    solver = it.ProjectedGradient(fun, projection=projection.projection_simplex, tol=1e-10)
    x = solver.run(torch.full((3,), 1 / 3, dtype=DT)).params  # hyperparams_proj=None
    torch.testing.assert_close(x, projection.projection_simplex(target))
    pg = it.MirrorDescent.make_projection_grad(projection.kl_projection_simplex, torch.log)
    out = it.MirrorDescent(fun, projection_grad=pg, stepsize=0.5, tol=1e-9, maxiter=5000).run(
        torch.full((3,), 1 / 3, dtype=DT)
    )
    torch.testing.assert_close(out.params.sum(), torch.tensor(1.0, dtype=DT))


# ------------------------------------------------------------------------------------------
# 7. Numerics at the edges
# ------------------------------------------------------------------------------------------


def test_binary_logistic_loss_limits_at_infinity():
    cases = [(1.0, INF, 0.0), (0.0, -INF, 0.0), (0.0, INF, INF), (1.0, -INF, INF),
             (0.5, INF, INF)]  # fmt: skip
    for label, logit, expected in cases:
        z = torch.tensor(logit, dtype=DT, requires_grad=True)
        value = loss.binary_logistic_loss(label, z)
        assert float(value.detach()) == expected, (label, logit)
        value.backward()
        assert bool(torch.isfinite(z.grad)), (label, logit)
    # Finite logits keep the usual value and gradient σ(z) − y.
    z = torch.tensor([-3.0, 0.0, 2.0], dtype=DT, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
    value = loss.binary_logistic_loss(y, z)
    torch.testing.assert_close(value, torch.nn.functional.softplus(z) - y * z)
    value.sum().backward()
    torch.testing.assert_close(z.grad, torch.sigmoid(z.detach()) - y)


@pytest.mark.parametrize("scale", [1e6, 1e9, 1e12, -1e9])
def test_projection_simplex_stays_in_the_set_at_large_scales(scale):
    g = torch.Generator().manual_seed(1)
    eps = torch.finfo(DT).eps
    for value in (0.8, 1.0, 3.0):
        for spread in (1e-9, 1e-6, 0.0):
            x = scale * (1 + spread * torch.randn(7, generator=g, dtype=DT))
            x[0] = scale if spread == 0 else x[0]
            p = projection.projection_simplex(torch.cat([x, torch.zeros(1, dtype=DT)]), value)
            assert bool((p >= 0).all()) and bool((p <= value).all()), (value, spread, p)
            assert abs(float(p.sum()) - value) <= 8 * eps * value, (value, spread)
    p = projection.projection_simplex(torch.tensor([1e9, 0.0], dtype=DT), 0.8)
    assert float(p[0]) <= 0.8 and float(p[1]) == 0.0


@pytest.mark.parametrize("n, spread", [(4, 1.0), (6, 1.0), (10, 3.0), (8, 0.01)])
def test_projection_birkhoff_meets_what_its_tol_bounds(n, spread):
    g = torch.Generator().manual_seed(n)
    tol = 1e-5
    for _ in range(3):
        S = spread * torch.randn(n, n, generator=g, dtype=DT)
        P = projection.projection_birkhoff(S, tol=tol)
        assert float((P.sum(0) - 1).abs().max()) <= tol
        assert float((P.sum(1) - 1).abs().max()) <= tol
        assert bool((P >= 0).all())


def test_projection_birkhoff_docstring_says_what_tol_bounds():
    doc = projection.projection_birkhoff.__doc__
    assert "tol" in doc and "row" in doc and "column" in doc


# ------------------------------------------------------------------------------------------
# 8. Options and init_params validated once, in the base class
# ------------------------------------------------------------------------------------------


def quad(x, *args):
    return ((x - 1.0) ** 2).sum()


SOLVERS = {
    "GradientDescent": lambda **kw: (it.GradientDescent(quad, **kw), ()),
    "ProximalGradient": lambda **kw: (it.ProximalGradient(quad, **kw), (None,)),
    "ProjectedGradient": lambda **kw: (
        it.ProjectedGradient(quad, projection=projection.projection_box, **kw),
        ((0.0, 2.0),),
    ),
    "MirrorDescent": lambda **kw: (it.MirrorDescent(quad, **kw), (None,)),
    "LBFGS": lambda **kw: (it.LBFGS(quad, **kw), ()),
    "GaussNewton": lambda **kw: (it.GaussNewton(lambda x: x - 1.0, **kw), ()),
    "LevenbergMarquardt": lambda **kw: (it.LevenbergMarquardt(lambda x: x - 1.0, **kw), ()),
    "FixedPointIteration": lambda **kw: (it.FixedPointIteration(lambda x: 0.5 * x, **kw), ()),
    "AndersonAcceleration": lambda **kw: (
        it.AndersonAcceleration(lambda x: 0.5 * x, **kw),
        (),
    ),
    "Broyden": lambda **kw: (it.Broyden(lambda x: x - 1.0, **kw), ()),
    "Bisection": lambda **kw: (it.Bisection(lambda x: x - 0.5, **kw), ()),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize(
    "tol", [-1.0, NAN, INF, torch.tensor(-1.0), torch.tensor(NAN)], ids=["neg", "nan", "inf",
                                                                         "tneg", "tnan"]
)  # fmt: skip
def test_every_solver_rejects_a_bad_tol(name, tol):
    solver, args = SOLVERS[name](tol=tol)
    with pytest.raises(ValueError, match="tol"):
        solver.run(torch.full((3,), 0.3, dtype=DT), *args)


@pytest.mark.parametrize("name", [n for n in SOLVERS if n != "Bisection"])
@pytest.mark.parametrize(
    "init",
    [torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), 1.0,
     {"a": torch.ones(3, dtype=torch.int32)}],
    ids=["int64", "bool", "number", "int_pytree"],
)  # fmt: skip
def test_every_solver_asks_for_floating_init_params(name, init):
    if name == "MirrorDescent" and isinstance(init, dict):
        pytest.skip("the entropic step needs a tensor")
    solver, args = SOLVERS[name]()
    with pytest.raises(TypeError, match=r"init_params.*floating"):
        solver.run(init, *args)


def test_bisection_asks_for_floating_init_params():
    with pytest.raises(TypeError, match=r"init_params.*floating"):
        it.Bisection(lambda x: x - 0.5).run(torch.ones(3, dtype=torch.int64))


def test_a_valid_tensor_tol_is_accepted():
    out = it.GradientDescent(quad, tol=torch.tensor(1e-6, dtype=DT)).run(torch.zeros(3, dtype=DT))
    assert out.state.error <= 1e-6


@pytest.mark.parametrize(
    "kw, match",
    [(dict(decrease_factor=1.5), "decrease_factor"), (dict(maxls=0), "maxls"),
     (dict(max_stepsize=0.0), "max_stepsize")],
)  # fmt: skip
def test_proximal_gradient_line_search_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        it.GradientDescent(quad, **kw).run(torch.zeros(3, dtype=DT))
