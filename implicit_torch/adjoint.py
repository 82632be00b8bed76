"""How a solution is differentiated, as an object: implicit, unrolled or phantom.

A forward solver ``run(init, *params) -> x*`` (or ``(x*, aux)``) and its optimality condition
``F(x, *params)`` say *what* is solved; an adjoint says how gradients reach ``params``:

* :class:`ImplicitAdjoint` — the implicit function theorem at the returned point
  (``∂x*/∂θ = −(∂ₓF)⁻¹ ∂_θF``), one linear solve per backward, whatever the number of forward
  iterations (Blondel et al., 2022). ``solve`` is the linear solver (a name, a callable, or a
  :class:`~implicit_torch.WarmStart`).
* :class:`UnrolledAdjoint` — autograd records the forward iterations and backpropagates
  through them (memory grows with the iterations; for comparisons, and for conditions that are
  not differentiable).
* :class:`PhantomAdjoint` — for fixed points ``x = T(x, θ)`` only: the forward runs without
  recording, then ``steps`` damped steps ``x ← (1 − λ) x + λ T(x, θ)`` from ``x*`` are
  recorded (Geng et al., 2021, "On Training Implicit Models"; ``steps = 1, λ = 1`` is the
  Jacobian-free gradient of Fung et al., 2022). Cheap, and only an approximation.

The solver classes keep JAXopt's fields (``implicit_diff``, ``implicit_diff_solve``,
``unroll``) as their public face and turn them into one of these with :func:`from_flags`; the
layers of :mod:`implicit_torch.nn` take an adjoint object directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch._implicit_diff import implicit_solve
from implicit_torch._tree import tree_add_scalar_mul, tree_detach, tree_sub
from implicit_torch.linear import get_solver

__all__ = ["Adjoint", "ImplicitAdjoint", "PhantomAdjoint", "UnrolledAdjoint", "from_flags"]

Solve = str | Callable[..., Any]


class Adjoint:
    """Base class: :meth:`apply` runs a forward solver and makes its solution differentiable."""

    def apply(
        self,
        run: Callable[..., Any],
        optimality_fn: Callable[..., Any],
        init: Any,
        params: tuple,
        *,
        has_aux: bool = False,
        batched: bool = False,
        default_solve: Solve = "cg",
        fixed_point_fn: Callable[..., Any] | None = None,
        check_root: bool = True,
    ) -> Any:
        """``run(init, *params)``, differentiable in ``params`` the way this adjoint says.

        Args:
            run: the forward solver; returns ``x*``, or ``(x*, aux)`` with ``has_aux``.
            optimality_fn: ``F(x, *params)``, zero at ``x*``.
            init: the initial guess; never differentiated.
            params: the tuple of parameters (tensors, pytrees, static constants).
            has_aux: ``run`` returns ``(x*, aux)``; ``aux`` is passed through undifferentiated
                (implicit, phantom) or as recorded (unrolled).
            batched: dim 0 of ``x*`` indexes independent problems.
            default_solve: the linear solver an :class:`ImplicitAdjoint` without one uses (a
                solver's natural choice: CG for a Hessian, GMRES for a fixed point).
            fixed_point_fn: ``T(x, *params)`` for fixed-point problems (needed by
                :class:`PhantomAdjoint`).
            check_root: check that ``run``'s output is a root (see
                :func:`~implicit_torch.implicit_solve`'s ``root_tol``); a solver class that
                reports its own convergence turns it off, so that a failure is reported once.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(Adjoint):
    """Differentiate by the implicit function theorem, with ``solve`` for ``∂ₓF``.

    Attributes:
        solve: a linear solver name (``"cg"``, ``"gmres"``, ``"auto"``, ...), a callable
            ``solve(matvec, b) -> x``, or a :class:`~implicit_torch.WarmStart`; ``None``
            takes the caller's default.
    """

    solve: Solve | None = None

    def __post_init__(self):
        if self.solve is not None:
            get_solver(self.solve)  # an unknown name or a non-callable fails here

    def apply(self, run, optimality_fn, init, params, *, has_aux=False, batched=False,
              default_solve="cg", fixed_point_fn=None, check_root=True):  # fmt: skip
        solve = default_solve if self.solve is None else self.solve
        return implicit_solve(
            run, optimality_fn, init, *params, solve=solve, has_aux=has_aux, batched=batched,
            on_failure="warn" if check_root else "ignore",
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(Adjoint):
    """Differentiate through the forward solver's recorded iterations (autograd)."""

    def apply(self, run, optimality_fn, init, params, *, has_aux=False, batched=False,
              default_solve="cg", fixed_point_fn=None, check_root=True):  # fmt: skip
        return run(tree_detach(init), *params)


@dataclasses.dataclass(frozen=True)
class PhantomAdjoint(Adjoint):
    """The phantom gradient of a fixed point: ``steps`` recorded damped steps from ``x*``.

    Attributes:
        steps: number of recorded steps ``k ≥ 1``.
        damping: ``λ`` in ``(0, 1]``.
    """

    steps: int = 1
    damping: float = 1.0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"PhantomAdjoint: steps must be an integer ≥ 1, got {self.steps!r}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"PhantomAdjoint: damping must be in (0, 1], got {self.damping!r}")

    def apply(self, run, optimality_fn, init, params, *, has_aux=False, batched=False,
              default_solve="cg", fixed_point_fn=None, check_root=True):  # fmt: skip
        if fixed_point_fn is None:
            raise TypeError(
                "PhantomAdjoint applies to fixed-point problems x = T(x, θ) only: this solver "
                "has no fixed-point map. Use ImplicitAdjoint or UnrolledAdjoint."
            )
        with torch.no_grad():
            out = run(tree_detach(init), *params)
        x, aux = out if has_aux else (out, None)
        x = tree_detach(x)
        lam = self.damping
        for _ in range(self.steps):
            fx = fixed_point_fn(x, *params)
            x = fx if lam == 1 else tree_add_scalar_mul(x, lam, tree_sub(fx, x))
        return (x, aux) if has_aux else x


def from_flags(implicit_diff: bool, implicit_diff_solve: Solve | None, unroll: bool) -> Adjoint:
    """The adjoint that JAXopt's solver fields describe (``unroll`` overrides
    ``implicit_diff``)."""
    if unroll or not implicit_diff:
        return UnrolledAdjoint()
    return ImplicitAdjoint(implicit_diff_solve)
