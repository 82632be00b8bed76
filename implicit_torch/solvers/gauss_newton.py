"""Gauss–Newton for nonlinear least squares ``min_x ½‖r(x, *args)‖²``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch import _runtime
from implicit_torch._result import Status
from implicit_torch._tree import Raveler, tree_leaves
from implicit_torch.linear import SOLVERS, LinearOperator, get_solver, is_builtin
from implicit_torch.optimality import make_stationarity_fun
from implicit_torch.solvers.base import Failure, IterativeSolver, OptStep, moved

__all__ = ["GaussNewton", "GaussNewtonState"]

Tensor = torch.Tensor


class GaussNewtonState(NamedTuple):
    """State of :class:`GaussNewton`.

    Attributes:
        iter_num: iterations run (int64, 0-d).
        value: ``½‖r(x)‖²`` at the iterate the last step was taken from (0-d).
        error: ``‖Jᵀr‖`` there (the gradient norm of ``½‖r‖²``).
        singular: the Gauss–Newton system ``JᵀJ δ = −Jᵀr`` of the last iteration was singular
            (``J`` without full column rank): no step was taken, and the solver stops and
            reports it (bool, 0-d).
        stalled: the last step did not move ``x`` (below its rounding) although the error is
            above zero: the solver stops and reports it (bool, 0-d).
    """

    iter_num: Tensor
    value: Tensor
    error: Tensor
    singular: Tensor
    stalled: Tensor


class _Linearization:
    """``r`` at ``x`` with the maps ``v ↦ J v`` and ``u ↦ Jᵀ u`` (``J = ∂r/∂x``), on the
    flattened unknowns ``x`` (``(N,)``) and residuals ``r`` (``(M,)``)."""

    def __init__(self, residual_fun: Callable[..., Any], params: Any, args: tuple):
        self.raveler = Raveler(params, batched=False, what="params")
        self.x = self.raveler.ravel(params).reshape(-1)

        def flat_residual(x: Tensor) -> Tensor:
            return _ravel_residual(residual_fun(self.raveler.unravel(x.reshape(1, -1)), *args))

        self.flat_residual = flat_residual
        # torch.func.vjp records r's graph whether or not grad mode is on.
        self.r, self._vjp = torch.func.vjp(flat_residual, self.x)
        self.grad = self.vjp(self.r)

    def jvp(self, v: Tensor) -> Tensor:
        return _runtime.jvp(self.flat_residual, (self.x,), (v,))[1]

    def vjp(self, u: Tensor) -> Tensor:
        return self._vjp(u)[0]

    def normal_operator(self, damping: Any = None) -> LinearOperator:
        """``v ↦ JᵀJ v (+ damping · v)``, symmetric (positive definite for ``J`` of full
        column rank or a positive damping), so CG and Cholesky apply."""

        def matvec(v: Tensor) -> Tensor:
            out = self.vjp(self.jvp(v))
            return out if damping is None else out + damping * v

        return LinearOperator(matvec, symmetric=True)


def _ravel_residual(r: Any) -> Tensor:
    leaves = tree_leaves(r)
    if not leaves or not all(isinstance(v, Tensor) and v.is_floating_point() for v in leaves):
        raise TypeError(
            "residual_fun must return a floating-point tensor or a pytree of floating-point "
            f"tensors, got {type(r).__name__}"
        )
    return torch.cat([v.reshape(-1) for v in leaves]) if len(leaves) > 1 else leaves[0].reshape(-1)


# What a failed step of a least-squares solver means (base.Failure: headline, detail, fix).
_STEP_STALL = (
    "stalled",
    "its step no longer moves the iterate (it is below the rounding of x)",
    "loosen tol, or check residual_fun and its Jacobian near the returned point.",
)


def _solve(solver: Any, operator: LinearOperator, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(A⁻¹ b, failed)`` with one of the package's linear solvers (a name or a callable):
    ``failed`` (0-d bool) when the system is singular or indefinite (the solver's status says
    so, or Cholesky had to fall back to LU: not positive definite), broke down, or gave a
    non-finite solution. A solve that only missed its tolerance has not failed: the outer
    iteration reports its own convergence, and an inexact step only slows it."""
    solve = get_solver(solver)
    if not is_builtin(solve):
        x = solve(operator, b)
        return x, ~torch.isfinite(x).all()
    x, info = solve(operator, b, on_failure="ignore", return_info=True)
    failed = torch.zeros_like(info.converged).any()
    for code in (Status.SINGULAR, Status.INDEFINITE, Status.BREAKDOWN, Status.NONFINITE):
        failed = failed | (info.status == code).any()
    if info.method == "lu" and solve is SOLVERS["cholesky"] and _runtime.can_inspect_values():
        failed = torch.ones_like(failed)  # Cholesky fell back to LU: not positive definite
    return x, failed | ~torch.isfinite(x).all()


def _least_squares_objective(residual_fun: Callable[..., Any]) -> Callable[..., Tensor]:
    def objective(x, *args):
        return 0.5 * sum((v * v).sum() for v in tree_leaves(residual_fun(x, *args)))

    return objective


@dataclasses.dataclass
class GaussNewton(IterativeSolver):
    """Gauss–Newton for ``min_x ½‖r(x, *args)‖²`` with ``r = residual_fun``.

    With ``J = ∂r/∂x`` at ``x``: solve ``JᵀJ δ = −Jᵀr`` and set ``x⁺ = x + stepsize · δ``
    (Nocedal & Wright, 2006, §10.3). ``JᵀJ`` is applied matrix-free (``v ↦ Jᵀ(J v)``, one
    ``torch.func.jvp`` and one vjp); ``solver`` chooses the linear solver: ``"cholesky"`` (the
    default: forms the ``N × N`` matrix with ``N`` vmapped matvecs, exact), ``"cg"``
    (matrix-free), any other name of :mod:`implicit_torch.linear` or a callable
    ``solve(matvec, b)``. ``J`` needs full column rank (as many independent residuals as
    unknowns): where ``JᵀJ`` is singular (Cholesky fails, or the linear solver reports it) no
    step is taken and the solver stops with a report (``state.singular``); use
    :class:`~implicit_torch.solvers.levenberg_marquardt.LevenbergMarquardt` there, whose
    damping makes every step well defined. (With ``solver="cg"`` a singular but consistent
    system still gives a step, CG's minimum-norm one from 0.)

    ``run(init_params, *args)``; ``init_params`` a tensor or pytree (flattened internally; ``r`` may
    be a pytree too). The solution is differentiable in ``args`` through the stationarity condition
    ``Jᵀr = ∇ₓ ½‖r‖² = 0`` (default linear solver CG: its Jacobian, the Hessian ``JᵀJ + Σᵢ rᵢ
    ∇²rᵢ``, is symmetric). ``state.error = ‖Jᵀr‖`` at the iterate the last step was taken from (as
    for :class:`GradientDescent`).

    Attributes:
        residual_fun: ``r(x, *args)``, a tensor or pytree of tensors (any shapes).
        solver: the linear solver of the Gauss–Newton system.
        stepsize: the step length (1: the full Gauss–Newton step).
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    residual_fun: Callable[..., Any]
    solver: str | Callable[..., Any] = "cholesky"
    stepsize: float = 1.0

    def default_implicit_diff_solve(self) -> str:
        """CG: ``∂ₓF`` is the Hessian of ``½‖r‖²``, symmetric."""
        return "cg"

    def init_state(self, init_params: Any, *args: Any) -> GaussNewtonState:
        if not self.stepsize > 0:
            raise ValueError(f"stepsize must be positive, got {self.stepsize}")
        get_solver(self.solver)  # a clear error for an unknown name
        leaf = Raveler(init_params, batched=False, what="init_params").ravel(init_params)
        return GaussNewtonState(
            iter_num=torch.zeros((), dtype=torch.int64, device=leaf.device),
            value=torch.tensor(math.inf, dtype=leaf.dtype, device=leaf.device),
            error=torch.tensor(math.inf, dtype=leaf.dtype, device=leaf.device),
            singular=torch.zeros((), dtype=torch.bool, device=leaf.device),
            stalled=torch.zeros((), dtype=torch.bool, device=leaf.device),
        )

    def update(self, params: Any, state: GaussNewtonState, *args: Any) -> OptStep:
        """One Gauss–Newton step (none where ``JᵀJ`` is singular)."""
        lin = _Linearization(self.residual_fun, params, args)
        delta, singular = _solve(self.solver, lin.normal_operator(), -lin.grad)
        x_new = torch.where(singular, lin.x, lin.x + self.stepsize * delta)
        error = torch.linalg.vector_norm(lin.grad)
        new_state = GaussNewtonState(
            iter_num=state.iter_num + 1,
            value=0.5 * torch.dot(lin.r, lin.r),
            error=error,
            singular=singular & (error > 0),
            stalled=~singular & ~moved(x_new, lin.x) & (error > 0),
        )
        return OptStep(lin.raveler.unravel(x_new.reshape(1, -1)), new_state)

    def _failures(self, state: GaussNewtonState) -> dict[str, Tensor]:
        return {"singular": state.singular, "stalled": state.stalled}

    def _failure_messages(self, state: GaussNewtonState) -> dict[Status, Failure]:
        return {
            Status.SINGULAR: (
                "met a singular matrix",
                "the Gauss–Newton system JᵀJ δ = −Jᵀr is singular: the Jacobian J = ∂r/∂x "
                "needs full column rank (at least as many independent residuals as unknowns)",
                "use LevenbergMarquardt (its damping μ·I makes every step well defined), or "
                "solver='cg' (minimum-norm steps), or a residual that determines x.",
            ),
            Status.STALLED: _STEP_STALL,
        }

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``Jᵀr = ∇ₓ ½‖residual_fun(params, *args)‖²``, shaped like ``params``."""
        return make_stationarity_fun(_least_squares_objective(self.residual_fun))(params, *args)
