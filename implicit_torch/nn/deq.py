"""The deep-equilibrium layer: ``z* = f(z*, x)`` around any ``nn.Module`` ``f``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from implicit_torch._result import (
    FailureLog,
    check_maxiter,
    check_on_failure,
    check_tolerances,
    collecting,
)
from implicit_torch.adjoint import Adjoint, ImplicitAdjoint
from implicit_torch.linear import get_solver, is_builtin
from implicit_torch.nn.implicit_layer import ImplicitLayer
from implicit_torch.solvers.anderson import AndersonAcceleration
from implicit_torch.solvers.base import IterativeSolver
from implicit_torch.solvers.broyden import Broyden
from implicit_torch.solvers.fixed_point_iteration import FixedPointIteration

__all__ = ["DEQ"]

Tensor = torch.Tensor

FORWARD_SOLVERS = ("anderson", "broyden", "fixed_point")


class DEQ(ImplicitLayer):
    """Deep-equilibrium layer: ``z* = f(z*, x)`` for an ``nn.Module`` ``f(z, x) -> z``.

    ``deq(x, init=None)`` returns ``z*``, shaped like ``init``: by default
    ``zeros(z_shape(x))``, or ``zeros_like(x)`` without ``z_shape`` (with ``warm_start``, the
    previous solution when it has that shape, dtype and device).

    Forward, by ``forward_solver`` (it only finds ``z*``; the adjoint differentiates it):
    Anderson acceleration (``"anderson"``), limited-memory Broyden on ``f(z) − z``
    (``"broyden"``, ``4 · history_size`` rank-one terms) or plain fixed-point iteration
    (``"fixed_point"``), at most ``maxiter`` iterations to ``‖f(z, x) − z‖ ≤ tol``.
    Non-convergence warns (or raises with ``on_failure="raise"``); ``last_state``, a
    diagnostic set by each forward, holds the solver's final state (``iter_num``, ``error``).

    Backward, by ``adjoint`` (:mod:`implicit_torch.adjoint`):

    * ``ImplicitAdjoint(solve)`` (the default, with GMRES): the exact gradient at the fixed
      point, ``dz*/dθ = (I − ∂_z f)⁻¹ ∂_θ f``, with ``(I − ∂_z f)ᵀ`` inverted by ``solve``
      (any engine solver name or callable, e.g. ``"neumann"`` for the truncated Neumann
      series when ``f`` is contractive, or a :class:`~implicit_torch.WarmStart`).
    * ``PhantomAdjoint(steps, damping)``: the phantom gradient (Geng et al., 2021): ``k``
      damped steps ``z ← (1 − λ) z + λ f(z, x)`` from ``z*``, recorded by autograd;
      ``k = 1, λ = 1`` is the one-step (Jacobian-free) gradient of Fung et al. (2022).
      Cheaper than the implicit gradient, and only an approximation: as ``k`` grows it tends
      to the implicit gradient when ``f`` is a contraction.
    * ``UnrolledAdjoint()``: backpropagation through the forward solver's iterations.

    ``warm_start=True`` starts each forward from the previous solution and each implicit
    backward solve from the previous adjoint (see :class:`ImplicitLayer`).

    Cost and failures in a training loop. The backward's linear solve gets a budget that
    follows the forward's: ``backward_maxiter`` iterations (default ``2 · maxiter``), so that
    a forward pushed past its tolerance cannot make a backward run for minutes (a GMRES
    default of ``10 N`` for ``N = batch × features`` unknowns did). A named solver (the
    default GMRES, or ``ImplicitAdjoint("neumann")``, ...) gets this budget; a callable of the
    user's is left as it is. Failures of the forward and of the backward are counted in
    :attr:`failures` (a :class:`~implicit_torch._result.FailureLog`: ``failures.counts``,
    ``failures.total``, ``failures.last``), and warnings are thinned out: the 1st, 10th,
    100th, ... failure of each kind warns, with the count and the fix. To turn them into
    errors, pass ``on_failure="raise"`` (forward) or filter
    :class:`~implicit_torch.ConvergenceWarning` to ``"error"``; to silence them, filter it to
    ``"ignore"``.

    Args:
        f: the cell ``f(z, x)``; its parameters are the layer's.
        z_shape: ``x -> shape of z``; default: ``x``'s shape.
        forward_solver: ``"anderson"``, ``"broyden"`` or ``"fixed_point"``. (Named apart
            from the adjoint's linear ``solve``, which inverts ``I − ∂_z f`` in the backward.)
        maxiter, tol, on_failure: of the forward solver (``on_failure`` also of the backward's
            named linear solver). ``tol`` bounds the forward solver's
            error (see the solver's ``error``; for the fixed-point solvers
            ``‖f(z, x) − z‖``, absolute, over the whole batch).
        backward_maxiter: iterations of the backward linear solve; default ``2 · maxiter``.
        history_size: iterates mixed by Anderson; Broyden keeps ``4 ·`` this many updates.
        adjoint: how ``z*`` is differentiated; default ``ImplicitAdjoint()`` (GMRES).
        warm_start: see above.
    """

    default_solve: ClassVar[str] = "gmres"

    def __init__(
        self,
        f: nn.Module,
        *,
        z_shape: Callable[[Tensor], tuple[int, ...]] | None = None,
        forward_solver: str = "anderson",
        maxiter: int = 50,
        tol: float = 1e-4,
        history_size: int = 5,
        adjoint: Adjoint | None = None,
        warm_start: bool = False,
        on_failure: str = "warn",
        backward_maxiter: int | None = None,
    ):
        if forward_solver not in FORWARD_SOLVERS:
            raise ValueError(
                "forward_solver must be 'anderson', 'broyden' or 'fixed_point', got "
                f"{forward_solver!r}"
            )
        if tol is None:
            raise TypeError("DEQ: tol must be a number (the forward solver's tolerance)")
        check_tolerances(tol)
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"DEQ: history_size must be an integer ≥ 1, got {history_size!r}")
        maxiter = check_maxiter(maxiter)
        budget = 2 * maxiter if backward_maxiter is None else check_maxiter(backward_maxiter)
        self.backward_maxiter = budget
        failures = FailureLog(
            hint=(
                f"In this DEQ the backward solve may take backward_maxiter={budget} iterations "
                f"(2 × the forward's maxiter by default); a forward that misses its tol makes "
                f"the backward hard too: raise maxiter / backward_maxiter, make f more "
                f"contractive, or use PhantomAdjoint for a cheap approximate gradient."
            )
        )
        on_failure = check_on_failure(on_failure)
        adjoint = _budgeted(ImplicitAdjoint() if adjoint is None else adjoint, budget, on_failure)
        super().__init__(adjoint=adjoint, warm_start=warm_start)
        self.failures = failures
        self.f = f
        self.z_shape = z_shape
        self.forward_solver = forward_solver
        self.maxiter, self.tol = maxiter, tol
        self.history_size = history_size
        self.on_failure = check_on_failure(on_failure)
        self.last_state: Any = None

    def forward(self, x: Tensor, *inputs: Any, init: Any = None) -> Tensor:
        """``z*`` for input ``x``; failures, of this forward and of the backward that follows
        it, are counted in :attr:`failures`."""
        with collecting(self.failures):
            return super().forward(x, *inputs, init=init)

    def initial(self, x: Tensor, *inputs: Any) -> Tensor:
        """``zeros(z_shape(x))`` (``zeros_like(x)`` without ``z_shape``)."""
        shape = tuple(self.z_shape(x)) if self.z_shape is not None else tuple(x.shape)
        return torch.zeros(shape, dtype=x.dtype, device=x.device)

    def fixed_point(self, z: Tensor, *inputs: Any) -> Tensor:
        """``f(z, x)``."""
        return self.f(z, *inputs)

    def optimality(self, z: Tensor, *inputs: Any) -> Tensor:
        """``f(z, x) − z``, zero at the fixed point."""
        return self.f(z, *inputs) - z

    def solve_forward(self, init: Tensor, *inputs: Any) -> Tensor:
        z, self.last_state = self._forward_solver().run(init, *inputs)
        return z

    def _forward_solver(self) -> IterativeSolver:
        common = dict(
            maxiter=self.maxiter,
            tol=self.tol,
            implicit_diff=False,  # the layer's adjoint differentiates, not the solver
            on_failure=self.on_failure,
        )
        if self.forward_solver == "anderson":
            return AndersonAcceleration(
                fixed_point_fun=self.fixed_point, history_size=self.history_size, **common
            )
        if self.forward_solver == "broyden":
            # Limited-memory Broyden on F(z) = f(z) − z, from J₀ = −I (exact when ∂f/∂z = 0).
            return Broyden(
                fun=self.optimality,
                jacobian_init=-1.0,
                memory_size=max(self.history_size, 1) * 4,
                **common,
            )
        return FixedPointIteration(fixed_point_fun=self.fixed_point, **common)

    def extra_repr(self) -> str:
        return (
            f"forward_solver={self.forward_solver!r}, maxiter={self.maxiter}, tol={self.tol}, "
            f"adjoint={self.adjoint!r}"
        )


def _budgeted(adjoint: Adjoint, budget: int, on_failure: str) -> Adjoint:
    """An :class:`ImplicitAdjoint` whose solver is named (or the default GMRES) gets
    ``maxiter=budget`` and the layer's ``on_failure``; anything else is returned as it is."""
    if not isinstance(adjoint, ImplicitAdjoint):
        return adjoint
    solve = DEQ.default_solve if adjoint.solve is None else adjoint.solve
    if isinstance(solve, str) or (is_builtin(solve) and not isinstance(solve, functools.partial)):
        return dataclasses.replace(
            adjoint,
            solve=functools.partial(get_solver(solve), maxiter=budget, on_failure=on_failure),
        )
    return adjoint
