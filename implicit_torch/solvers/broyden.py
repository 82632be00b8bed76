"""Broyden's (good) method for a root of ``F(x, *args) = 0``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._tree import Raveler, tree_leaves
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = ["Broyden", "BroydenState"]

Tensor = torch.Tensor


class BroydenState(NamedTuple):
    """State of :class:`Broyden`; ``N`` is the number of unknowns (all leaves, flattened).

    Attributes:
        iter_num: iterations run (int64, 0-d).
        value: ``F(x)`` at the current iterate, flattened, ``(N,)``.
        error: ``‖F(x)‖`` at the current iterate.
        inv_jacobian: ``(N, N)``, the current approximation ``H`` of ``(∂ₓF)⁻¹`` (``(0, 0)``
            with ``memory_size``).
        low_rank_u, low_rank_v: with ``memory_size = m``, ``(m, N)`` each: ``H = I / a + Σ_k
            u_k v_kᵀ`` over the rows (zero rows are unused slots); ``(0, N)`` otherwise.
    """

    iter_num: Tensor
    value: Tensor
    error: Tensor
    inv_jacobian: Tensor
    low_rank_u: Tensor
    low_rank_v: Tensor


@dataclasses.dataclass
class Broyden(IterativeSolver):
    """Broyden's "good" method (Broyden, 1965) for ``F(x, *args) = 0``, updating an
    approximation ``H`` of the inverse Jacobian.

    ``s = −stepsize · H F(x)``, ``x⁺ = x + s``, ``y = F(x⁺) − F(x)``, then the rank-one update

        ``H⁺ = H + (s − H y) sᵀH / (sᵀ H y)``

    (Sherman–Morrison applied to the good-Broyden update ``J⁺ = J + (y − J s) sᵀ / sᵀs``),
    skipped when ``|sᵀHy|`` is negligible. ``H₀`` is ``(∂ₓF(init_params))⁻¹`` formed by
    ``torch.func.jacrev`` (``N`` reverse passes, vectorised; a pseudo-inverse if singular) when
    ``jacobian_init`` is None, or ``I / jacobian_init`` for a number (e.g. ``-1`` for a
    fixed-point residual ``F = T − x`` with a contractive ``T``). ``H`` is dense, ``N × N``: for
    small to moderate ``N``. With ``memory_size = m`` (limited-memory Broyden, as used for deep
    equilibrium models), ``H = I / jacobian_init + Σ u_k v_kᵀ`` is kept as at most ``m`` rank-one
    terms, ``O(m N)`` memory; once they are all used, the oldest term is overwritten. No line
    search.

    ``run(init_params, *args)``; ``init_params`` a tensor or pytree; ``F`` returns a pytree like
    ``x``. The solution is differentiable in ``args`` through ``F`` itself (default linear solver
    GMRES). ``state.error = ‖F(x)‖`` at the returned iterate.

    Attributes:
        fun: ``F(x, *args)``, a pytree with the structure and shapes of ``x``.
        jacobian_init: None (the exact Jacobian at ``init_params``) or a nonzero number ``a``
            (``J₀ = a I``).
        stepsize: scaling of the quasi-Newton step (1: full step).
        memory_size: None (dense ``H``) or the number ``m`` of rank-one terms kept (needs a
            number ``jacobian_init``).
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    fun: Callable[..., Any]
    jacobian_init: float | None = None
    stepsize: float = 1.0
    memory_size: int | None = None

    def _flat_fun(self, raveler: Raveler, args: tuple) -> Callable[[Tensor], Tensor]:
        def flat(x: Tensor) -> Tensor:
            out = self.fun(raveler.unravel(x.reshape(1, -1)), *args)
            return raveler.ravel(out, "the output of fun").reshape(-1)

        return flat

    def init_state(self, init_params: Any, *args: Any) -> BroydenState:
        """Evaluates ``F(init_params)`` and forms ``H₀``."""
        if self.jacobian_init is not None and self.jacobian_init == 0:
            raise ValueError("jacobian_init must be None or a nonzero number")
        if not self.stepsize > 0:
            raise ValueError(f"stepsize must be positive, got {self.stepsize}")
        if self.memory_size is not None and (self.memory_size < 1 or self.jacobian_init is None):
            raise ValueError(
                "memory_size must be a positive integer, and needs a number jacobian_init "
                f"(got memory_size={self.memory_size}, jacobian_init={self.jacobian_init})"
            )
        raveler = Raveler(init_params, batched=False, what="init_params")
        if not all(isinstance(v, Tensor) for v in tree_leaves(init_params)):
            raise TypeError("init_params must be a tensor or a pytree of tensors")
        x = raveler.ravel(init_params).reshape(-1)
        flat = self._flat_fun(raveler, args)
        value = flat(x)
        n = x.numel()
        kw = dict(dtype=x.dtype, device=x.device)
        if self.memory_size is not None:
            m = self.memory_size
            return BroydenState(
                iter_num=torch.zeros((), dtype=torch.int64, device=x.device),
                value=value,
                error=torch.linalg.vector_norm(value),
                inv_jacobian=torch.zeros((0, 0), **kw),
                low_rank_u=torch.zeros((m, n), **kw),
                low_rank_v=torch.zeros((m, n), **kw),
            )
        if self.jacobian_init is None:
            J = torch.func.jacrev(flat)(x)
            H, info = torch.linalg.inv_ex(J)
            H = torch.where(info == 0, H, torch.linalg.pinv(J))
        else:
            H = torch.eye(n, dtype=x.dtype, device=x.device) / self.jacobian_init
        return BroydenState(
            iter_num=torch.zeros((), dtype=torch.int64, device=x.device),
            value=value,
            error=torch.linalg.vector_norm(value),
            inv_jacobian=H,
            low_rank_u=torch.zeros((0, n), **kw),
            low_rank_v=torch.zeros((0, n), **kw),
        )

    def update(self, params: Any, state: BroydenState, *args: Any) -> OptStep:
        """One Broyden step and inverse-Jacobian update."""
        if self.memory_size is not None:
            return self._update_low_rank(params, state, *args)
        raveler = Raveler(params, batched=False, what="params")
        x = raveler.ravel(params).reshape(-1)
        H, value = state.inv_jacobian, state.value
        s = -self.stepsize * (H @ value)
        x_new = x + s
        value_new = self._flat_fun(raveler, args)(x_new)
        y = value_new - value
        Hy = H @ y
        sH = s @ H
        denom = torch.dot(s, Hy)
        eps = torch.finfo(x.dtype).eps
        ok = denom.abs() > eps * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(Hy)
        H_new = H + torch.outer(s - Hy, sH) / torch.where(ok, denom, 1)
        new_state = BroydenState(
            iter_num=state.iter_num + 1,
            value=value_new,
            error=torch.linalg.vector_norm(value_new),
            inv_jacobian=torch.where(ok, H_new, H),
            low_rank_u=state.low_rank_u,
            low_rank_v=state.low_rank_v,
        )
        return OptStep(raveler.unravel(x_new.reshape(1, -1)), new_state)

    def _update_low_rank(self, params: Any, state: BroydenState, *args: Any) -> OptStep:
        """The same step with ``H = I/a + Uᵀ V`` (rows ``u_k``, ``v_k``): ``H z = z/a +
        Uᵀ(V z)``, ``Hᵀ s = s/a + Vᵀ(U s)``; the new term ``u = (s − Hy)/(sᵀHy)``, ``v = Hᵀs``
        goes to slot ``iter_num mod m``."""
        raveler = Raveler(params, batched=False, what="params")
        x = raveler.ravel(params).reshape(-1)
        U, V, a = state.low_rank_u, state.low_rank_v, self.jacobian_init

        def H(z):
            return z / a + U.T @ (V @ z)

        s = -self.stepsize * H(state.value)
        x_new = x + s
        value_new = self._flat_fun(raveler, args)(x_new)
        Hy = H(value_new - state.value)
        sH = s / a + V.T @ (U @ s)
        denom = torch.dot(s, Hy)
        eps = torch.finfo(x.dtype).eps
        ok = denom.abs() > eps * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(Hy)
        slot = (torch.arange(U.shape[0], device=x.device) == state.iter_num % U.shape[0])[:, None]
        write = slot & ok
        new_state = BroydenState(
            iter_num=state.iter_num + 1,
            value=value_new,
            error=torch.linalg.vector_norm(value_new),
            inv_jacobian=state.inv_jacobian,
            low_rank_u=torch.where(write, ((s - Hy) / torch.where(ok, denom, 1))[None], U),
            low_rank_v=torch.where(write, sH[None], V),
        )
        return OptStep(raveler.unravel(x_new.reshape(1, -1)), new_state)

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``F(params, *args)``."""
        return self.fun(params, *args)
