"""Mirror descent, with the entropic (KL) geometry of products of simplices built in.

Minimises ``fun(x, *args)`` over a convex set ``C`` through a mirror map ``∇φ``:
``x⁺ = argmin_{z ∈ C} η⟨∇fun(x), z⟩ + D_φ(z, x)``, which for Legendre ``φ`` is
``x⁺ = P_C^φ(∇φ*(∇φ(x) − η∇fun(x)))`` (Nemirovski & Yudin, 1983; Beck & Teboulle, 2003). With
the negative entropy ``φ(x) = Σ x log x`` on the simplex, the step is the exponentiated
gradient ``x⁺ ∝ x ⊙ exp(−η ∇fun(x))``, i.e. ``x⁺ = softmax(log x − η∇fun(x))`` row by row.

The solution is differentiated through the step's fixed point ``x = T_η(x)`` (Blondel et al.,
2022, §2.2: "mirror descent fixed point"), which holds exactly at a minimiser.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._result import Status
from implicit_torch._tree import tree_l2_norm, tree_leaves, tree_sub
from implicit_torch.optimality import gradient_of
from implicit_torch.prox import with_default_hyperparams
from implicit_torch.solvers.base import (
    Failure,
    IterativeSolver,
    OptStep,
    objective_value_and_grad,
    step_error,
)

__all__ = [
    "MirrorDescent",
    "MirrorDescentState",
    "make_mirror_descent_fun",
    "projection_grad_kl_simplex",
    "projection_kl_simplex",
    "safe_log",
]

Tensor = torch.Tensor


def safe_log(x: Tensor) -> Tensor:
    """``log x`` for ``x ≥ 0``, ``−∞`` at ``x = 0``, with a zero (never NaN) derivative there.

    The mirror map of the negative entropy: with it a coordinate at exactly 0 stays at 0 under
    the entropic step (``softmax`` of ``−∞`` is 0), and its row of the step's Jacobian is 0.
    """
    positive = x > 0
    # log of 1 in the branch not taken, so that its derivative 1/x is never evaluated at 0.
    log = torch.log(torch.where(positive, x, torch.ones_like(x)))
    return torch.where(positive, log, torch.full_like(x, -math.inf))


def projection_kl_simplex(logits: Tensor, value: Any = 1.0) -> Tensor:
    """KL (Bregman) projection onto the simplex ``{p ≥ 0, Σ p = value}`` of each row (last
    dimension) of the point whose entropic mirror image is ``logits``:

    ``argmin_{p ∈ Δ} KL(p, exp(logits)) = value · softmax(logits)``.

    Args:
        logits: shape ``(..., k)``.
        value: the row sum, a positive number or a tensor broadcastable to ``(..., 1)``.

    Returns:
        Shape ``(..., k)``.
    """
    return value * torch.softmax(logits, dim=-1)


def projection_grad_kl_simplex(
    x: Tensor, x_fun_grad: Tensor, stepsize: Any, hyperparams_proj: Any = None
) -> Tensor:
    """The entropic mirror-descent step on a product of simplices (exponentiated gradient):

    ``x⁺ = value · softmax(log x − η ∇fun(x))`` over the last dimension, i.e.
    ``x⁺ ∝ x ⊙ exp(−η ∇fun(x))`` row by row, with entries below ``tiny / eps`` of the dtype
    (about 1e-292 in float64, 1e-31 in float32) set to exactly 0 (they then stay 0).

    Args:
        x: ``(..., k)``, every row on the simplex of sum ``value`` (entries ``> 0``; zeros stay
            zero).
        x_fun_grad: ``∇fun(x)``, shaped like ``x``.
        stepsize: ``η > 0``.
        hyperparams_proj: the row sum ``value`` (None means 1).

    Returns:
        ``x⁺``, shaped like ``x``.
    """
    value = 1.0 if hyperparams_proj is None else hyperparams_proj
    p = projection_kl_simplex(safe_log(x) - stepsize * x_fun_grad, value)
    # Entries that decay to zero are set to exactly 0 once below tiny/eps (~1e-292 in float64):
    # nearer to the subnormal range, p_j / x_j (the step's Jacobian on that entry, through
    # the derivative of log) would lose all its digits, and the fixed point's Jacobian could
    # look singular. The row sums move by at most k · 1e-292.
    floor = torch.finfo(p.dtype).tiny / torch.finfo(p.dtype).eps
    return torch.where(p > floor, p, torch.zeros_like(p))


def make_mirror_descent_fun(
    fun: Callable[..., Tensor],
    projection_grad: Callable[..., Any],
    stepsize: Any = 1.0,
    value_and_grad: bool = False,
) -> Callable[..., Any]:
    """Fixed point of mirror descent for ``min_{x ∈ C} fun(x, *args)``:

    ``F(x, hyperparams_proj, *args) = projection_grad(x, ∇fun(x, *args), η, hyperparams_proj)
    − x`` with a fixed step ``η``.

    ``x*`` is a minimiser iff ``F(x*) = 0`` (for the entropic step, under strict
    complementarity the zero coordinates of ``x*`` are attracting fixed points, with
    ``∂T_i/∂x_i = exp(−η (∇_i fun − λ))`` < 1, so ``∂ₓF`` is invertible).

    Args:
        fun: ``fun(x, *args)``, a scalar tensor.
        projection_grad: ``projection_grad(x, x_fun_grad, stepsize, hyperparams_proj)``.
        stepsize: ``η > 0`` (number or 0-d tensor).
        value_and_grad: ``fun`` returns ``(value, ∇ₓ fun)`` (see
            :func:`implicit_torch.optimality.gradient_of`).

    Returns:
        ``F(x, hyperparams_proj, *args)``, shaped like ``x``. Its Jacobian is not symmetric
        (use ``solve="gmres"``).
    """
    grad = gradient_of(fun, value_and_grad)

    def mirror_descent_residual(x, hyperparams_proj, *args):
        return tree_sub(projection_grad(x, grad(x, *args), stepsize, hyperparams_proj), x)

    return mirror_descent_residual


class MirrorDescentState(NamedTuple):
    """State of :class:`MirrorDescent`.

    Attributes:
        iter_num: iterations run (int64, 0-d).
        stepsize: the step ``η`` of the last iteration (0-d).
        error: ``‖x⁺ − x‖ / η`` of the last iteration (``inf`` before the first); where the
            step did not move ``x`` at all (a step below its rounding), the same measure at
            the step of :meth:`MirrorDescent.optimality_fun`, so it is never 0 away from a
            solution.
        stalled: the last step did not move ``x`` although the error is above zero (a step
            schedule that vanished): the solver stops and reports it (bool, 0-d).
    """

    iter_num: Tensor
    stepsize: Tensor
    error: Tensor
    stalled: Tensor


@dataclasses.dataclass
class MirrorDescent(IterativeSolver):
    """Mirror descent: ``min_{x ∈ C(hyperparams_proj)} fun(x, *args)``.

    ``x⁺ = projection_grad(x, ∇fun(x, *args), η_t, hyperparams_proj)`` with
    ``η_t = stepsize`` or ``stepsize(t)``. ``run(init_params, hyperparams_proj, *args)``; the
    solution is differentiable in ``hyperparams_proj`` and ``args`` through the fixed point of
    :func:`make_mirror_descent_fun` (step: ``stepsize`` if it is a number, else 1, as in
    JAXopt).

    Example (entropic geometry, every row of ``β`` on the simplex)::

        solver = MirrorDescent(fun=objective.multiclass_linear_svm_dual,
                               projection_grad=projection_grad_kl_simplex, stepsize=eta)
        beta = solver.run(torch.full((n, k), 1 / k), None, l2reg, (X, Y)).params

    Attributes:
        fun: ``fun(x, *args)``, a scalar tensor.
        projection_grad: ``projection_grad(x, x_fun_grad, stepsize, hyperparams_proj) -> x⁺``,
            the mirror step (:func:`projection_grad_kl_simplex`, or one built by
            :meth:`make_projection_grad`).
        stepsize: ``η > 0``, a number or a schedule ``stepsize(iter_num) -> η`` (``iter_num`` a
            0-d int64 tensor). For the entropic step, ``η ≤ 1 / L`` with ``L`` the Lipschitz
            constant of ``∇fun`` from ``ℓ1`` (per row) to ``ℓ∞`` converges.
        value_and_grad: ``fun`` returns ``(value, gradient)`` itself, as for
            :class:`~implicit_torch.solvers.proximal_gradient.ProximalGradient`.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`; the error
            is ``‖x⁺ − x‖ / η``.
    """

    fun: Callable[..., Tensor]
    projection_grad: Callable[..., Any] = projection_grad_kl_simplex
    stepsize: float | Callable[[Tensor], Any] = 1.0
    value_and_grad: bool = False

    @staticmethod
    def make_projection_grad(
        projection: Callable[..., Any], mapping_fun: Callable[[Any], Any]
    ) -> Callable[..., Any]:
        """``projection_grad(x, g, η, hp) = projection(mapping_fun(x) − η g, hp)``: a mirror
        step from a mirror map ``mapping_fun = ∇φ`` and the Bregman projection ``projection``
        of the point whose mirror image is its first argument (e.g. :func:`safe_log` and
        :func:`projection_kl_simplex`). ``hyperparams_proj=None`` means the projection's
        defaults."""
        project = with_default_hyperparams(projection)

        def projection_grad(x, x_fun_grad, stepsize, hyperparams_proj=None):
            return project(mapping_fun(x) - stepsize * x_fun_grad, hyperparams_proj)

        return projection_grad

    def _stepsize(self, iter_num: Tensor, like: Tensor) -> Tensor:
        eta = self.stepsize(iter_num) if callable(self.stepsize) else self.stepsize
        return torch.as_tensor(eta, dtype=like.dtype, device=like.device)

    def _diff_stepsize(self) -> Any:
        return self.stepsize if not callable(self.stepsize) else 1.0

    def init_state(
        self, init_params: Any, hyperparams_proj: Any = None, *args: Any
    ) -> MirrorDescentState:
        leaf = tree_leaves(init_params)[0]
        iter_num = torch.zeros((), dtype=torch.int64, device=leaf.device)
        return MirrorDescentState(
            iter_num=iter_num,
            stepsize=self._stepsize(iter_num, leaf),
            error=torch.tensor(math.inf, dtype=leaf.dtype, device=leaf.device),
            stalled=torch.zeros((), dtype=torch.bool, device=leaf.device),
        )

    def update(
        self, params: Any, state: MirrorDescentState, hyperparams_proj: Any, *args: Any
    ) -> OptStep:
        """One mirror step."""
        eta = self._stepsize(state.iter_num, tree_leaves(params)[0])
        _, g = objective_value_and_grad(self.fun, params, args, self.value_and_grad)
        x_new = self.projection_grad(params, g, eta, hyperparams_proj)
        ref_eta = self._diff_stepsize()

        def reference():
            x_ref = self.projection_grad(params, g, ref_eta, hyperparams_proj)
            return tree_l2_norm(tree_sub(x_ref, params)) / ref_eta

        error, has_moved = step_error(x_new, params, eta, reference)
        stalled = ~has_moved & (error > 0)
        return OptStep(x_new, MirrorDescentState(state.iter_num + 1, eta, error, stalled))

    def _failure_messages(self, state: MirrorDescentState) -> dict[Status, Failure]:
        return {
            Status.STALLED: (
                "stalled",
                f"its step η = {float(state.stepsize):.3g} no longer moves the iterate",
                "use a step (schedule) that does not vanish.",
            )
        }

    def optimality_fun(self, params: Any, hyperparams_proj: Any, *args: Any) -> Any:
        """``projection_grad(x, ∇fun(x), η, hyperparams_proj) − x``."""
        F = make_mirror_descent_fun(
            self.fun, self.projection_grad, self._diff_stepsize(), self.value_and_grad
        )
        return F(params, hyperparams_proj, *args)

    def run(self, init_params: Any, hyperparams_proj: Any = None, *args: Any) -> OptStep:
        """Solve from ``init_params``; see :meth:`IterativeSolver.run`."""
        return super().run(init_params, hyperparams_proj, *args)
