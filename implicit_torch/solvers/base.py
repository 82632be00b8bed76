"""The shared driver of the iterative solvers: hyperparameters, the loop, differentiation.

A solver is a dataclass of hyperparameters with JAXopt's methods:

* ``init_state(init, *args) -> state`` and ``update(params, state, *args) -> OptStep``: one
  iteration, usable on their own;
* ``optimality_fun(params, *args)``: the residual ``F`` that is zero at a solution;
* ``run(init, *args) -> OptStep(params, state)``: iterate until ``state.error ≤ tol`` or
  ``maxiter``, with ``params`` differentiable in ``args``.

Differentiation. By default (``implicit_diff=True``) the loop runs under ``torch.no_grad``
inside :func:`implicit_torch.implicit_solve` with ``optimality_fun``, so gradients come from the
implicit function theorem at the returned point (Blondel et al., 2022) and cost one linear
solve, whatever the number of iterations. With ``unroll=True`` (or ``implicit_diff=False``)
the loop runs with autograd recording, and gradients are those of the iterations themselves;
at convergence both agree, which is how the tests compare them.

Convergence checks. The loop reads ``state.error`` on the host only every ``check_every``
iterations (by default every iteration on the CPU, every 10 on an accelerator, see
:func:`implicit_torch._runtime.check_interval`); in between, a problem that has converged is
frozen by ``torch.where`` masking, so the result does not depend on the interval. Under
``torch.func.vmap`` or ``torch.compile`` no value can be read: all ``maxiter`` masked
iterations run and failures are not reported.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch

from implicit_torch import _runtime
from implicit_torch._errors import ConvergenceError, ConvergenceWarning
from implicit_torch._implicit_diff import implicit_solve
from implicit_torch._tree import tree_detach, tree_flatten, tree_leaves, tree_unflatten, tree_where

__all__ = ["IterativeSolver", "OptStep"]

Solve = str | Callable[..., Any]


class OptStep(NamedTuple):
    """What ``run`` and ``update`` return.

    Attributes:
        params: the solution (or the next iterate), a tensor or pytree like ``init``.
        state: the solver's state, a NamedTuple of tensors with at least ``iter_num``
            (iterations run, int64) and ``error`` (the solver's optimality error at the last
            iterate it measured).
    """

    params: Any
    state: Any


@dataclasses.dataclass(kw_only=True)
class IterativeSolver:
    """Base class: the hyperparameters every iterative solver shares, and ``run``.

    Attributes:
        maxiter: maximum number of iterations.
        tol: stop once ``state.error ≤ tol`` (each solver defines its error).
        verbose: print the error at every host-side convergence check.
        implicit_diff: differentiate ``run``'s solution by implicit differentiation of
            ``optimality_fun``; if False, by unrolling the iterations.
        implicit_diff_solve: the engine's linear solver for implicit differentiation: a name
            (``"cg"``, ``"gmres"``, ``"lu"``, ...) or a callable ``solve(matvec, b)``; None
            picks the solver's default (``"cg"`` for a stationarity condition, whose Jacobian is
            a symmetric Hessian; ``"gmres"`` for fixed points).
        unroll: backpropagate through the iterations (overrides ``implicit_diff``); for
            comparisons, and for problems whose optimality condition is not differentiable.
        on_failure: if ``maxiter`` is reached with ``error > tol`` (or a NaN): ``"warn"`` with
            :class:`~implicit_torch.ConvergenceWarning`, ``"raise"``
            :class:`~implicit_torch.ConvergenceError`, or ``"ignore"``. The result is returned
            either way with the state holding the error and the iteration count.
        check_every: iterations between host-side convergence checks; None: 1 on the CPU, 10
            on an accelerator.
    """

    maxiter: int = 500
    tol: float = 1e-3
    verbose: bool = False
    implicit_diff: bool = True
    implicit_diff_solve: Solve | None = None
    unroll: bool = False
    on_failure: str = "warn"
    check_every: int | None = None

    default_diff_solve: ClassVar[str] = "gmres"

    # -- to be defined by each solver -----------------------------------------------------

    def init_state(self, init: Any, *args: Any) -> Any:
        raise NotImplementedError

    def update(self, params: Any, state: Any, *args: Any) -> OptStep:
        raise NotImplementedError

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        raise NotImplementedError

    # -- the driver -----------------------------------------------------------------------

    def run(self, init: Any, *args: Any) -> OptStep:
        """Iterate from ``init`` until ``state.error ≤ tol`` or ``maxiter`` iterations.

        Returns:
            ``OptStep(params, state)``; ``params`` is differentiable in every tensor of
            ``args`` (implicitly, or through the iterations with ``unroll=True``); ``init``
            never receives a gradient.
        """
        self._validate()
        if self.unroll or not self.implicit_diff:
            return OptStep(*self._iterate(tree_detach(init), args))
        solve = self.implicit_diff_solve or self.default_diff_solve
        params, state = implicit_solve(
            lambda x0, *a: self._iterate(x0, a),
            self.optimality_fun,
            init,
            *args,
            solve=solve,
            has_aux=True,
        )
        return OptStep(params, state)

    def _validate(self) -> None:
        if self.on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(
                f"on_failure must be 'warn', 'raise' or 'ignore', got {self.on_failure!r}"
            )
        if self.maxiter < 0:
            raise ValueError(f"maxiter must be non-negative, got {self.maxiter}")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError(f"check_every must be a positive integer, got {self.check_every}")

    def _iterate(self, init: Any, args: tuple) -> tuple[Any, Any]:
        params = init
        state = self.init_state(init, *args)
        inspect = _runtime.can_inspect_values()
        device = tree_leaves(init)[0].device
        interval = self.check_every or _runtime.check_interval(device)
        # With a check before every iteration, an iteration only runs while the problem is
        # active, so no masking is needed.
        masked = not (inspect and interval == 1)
        for k in range(self.maxiter):
            if inspect and k % interval == 0:
                if self.verbose:
                    error = float(state.error.detach())
                    print(f"{type(self).__name__} iteration {k}: error {error:.3e}")
                if not bool(state.error > self.tol):  # converged (or NaN: stop too)
                    break
            new_params, new_state = self.update(params, state, *args)
            if masked:
                active = state.error > self.tol
                new_params = tree_where(active, new_params, params)
                new_state = tree_where(active, new_state, state)
            params, state = new_params, new_state
        if inspect and self.on_failure != "ignore":
            self._report(state)
        return params, state

    def _report(self, state: Any) -> None:
        error = float(state.error.detach())
        if error <= self.tol:
            return
        iters = int(state.iter_num.detach())
        msg = (
            f"implicit_torch: {type(self).__name__} did not converge: error {error:.3e} > "
            f"tol={self.tol:g} after {iters} iterations (maxiter={self.maxiter})."
            f" The solution, and any gradient computed from it, is inaccurate: raise maxiter, "
            f"loosen tol or adjust the step size."
        )
        if self.on_failure == "raise":
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)


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
