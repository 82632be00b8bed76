"""Anderson acceleration of a fixed-point iteration ``x = T(x, *args)``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._tree import Raveler, tree_leaves
from implicit_torch.optimality import make_fixed_point_fun
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = ["AndersonAcceleration", "AndersonState"]

Tensor = torch.Tensor


class AndersonState(NamedTuple):
    """State of :class:`AndersonAcceleration`; ``N`` is the number of unknowns.

    Attributes:
        iter_num: iterations run (int64, 0-d).
        error: ``‖T(x) − x‖`` at the last iterate ``x`` that ``T`` was applied to.
        params_history: ``(history_size, N)``, the last iterates ``x_i`` (flattened), oldest
            first.
        residuals_history: ``(history_size, N)``, their residuals ``g_i = T(x_i) − x_i``.
        valid: ``(history_size,)`` bool, which history rows hold an iterate yet.
    """

    iter_num: Tensor
    error: Tensor
    params_history: Tensor
    residuals_history: Tensor
    valid: Tensor


@dataclasses.dataclass
class AndersonAcceleration(IterativeSolver):
    """Anderson acceleration (Anderson, 1965; Walker & Ni, 2011, "Anderson Acceleration for
    Fixed-Point Iterations") of ``x = T(x, *args)``.

    With the last ``m`` iterates ``x_i`` and residuals ``g_i = T(x_i) − x_i``, the weights

        ``α = argmin_{Σα = 1} ‖Σ α_i g_i‖² + ridge · s · ‖α‖²``

    (``s`` the mean ``‖g_i‖²``, so the regularisation is relative: unlike JAXopt's absolute
    ridge it does not take over as the residuals vanish) give ``x⁺ = Σ α_i (x_i + β g_i)``. The
    weights come from the bordered system ``(G + ridge·s·I) z = 1``, ``α = z / Σz``, with
    ``G_ij = ⟨g_i, g_j⟩``. Every ``mixing_frequency``-th iteration mixes; the others take the
    damped step ``x + β g``. The history is a shift register of fixed size, so an iteration has
    static shapes and no host synchronisation.

    ``run(init_params, *args)``; differentiable in ``args`` through ``F = T − x`` (GMRES by
    default). ``state.error = ‖T(x) − x‖``.

    Attributes:
        fixed_point_fun: ``T(x, *args)``, a pytree like ``x``.
        history_size: ``m``, the number of iterates mixed.
        mixing_frequency: mix every this many iterations.
        beta: damping ``β`` (1: undamped).
        ridge: relative Tikhonov regularisation of the weights' least-squares problem.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    fixed_point_fun: Callable[..., Any]
    history_size: int = 5
    mixing_frequency: int = 1
    beta: float = 1.0
    ridge: float = 1e-5

    def init_state(self, init_params: Any, *args: Any) -> AndersonState:
        if self.history_size < 1 or self.mixing_frequency < 1:
            raise ValueError("history_size and mixing_frequency must be positive integers")
        flat = _flat(init_params)
        m, kw = self.history_size, dict(dtype=flat.dtype, device=flat.device)
        return AndersonState(
            iter_num=torch.zeros((), dtype=torch.int64, device=flat.device),
            error=torch.tensor(math.inf, **kw),
            params_history=torch.zeros((m, flat.numel()), **kw),
            residuals_history=torch.zeros((m, flat.numel()), **kw),
            valid=torch.zeros((m,), dtype=torch.bool, device=flat.device),
        )

    def update(self, params: Any, state: AndersonState, *args: Any) -> OptStep:
        """One Anderson (or, between mixings, damped fixed-point) step."""
        raveler = Raveler(params, batched=False)
        x = raveler.ravel(params).reshape(-1)
        g = raveler.ravel(self.fixed_point_fun(params, *args)).reshape(-1) - x
        error = torch.linalg.vector_norm(g)
        X = torch.cat([state.params_history[1:], x[None]])
        R = torch.cat([state.residuals_history[1:], g[None]])
        valid = torch.cat([state.valid[1:], torch.ones_like(state.valid[:1])])
        x_new = self._mix(X, R, valid)
        if self.mixing_frequency > 1:
            mix = state.iter_num % self.mixing_frequency == 0
            x_new = torch.where(mix, x_new, x + self.beta * g)
        new_state = AndersonState(state.iter_num + 1, error, X, R, valid)
        return OptStep(raveler.unravel(x_new.reshape(1, -1)), new_state)

    def _mix(self, X: Tensor, R: Tensor, valid: Tensor) -> Tensor:
        G = R @ R.mT
        w = valid.to(G.dtype)
        # Relative regularisation: the weights are invariant to the scale of the residuals.
        scale = (torch.diagonal(G) * w).sum() / w.sum() + torch.finfo(G.dtype).tiny
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        both = valid[:, None] & valid[None, :]
        # Rows of the history not filled yet get the equation α_i = 0.
        M = torch.where(both, G / scale + self.ridge * eye, eye)
        z = torch.linalg.solve(M, w)
        alpha = z / z.sum()
        return alpha @ (X + self.beta * R)

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``T(params, *args) − params``."""
        return make_fixed_point_fun(self.fixed_point_fun)(params, *args)


def _flat(tree: Any) -> Tensor:
    leaves = tree_leaves(tree)
    if len(leaves) == 1:
        return leaves[0].reshape(-1)
    return Raveler(tree, batched=False).ravel(tree).reshape(-1)
