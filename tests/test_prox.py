"""implicit_torch.prox: values against the defining argmin (solved by scipy), derivatives by
finite differences, and no NaN at the kinks."""

import numpy as np
import pytest
import scipy.optimize
import torch

import implicit_torch as it
from implicit_torch import prox

DT = torch.float64
XS = [-2.3, -0.71, -0.2, 0.0, 0.05, 0.4, 1.7]


def scalar_argmin(x, g, scaling):
    """argmin_z ½(z − x)² + scaling · g(z), by bounded scalar minimisation."""
    res = scipy.optimize.minimize_scalar(
        lambda z: 0.5 * (z - x) ** 2 + scaling * g(z),
        bounds=(-10.0, 10.0),
        method="bounded",
        options={"xatol": 1e-11},
    )
    return res.x


BIG = 1e6  # a penalty standing in for the indicator of z ≥ 0

SCALAR_CASES = [
    ("lasso", lambda x, s: prox.prox_lasso(x, 0.5, s), lambda z: 0.5 * abs(z)),
    (
        "non_negative_lasso",
        lambda x, s: prox.prox_non_negative_lasso(x, 0.5, s),
        lambda z: 0.5 * z + BIG * max(-z, 0.0),
    ),
    (
        "elastic_net",
        lambda x, s: prox.prox_elastic_net(x, (0.5, 2.0), s),
        lambda z: 0.5 * abs(z) + 0.5 * 2.0 * z * z,
    ),
    ("ridge", lambda x, s: prox.prox_ridge(x, 3.0, s), lambda z: 0.5 * 3.0 * z * z),
    (
        "non_negative_ridge",
        lambda x, s: prox.prox_non_negative_ridge(x, 3.0, s),
        lambda z: 0.5 * 3.0 * z * z + BIG * max(-z, 0.0),
    ),
    ("none", lambda x, s: prox.prox_none(x, None, s), lambda z: 0.0),
]


@pytest.mark.parametrize("name,op,g", SCALAR_CASES, ids=[c[0] for c in SCALAR_CASES])
@pytest.mark.parametrize("scaling", [1.0, 0.3])
def test_scalar_prox_is_the_argmin(name, op, g, scaling):
    x = torch.tensor(XS, dtype=DT)
    got = op(x, scaling)
    ref = torch.tensor([scalar_argmin(v, g, scaling) for v in XS], dtype=DT)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_closed_forms():
    x = torch.tensor(XS, dtype=DT)
    torch.testing.assert_close(
        prox.prox_lasso(x, 0.4, 0.5), torch.sign(x) * torch.clamp(x.abs() - 0.2, min=0)
    )
    torch.testing.assert_close(
        prox.prox_elastic_net(x, (0.4, 1.0), 0.5),
        torch.sign(x) * torch.clamp(x.abs() - 0.2, min=0) / 1.5,
    )
    torch.testing.assert_close(prox.prox_ridge(x, 2.0, 0.5), x / 2.0)
    torch.testing.assert_close(prox.prox_non_negative_lasso(x, 0.4, 0.5), torch.relu(x - 0.2))
    torch.testing.assert_close(prox.prox_non_negative_ridge(x, 2.0, 0.5), torch.relu(x) / 2.0)
    # Defaults: strength 1.
    torch.testing.assert_close(prox.prox_lasso(x), prox.prox_lasso(x, 1.0, 1.0))
    # Per-coordinate strengths broadcast.
    lam = torch.linspace(0.1, 1.0, len(XS), dtype=DT)
    torch.testing.assert_close(
        prox.prox_lasso(x, lam), torch.sign(x) * torch.clamp(x.abs() - lam, min=0)
    )


@pytest.mark.parametrize("x", [[3.0, -4.0, 1.0], [0.3, -0.2, 0.1]])
def test_group_lasso_is_the_argmin(x):
    x = np.array(x)
    t = 0.7 * 1.5  # l2reg · scaling
    got = prox.prox_group_lasso(torch.tensor(x, dtype=DT), 0.7, 1.5).numpy()
    if np.linalg.norm(x) <= t:
        # 0 is optimal iff x is in the subdifferential of t‖·‖ at 0, the ball of radius t.
        np.testing.assert_array_equal(got, 0.0)
        return
    res = scipy.optimize.minimize(
        lambda z: 0.5 * np.sum((z - x) ** 2) + t * np.linalg.norm(z),
        x,
        method="BFGS",
        options={"gtol": 1e-12},
    )
    np.testing.assert_allclose(got, res.x, atol=1e-6)
    np.testing.assert_allclose(got, x * (1 - t / np.linalg.norm(x)), rtol=1e-12)


def test_pytree_inputs_and_per_leaf_hyperparams():
    x = {"a": torch.tensor([1.0, -3.0], dtype=DT), "b": torch.tensor([[0.2, -0.5]], dtype=DT)}
    out = prox.prox_lasso(x, {"a": 0.5, "b": torch.tensor(0.3, dtype=DT)})
    torch.testing.assert_close(out["a"], torch.tensor([0.5, -2.5], dtype=DT))
    torch.testing.assert_close(out["b"], torch.tensor([[0.0, -0.2]], dtype=DT))
    shared = prox.prox_ridge(x, 1.0, 1.0)
    torch.testing.assert_close(shared["b"], x["b"] / 2)
    # Group lasso: one group over all leaves.
    norm = torch.sqrt(sum((v**2).sum() for v in x.values()))
    g = prox.prox_group_lasso(x, 1.0)
    torch.testing.assert_close(g["a"], x["a"] * (1 - 1 / norm))
    with pytest.raises(ValueError, match="does not match"):
        prox.prox_lasso(x, {"a": 0.5})


@pytest.mark.parametrize(
    "op",
    [
        lambda x, lam, s: prox.prox_lasso(x, lam, s),
        lambda x, lam, s: prox.prox_non_negative_lasso(x, lam, s),
        lambda x, lam, s: prox.prox_elastic_net(x, (lam, 2 * lam), s),
        lambda x, lam, s: prox.prox_ridge(x, lam, s),
        lambda x, lam, s: prox.prox_non_negative_ridge(x, lam, s),
        lambda x, lam, s: prox.prox_group_lasso(x, lam, s),
    ],
    ids=["lasso", "nn_lasso", "elastic_net", "ridge", "nn_ridge", "group_lasso"],
)
def test_derivatives_by_finite_differences(op):
    # Points away from the kinks, where the prox is smooth.
    x = torch.tensor([1.3, -0.9, 0.05, -2.2, 0.6], dtype=DT, requires_grad=True)
    lam = torch.tensor(0.35, dtype=DT, requires_grad=True)
    s = torch.tensor(0.8, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x, lam, s))
    assert torch.autograd.gradgradcheck(op, (x, lam, s))


def test_no_nan_at_kinks():
    # x exactly 0 and exactly at the threshold: the a.e. derivative (0 there), never NaN.
    x = torch.tensor([0.0, 0.5, -0.5, 2.0], dtype=DT, requires_grad=True)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    for op in (prox.prox_lasso, prox.prox_non_negative_lasso, prox.prox_group_lasso):
        gx, gl = torch.autograd.grad(op(x, lam).sum(), (x, lam))
        assert torch.isfinite(gx).all() and torch.isfinite(gl).all()
    z = torch.zeros(3, dtype=DT, requires_grad=True)
    (gz,) = torch.autograd.grad(prox.prox_group_lasso(z, 0.1).sum(), z)
    torch.testing.assert_close(gz, torch.zeros(3, dtype=DT))
    J = torch.autograd.functional.jacobian(lambda v: prox.prox_lasso(v, 0.5), x.detach())
    torch.testing.assert_close(J, torch.diag(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=DT)))


def test_make_prox_from_projection_ignores_scaling():
    p = prox.make_prox_from_projection(it.projection.projection_box)
    x = torch.tensor([-2.0, 0.5, 3.0], dtype=DT)
    for s in (1.0, 0.01, 7.0):
        torch.testing.assert_close(p(x, (-1.0, 1.0), s), torch.tensor([-1.0, 0.5, 1.0], dtype=DT))


def test_float32_and_vmap():
    x = torch.randn(4, 6)
    out = prox.prox_elastic_net(x, (0.1, 0.2), 0.5)
    assert out.dtype == torch.float32
    rows = torch.func.vmap(lambda v: prox.prox_group_lasso(v, 0.5))(x)
    torch.testing.assert_close(rows, torch.stack([prox.prox_group_lasso(v, 0.5) for v in x]))
