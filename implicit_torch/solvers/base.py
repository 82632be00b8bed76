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

Failures. Besides ``error > tol`` at ``maxiter`` (or a NaN), a solver's iterations may detect
that they cannot go on: a state field ``stalled`` (the line-search solvers, mirror descent,
Gauss–Newton and Levenberg–Marquardt) is set when an iteration could not move the iterate
although its error is above zero (a collapsed line search or step: every later iteration would
do the same), and Gauss–Newton's ``singular`` when its system is singular. The loop stops there
and the failure is reported with its cause (:meth:`IterativeSolver._failure_messages`); the
error stays the solver's true measure at the returned point (:func:`step_error`).

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
    Status,
    check_maxiter,
    check_on_failure,
    check_tolerances,
    report,
    status_codes,
)
from implicit_torch._tree import (
    describe,
    tree_detach,
    tree_flatten,
    tree_l2_norm,
    tree_leaves,
    tree_sub,
    tree_unflatten,
    tree_where,
)
from implicit_torch.adjoint import Adjoint, from_flags

__all__ = ["DiffFields", "IterativeSolver", "OptStep", "moved", "step_error"]

# What a failure found by a solver's own iterations means, by Status: (headline, detail, fix).
# See IterativeSolver._failure_messages.
Failure = tuple[str, str, str]

# A stalled line search (the state's ``stalled``): no trial step decreased the objective and
# moved the iterate, so no later iteration can either.
LINE_SEARCH_STALL: Failure = (
    "stalled",
    "its line search found no step that decreases the objective and moves the iterate",
    "if the error is at the rounding level of fun's gradient, tol is below what this dtype "
    "attains: loosen it; otherwise fun is NaN or Inf near the returned point (outside its "
    "domain) or its gradient is wrong there: check both, or keep the iterates inside the "
    "domain (ProjectedGradient, or a reparametrisation).",
)
_DEFAULT_FIX = "raise maxiter, loosen tol or adjust the step size."

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
        _check_init_params(type(self).__name__, init_params)
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
        elif _runtime.can_inspect_values(self.tol):
            tol = self.tol.detach()
            if not (tol.is_floating_point() and bool((torch.isfinite(tol) & (tol >= 0)).all())):
                raise ValueError(f"tol must be finite and non-negative, got {self.tol}")

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
        active = state.error > self.tol
        for failed in self._failures(state).values():
            active = active & ~failed
        return active

    def _failures(self, state: Any) -> dict[str, torch.Tensor]:
        """The failures the iterations detected, as bool masks keyed by a lower-case
        :class:`~implicit_torch._result.Status` name (as :func:`~implicit_torch._result.
        status_codes` takes them): a failed problem stops, and is reported with
        :meth:`_failure_messages`. By default a state field ``stalled`` is a
        ``"stalled"``: the last iteration could not move the iterate."""
        stalled = getattr(state, "stalled", None)
        return {} if stalled is None else {"stalled": stalled}

    def _failure_messages(self, state: Any) -> dict[Status, Failure]:
        """What each failure of :meth:`_failures` means: ``(headline, detail, fix)`` by
        status, for :func:`~implicit_torch._result.report`. By default a stall is a line
        search's (:data:`LINE_SEARCH_STALL`)."""
        return {Status.STALLED: LINE_SEARCH_STALL}

    def _print(self, k: int, carry: tuple) -> None:
        error = float(carry[1].error.detach())
        print(f"{type(self).__name__} iteration {k}: error {error:.3e}")

    def _report(self, state: Any) -> None:
        error = state.error.detach()
        converged = error <= self.tol
        status = status_codes(converged, error, **self._failures(state))
        info = SolveInfo(
            iterations=state.iter_num,
            residual_norm=error,
            converged=converged,
            status=status,
            method=type(self).__name__,
            target=torch.as_tensor(self.tol).detach(),
        )
        messages = self._failure_messages(state)
        worst = Status(int(status.max()))  # the one report() describes
        fix = messages[worst][2] if worst in messages else _DEFAULT_FIX
        report(
            type(self).__name__,
            info,
            self.on_failure,
            target=None if isinstance(self.tol, torch.Tensor) else f"tol={self.tol:g}",
            maxiter=self.maxiter,
            fix=fix,
            explain={code: (headline, detail) for code, (headline, detail, _) in messages.items()},
        )


def _check_init_params(who: str, init_params: Any) -> None:
    """``TypeError`` unless every leaf of ``init_params`` is a floating-point tensor."""
    leaves = tree_leaves(init_params)
    if leaves and all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in leaves):
        return
    bad = next(
        (v for v in leaves if not (isinstance(v, torch.Tensor) and v.is_floating_point())), None
    )
    found = (
        "no tensor"
        if bad is None
        else (f"dtype {bad.dtype}" if isinstance(bad, torch.Tensor) else type(bad).__name__)
    )
    raise TypeError(
        f"{who}: init_params must be a floating-point tensor (float16, bfloat16, float32 or "
        f"float64) or a pytree of them, got {describe(init_params)} with {found} (convert it, "
        "e.g. init_params.to(torch.float64))"
    )


def moved(new: Any, old: Any) -> torch.Tensor:
    """Whether a step changed any entry of the iterate (a 0-d bool tensor): a step below the
    rounding of the iterate leaves it bitwise unchanged."""
    changed = [(a != b).any() for a, b in zip(tree_leaves(new), tree_leaves(old))]
    return torch.stack(changed).any() if len(changed) > 1 else changed[0]


def step_error(
    new: Any,
    old: Any,
    eta: Any,
    reference: Callable[[], torch.Tensor],
    use_reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(error, moved)``: ``‖x⁺ − x‖ / η``, JAXopt's error of a step of size ``η`` from ``x =
    old`` to ``x⁺ = new``, and whether the step moved ``x`` at all.

    A step below the rounding of ``x`` (a collapsed line search, a vanishing step schedule)
    leaves ``x`` unchanged and that ratio 0 however far ``x`` is from a solution. Where ``x⁺ ==
    x`` (every entry), or ``use_reference`` says so, the error is ``reference()`` instead: the
    same measure at a step that is not collapsed (the step of the solver's optimality
    condition). ``reference`` is evaluated only where it is needed when values can be read for
    free (the CPU, outside transforms), and selected by ``torch.where`` otherwise.
    """
    has_moved = moved(new, old)
    ratio = tree_l2_norm(tree_sub(new, old)) / eta
    need = ~has_moved if use_reference is None else ~has_moved | use_reference
    if Cadence(has_moved.device, has_moved).every_step and not bool(need):
        return ratio, has_moved
    return torch.where(need, reference().to(ratio.dtype), ratio), has_moved


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
