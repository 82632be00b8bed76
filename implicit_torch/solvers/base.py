"""The shared driver of the iterative solvers: hyperparameters, the loop, differentiation.

A solver is a dataclass of hyperparameters with JAXopt's methods:

* ``init_state(init_params, *args) -> state`` and ``update(params, state, *args) -> OptStep``: one
  iteration, usable on their own;
* ``optimality_fun(params, *args)``: the residual ``F`` that is zero at a solution;
* ``run(init_params, *args) -> OptStep(params, state)``: iterate until ``state.error ≤ tol`` or
  ``maxiter``, with ``params`` differentiable in ``args``.

Differentiation. JAXopt's fields ``implicit_diff``, ``implicit_diff_solve`` and ``unroll``
describe an adjoint (:func:`implicit_torch.adjoint.from_flags`). By default it is implicit: the
loop runs under ``torch.no_grad`` and gradients come from the implicit function theorem applied
to ``optimality_fun`` at the returned point (Blondel et al., 2022), one linear solve whatever
the number of iterations. With ``unroll=True`` (or ``implicit_diff=False``) the loop runs with
autograd recording and gradients are those of the iterations; at convergence both agree,
which is how the tests compare them.

The linear solver of the implicit derivatives (``implicit_diff_solve=None``) is chosen by each
solver class from the structure of its optimality condition (:meth:`IterativeSolver.
default_implicit_diff_solve`):

====================================================  ==========================================
solver                                                default ``implicit_diff_solve``
====================================================  ==========================================
GradientDescent, LBFGS, GaussNewton,                  ``"cg"``: ``F = ∇ₓf``, so ``∂ₓF`` is the
LevenbergMarquardt                                    symmetric Hessian
FixedPointIteration, AndersonAcceleration, Broyden,   ``"gmres"``: a fixed point or root, whose
ProximalGradient, ProjectedGradient, MirrorDescent,   Jacobian is not symmetric in general
BlockCoordinateDescent
Bisection                                             division by the diagonal of ``∂ₓF``
                                                      (``F`` is element-wise)
QP                                                    the KKT structure (``KKTLinearSolve``)
====================================================  ==========================================

Convergence checks. The loop is :func:`implicit_torch._loop.iterate`: ``state.error`` is read
on the host only every ``check_every`` iterations (by default every iteration on the CPU, every
10 on an accelerator); in between, a problem that has converged is frozen by ``torch.where``
masking, so the result does not depend on the interval. Under ``torch.func.vmap`` or
``torch.compile`` no value can be read: all ``maxiter`` masked iterations run and failures are
not reported. Failures are reported by :func:`implicit_torch._result.report`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch import _runtime
from implicit_torch._loop import Cadence, iterate
from implicit_torch._result import (
    DEFAULT_RTOL,
    SolveInfo,
    check_maxiter,
    check_on_failure,
    check_tolerances,
    report,
    status_codes,
)
from implicit_torch._tree import tree_detach, tree_flatten, tree_leaves, tree_unflatten, tree_where
from implicit_torch.adjoint import Adjoint, from_flags

__all__ = ["DiffFields", "IterativeSolver", "OptStep"]

Solve = str | Callable[..., Any]


class OptStep(NamedTuple):
    """What ``run`` and ``update`` return.

    Attributes:
        params: the solution (or the next iterate), a tensor or pytree like ``init_params``.
        state: the solver's state, a NamedTuple of tensors with at least ``iter_num``
            (iterations run, int64) and ``error`` (the solver's optimality error at the last
            iterate it measured).
    """

    params: Any
    state: Any


@dataclasses.dataclass(kw_only=True)
class DiffFields:
    """JAXopt's public fields for how a solution is differentiated, and what to do on failure.

    Shared by :class:`IterativeSolver` and the direct solvers (``EqualityConstrainedQP``); they
    are turned into one :class:`~implicit_torch.adjoint.Adjoint` by :attr:`adjoint`.

    Attributes:
        implicit_diff: differentiate the solution by implicit differentiation of
            ``optimality_fun``; if False, through the solver's own operations.
        implicit_diff_solve: the engine's linear solver for implicit differentiation: a name
            (``"cg"``, ``"gmres"``, ``"lu"``, ...) or a callable ``solve(matvec, b)``; None
            takes the solver's default (:meth:`default_implicit_diff_solve`).
        unroll: backpropagate through the solver's operations (overrides ``implicit_diff``);
            for comparisons, and for problems whose optimality condition is not
            differentiable.
        on_failure: when the solver does not meet its tolerance (or meets a NaN): ``"warn"``
            with :class:`~implicit_torch.ConvergenceWarning`, ``"raise"``
            :class:`~implicit_torch.ConvergenceError`, or ``"ignore"``. The result is returned
            either way, with a state that says how far it got.
    """

    implicit_diff: bool = True
    implicit_diff_solve: Solve | None = None
    unroll: bool = False
    on_failure: str = "warn"

    @property
    def adjoint(self) -> Adjoint:
        """The adjoint these fields describe (``unroll`` overrides ``implicit_diff``)."""
        return from_flags(self.implicit_diff, self.implicit_diff_solve, self.unroll)

    def default_implicit_diff_solve(self) -> Solve:
        """The linear solver of the implicit derivatives when ``implicit_diff_solve`` is None.

        GMRES here, which needs nothing of ``∂ₓF``; a solver whose optimality condition has
        more structure (a symmetric Hessian, a diagonal, KKT blocks) overrides it, see the
        table in :mod:`implicit_torch.solvers.base`.
        """
        return "gmres"


@dataclasses.dataclass(kw_only=True)
class IterativeSolver(DiffFields):
    """Base class: the hyperparameters every iterative solver shares, and ``run``.

    Attributes:
        maxiter: maximum number of iterations.
        tol: stop once ``state.error ≤ tol`` (each solver defines its error); a number, or a
            0-d tensor (e.g. a tolerance relative to the data, or one per problem under
            ``torch.func.vmap``). JAXopt's default, ``DEFAULT_RTOL["solver"]``.
        verbose: print the error at every host-side convergence check.
        check_every: iterations between host-side convergence checks; None: 1 on the CPU, 10
            on an accelerator.
        implicit_diff, implicit_diff_solve, unroll, on_failure: see :class:`DiffFields`; if
            ``maxiter`` is reached with ``error > tol`` (or a NaN) the failure is reported as
            ``on_failure`` says.
    """

    maxiter: int = 500
    tol: Any = DEFAULT_RTOL["solver"][0]
    verbose: bool = False
    check_every: int | None = None

    # -- to be defined by each solver -----------------------------------------------------

    def init_state(self, init_params: Any, *args: Any) -> Any:
        raise NotImplementedError

    def update(self, params: Any, state: Any, *args: Any) -> OptStep:
        raise NotImplementedError

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        raise NotImplementedError

    # -- the driver -----------------------------------------------------------------------

    def run(self, init_params: Any, *args: Any) -> OptStep:
        """Iterate from ``init_params`` until ``state.error ≤ tol`` or ``maxiter`` iterations.

        Returns:
            ``OptStep(params, state)``; ``params`` is differentiable in every tensor of
            ``args`` (implicitly, or through the iterations with ``unroll=True``); ``init_params``
            never receives a gradient.
        """
        self._validate()
        params, state = self.adjoint.apply(
            self._iterate,
            self.optimality_fun,
            init_params,
            args,
            has_aux=True,
            default_solve=self.default_implicit_diff_solve(),
            check_root=False,  # the loop reports its own failures, once
        )
        return OptStep(params, state)

    def _validate(self) -> None:
        check_on_failure(self.on_failure)
        check_maxiter(self.maxiter)
        if not isinstance(self.tol, torch.Tensor):
            check_tolerances(self.tol)

    def _iterate(self, init_params: Any, *args: Any) -> tuple[Any, Any]:
        """The forward solve: ``(params, state)`` after the loop, failures reported."""
        cadence = Cadence(tree_leaves(init_params)[0].device, check_every=self.check_every)
        # With a check before every iteration, an iteration only runs while the problem is
        # active, so no masking is needed.
        masked = not cadence.every_step

        def step(carry):
            params, state = carry
            new_params, new_state = self.update(params, state, *args)
            if masked:
                active = self._active(state)
                new_params = tree_where(active, new_params, params)
                new_state = tree_where(active, new_state, state)
            return new_params, new_state

        (params, state), _ = iterate(
            step,
            (init_params, self.init_state(init_params, *args)),
            active=lambda carry: self._active(carry[1]),
            maxiter=self.maxiter,
            cadence=cadence,
            on_check=self._print if self.verbose else None,
        )
        if cadence.inspect:
            self._report(state)
        return params, state

    def _active(self, state: Any) -> torch.Tensor:
        # A NaN error compares False: the loop stops, and the report says why.
        return state.error > self.tol

    def _print(self, k: int, carry: tuple) -> None:
        error = float(carry[1].error.detach())
        print(f"{type(self).__name__} iteration {k}: error {error:.3e}")

    def _report(self, state: Any) -> None:
        error = state.error.detach()
        converged = error <= self.tol
        info = SolveInfo(
            iterations=state.iter_num,
            residual_norm=error,
            converged=converged,
            status=status_codes(converged, error),
            method=type(self).__name__,
            target=torch.as_tensor(self.tol).detach(),
        )
        report(
            type(self).__name__,
            info,
            self.on_failure,
            target=None if isinstance(self.tol, torch.Tensor) else f"tol={self.tol:g}",
            maxiter=self.maxiter,
            fix="raise maxiter, loosen tol or adjust the step size.",
        )


def value_and_grad(fun: Callable[..., torch.Tensor], x: Any, *args: Any) -> tuple[Any, Any]:
    """``(fun(x, *args), ∇ₓ fun(x, *args))`` for a scalar ``fun`` and a tensor or pytree ``x``.

    With grad mode on (unrolling) the gradient is itself differentiable (a graph is kept);
    with it off (the forward solve of implicit differentiation) values only are computed, by
    plain ``torch.autograd.grad`` on detached inputs, which is cheaper than ``torch.func``
    there. Inside torch.func transforms (e.g. vmap over a hyperparameter),
    ``torch.func.grad_and_value`` is used, which composes with them.
    """
    if _runtime.under_functorch():
        grad, value = torch.func.grad_and_value(fun)(x, *args)
        return value, grad
    leaves, spec = tree_flatten(x)
    differentiable = torch.is_grad_enabled()
    if differentiable:
        xs = [v if v.requires_grad else v.detach().requires_grad_() for v in leaves]
    else:
        xs = [v.detach().requires_grad_() for v in leaves]
        args = tree_detach(args)
    with torch.enable_grad():
        value = fun(tree_unflatten(xs, spec), *args)
        grads = torch.autograd.grad(value, xs, create_graph=differentiable, allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(xs, grads)]
    if not differentiable:
        value = value.detach()
    return value, tree_unflatten(grads, spec)


def objective_value_and_grad(
    fun: Callable[..., Any], x: Any, args: tuple, given: bool
) -> tuple[Any, Any]:
    """``(fun(x, *args), ∇ₓ fun(x, *args))``: returned by ``fun`` itself when ``given`` (a
    solver's ``value_and_grad=True``, JAXopt's convention), else by :func:`value_and_grad`."""
    if not given:
        return value_and_grad(fun, x, *args)
    out = fun(x, *args)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            "with value_and_grad=True, fun(x, *args) must return a pair (value, gradient), got "
            f"{type(out).__name__}"
        )
    return out[0], out[1]


def objective_value(fun: Callable[..., Any], x: Any, args: tuple, given: bool) -> Any:
    """``fun(x, *args)``, the first output of a ``fun`` that returns ``(value, gradient)``
    when ``given``."""
    out = fun(x, *args)
    return out[0] if given else out
