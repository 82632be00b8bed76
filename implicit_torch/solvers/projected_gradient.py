"""Projected gradient descent (accelerated, with backtracking)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch.optimality import make_projected_gradient_fun
from implicit_torch.prox import with_default_hyperparams
from implicit_torch.solvers.base import OptStep
from implicit_torch.solvers.proximal_gradient import ProxGradState, _ProximalGradientBase

__all__ = ["ProjectedGradient"]


@dataclasses.dataclass
class ProjectedGradient(_ProximalGradientBase):
    """Projected gradient: ``min_{x ∈ C(hyperparams_proj)} fun(x, *args)``.

    ``x⁺ = proj_C(y − η ∇fun(y), hyperparams_proj)``: proximal gradient with ``g = ι_C``, whose
    prox is the projection (FISTA momentum when ``acceleration``; Beck & Teboulle, 2009).
    ``run(init_params, hyperparams_proj, *args)``; the solution is differentiable in
    ``hyperparams_proj`` and ``args`` through the fixed point of
    :func:`~implicit_torch.optimality.make_projected_gradient_fun` with ``η = stepsize`` (1
    with a line search). ``state.error = ‖x⁺ − y‖ / η``.

    Attributes:
        fun: ``fun(x, *args)``, a scalar tensor.
        projection: ``projection(v, hyperparams_proj)`` onto a closed convex set (see
            :mod:`implicit_torch.projection`); ``hyperparams_proj=None`` means its defaults.
        stepsize, acceleration, maxls, decrease_factor, max_stepsize, value_and_grad: see
            :class:`ProximalGradient`.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    fun: Callable[..., torch.Tensor]
    projection: Callable[..., Any]

    def _prox(self, v, hyperparams, eta):
        return with_default_hyperparams(self.projection)(v, hyperparams)

    def init_state(
        self, init_params: Any, hyperparams_proj: Any = None, *args: Any
    ) -> ProxGradState:
        return self._init(init_params)

    def update(self, params: Any, state: ProxGradState, hyperparams_proj: Any, *args) -> OptStep:
        """One (accelerated) projected gradient step."""
        return self._step(params, state, hyperparams_proj, args)

    def optimality_fun(self, params: Any, hyperparams_proj: Any, *args: Any) -> Any:
        """``proj_C(x − η∇fun(x, *args), hyperparams_proj) − x``."""
        projection = with_default_hyperparams(self.projection)
        F = make_projected_gradient_fun(
            self.fun, projection, self._diff_stepsize(), value_and_grad=self.value_and_grad
        )
        return F(params, hyperparams_proj, *args)

    def run(self, init_params: Any, hyperparams_proj: Any = None, *args: Any) -> OptStep:
        """Solve from ``init_params``; see :meth:`IterativeSolver.run`."""
        return super().run(init_params, hyperparams_proj, *args)
