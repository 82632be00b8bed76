"""Block coordinate descent for composite problems with a block-separable non-smooth part.

Minimises ``fun(W, *args) + Σ_j g(W[j], hyperparams_prox)`` where ``fun`` is a
:class:`~implicit_torch.objective.CompositeLinearFunction`, ``fun(W) = subfun(A W + c) +
⟨b, W⟩``, and ``g`` is given by its proximal operator ``block_prox``. The blocks are the
entries of a vector ``W`` of shape ``(d,)`` or the rows of a matrix ``W`` of shape ``(d, k)``,
visited cyclically; block ``j`` takes one proximal-gradient step with its own step
``1 / L_j``, ``L_j = L_sub ‖A[:, j]‖²`` (Tseng & Yun, 2009; Friedman et al., 2010 for the
lasso). The predictions ``z = A W + c`` are carried along, so a block costs ``O(m k)``.

The solution is differentiated through the proximal-gradient fixed point of the whole problem
(Blondel et al., 2022: the optimality condition need not come from the forward solver).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch import _runtime
from implicit_torch.objective import CompositeLinearFunction
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = ["BlockCoordinateDescent", "BlockCoordinateDescentState", "make_block_prox_grad_fun"]

Tensor = torch.Tensor


def _rowwise(block_prox: Callable[..., Any]) -> Callable[..., Any]:
    """``block_prox`` applied to every block (entry or row) of ``V``: ``(d, ...) → (d, ...)``."""
    return torch.func.vmap(block_prox, in_dims=(0, None, None))


def make_block_prox_grad_fun(
    fun: Callable[..., Tensor], block_prox: Callable[..., Any], stepsize: Any = 1.0
) -> Callable[..., Any]:
    """Proximal-gradient fixed point with a block-separable prox:

    ``F(W, hyperparams_prox, *args)[j] = block_prox(W[j] − η ∂_j fun(W, *args),
    hyperparams_prox, η) − W[j]`` for every block ``j`` (entry or row of ``W``).

    Zero exactly at the minimisers of ``fun + Σ_j g(W[j])`` for any ``η > 0``.

    Args:
        fun: ``fun(W, *args)``, a scalar tensor; ``W`` of shape ``(d,)`` or ``(d, k)``.
        block_prox: ``block_prox(w, hyperparams_prox, scaling)`` on one block (a 0-d tensor or a
            row of shape ``(k,)``); applied to all blocks at once with ``torch.func.vmap``.
        stepsize: ``η > 0`` (number or 0-d tensor).

    Returns:
        ``F(W, hyperparams_prox, *args)``, shaped like ``W``.
    """
    grad = torch.func.grad(fun)
    prox = _rowwise(block_prox)

    def block_prox_grad_residual(W, hyperparams_prox, *args):
        return prox(W - stepsize * grad(W, *args), hyperparams_prox, stepsize) - W

    return block_prox_grad_residual


class BlockCoordinateDescentState(NamedTuple):
    """State of :class:`BlockCoordinateDescent`.

    Attributes:
        iter_num: sweeps run (int64, 0-d).
        error: ``(Σ_j L_j² ‖W⁺[j] − W[j]‖²)^½`` over the last sweep: the norm of the
            block-wise gradient mapping (``inf`` before the first sweep).
        predictions: ``z = A W + c`` at the current ``W``.
    """

    iter_num: Tensor
    error: Tensor
    predictions: Tensor


@dataclasses.dataclass
class BlockCoordinateDescent(IterativeSolver):
    """Cyclic block coordinate descent: ``min_W fun(W, *args) + Σ_j g(W[j], hyperparams_prox)``.

    One iteration is a sweep over the blocks ``j = 0, …, d − 1`` (entries of ``W`` of shape
    ``(d,)``, rows of ``W`` of shape ``(d, k)``), each updated by

    ``W[j] ← block_prox(W[j] − ∂_j fun(W) / L_j, hyperparams_prox, 1 / L_j)`` with
    ``∂_j fun(W) = A[:, j]ᵀ ∇subfun(z) + b[j]`` and ``z ← z + A[:, j] ⊗ (W⁺[j] − W[j])``.

    ``run(init, hyperparams_prox, *args)``; the solution is differentiable in
    ``hyperparams_prox`` and ``args`` through the fixed point of
    :func:`make_block_prox_grad_fun` with ``η = 1 / max_j L_j``.

    Example::

        solver = BlockCoordinateDescent(fun=objective.binary_logistic_regression,
                                        block_prox=prox.prox_lasso, tol=1e-8)
        w = solver.run(torch.zeros(d), l1reg, (X, y)).params

    Attributes:
        fun: a :class:`~implicit_torch.objective.CompositeLinearFunction` with
            ``subfun_lipschitz`` (e.g. :data:`~implicit_torch.objective.least_squares`,
            :data:`~implicit_torch.objective.binary_logistic_regression`,
            :data:`~implicit_torch.objective.multiclass_logistic_regression`,
            :data:`~implicit_torch.objective.multiclass_linear_svm_dual`).
        block_prox: ``block_prox(w, hyperparams_prox, scaling)`` on one block (see
            :mod:`implicit_torch.prox`; a projection through
            :func:`~implicit_torch.prox.make_prox_from_projection`).
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`; an
            iteration is a sweep and the error is that of :class:`BlockCoordinateDescentState`.
    """

    fun: CompositeLinearFunction
    block_prox: Callable[..., Any]

    def _check_fun(self) -> None:
        if not isinstance(self.fun, CompositeLinearFunction):
            raise TypeError(
                "BlockCoordinateDescent needs fun to be a CompositeLinearFunction (e.g. "
                f"implicit_torch.objective.least_squares), got {self.fun!r}"
            )

    def _lipschitz(self, args: tuple) -> Tensor:
        L = self.fun.columnwise_lipschitz_const(*args)
        # A zero column: its block's smooth part is linear; any positive step will do.
        return torch.where(L > 0, L, torch.ones_like(L))

    def init_state(
        self, init: Tensor, hyperparams_prox: Any = None, *args: Any
    ) -> BlockCoordinateDescentState:
        self._check_fun()
        return BlockCoordinateDescentState(
            iter_num=torch.zeros((), dtype=torch.int64, device=init.device),
            error=torch.tensor(math.inf, dtype=init.dtype, device=init.device),
            predictions=self.fun.predictions(init, *args),
        )

    def update(
        self, params: Tensor, state: BlockCoordinateDescentState, hyperparams_prox: Any, *args
    ) -> OptStep:
        """One cyclic sweep over all blocks."""
        fun = self.fun
        A_cols = fun.linear_op(*args).T  # row j is column A[:, j]
        L = self._lipschitz(args)
        b = fun.linear_term(*args) if fun.linear_term is not None else None
        # Without autograd or torch.func to record, z is updated in place (on a copy: the
        # state passed in may be kept by the driver's masking). Otherwise out of place.
        in_place = not torch.is_grad_enabled() and not _runtime.under_functorch()
        z = state.predictions.clone() if in_place else state.predictions
        steps = 1.0 / L
        blocks = list(params.unbind(0))
        for j in range(len(blocks)):
            a_j = A_cols[j]
            g_j = a_j @ fun.subfun_grad(z, *args)
            if b is not None:
                g_j = g_j + b[j]
            eta = steps[j]
            w_j = blocks[j]
            new_w_j = self.block_prox(w_j - eta * g_j, hyperparams_prox, eta)
            delta = new_w_j - w_j
            change = torch.outer(a_j, delta) if delta.dim() == 1 else a_j * delta
            if in_place:
                z.add_(change)
            else:
                z = z + change
            blocks[j] = new_w_j
        new_params = torch.stack(blocks, 0)
        # Each block moves once per sweep, so the sweep's change is the blocks' steps.
        moves = (new_params - params).reshape(params.shape[0], -1)
        error = torch.sqrt((L * L * (moves * moves).sum(1)).sum())
        new_state = BlockCoordinateDescentState(state.iter_num + 1, error, z)
        return OptStep(new_params, new_state)

    def optimality_fun(self, params: Tensor, hyperparams_prox: Any, *args: Any) -> Tensor:
        """``block_prox(W − η∇fun(W), hyperparams_prox, η) − W`` blockwise,
        ``η = 1 / max_j L_j`` (detached: any positive step gives the same solution)."""
        self._check_fun()
        eta = 1.0 / self._lipschitz(args).detach().max()
        F = make_block_prox_grad_fun(self.fun, self.block_prox, eta)
        return F(params, hyperparams_prox, *args)

    def run(self, init: Tensor, hyperparams_prox: Any = None, *args: Any) -> OptStep:
        """Solve from ``init``; see :meth:`IterativeSolver.run`."""
        self._check_fun()
        return super().run(init, hyperparams_prox, *args)
