"""Bisection for scalar roots of monotone functions, element-wise over a tensor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch import _runtime
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = ["Bisection", "BisectionState"]

Tensor = torch.Tensor


class BisectionState(NamedTuple):
    """State of :class:`Bisection`; every tensor but ``iter_num`` and ``error`` has the shape
    of the roots.

    Attributes:
        iter_num: iterations run (int64, 0-d).
        error: ``max_i |F(x)_i|`` at the current midpoints ``x``.
        value: ``F(x)`` at the current midpoints.
        low: the end of each bracket where ``sign · F ≤ 0``.
        high: the end where ``sign · F ≥ 0``.
        sign: ``+1`` where ``F`` increases, ``−1`` where it decreases.
    """

    iter_num: Tensor
    error: Tensor
    value: Tensor
    low: Tensor
    high: Tensor
    sign: Tensor


def _elementwise_solve(matvec: Callable[[Tensor], Tensor], b: Tensor) -> Tensor:
    """``A⁻¹ b`` for a diagonal ``A``: ``b / (A 1)``."""
    return b / matvec(torch.ones_like(b))


@dataclasses.dataclass
class Bisection(IterativeSolver):
    """Bisection (Burden & Faires, "Numerical Analysis", §2.1) for ``F(x, *args) = 0`` with
    ``x`` in ``[lower, upper]``, element-wise: ``F(x)_i`` must depend on ``x_i`` only (and be
    monotone in it), so every element is an independent scalar root, all bisected at once.

    Each iteration takes the midpoints ``x = (low + high) / 2`` and keeps the half of each
    bracket where ``F`` changes sign: ``high ← x`` where ``sign · F(x) > 0``, ``low ← x``
    elsewhere. After ``k`` iterations the bracket width is ``(upper − lower) / 2ᵏ``.
    ``state.error = max_i |F(x)_i|`` at the returned midpoints (the max, not a norm, so the
    tolerance applies to each root). Whether ``F`` increases or decreases is given by
    ``increasing`` or read from its values at ``lower`` and ``upper``, per element.

    ``run(init_params=None, *args)``; ``init_params`` is only used for its shape, dtype and device
    (the iteration starts from the bracket); with None these come from ``lower``, ``upper`` and
    ``F(lower)``. The roots are differentiable in ``args`` by the implicit function theorem applied
    element-wise, ``∂xᵢ/∂θ = −(∂F_i/∂x_i)⁻¹ ∂F_i/∂θ``: the default linear solver divides by the
    diagonal of ``∂ₓF`` (set ``implicit_diff_solve`` for an ``F`` whose Jacobian is not diagonal).
    Unrolling gives no gradient in ``args`` (the midpoints depend on them only through comparisons).

    Example (the simplex projection ``max(z − τ, 0)``, ``τ`` the root of ``Σ max(z − τ, 0) =
    1``)::

        tau = Bisection(lambda t, z: torch.relu(z - t).sum() - 1, lower=z.min() - 1,
                        upper=z.max(), maxiter=100, tol=1e-12).run(None, z).params

    Attributes:
        optimality_fun: ``F(x, *args)``, shaped like ``x`` (the same name as JAXopt's field;
            it is also the optimality condition).
        lower, upper: the bracket, numbers or tensors broadcastable to the roots' shape.
        increasing: whether ``F`` increases in ``x``; None (default) reads it per element from
            ``F(lower)`` and ``F(upper)``.
        check_bracket: raise ``ValueError`` if ``F(lower)`` and ``F(upper)`` have the same
            strict sign anywhere (skipped under vmap and compile, where values cannot be read).
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`; the
            defaults (30, 1e-5) are JAXopt's.
    """

    optimality_fun: Callable[..., Tensor]
    lower: float | Tensor = 0.0
    upper: float | Tensor = 1.0
    increasing: bool | None = None
    check_bracket: bool = True
    maxiter: int = dataclasses.field(default=30, kw_only=True)
    tol: float = dataclasses.field(default=1e-5, kw_only=True)

    def run(self, init_params: Any = None, *args: Any) -> OptStep:
        """Find the roots; see :meth:`IterativeSolver.run`."""
        if init_params is None:
            init_params = self._bracket(None, args)[0]
        elif not (isinstance(init_params, Tensor) and init_params.is_floating_point()):
            raise TypeError(
                "Bisection: init_params must be None or a floating-point tensor, got "
                f"{type(init_params).__name__}"
            )
        return super().run(init_params, *args)

    def default_implicit_diff_solve(self) -> Any:
        """Division by the diagonal of ``∂ₓF``: ``F`` is element-wise, so one matvec gives
        its Jacobian."""
        return _elementwise_solve

    def _bracket(self, like: Tensor | None, args: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(low, high, F(low), F(high))`` broadcast to the roots' shape."""
        if like is None:
            lo, hi = torch.as_tensor(self.lower), torch.as_tensor(self.upper)
            if not lo.is_floating_point():
                lo = lo.to(torch.get_default_dtype())
            f_lo = self._fun(lo, args)
            dtype = torch.promote_types(torch.promote_types(lo.dtype, hi.dtype), f_lo.dtype)
            shape = torch.broadcast_shapes(lo.shape, hi.shape, f_lo.shape)
            device = f_lo.device
        else:
            dtype, shape, device = like.dtype, like.shape, like.device
        lo = torch.as_tensor(self.lower, dtype=dtype, device=device)
        hi = torch.as_tensor(self.upper, dtype=dtype, device=device)
        try:
            lo, hi = lo.expand(shape).clone(), hi.expand(shape).clone()
        except RuntimeError:
            raise ValueError(
                f"Bisection: lower {tuple(lo.shape)} and upper {tuple(hi.shape)} do not "
                f"broadcast to the roots' shape {tuple(shape)}"
            ) from None
        return lo, hi, self._fun(lo, args), self._fun(hi, args)

    def _fun(self, x: Tensor, args: tuple) -> Tensor:
        out = self.optimality_fun(x, *args)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Bisection: optimality_fun must return a tensor, got {type(out).__name__}"
            )
        return out

    def init_state(self, init_params: Any, *args: Any) -> BisectionState:
        """The bracket ``[lower, upper]`` broadcast to ``init_params``'s shape, checked."""
        low, high, f_low, f_high = self._bracket(init_params, args)
        if f_low.shape != low.shape:
            raise ValueError(
                f"Bisection: optimality_fun must return one value per root (shape "
                f"{tuple(low.shape)}), got shape {tuple(f_low.shape)}"
            )
        if self.check_bracket and _runtime.can_inspect_values(f_low):
            if bool((low > high).any()):
                raise ValueError("Bisection: lower must not exceed upper")
            bad = (f_low * f_high > 0) | torch.isnan(f_low) | torch.isnan(f_high)
            if bool(bad.any()):
                i = int(bad.reshape(-1).nonzero()[0])
                raise ValueError(
                    f"Bisection: [lower, upper] does not bracket a root for {int(bad.sum())} "
                    f"of {bad.numel()} elements: F(lower) and F(upper) have the same sign "
                    f"(first at flat index {i}: F(lower) = {float(f_low.reshape(-1)[i]):.3g}, "
                    f"F(upper) = {float(f_high.reshape(-1)[i]):.3g}). Widen the bracket."
                )
        one = torch.ones((), dtype=low.dtype, device=low.device)
        return BisectionState(
            iter_num=torch.zeros((), dtype=torch.int64, device=low.device),
            error=torch.tensor(math.inf, dtype=low.dtype, device=low.device),
            value=torch.full_like(low, math.inf),
            low=low,
            high=high,
            sign=(
                torch.where(f_high >= f_low, one, -one)
                if self.increasing is None
                else (one if self.increasing else -one).expand(low.shape)
            ),
        )

    def update(self, params: Any, state: BisectionState, *args: Any) -> OptStep:
        """Evaluate ``F`` at the midpoints and halve every bracket."""
        x = (state.low + state.high) / 2
        value = self._fun(x, args)
        above = state.sign * value > 0
        new_state = BisectionState(
            iter_num=state.iter_num + 1,
            error=value.abs().amax() if value.numel() else torch.zeros_like(state.error),
            value=value,
            low=torch.where(above, state.low, x),
            high=torch.where(above, x, state.high),
            sign=state.sign,
        )
        return OptStep(x, new_state)
