"""Optimality-condition builders: ``F(x, *args)``, zero exactly at a solution.

Each builder turns the description of a problem (an objective, a fixed-point map, a proximal
operator or a projection) into the residual function the engine differentiates
(:func:`implicit_torch.implicit_solve`, :func:`implicit_torch.custom_root`): for a solution
``x*(θ)`` of ``F(x, θ) = 0``, ``∂x*/∂θ = −(∂ₓF)⁻¹ ∂_θF`` (Blondel et al., 2022, §2).

The condition used for differentiation need not come from the forward solver: a lasso solved by
coordinate descent can be differentiated through the proximal-gradient fixed point below.

``x`` may be a tensor or a pytree of tensors; every residual has the structure and shapes of
``x``. The functions are built from torch ops and ``torch.func.grad``, so they compose with
autograd and every ``torch.func`` transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit_torch._root import SYMMETRIC_JACOBIAN
from implicit_torch._tree import tree_add_scalar_mul, tree_sub

__all__ = [
    "gradient_of",
    "make_fixed_point_fun",
    "make_projected_gradient_fun",
    "make_proximal_gradient_fun",
    "make_stationarity_fun",
]


def gradient_of(fun: Callable[..., Any], value_and_grad: bool = False) -> Callable[..., Any]:
    """``x, *args ↦ ∇ₓ fun(x, *args)``: by ``torch.func.grad`` of a scalar ``fun``, or, with
    ``value_and_grad=True`` (JAXopt's convention), the second output of a ``fun`` that returns
    ``(value, gradient)`` itself, which must then be differentiable in ``x`` and ``args``."""
    if value_and_grad:
        return lambda x, *args: fun(x, *args)[1]
    return torch.func.grad(fun)


def make_stationarity_fun(
    fun: Callable[..., torch.Tensor], value_and_grad: bool = False
) -> Callable[..., Any]:
    """Stationarity of a smooth objective: ``F(x, *args) = ∇ₓ fun(x, *args)``.

    Args:
        fun: ``fun(x, *args)`` returning a scalar (0-d) tensor; ``x`` a tensor or pytree.
        value_and_grad: ``fun`` returns ``(value, ∇ₓ fun)`` (see :func:`gradient_of`).

    Returns:
        ``F(x, *args)``, a pytree like ``x``. Its Jacobian in ``x`` is the Hessian of ``fun``,
        symmetric, so the engine may use ``solve="cg"`` (definite at a strict minimum); the
        function says so (attribute ``jacobian_is_symmetric``), and ``solve="auto"`` reads it.
    """
    grad = gradient_of(fun, value_and_grad)

    def stationarity_fun(x, *args):
        return grad(x, *args)

    # The engine's operators then carry the symmetry, and solve="auto" uses CG without probing.
    setattr(stationarity_fun, SYMMETRIC_JACOBIAN, True)
    return stationarity_fun


def make_fixed_point_fun(fixed_point_fun: Callable[..., Any]) -> Callable[..., Any]:
    """Fixed point of a map ``T``: ``F(x, *args) = T(x, *args) − x``.

    Args:
        fixed_point_fun: ``T(x, *args)``, returning a pytree like ``x``.

    Returns:
        ``F(x, *args)``. Its Jacobian ``∂ₓT − I`` is not symmetric in general (use
        ``solve="gmres"``).
    """

    def fixed_point_residual(x, *args):
        return tree_sub(fixed_point_fun(x, *args), x)

    return fixed_point_residual


def make_proximal_gradient_fun(
    fun: Callable[..., torch.Tensor],
    prox: Callable[..., Any],
    stepsize: float = 1.0,
    value_and_grad: bool = False,
) -> Callable[..., Any]:
    """Fixed point of proximal gradient for ``min_x fun(x, *args) + g(x, hyperparams_prox)``.

    ``F(x, hyperparams_prox, *args) = prox(x − η ∇ₓfun(x, *args), hyperparams_prox, η) − x``
    with the fixed step ``η = stepsize``. ``x*`` minimises the composite objective if and only
    if ``F(x*) = 0``, for every ``η > 0`` (JAXopt uses ``η = 1``); where the prox is
    differentiable at the solution (e.g. strict complementarity for the lasso), the implicit
    derivative does not depend on ``η`` either, but the conditioning of ``∂ₓF`` does: a step
    near ``1/L`` (``L`` the Lipschitz constant of ``∇fun``) keeps ``I − η∇²fun`` well scaled.

    Args:
        fun: the smooth part, ``fun(x, *args)`` returning a scalar tensor.
        prox: ``prox(v, hyperparams_prox, scaling)`` = ``argmin_z ½‖z − v‖² + scaling·g(z)``
            (see :mod:`implicit_torch.prox`).
        stepsize: ``η > 0``.
        value_and_grad: ``fun`` returns ``(value, ∇ₓ fun)`` (see :func:`gradient_of`).

    Returns:
        ``F(x, hyperparams_prox, *args)``, a pytree like ``x``.
    """
    if not stepsize > 0:
        raise ValueError(f"make_proximal_gradient_fun needs stepsize > 0, got {stepsize}")
    grad = gradient_of(fun, value_and_grad)

    def proximal_gradient_residual(x, hyperparams_prox, *args):
        v = tree_add_scalar_mul(x, -stepsize, grad(x, *args))
        return tree_sub(prox(v, hyperparams_prox, stepsize), x)

    return proximal_gradient_residual


def make_projected_gradient_fun(
    fun: Callable[..., torch.Tensor],
    projection: Callable[..., Any],
    stepsize: float = 1.0,
    value_and_grad: bool = False,
) -> Callable[..., Any]:
    """Fixed point of projected gradient for ``min_{x ∈ C(hyperparams_proj)} fun(x, *args)``.

    ``F(x, hyperparams_proj, *args) = proj_C(x − η ∇ₓfun(x, *args), hyperparams_proj) − x``
    with the fixed step ``η = stepsize``: the proximal-gradient condition for the indicator of
    ``C``, whose prox is the projection whatever the scaling.

    Args:
        fun: ``fun(x, *args)`` returning a scalar tensor.
        projection: ``projection(v, hyperparams_proj)`` onto a closed convex set ``C`` (see
            :mod:`implicit_torch.projection`).
        stepsize: ``η > 0``.
        value_and_grad: ``fun`` returns ``(value, ∇ₓ fun)`` (see :func:`gradient_of`).

    Returns:
        ``F(x, hyperparams_proj, *args)``, a pytree like ``x``.
    """
    if not stepsize > 0:
        raise ValueError(f"make_projected_gradient_fun needs stepsize > 0, got {stepsize}")
    grad = gradient_of(fun, value_and_grad)

    def projected_gradient_residual(x, hyperparams_proj, *args):
        v = tree_add_scalar_mul(x, -stepsize, grad(x, *args))
        return tree_sub(projection(v, hyperparams_proj), x)

    return projected_gradient_residual
