"""Block coordinate descent for composite problems with a block-separable non-smooth part.

Minimises ``fun(W, *args) + Σ_j g(W[j], hyperparams_prox)`` where ``fun`` is a
:class:`CompositeLinearFunction`, ``fun(W) = subfun(A W + c) + ⟨b, W⟩`` (defined here, with
the solver that exploits it; :mod:`implicit_torch.objective` builds the usual ones and
re-exports it), and ``g`` is given by its proximal operator ``block_prox``. The blocks are the
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
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = [
    "BlockCoordinateDescent",
    "BlockCoordinateDescentState",
    "CompositeLinearFunction",
    "make_block_prox_grad_fun",
]

Tensor = torch.Tensor


class CompositeLinearFunction:
    """``f(W, *args) = subfun(A W + c, *args) + ⟨b, W⟩``: a smooth outer function of an affine
    map of ``W``, plus a linear term.

    Shapes: ``A`` is ``(m, d)``; ``W`` is ``(d,)`` or ``(d, k)``; the predictions
    ``z = A W + c`` are ``(m,)`` or ``(m, k)``; ``b`` is shaped like ``W``. Block ``j`` of ``W``
    (its entry or row ``j``) enters ``z`` only through column ``A[:, j]``, so
    ``∂f/∂W[j] = A[:, j]ᵀ ∇subfun(z) + b[j]`` and the block's gradient is Lipschitz with
    constant ``L_sub · ‖A[:, j]‖²`` when ``∇subfun`` is ``L_sub``-Lipschitz.

    Args:
        subfun: ``subfun(z, *args)``, a scalar tensor.
        linear_op: ``linear_op(*args) -> A``.
        offset: ``offset(*args) -> c`` (broadcastable to ``z``), or None for ``c = 0``.
        linear_term: ``linear_term(*args) -> b``, or None for ``b = 0``.
        subfun_grad: ``subfun_grad(z, *args) -> ∇subfun(z)`` in closed form; None: autograd.
        subfun_lipschitz: ``subfun_lipschitz(*args) -> L_sub`` (number or 0-d tensor).
        predictions_fun: ``predictions_fun(W, *args) -> A W + c`` computed more cheaply than
            by forming ``c`` (e.g. ``A (W − W₀)``); None: ``linear_op(*args) @ W + c``.
        name: the objective's name (``__name__``).
    """

    def __init__(
        self,
        subfun: Callable[..., Tensor],
        linear_op: Callable[..., Tensor],
        *,
        offset: Callable[..., Tensor] | None = None,
        linear_term: Callable[..., Tensor] | None = None,
        subfun_grad: Callable[..., Tensor] | None = None,
        subfun_lipschitz: Callable[..., Any] | None = None,
        predictions_fun: Callable[..., Tensor] | None = None,
        name: str = "composite_linear_function",
        doc: str | None = None,
    ):
        self.subfun = subfun
        self.linear_op = linear_op
        self.offset = offset
        self.linear_term = linear_term
        self._subfun_grad = subfun_grad
        self.subfun_lipschitz = subfun_lipschitz
        self._predictions_fun = predictions_fun
        self.__name__ = name
        self.__doc__ = doc

    def __repr__(self) -> str:
        return f"<CompositeLinearFunction {self.__name__}>"

    def predictions(self, W: Tensor, *args: Any) -> Tensor:
        """``z = A W + c``, shape ``(m,)`` or ``(m, k)``."""
        if self._predictions_fun is not None:
            return self._predictions_fun(W, *args)
        z = self.linear_op(*args) @ W
        return z if self.offset is None else z + self.offset(*args)

    def subfun_grad(self, z: Tensor, *args: Any) -> Tensor:
        """``∇subfun(z, *args)``, shaped like ``z`` (closed form when given, else autograd)."""
        if self._subfun_grad is not None:
            return self._subfun_grad(z, *args)
        return torch.func.grad(self.subfun)(z, *args)

    def columnwise_lipschitz_const(self, *args: Any) -> Tensor:
        """``L_sub · ‖A[:, j]‖²`` for every ``j``, shape ``(d,)``: the Lipschitz constants of the
        block gradients ``∂f/∂W[j]``."""
        if self.subfun_lipschitz is None:
            raise ValueError(f"{self.__name__} does not define subfun_lipschitz")
        A = self.linear_op(*args)
        return self.subfun_lipschitz(*args) * (A * A).sum(0)

    def __call__(self, W: Tensor, *args: Any) -> Tensor:
        value = self.subfun(self.predictions(W, *args), *args)
        if self.linear_term is not None:
            value = value + (self.linear_term(*args) * W).sum()
        return value

    def value_and_grad(self, W: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        """``(f(W, *args), ∇_W f(W, *args))`` with ``∇_W f = Aᵀ ∇subfun(A W + c) + b``: the
        form solvers take with ``value_and_grad=True``, one product with ``A`` each way and no
        autograd pass (the closed-form ``subfun_grad`` when given). Differentiable in ``W`` and
        ``args``."""
        z = self.predictions(W, *args)
        value = self.subfun(z, *args)
        grad = self.linear_op(*args).mT @ self.subfun_grad(z, *args)
        if self.linear_term is not None:
            b = self.linear_term(*args)
            value = value + (b * W).sum()
            grad = grad + b
        return value, grad


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

    ``run(init_params, hyperparams_prox, *args)``; the solution is differentiable in
    ``hyperparams_prox`` and ``args`` through the fixed point of
    :func:`make_block_prox_grad_fun` with ``η = 1 / max_j L_j``.

    Example::

        solver = BlockCoordinateDescent(fun=objective.binary_logistic_regression,
                                        block_prox=prox.prox_lasso, tol=1e-8)
        w = solver.run(torch.zeros(d), l1reg, (X, y)).params

    Attributes:
        fun: a :class:`CompositeLinearFunction` with
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
        self, init_params: Tensor, hyperparams_prox: Any = None, *args: Any
    ) -> BlockCoordinateDescentState:
        self._check_fun()
        return BlockCoordinateDescentState(
            iter_num=torch.zeros((), dtype=torch.int64, device=init_params.device),
            error=torch.tensor(math.inf, dtype=init_params.dtype, device=init_params.device),
            predictions=self.fun.predictions(init_params, *args),
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

    def run(self, init_params: Tensor, hyperparams_prox: Any = None, *args: Any) -> OptStep:
        """Solve from ``init_params``; see :meth:`IterativeSolver.run`."""
        self._check_fun()
        return super().run(init_params, hyperparams_prox, *args)
