"""Proximal gradient descent (ISTA) and its accelerated version (FISTA), with backtracking.

Minimises ``fun(x, *args) + g(x, hyperparams_prox)`` for a smooth ``fun`` and a ``g`` given by
its proximal operator (Beck & Teboulle, 2009, "A Fast Iterative Shrinkage-Thresholding
Algorithm for Linear Inverse Problems"). :class:`GradientDescent` and
:class:`ProjectedGradient` are the special cases ``g = 0`` and ``g = ι_C``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._loop import Cadence
from implicit_torch._tree import (
    tree_add_scalar_mul,
    tree_l2_norm,
    tree_leaves,
    tree_sub,
    tree_vdot,
    tree_where,
)
from implicit_torch.optimality import make_proximal_gradient_fun
from implicit_torch.prox import prox_none
from implicit_torch.solvers.base import (
    IterativeSolver,
    OptStep,
    moved,
    objective_value,
    objective_value_and_grad,
    step_error,
)

__all__ = ["ProxGradState", "ProximalGradient"]

Tensor = torch.Tensor


class ProxGradState(NamedTuple):
    """State of :class:`ProximalGradient` (and :class:`GradientDescent`).

    Attributes:
        iter_num: iterations run (int64, 0-d).
        stepsize: the step of the last iteration; with a line search, the step the next search
            starts from (0-d).
        error: ``‖x⁺ − y‖ / η``, the step-normalised fixed-point residual at the last point
            ``y`` the gradient was taken at (``‖∇fun(y)‖`` for gradient descent); where the
            step could not move ``y`` (a collapsed or failed line search), the same measure at
            the step of :meth:`optimality_fun` (see :func:`~implicit_torch.solvers.base.
            step_error`), so it is never 0 away from a solution.
        velocity: the extrapolated point ``y`` of the next iteration (FISTA), or ``x``.
        t: FISTA's momentum sequence ``t_k`` (0-d).
        stalled: the last step did not move ``y = x`` (it is below the rounding of ``x``, and
            no momentum is left) although the error is above zero: no later iteration can
            move either, so the solver stops and reports it (bool, 0-d).
    """

    iter_num: Tensor
    stepsize: Tensor
    error: Tensor
    velocity: Any
    t: Tensor
    stalled: Tensor


@dataclasses.dataclass(kw_only=True)
class _ProximalGradientBase(IterativeSolver):
    """Shared iterations of proximal/projected gradient and gradient descent.

    One iteration from ``x`` (with FISTA's extrapolated point ``y``; ``y = x`` without
    acceleration): ``x⁺ = prox(y − η ∇fun(y), hyperparams_prox, η)``, then
    ``t⁺ = (1 + √(1 + 4t²)) / 2`` and ``y⁺ = x⁺ + (t − 1)/t⁺ · (x⁺ − x)``.

    Attributes:
        stepsize: ``η > 0``: a fixed step (``1/L`` for an ``L``-Lipschitz gradient converges);
            ``≤ 0``: backtracking line search (Beck & Teboulle, 2009, §4), starting from
            ``max_stepsize`` and accepting ``η`` when ``fun(x⁺) ≤ fun(y) + ⟨∇fun(y), x⁺ − y⟩
            + ‖x⁺ − y‖² / (2η)`` (up to float rounding of ``fun``). Each search starts from the
            last accepted step, so the step never increases (as FISTA's analysis needs, and so
            that no step is accepted only because the decrease is below rounding). A search
            that accepts no trial within ``maxls`` takes no step: the iterate stays at ``x``
            (the momentum restarts), and the next search goes on from a smaller step, or from
            the same one when ``fun(y)`` itself was not finite (an extrapolated ``y`` outside
            ``fun``'s domain). A search whose accepted step no longer moves ``y`` has
            collapsed: the solver stops and reports it (``state.stalled``).
        acceleration: FISTA momentum (Nesterov).
        maxls: maximum number of backtracking steps per iteration.
        decrease_factor: step shrink factor of the line search.
        max_stepsize: first step tried by the line search.
        value_and_grad: ``fun`` returns ``(value, gradient)`` (see :class:`ProximalGradient`).
    """

    stepsize: float = 0.0
    acceleration: bool = True
    maxls: int = 15
    decrease_factor: float = 0.5
    max_stepsize: float = 1.0
    value_and_grad: bool = False

    # Subclasses define the field ``fun(x, *args)``, the smooth objective.

    def _prox(self, v: Any, hyperparams: Any, eta: Any) -> Any:
        raise NotImplementedError

    def _validate(self) -> None:
        super()._validate()
        if self.stepsize <= 0:
            if not 0 < self.decrease_factor < 1:
                raise ValueError(f"decrease_factor must be in (0, 1), got {self.decrease_factor}")
            if isinstance(self.maxls, bool) or not isinstance(self.maxls, int) or self.maxls < 1:
                raise ValueError(f"maxls must be a positive integer, got {self.maxls!r}")
            if not self.max_stepsize > 0:
                raise ValueError(f"max_stepsize must be positive, got {self.max_stepsize}")

    def _init(self, init_params: Any) -> ProxGradState:
        leaf = tree_leaves(init_params)[0]
        scalar = dict(dtype=leaf.dtype, device=leaf.device)
        step = self.stepsize if self.stepsize > 0 else self.max_stepsize
        return ProxGradState(
            iter_num=torch.zeros((), dtype=torch.int64, device=leaf.device),
            stepsize=torch.tensor(step, **scalar),
            error=torch.tensor(math.inf, **scalar),
            velocity=init_params,
            t=torch.ones((), **scalar),
            stalled=torch.zeros((), dtype=torch.bool, device=leaf.device),
        )

    def _step(self, x: Any, state: ProxGradState, hyperparams: Any, args: tuple) -> OptStep:
        y = state.velocity if self.acceleration else x
        f_y, g_y = objective_value_and_grad(self.fun, y, args, self.value_and_grad)
        accepted = None  # a step taken (a fixed step, or a search known to have succeeded)
        if self.stepsize > 0:
            eta: Any = self.stepsize
            trial = self._prox(tree_add_scalar_mul(y, -eta, g_y), hyperparams, eta)
            step = state.stepsize
        else:
            stop_early = Cadence(f_y.device).every_step
            trial, eta, accepted = self._line_search(
                y, f_y, g_y, hyperparams, args, state.stepsize, stop_early
            )
            step = eta
            if stop_early and bool(accepted):  # read already by the search: no masking
                accepted = None
        use_reference = None if accepted is None else ~accepted
        error, has_moved = self._error(y, g_y, trial, eta, hyperparams, use_reference)
        # Stuck: the step moved nothing, and no momentum is left to move the next one.
        x_new, stalled = trial, ~has_moved & (error > 0)
        if self.acceleration:
            stalled = stalled & ~moved(y, x)
        if accepted is not None:
            x_new, step, error, stalled = self._failed_search(
                x, y, f_y, state, accepted, trial, step, error, stalled
            )
        if self.acceleration:
            t_new = 0.5 + torch.sqrt(0.25 + state.t * state.t)  # = (1 + √(1 + 4t²)) / 2
            velocity = tree_add_scalar_mul(x_new, (state.t - 1) / t_new, tree_sub(x_new, x))
            if accepted is not None:
                # A failed search restarts the momentum (O'Donoghue & Candès, 2015).
                t_new = torch.where(accepted, t_new, torch.ones_like(t_new))
                velocity = tree_where(accepted, velocity, x_new)
        else:
            t_new, velocity = state.t, x_new
        new_state = ProxGradState(state.iter_num + 1, step, error, velocity, t_new, stalled)
        return OptStep(x_new, new_state)

    def _failed_search(self, x, y, f_y, state, accepted, trial, step, error, stalled):
        """``(x⁺, step, error, stalled)`` where the line search may have failed (``accepted``
        False, a 0-d tensor): a failed search takes no step, back to ``x``, the last accepted
        iterate (``y`` may be an extrapolation), and the next search goes on from a smaller
        step, unless ``fun(y)`` itself was not finite (an extrapolated ``y`` outside the
        domain). The error at ``y`` is then the reference measure, or unknown where
        ``fun(y)`` is not finite (the previous one; NaN at ``y = x``, where nothing is left to
        restart from)."""
        finite = torch.isfinite(f_y)
        shrunk = torch.where(finite, step * self.decrease_factor, state.stepsize)
        unmeasured = torch.full_like(error, torch.nan)
        if self.acceleration:
            unmeasured = torch.where(moved(y, x), state.error, unmeasured)
        return (
            tree_where(accepted, trial, x),
            torch.where(accepted, step, shrunk),
            torch.where(accepted | finite, error, unmeasured),
            accepted & stalled,
        )

    def _error(self, y, g_y, trial, eta, hyperparams, use_reference) -> tuple[Tensor, Tensor]:
        """``(error, moved)`` of the step from ``y`` to ``trial`` (:func:`~implicit_torch.
        solvers.base.step_error`), the reference being the prox-gradient residual at the
        step of :meth:`optimality_fun`."""
        ref_eta = self._diff_stepsize()

        def reference():
            x_ref = self._prox(tree_add_scalar_mul(y, -ref_eta, g_y), hyperparams, ref_eta)
            return tree_l2_norm(tree_sub(x_ref, y)) / ref_eta

        return step_error(trial, y, eta, reference, use_reference)

    def _line_search(self, y, f_y, g_y, hyperparams, args, last_step, stop_early):
        """Backtracking from ``last_step``: ``(trial, step, accepted)``, the first accepted
        trial and its step, or the last (smallest) one after ``maxls`` with ``accepted``
        False.

        No host synchronisation except, with ``stop_early`` (on the CPU outside transforms),
        one read per trial to stop at the first accepted step; elsewhere all ``maxls`` trials
        run, masked.
        """
        # The step never increases: near convergence the decrease of ``fun`` falls below its
        # float resolution, and a step allowed to grow back would be accepted too large.
        step = last_step
        slack = 10 * torch.finfo(f_y.dtype).eps * f_y.abs()
        accepted = torch.zeros((), dtype=torch.bool, device=f_y.device)
        if stop_early and not bool(torch.isfinite(f_y)):
            return y, step, accepted  # no trial can be accepted
        for j in range(self.maxls):
            trial = self._prox(tree_add_scalar_mul(y, -step, g_y), hyperparams, step)
            diff = tree_sub(trial, y)
            bound = f_y + tree_vdot(g_y, diff) + tree_l2_norm(diff, squared=True) / (2 * step)
            ok = objective_value(self.fun, trial, args, self.value_and_grad) <= bound + slack
            if j == 0:
                x_new, step_used = trial, step
            else:
                x_new = tree_where(accepted, x_new, trial)
                step_used = torch.where(accepted, step_used, step)
            accepted = accepted | ok
            if stop_early and bool(accepted):
                break
            step = step * self.decrease_factor
        return x_new, step_used, accepted

    def _diff_stepsize(self) -> float:
        # The step of the fixed-point condition used for differentiation (any η > 0 gives the
        # same solution; 1/L conditions its Jacobian best). JAXopt uses 1.
        return self.stepsize if self.stepsize > 0 else 1.0


@dataclasses.dataclass
class ProximalGradient(_ProximalGradientBase):
    """Proximal gradient: ``min_x fun(x, *args) + g(x, hyperparams_prox)``.

    ISTA, or FISTA with ``acceleration=True`` (Beck & Teboulle, 2009). ``run(init_params,
    hyperparams_prox, *args)``; the solution is differentiable in ``hyperparams_prox`` and
    ``args`` through the fixed point of :func:`~implicit_torch.optimality.
    make_proximal_gradient_fun` with ``η = stepsize`` (1 with a line search).

    Example::

        solver = ProximalGradient(fun=least_squares, prox=prox.prox_lasso, stepsize=1 / L,
                                  tol=1e-8)
        w = solver.run(w0, l1reg, X, y).params

    Attributes:
        fun: the smooth part ``fun(x, *args)``, a scalar tensor.
        prox: ``prox(v, hyperparams_prox, scaling)`` of the non-smooth part (see
            :mod:`implicit_torch.prox`); default ``prox_none``.
        stepsize: ``> 0`` a fixed step (``1/L`` converges for an ``L``-Lipschitz
            ``∇fun``); ``≤ 0`` backtracking line search from ``max_stepsize``, shrinking by
            ``decrease_factor`` at most ``maxls`` times per iteration, the step never increasing.
        acceleration: FISTA momentum (default True).
        value_and_grad: ``fun`` returns ``(value, gradient)`` itself (JAXopt's option), e.g.
            an analytic gradient, saving the autograd pass of every iteration; the gradient
            must be written in torch operations, since implicit differentiation (and
            ``unroll``) differentiates it.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`; the error
            is ``‖x⁺ − y‖ / η``.
    """

    fun: Callable[..., Tensor]
    prox: Callable[..., Any] = prox_none

    def _prox(self, v, hyperparams, eta):
        return self.prox(v, hyperparams, eta)

    def init_state(
        self, init_params: Any, hyperparams_prox: Any = None, *args: Any
    ) -> ProxGradState:
        return self._init(init_params)

    def update(self, params: Any, state: ProxGradState, hyperparams_prox: Any, *args) -> OptStep:
        """One ISTA/FISTA iteration."""
        return self._step(params, state, hyperparams_prox, args)

    def optimality_fun(self, params: Any, hyperparams_prox: Any, *args: Any) -> Any:
        """``prox(x − η∇fun(x, *args), hyperparams_prox, η) − x``."""
        F = make_proximal_gradient_fun(
            self.fun, self.prox, self._diff_stepsize(), value_and_grad=self.value_and_grad
        )
        return F(params, hyperparams_prox, *args)

    def run(self, init_params: Any, hyperparams_prox: Any = None, *args: Any) -> OptStep:
        """Solve from ``init_params``; see :meth:`IterativeSolver.run`."""
        return super().run(init_params, hyperparams_prox, *args)
