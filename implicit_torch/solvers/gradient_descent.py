"""Gradient descent, with Nesterov acceleration and backtracking line search."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch._tree import tree_l2_norm
from implicit_torch.optimality import make_stationarity_fun
from implicit_torch.solvers.base import OptStep, moved
from implicit_torch.solvers.proximal_gradient import ProxGradState, _ProximalGradientBase

__all__ = ["GradientDescent"]


@dataclasses.dataclass
class GradientDescent(_ProximalGradientBase):
    """Gradient descent on a smooth objective: ``min_x fun(x, *args)``.

    ``x⁺ = y − η ∇fun(y)``, with Nesterov's momentum in FISTA's form when ``acceleration``
    (Nesterov, 1983; Beck & Teboulle, 2009) and ``y = x`` otherwise; ``stepsize ≤ 0`` selects
    a backtracking (Armijo-type) line search. This is :class:`ProximalGradient` with ``g = 0``,
    but differentiated through the stationarity condition ``∇ₓfun(x*, *args) = 0``, whose
    Jacobian is the symmetric Hessian: the default linear solver is CG.

    ``run(init_params, *args)``; ``state.error = ‖∇fun(y)‖`` at the last gradient evaluation
    (measured directly, so a collapsed step never makes it 0). A line search that collapses
    (its step no longer moves ``y``) stops the solver with a report, see
    :class:`ProximalGradient`.

    Attributes:
        fun: ``fun(x, *args)``, a scalar tensor; ``x`` a tensor or pytree.
        stepsize, acceleration, maxls, decrease_factor, max_stepsize, value_and_grad: see
            :class:`ProximalGradient`.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    fun: Callable[..., torch.Tensor]

    def default_implicit_diff_solve(self) -> str:
        """CG: ``∂ₓF`` is the Hessian of ``fun``, symmetric."""
        return "cg"

    def _prox(self, v, hyperparams, eta):
        return v

    def _error(self, y, g_y, trial, eta, hyperparams, use_reference):
        # ‖x⁺ − y‖ / η = ‖∇fun(y)‖ exactly here: measured directly, it never cancels.
        return tree_l2_norm(g_y), moved(trial, y)

    def init_state(self, init_params: Any, *args: Any) -> ProxGradState:
        return self._init(init_params)

    def update(self, params: Any, state: ProxGradState, *args: Any) -> OptStep:
        """One (accelerated) gradient step."""
        return self._step(params, state, None, args)

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``∇ₓ fun(params, *args)``."""
        return make_stationarity_fun(self.fun, self.value_and_grad)(params, *args)
