"""Plain fixed-point iteration ``x⁺ = T(x, *args)``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._tree import tree_l2_norm, tree_leaves, tree_sub
from implicit_torch.optimality import make_fixed_point_fun
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = ["FixedPointIteration", "FixedPointState"]


class FixedPointState(NamedTuple):
    """State of :class:`FixedPointIteration`.

    Attributes:
        iter_num: iterations run (int64, 0-d).
        error: ``‖T(x) − x‖`` at the last iterate ``x`` that ``T`` was applied to.
    """

    iter_num: torch.Tensor
    error: torch.Tensor


@dataclasses.dataclass
class FixedPointIteration(IterativeSolver):
    """Fixed-point iteration (Picard / Banach): ``x⁺ = T(x, *args)``.

    Converges linearly when ``T`` is a contraction in ``x``. ``run(init_params, *args)``; the
    solution is differentiable in ``args`` through ``F = T − x`` (default linear solver GMRES, since
    ``∂ₓT − I`` is not symmetric in general). ``state.error = ‖T(x) − x‖``.

    Attributes:
        fixed_point_fun: ``T(x, *args)``, a pytree like ``x``.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    fixed_point_fun: Callable[..., Any]

    def init_state(self, init_params: Any, *args: Any) -> FixedPointState:
        leaf = tree_leaves(init_params)[0]
        return FixedPointState(
            iter_num=torch.zeros((), dtype=torch.int64, device=leaf.device),
            error=torch.tensor(math.inf, dtype=leaf.dtype, device=leaf.device),
        )

    def update(self, params: Any, state: FixedPointState, *args: Any) -> OptStep:
        """``x⁺ = T(x)``, recording ``‖T(x) − x‖``."""
        new = self.fixed_point_fun(params, *args)
        error = tree_l2_norm(tree_sub(new, params))
        return OptStep(new, FixedPointState(state.iter_num + 1, error))

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``T(params, *args) − params``."""
        return make_fixed_point_fun(self.fixed_point_fun)(params, *args)
