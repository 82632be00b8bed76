"""implicit_torch.meta.imaml_adapt against closed forms (float64)."""

import pytest
import torch
from problems import DT, gen

import implicit_torch as it
from implicit_torch.meta import imaml_adapt

T, K, D, REG = 4, 8, 3, 2.0


def task_data(seed=0):
    g = gen(seed)
    return torch.randn(T, K, D, generator=g, dtype=DT), torch.randn(T, K, generator=g, dtype=DT)


def linear_loss(p, X, y):
    return 0.5 * (X @ p["w"] + p["b"] - y).square().mean()


def closed_form(w, b, X, y, scale=None):
    """argmin_φ linear_loss(φ) + REG/2 ‖φ − θ‖² per task, φ = (w, b) stacked."""
    Z = torch.cat([X if scale is None else X * scale, torch.ones(T, K, 1, dtype=DT)], -1)
    A = Z.mT @ Z / K + REG * torch.eye(D + 1, dtype=DT)
    rhs = (Z.mT @ y.unsqueeze(-1)).squeeze(-1) / K + REG * torch.cat([w, b.reshape(1)])
    return torch.linalg.solve(A, rhs)


def test_meta_gradient_matches_the_closed_form():
    X, y = task_data()
    theta = {
        "w": torch.randn(D, generator=gen(1), dtype=DT).requires_grad_(),
        "b": torch.tensor(0.3, dtype=DT, requires_grad=True),
    }
    Xr = X.clone().requires_grad_()
    phi = imaml_adapt(linear_loss, theta, Xr, y, reg=REG, inner_lr=0.3, maxiter=5000, tol=1e-12)
    ref = closed_form(theta["w"], theta["b"], X, y)
    torch.testing.assert_close(torch.cat([phi["w"], phi["b"][:, None]], -1), ref.detach())
    weights = torch.randn(T, D + 1, generator=gen(2), dtype=DT)
    out = (weights[:, :D] * phi["w"]).sum() + (weights[:, D] * phi["b"]).sum()
    grads = torch.autograd.grad(out, [theta["w"], theta["b"], Xr])
    w2 = theta["w"].detach().clone().requires_grad_()
    b2 = theta["b"].detach().clone().requires_grad_()
    X2 = X.clone().requires_grad_()
    refs = torch.autograd.grad((weights * closed_form(w2, b2, X2, y)).sum(), [w2, b2, X2])
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_shared_parameters_get_the_sum_of_per_task_gradients():
    X, y = task_data(3)

    def loss(p, X, y, scale):  # the features are scaled by a shared, non-adapted parameter
        return linear_loss(p, X * scale, y)

    theta = {"w": torch.zeros(D, dtype=DT), "b": torch.zeros((), dtype=DT)}
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=DT, requires_grad=True)
    phi = imaml_adapt(
        loss, theta, X, y, reg=REG, inner_lr=0.1, maxiter=10_000, tol=1e-12, shared=scale
    )
    (g,) = torch.autograd.grad(phi["w"].square().sum(), scale)
    s2 = scale.detach().clone().requires_grad_()
    ref_phi = closed_form(theta["w"], theta["b"], X, y, scale=s2)
    (r,) = torch.autograd.grad(ref_phi[:, :D].square().sum(), s2)
    torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_custom_inner_solver_is_used_and_differentiated_implicitly():
    X, y = task_data(4)
    theta = {
        "w": torch.randn(D, generator=gen(5), dtype=DT).requires_grad_(),
        "b": torch.tensor(0.0, dtype=DT, requires_grad=True),
    }

    def exact(theta, shared, X, y):
        sol = closed_form(theta["w"], theta["b"], X, y)
        return {"w": sol[:, :D], "b": sol[:, D]}

    phi = imaml_adapt(linear_loss, theta, X, y, reg=REG, inner_lr=0.0, inner_solver=exact)
    (g,) = torch.autograd.grad(phi["b"].sum(), theta["w"])
    w2 = theta["w"].detach().clone().requires_grad_()
    (r,) = torch.autograd.grad(closed_form(w2, theta["b"].detach(), X, y)[:, D].sum(), w2)
    torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_inner_non_convergence_and_divergence_warn():
    X, y = task_data(6)
    theta = {"w": torch.zeros(D, dtype=DT), "b": torch.zeros((), dtype=DT)}
    with pytest.warns(it.ConvergenceWarning, match="did not converge"):
        imaml_adapt(linear_loss, theta, X, y, reg=REG, inner_lr=0.01, maxiter=3)
    with pytest.warns(it.ConvergenceWarning, match="diverges"):
        imaml_adapt(linear_loss, theta, X, y, reg=REG, inner_lr=50.0, maxiter=50)


@pytest.mark.parametrize(
    "kwargs, data, match",
    [
        (dict(reg=0.0), "ok", "reg must be positive"),
        (dict(reg=1.0), "none", "needs task data"),
        (dict(reg=1.0), "mismatched", "dim 0"),
    ],
)
def test_bad_arguments(kwargs, data, match):
    X, y = task_data()
    args = {"ok": (X, y), "none": (), "mismatched": (X, y[:2])}[data]
    theta = {"w": torch.zeros(D, dtype=DT), "b": torch.zeros((), dtype=DT)}
    with pytest.raises(ValueError, match=match):
        imaml_adapt(linear_loss, theta, *args, inner_lr=0.1, **kwargs)


def test_each_task_stops_on_its_own():
    # A task that converges is frozen while the others go on: its result is the same as when
    # it is adapted alone (and so does not depend on when the loop reads the norms).
    X, y = task_data(7)
    theta = {"w": torch.zeros(D, dtype=DT), "b": torch.zeros((), dtype=DT)}
    kw = dict(reg=REG, inner_lr=0.3, maxiter=5000, tol=1e-8)
    together = imaml_adapt(linear_loss, theta, X, y, **kw)
    for i in range(T):
        alone = imaml_adapt(linear_loss, theta, X[i : i + 1], y[i : i + 1], **kw)
        for key in ("w", "b"):
            torch.testing.assert_close(together[key][i], alone[key][0], rtol=0, atol=0)
