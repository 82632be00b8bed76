"""Levenberg–Marquardt for nonlinear least squares ``min_x ½‖r(x, *args)‖²``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._result import Status
from implicit_torch._tree import Raveler
from implicit_torch.linear import get_solver
from implicit_torch.optimality import make_stationarity_fun
from implicit_torch.solvers.base import Failure, IterativeSolver, OptStep, moved
from implicit_torch.solvers.gauss_newton import (
    _STEP_STALL,
    _least_squares_objective,
    _Linearization,
    _solve,
)

__all__ = ["LevenbergMarquardt", "LevenbergMarquardtState"]

Tensor = torch.Tensor


class LevenbergMarquardtState(NamedTuple):
    """State of :class:`LevenbergMarquardt`.

    Attributes:
        iter_num: iterations run (int64, 0-d).
        value: ``½‖r(x)‖²`` at the iterate the last step was tried from (0-d).
        error: ``‖Jᵀr‖`` there (the gradient norm of ``½‖r‖²``).
        damping: the damping ``μ`` of the next step (0-d).
        nu: the factor by which ``μ`` grows at the next rejected step (0-d).
        accepted: whether the last trial step was accepted (bool, 0-d).
        stalled: the last trial step did not move ``x`` (below its rounding, the damping
            having grown after rejected steps) although the error is above zero: a larger
            damping can only shorten it, so the solver stops and reports it (bool, 0-d).
    """

    iter_num: Tensor
    value: Tensor
    error: Tensor
    damping: Tensor
    nu: Tensor
    accepted: Tensor
    stalled: Tensor


@dataclasses.dataclass
class LevenbergMarquardt(IterativeSolver):
    """Levenberg–Marquardt for ``min_x ½‖r(x, *args)‖²`` with ``r = residual_fun``
    (Levenberg, 1944; Marquardt, 1963), with Nielsen's damping update (Madsen, Nielsen &
    Tingleff, 2004, "Methods for Non-Linear Least Squares Problems", §3.2).

    With ``J = ∂r/∂x`` and ``g = Jᵀr`` at ``x``, the trial step solves
    ``(JᵀJ + μ I) δ = −g``. Its gain ratio ``ρ = (½‖r(x)‖² − ½‖r(x + δ)‖²) / L``, with the
    decrease ``L = ½ δᵀ(μ δ − g)`` predicted by the linear model, decides: if the objective did
    not increase the step is taken and ``μ ← μ · max(1/3, 1 − (2ρ − 1)³)``, ``ν ← 2``;
    otherwise ``x`` stays and ``μ ← μ ν``, ``ν ← 2ν``. Every branch is a ``torch.where``: no
    host synchronisation. ``JᵀJ + μ I`` is applied matrix-free; ``solver`` is as in
    :class:`~implicit_torch.solvers.gauss_newton.GaussNewton` (default ``"cholesky"``).

    A trial step that no longer moves ``x`` (the damping grown until the step is below the
    rounding of ``x``, e.g. after every longer step left ``residual_fun``'s domain) ends the
    run with a report (``state.stalled``): more damping could only shorten it.

    ``run(init_params, *args)``; ``init_params`` a tensor or pytree. The solution is differentiable
    in ``args`` through the stationarity condition ``Jᵀr = 0`` (default linear solver CG).
    ``state.error = ‖Jᵀr‖`` at the iterate the last step was tried from.

    Attributes:
        residual_fun: ``r(x, *args)``, a tensor or pytree of tensors.
        damping_parameter: the initial damping ``μ₀ > 0`` (absolute; it adapts quickly).
        solver: the linear solver of the damped system.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    residual_fun: Callable[..., Any]
    damping_parameter: float = 1e-3
    solver: str | Callable[..., Any] = "cholesky"

    def default_implicit_diff_solve(self) -> str:
        """CG: ``∂ₓF`` is the Hessian of ``½‖r‖²``, symmetric."""
        return "cg"

    def init_state(self, init_params: Any, *args: Any) -> LevenbergMarquardtState:
        if not self.damping_parameter > 0:
            raise ValueError(f"damping_parameter must be positive, got {self.damping_parameter}")
        get_solver(self.solver)
        flat = Raveler(init_params, batched=False, what="init_params").ravel(init_params)
        kw = dict(dtype=flat.dtype, device=flat.device)
        return LevenbergMarquardtState(
            iter_num=torch.zeros((), dtype=torch.int64, device=flat.device),
            value=torch.tensor(math.inf, **kw),
            error=torch.tensor(math.inf, **kw),
            damping=torch.tensor(self.damping_parameter, **kw),
            nu=torch.tensor(2.0, **kw),
            accepted=torch.zeros((), dtype=torch.bool, device=flat.device),
            stalled=torch.zeros((), dtype=torch.bool, device=flat.device),
        )

    def update(self, params: Any, state: LevenbergMarquardtState, *args: Any) -> OptStep:
        """One trial step, accepted or rejected."""
        lin = _Linearization(self.residual_fun, params, args)
        mu, g = state.damping, lin.grad
        delta, _ = _solve(self.solver, lin.normal_operator(mu), -g)  # (JᵀJ + μI) is definite
        x_try = lin.x + delta
        r_try = lin.flat_residual(x_try)
        f = 0.5 * torch.dot(lin.r, lin.r)
        f_try = 0.5 * torch.dot(r_try, r_try)
        predicted = 0.5 * torch.dot(delta, mu * delta - g)
        positive = predicted > 0
        rho = torch.where(positive, (f - f_try) / torch.where(positive, predicted, 1), 0)
        accepted = (f_try <= f) & torch.isfinite(f_try)
        x_new = torch.where(accepted, x_try, lin.x)
        shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
        error = torch.linalg.vector_norm(g)
        damping = torch.where(accepted, mu * shrink, mu * state.nu)
        new_state = LevenbergMarquardtState(
            iter_num=state.iter_num + 1,
            value=f,
            error=error,
            damping=damping,
            nu=torch.where(accepted, torch.full_like(state.nu, 2.0), 2 * state.nu),
            accepted=accepted,
            stalled=(~moved(x_try, lin.x) | ~torch.isfinite(damping)) & (error > 0),
        )
        return OptStep(lin.raveler.unravel(x_new.reshape(1, -1)), new_state)

    def _failure_messages(self, state: LevenbergMarquardtState) -> dict[Status, Failure]:
        return {Status.STALLED: _STEP_STALL}

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``Jᵀr = ∇ₓ ½‖residual_fun(params, *args)‖²``, shaped like ``params``."""
        return make_stationarity_fun(_least_squares_objective(self.residual_fun))(params, *args)
