"""Modules whose output is the solution of an inner problem: :class:`ImplicitLayer` and
:class:`ArgminLayer`.

An :class:`ImplicitLayer` is three things, each in one place:

* *what* is solved: the subclass's ``solve_forward`` (any forward solver) and ``optimality``
  (the residual ``F(x, *inputs)`` that is zero at the solution), plus ``fixed_point`` for a
  fixed-point problem ``x = T(x, *inputs)``;
* *how* the solution is differentiated: an adjoint object from :mod:`implicit_torch.adjoint`
  (:class:`~implicit_torch.adjoint.ImplicitAdjoint`, the default;
  :class:`~implicit_torch.adjoint.UnrolledAdjoint`;
  :class:`~implicit_torch.adjoint.PhantomAdjoint` for fixed points);
* where a solve starts: the caller's ``init``, else the previous solution
  (:class:`~implicit_torch.nn.ForwardWarmStart`, with ``warm_start=True``), else
  the subclass's ``initial``.

Parameters reach the engine through :func:`torch.func.functional_call`: ``optimality`` (and
``fixed_point``) are evaluated with the module's parameters passed explicitly, so the engine
sees them as inputs and returns their gradients (a module attribute read inside
``optimality`` would otherwise be a tensor the function closes over, which the engine
refuses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from implicit_torch._result import check_maxiter, check_tolerances
from implicit_torch.adjoint import Adjoint, ImplicitAdjoint, PhantomAdjoint
from implicit_torch.linear import WarmStart, is_builtin
from implicit_torch.nn.warm_start import ForwardWarmStart
from implicit_torch.solvers.gradient_descent import GradientDescent

__all__ = ["ArgminLayer", "ImplicitLayer"]

Tensor = torch.Tensor


class _Call(nn.Module):
    """Calls ``method`` of a module as this module's forward, so that
    :func:`torch.func.functional_call` can run it with substituted parameters. Not registered
    as a child of that module (it would be a cycle); its own child is the module."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args):
        return getattr(self.module, self.method)(*args)


def _check_adjoint(adjoint: Any, layer: ImplicitLayer) -> Adjoint:
    """``adjoint`` itself, or a ``TypeError`` that says what a layer accepts."""
    who = type(layer).__name__
    if not isinstance(adjoint, Adjoint):
        hint = (
            f"; for a linear solver, ImplicitAdjoint({adjoint!r})"
            if isinstance(adjoint, str)
            else ""
        )
        raise TypeError(
            f"{who}: adjoint must be ImplicitAdjoint(solve), UnrolledAdjoint() or "
            f"PhantomAdjoint(steps, damping) from implicit_torch.adjoint, got "
            f"{type(adjoint).__name__} {adjoint!r}{hint}"
        )
    if isinstance(adjoint, PhantomAdjoint) and not layer.is_fixed_point():
        raise TypeError(
            f"{who}: PhantomAdjoint differentiates a fixed point x = T(x, ...), and this layer "
            "defines no fixed_point(x, *inputs); use ImplicitAdjoint or UnrolledAdjoint"
        )
    return adjoint


def _warm_started(adjoint: Adjoint, default_solve: str) -> Adjoint:
    """The backward warm start: an :class:`ImplicitAdjoint` whose linear solver is built in
    gets it wrapped in :class:`~implicit_torch.WarmStart` (each backward solve starts from the
    previous adjoint). Other adjoints have no backward solve, and a user's callable is left as
    it is (it may not take ``init``)."""
    if not isinstance(adjoint, ImplicitAdjoint) or isinstance(adjoint.solve, WarmStart):
        return adjoint
    solve = default_solve if adjoint.solve is None else adjoint.solve
    if isinstance(solve, str) or is_builtin(solve):
        return dataclasses.replace(adjoint, solve=WarmStart(solve))
    return adjoint


class ImplicitLayer(nn.Module):
    """An ``nn.Module`` whose output is the solution of an inner problem.

    Subclasses define, using ``self``'s parameters and buffers freely:

    * ``solve_forward(self, init, *inputs) -> x*``: any forward solver (it runs under
      ``torch.no_grad`` unless the adjoint unrolls it);
    * ``optimality(self, x, *inputs) -> F``: a residual shaped like ``x``, zero at ``x*``;
    * optionally ``initial(self, *inputs) -> x0``, the cold start (default ``None``), and
      ``fixed_point(self, x, *inputs) -> T(x)`` when ``x* = T(x*)`` (this enables
      :class:`~implicit_torch.adjoint.PhantomAdjoint`).

    ``layer(*inputs, init=None)`` returns ``x*``, differentiable in every tensor input and in
    every registered parameter. With the default ``ImplicitAdjoint``, ``dx*/dθ = −(∂ₓF)⁻¹ ∂_θF``
    (the implicit function theorem), ``∂ₓF`` inverted by the adjoint's linear solver
    (:attr:`default_solve` when it names none). ``state_dict``, ``.to``, ``train``/``eval``
    and parameter registration behave as for any module.

    ``solve_forward`` receives as ``init``: the caller's ``init``; else, with
    ``warm_start=True``, the previous call's solution (kept in non-persistent buffers of the
    child ``warm_start_state``, see :class:`~implicit_torch.nn.ForwardWarmStart`);
    else ``initial(*inputs)``.

    Args:
        adjoint: how the solution is differentiated; default ``ImplicitAdjoint()``. A
            ``TypeError`` for anything but an :class:`~implicit_torch.adjoint.Adjoint`, or for
            ``PhantomAdjoint`` on a layer without ``fixed_point``.
        batched: dim 0 of the solution indexes independent problems (per-sample inner
            problems): the backward solves them separately.
        warm_start: start each forward solve from the previous call's solution (counted in
            :attr:`warm_starts`), and each backward linear solve from the previous adjoint
            (the adjoint's built-in solver wrapped in :class:`~implicit_torch.WarmStart`,
            whose ``iterations`` list records each solve). Reset with
            :meth:`reset_warm_start`.

    Attributes:
        adjoint: the adjoint in use (with ``warm_start``, the one holding the ``WarmStart``).
        default_solve: the linear solver of an ``ImplicitAdjoint()`` that names none
            (``"cg"``: ``∂ₓF`` symmetric positive definite, as for a stationarity condition).
    """

    default_solve: ClassVar[str] = "cg"

    def __init__(
        self, *, adjoint: Adjoint | None = None, batched: bool = False, warm_start: bool = False
    ):
        super().__init__()
        adjoint = _check_adjoint(ImplicitAdjoint() if adjoint is None else adjoint, self)
        self.adjoint = _warm_started(adjoint, self.default_solve) if warm_start else adjoint
        self.batched = batched
        self.warm_start_state = ForwardWarmStart(enabled=warm_start)
        # Outside the module registry on purpose (a child holding its parent is a cycle).
        object.__setattr__(self, "_optimality_call", _Call(self, "optimality"))
        object.__setattr__(self, "_fixed_point_call", _Call(self, "fixed_point"))

    # -- what subclasses define -------------------------------------------------------------

    def solve_forward(self, init: Any, *inputs: Any) -> Any:
        raise NotImplementedError("subclasses define solve_forward(init, *inputs)")

    def optimality(self, x: Any, *inputs: Any) -> Any:
        raise NotImplementedError("subclasses define optimality(x, *inputs)")

    def initial(self, *inputs: Any) -> Any:
        """The cold start; ``None`` (the default) leaves the choice to ``solve_forward``."""
        return None

    def fixed_point(self, x: Any, *inputs: Any) -> Any:
        raise NotImplementedError("fixed-point layers define fixed_point(x, *inputs)")

    def is_fixed_point(self) -> bool:
        """Whether this layer defines ``fixed_point`` (its problem is ``x = T(x, *inputs)``)."""
        return type(self).fixed_point is not ImplicitLayer.fixed_point

    # -- warm starts ------------------------------------------------------------------------

    @property
    def warm_start(self) -> bool:
        """Whether forward (and implicit backward) solves start from the previous ones."""
        return self.warm_start_state.enabled

    @property
    def warm_starts(self) -> int:
        """Forward solves started from the previous solution (a diagnostic)."""
        return self.warm_start_state.count

    def reset_warm_start(self) -> None:
        """Forget the stored solution and adjoint: the next solves start cold."""
        self.warm_start_state.reset()
        solve = getattr(self.adjoint, "solve", None)
        if isinstance(solve, WarmStart):
            solve.reset()

    # -- the forward ------------------------------------------------------------------------

    def forward(self, *inputs: Any, init: Any = None) -> Any:
        """The solution ``x*`` for ``inputs``, differentiable as :attr:`adjoint` says.

        Args:
            *inputs: passed on to ``solve_forward``, ``optimality`` (and ``initial``,
                ``fixed_point``); every tensor among them is differentiable.
            init: the forward solver's initial guess (never differentiated); default: the
                previous solution with ``warm_start``, else ``initial(*inputs)``.
        """
        guess = None
        if init is None:
            cold = self.initial(*inputs)
            guess = self.warm_start_state.recall(like=cold)
            init = cold if guess is None else guess
        params = dict(self.named_parameters())
        names = tuple(params)
        fixed_point_fn = None
        if self.is_fixed_point():
            fixed_point_fn = _functional(self._fixed_point_call, names)
        x = self.adjoint.apply(
            self._run,
            _functional(self._optimality_call, names),
            init,
            (tuple(params.values()), *inputs),
            batched=self.batched,
            default_solve=self.default_solve,
            fixed_point_fn=fixed_point_fn,
        )
        self.warm_start_state.remember(x, guess)
        return x

    def _run(self, init: Any, _tensors: tuple, *inputs: Any) -> Any:
        # The forward solver uses the module's own parameters: under no_grad (implicit,
        # phantom) their values are all it needs; unrolled, autograd records through them.
        return self.solve_forward(init, *inputs)


def _functional(call: _Call, names: tuple[str, ...]) -> Callable[..., Any]:
    """``(x, tensors, *inputs) -> call(x, *inputs)`` with the module's parameters ``names``
    replaced by ``tensors`` (so the engine sees them as inputs, see the module docstring)."""

    def fn(x, tensors, *inputs):
        prefixed = {f"module.{n}": t for n, t in zip(names, tensors)}
        return torch.func.functional_call(call, prefixed, (x, *inputs), strict=False)

    return fn


class ArgminLayer(ImplicitLayer):
    """``x* = argmin_x objective(x, *inputs)`` as a layer, for a smooth objective.

    Subclasses define ``objective(self, x, *inputs) -> scalar`` (using the module's
    parameters) and ``initial(self, *inputs) -> x0`` (or pass ``init=`` to the call). The
    forward pass runs accelerated gradient descent with a backtracking line search
    (:class:`~implicit_torch.GradientDescent`, ``maxiter``, ``tol`` on ``‖∇ₓ objective‖``;
    non-convergence warns, and ``last_state``, a diagnostic set by each forward, holds the
    solver's final state); the backward pass differentiates the stationarity condition
    ``∇ₓ objective(x*, *inputs) = 0``, whose Jacobian is the Hessian, by CG unless
    ``adjoint`` says otherwise.

    Args:
        maxiter, tol: of the forward gradient descent.
        adjoint, batched, warm_start: see :class:`ImplicitLayer`.
    """

    def __init__(
        self,
        *,
        maxiter: int = 1000,
        tol: float = 1e-6,
        adjoint: Adjoint | None = None,
        batched: bool = False,
        warm_start: bool = False,
    ):
        super().__init__(adjoint=adjoint, batched=batched, warm_start=warm_start)
        check_tolerances(tol)
        self.maxiter, self.tol = check_maxiter(maxiter), tol
        self.last_state: Any = None

    def objective(self, x: Any, *inputs: Any) -> Tensor:
        raise NotImplementedError("subclasses define objective(x, *inputs) -> scalar")

    def solve_forward(self, init: Any, *inputs: Any) -> Any:
        if init is None:
            raise NotImplementedError(
                "define initial(*inputs) -> x0 in the subclass, or call the layer with init="
            )
        solver = GradientDescent(
            fun=self.objective,
            stepsize=0.0,
            acceleration=True,
            maxiter=self.maxiter,
            tol=self.tol,
            implicit_diff=False,  # the layer's adjoint differentiates
        )
        x, self.last_state = solver.run(init, *inputs)
        return x

    def optimality(self, x: Any, *inputs: Any) -> Any:
        return torch.func.grad(self.objective)(x, *inputs)
