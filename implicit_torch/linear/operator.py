"""The one linear-operator type of the package.

A :class:`LinearOperator` is a linear map ``v ↦ A v`` on pytrees shaped like a template,
built by whoever knows its structure — the engine knows the transpose of ``∂ₓF`` and which of
the two it hands out, a stationarity condition knows its Jacobian is symmetric, a formed
matrix knows its blocks — so that linear solvers read the structure instead of probing for it.

Inside the solvers every operator is used in the flat ``(B, N)`` representation of
:class:`FlatSystem`: ``B`` independent systems (1 unless ``batched``) of ``N`` unknowns.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _result, _runtime
from implicit_torch._tree import Raveler, tree_map

__all__ = ["FlatSystem", "LinearOperator", "as_operator", "materialise_flat"]

Tensor = torch.Tensor


class LinearOperator:
    """A linear map on pytrees, with what is known of its structure.

    Calling the operator applies it (``op(v) = A v``), so an operator can be passed wherever a
    plain ``matvec`` function is expected, e.g. to a user's ``solve(matvec, b)``.

    Args:
        apply: ``v ↦ A v``, differentiable torch ops that ``torch.func`` transforms compose
            with (the dense solvers vmap it).
        transpose: ``u ↦ Aᵀ u`` where it is known (the engine has it from a vjp); ``None``
            if unknown (then :attr:`T` falls back to the vjp of ``apply``).
        batched: dim 0 of every leaf indexes independent systems and ``A`` is block diagonal.
        symmetric: ``True`` if ``A = Aᵀ`` is known, ``False`` if known not to be, ``None`` if
            unknown (``"auto"`` then probes).
        transposed: this operator is the transpose of the Jacobian it was built from (the
            reverse-mode system ``(∂ₓF)ᵀ u = −v``); ``False`` for ``∂ₓF`` itself.
        apply_values: optional cheaper ``v ↦ A v`` for values only (no graph recorded, not for
            use under ``torch.func`` transforms); the Krylov solvers use it when given.
    """

    def __init__(
        self,
        apply: Callable[[Any], Any],
        *,
        transpose: Callable[[Any], Any] | None = None,
        batched: bool = False,
        symmetric: bool | None = None,
        transposed: bool = False,
        apply_values: Callable[[Any], Any] | None = None,
    ):
        if not callable(apply):
            raise TypeError(f"matvec must be callable, got {type(apply).__name__}")
        self.apply = apply
        self.transpose_fn = transpose
        self.batched = batched
        self.symmetric = symmetric
        self.transposed = transposed
        self.apply_values = apply_values

    def __call__(self, v: Any) -> Any:
        return self.apply(v)

    def __repr__(self) -> str:
        tags = [t for t in ("batched", "transposed") if getattr(self, t)]
        if self.symmetric is not None:
            tags.append("symmetric" if self.symmetric else "non-symmetric")
        return f"LinearOperator({', '.join(tags)})"

    @property
    def T(self) -> LinearOperator:
        """The transpose ``u ↦ Aᵀ u``: ``self`` when symmetric, the known transpose when
        given, else the vector-Jacobian product of ``apply`` (linear, so exact)."""
        if self.symmetric:
            return self
        transpose = self.transpose_fn
        if transpose is None:
            vjp_fn = None

            def transpose(u):
                # A is linear, so its vjp at any point is Aᵀ: built once, at the first call.
                nonlocal vjp_fn
                if vjp_fn is None:
                    _, vjp_fn = torch.func.vjp(self.apply, tree_map(torch.zeros_like, u))
                return vjp_fn(u)[0]

        return LinearOperator(
            transpose,
            transpose=self.apply,
            batched=self.batched,
            symmetric=self.symmetric,
            transposed=not self.transposed,
        )


def as_operator(matvec: Callable[[Any], Any] | LinearOperator, batched: bool) -> LinearOperator:
    """``matvec`` as a :class:`LinearOperator` (an operator is returned as is)."""
    if isinstance(matvec, LinearOperator):
        return matvec
    return LinearOperator(matvec, batched=batched)


def materialise_flat(
    apply_flat: Callable[[Tensor], Tensor], batch: int, n: int, dtype, device, loop_fallback=True
) -> Tensor | None:
    """The ``(B, N, N)`` blocks of a block-diagonal flat operator, from ``N`` (batched) matvecs.

    Column ``j`` of every block is ``apply_flat(e_j)`` with ``e_j`` repeated for all systems.
    The matvecs are vectorised with ``torch.func.vmap``; a matvec that vmap cannot handle is
    called once per column instead, or, with ``loop_fallback=False``, ``None`` is returned.
    """
    eye = torch.eye(n, dtype=dtype, device=device)

    def column(e: Tensor) -> Tensor:
        return apply_flat(e.expand(batch, n))

    try:
        cols = torch.func.vmap(column)(eye)  # (N, B, N)
    except Exception:  # not vmappable: loop instead (a real error re-raises there)
        if not loop_fallback:
            return None
        cols = torch.stack([column(eye[j]) for j in range(n)])
    return cols.permute(1, 2, 0)


class FlatSystem:
    """``A x = b`` in the solvers' flat ``(B, N)`` representation, with its stopping target.

    Attributes:
        op: the operator (pytree side).
        b: ``(B, N)`` right-hand side; ``x0``: ``(B, N)`` initial guess (zeros unless given).
        tol, atol: relative and absolute tolerance; ``threshold = max(tol ‖b_i‖, atol)`` per
            system, ``bnorm = ‖b_i‖``.
        inspect: whether values may be read on the host (not under vmap / compile).
    """

    def __init__(self, op: LinearOperator, b, init, ridge, M, tol, atol):
        self.op = op
        self.raveler = Raveler(b, op.batched, what="the right-hand side b")
        if self.raveler.device.type == "meta":
            raise ValueError(
                "the linear solvers need tensor values (their loops read convergence on the "
                "host): b is on the meta device, which holds shapes only"
            )
        self.batched = op.batched
        self.b = self.raveler.ravel(b, "b")
        self.ridge = _check_ridge(ridge)
        self._M = M
        self.init_given = init is not None
        self.x0 = (
            torch.zeros_like(self.b)
            if init is None
            else self.raveler.ravel(init, "init").detach().to(self.b.dtype)
        )
        _result.check_tolerances(tol, atol)
        if tol is None:
            tol = _result.default_rtol(self.b.dtype, "linear")
        self.tol, self.atol = tol, atol
        self.bnorm = norm(self.b)
        self.inspect = _runtime.can_inspect_values(self.b)
        self.threshold = torch.clamp(tol * self.bnorm, min=atol)
        apply = op.apply_values if (op.apply_values is not None and self.inspect) else op.apply
        self._apply = apply
        self._residual: tuple[Tensor, Tensor] | None = None
        # Whether a solver may warn about a fallback it took (Cholesky -> LU): not when the
        # caller asked for on_failure="ignore".
        self.report_fallbacks = True

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.b.shape)

    @property
    def preconditioned(self) -> bool:
        return self._M is not None

    def A(self, v: Tensor) -> Tensor:
        out = self.raveler.ravel(self._apply(self.raveler.unravel(v)), "the output of matvec")
        return out if self.ridge is None else out + self.ridge * v

    def A_differentiable(self, v: Tensor) -> Tensor:
        """``A v`` through the operator's differentiable ``apply`` (for vmap / vjp)."""
        out = self.raveler.ravel(self.op.apply(self.raveler.unravel(v)), "the output of matvec")
        return out if self.ridge is None else out + self.ridge * v

    def M(self, v: Tensor) -> Tensor:
        if self._M is None:
            return v
        return self.raveler.ravel(self._M(self.raveler.unravel(v)), "the output of M")

    def residual_norm(self, x: Tensor) -> Tensor:
        """``‖b − A x‖`` per system; remembered for the last ``x`` asked about, since a solver
        and the final check often ask for the same one (one matvec saved)."""
        if self._residual is not None and self._residual[0] is x:
            return self._residual[1]
        r = norm(self.b - self.A(x))
        self._residual = (x, r)
        return r

    def restarted_from(self, x: Tensor) -> FlatSystem:
        """The same system with ``x`` (``(B, N)``) as its initial guess (a copy; ``self`` is
        left as it is)."""
        other = copy.copy(self)
        other.x0, other.init_given = x.detach(), True
        other._residual = None
        return other

    def materialise(self) -> Tensor:
        """The ``(B, N, N)`` blocks of ``A`` (with the ridge), from ``N`` vmapped matvecs."""
        B, N = self.shape
        return materialise_flat(self.A_differentiable, B, N, self.b.dtype, self.b.device)


def _check_ridge(ridge):
    """``ridge`` itself: ``None``, a finite real number or a finite 0-d tensor."""
    if ridge is None:
        return None
    if isinstance(ridge, Tensor):
        if ridge.dim() != 0 or not ridge.is_floating_point():
            raise TypeError(
                f"ridge must be a number or a 0-d float tensor, got {tuple(ridge.shape)}"
            )
        finite = bool(torch.isfinite(ridge)) if ridge.device.type != "meta" else True
    elif isinstance(ridge, (int, float)) and not isinstance(ridge, bool):
        finite = math.isfinite(ridge)
    else:
        raise TypeError(f"ridge must be a number, got {type(ridge).__name__}")
    if not finite:
        raise ValueError(f"ridge must be finite, got {ridge}")
    return ridge


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-system inner products of ``(B, N)`` matrices: ``(B,)``."""
    return torch.linalg.vecdot(a, b, dim=1)


def norm(a: Tensor) -> Tensor:
    """Per-system Euclidean norms of a ``(B, N)`` matrix: ``(B,)``."""
    return torch.linalg.vector_norm(a, dim=1)
