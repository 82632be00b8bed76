"""Failure modes of the engine (issue 13): a solver output that is not a root, NaN solutions,
the torchopt ``torch.autograd.grad`` habit, bad tangents and options: each reported clearly."""

from __future__ import annotations

import warnings

import pytest
import torch

import implicit_torch as it

DT = torch.float64


def ridge_problem(seed: int = 0, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=DT)
    y = torch.randn(3 * n, generator=g, dtype=DT)
    return X, y


def optimality(w, lam, X, y):
    return X.T @ (X @ w - y) + lam * w


def exact(init, lam, X, y):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=DT), X.T @ y)


def lam_():
    return torch.tensor(1.0, dtype=DT, requires_grad=True)


def test_a_converged_solver_passes_silently():
    X, y = ridge_problem()

    def gd(init, lam, X, y, tol=1e-3):  # stops at ‖∇f‖ ≤ 1e-3, like JAXopt's default
        w = torch.zeros(X.shape[1], dtype=DT)
        step = 1 / (torch.linalg.matrix_norm(X, 2) ** 2 + lam)
        for _ in range(10_000):
            grad = optimality(w, lam, X, y)
            if grad.norm() <= tol:
                break
            w = w - step * grad
        return w

    with warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        it.implicit_solve(gd, optimality, None, lam_(), X, y).sum().backward()


def test_a_point_that_is_not_a_root_is_reported():
    X, y = ridge_problem()
    lam = lam_()
    with pytest.warns(it.ConvergenceWarning, match="not a root"):
        it.implicit_solve(lambda init, *a: torch.zeros(5, dtype=DT), optimality, None, lam, X, y)
    with pytest.raises(it.ConvergenceError, match="not a root"):
        it.implicit_solve(
            lambda init, *a: torch.zeros(5, dtype=DT), optimality, None, lam, X, y,
            on_failure="raise",
        )  # fmt: skip


def test_root_tol_none_turns_the_residual_test_off_but_not_the_nan_test():
    X, y = ridge_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        it.implicit_solve(
            lambda init, *a: torch.zeros(5, dtype=DT), optimality, None, lam_(), X, y,
            root_tol=None,
        )  # fmt: skip
    with pytest.warns(it.ConvergenceWarning, match="not finite"):
        it.implicit_solve(
            lambda init, *a: torch.full((5,), float("nan"), dtype=DT), optimality, None,
            lam_(), X, y, root_tol=None,
        )  # fmt: skip


def test_batched_reports_count_the_problems_that_are_not_roots():
    X, y = ridge_problem()
    Xb, yb = X.expand(3, *X.shape), y.expand(3, *y.shape)

    def F(w, lam, X, y):
        return torch.einsum("bji,bj->bi", X, torch.einsum("bij,bj->bi", X, w) - y) + lam * w

    def solver(init, lam, X, y):
        w = torch.stack([exact(None, lam, X[i], y[i]) for i in range(3)])
        w[1] = 0.0  # one problem left unsolved
        return w

    with pytest.warns(it.ConvergenceWarning, match="1 of 3"):
        it.implicit_solve(solver, F, None, lam_(), Xb, yb, batched=True)


def test_no_check_without_grad():
    X, y = ridge_problem()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", it.ConvergenceWarning)
        it.implicit_solve(lambda init, *a: torch.zeros(5, dtype=DT), optimality, None, lam_(), X, y)


def test_autograd_grad_in_the_optimality_function_names_the_fix():
    X, y = ridge_problem()

    def inner_loss(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def F(w, lam):  # the torchopt habit
        return torch.autograd.grad(inner_loss(w, lam), w, create_graph=True)[0]

    with pytest.raises(TypeError, match=r"torch\.func\.grad"):
        it.implicit_solve(lambda init, lam: exact(None, lam, X, y), F, None, lam_())


@pytest.mark.parametrize(
    "kw, error",
    [({"root_tol": -1.0}, ValueError), ({"root_tol": float("nan")}, ValueError),
     ({"on_failure": "loud"}, ValueError), ({"root_tol": "big"}, TypeError)],
)  # fmt: skip
def test_bad_options_are_rejected_at_decoration(kw, error):
    with pytest.raises(error):
        it.custom_root(optimality, **kw)


def test_root_jvp_names_a_tangent_of_the_wrong_shape():
    X, y = ridge_problem()
    lam = torch.tensor(1.0, dtype=DT)
    w = exact(None, lam, X, y)
    with pytest.raises(ValueError, match="tangent"):
        it.root_jvp(optimality, w, (lam, X, y), (torch.ones(2, dtype=DT), None, None))


def test_gradient_is_unchanged_by_the_check():
    """The check reads values only: the gradient equals the closed form."""
    X, y = ridge_problem()
    lam = lam_()
    w = it.implicit_solve(exact, optimality, None, lam, X, y)
    (g,) = torch.autograd.grad(w.sum(), lam)
    H = X.T @ X + lam.detach() * torch.eye(5, dtype=DT)
    expected = -(torch.linalg.solve(H, w.detach())).sum()
    torch.testing.assert_close(g, expected)
