"""A QP's data and KKT conditions: checked shapes, batched products, the KKT residual (the
optimality function the engine differentiates) and the symmetric KKT matrix.

The problem, for each of ``B`` independent problems (dim 0):

    min_x ½ xᵀQx + cᵀx   subject to   A x = b,   G x ≤ h,

with ``x ∈ ℝⁿ``, ``A ∈ ℝᵖˣⁿ``, ``G ∈ ℝᵐˣⁿ``, ``Q`` symmetric positive semidefinite (a
non-symmetric ``Q`` stands for ``Qₛ = ½(Q + Qᵀ)``). In the primal ``x``, the equality
multipliers ``ν`` and the inequality multipliers ``λ ≥ 0``, flattened per problem into
``z = [x; ν; λ]`` (B, N) with ``N = n + p + m``, the KKT conditions are

    Qₛ x + c + Aᵀν + Gᵀλ = 0,    A x − b = 0,    λ ⊙ (G x − h) = 0.

Every piece of data is shared by the batch (``Q (n, n)``, ``c (n,)``, ...) or given per
problem (one more leading dimension ``B``); internally every problem is batched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["KKTSolution", "QPState"]

Tensor = torch.Tensor


class KKTSolution(NamedTuple):
    """A QP's primal and dual solution (JAXopt's name).

    Attributes:
        primal: ``x``, ``(B, n)`` or ``(n,)``.
        dual_eq: ``ν``, the multipliers of ``A x = b``, ``(B, p)`` or ``(p,)``; None without
            equality constraints.
        dual_ineq: ``λ ≥ 0``, the multipliers of ``G x ≤ h``, ``(B, m)`` or ``(m,)``; None
            without inequality constraints.
    """

    primal: Tensor
    dual_eq: Tensor | None = None
    dual_ineq: Tensor | None = None


class QPState(NamedTuple):
    """State returned by the QP solvers' ``run``.

    Attributes:
        iter_num: iterations run, int64, per problem (``(B,)``, or 0-d for a single problem).
        error: per problem, the ∞-norm of the KKT residual (stationarity, ``Ax − b``,
            ``λ ⊙ (Gx − h)``) and of the inequality violation ``(Gx − h)₊``.
        converged: per problem, whether ``error`` met the tolerance.
        status: per problem, a :class:`~implicit_torch._result.Status` code (int64): 0
            converged; otherwise why not, e.g. ``UNBOUNDED`` (``Q`` not positive semidefinite:
            not convex), ``SINGULAR`` (``Q`` singular, or dependent equality constraints),
            ``INFEASIBLE`` (no point satisfies the constraints), ``MAX_ITERATIONS``.
    """

    iter_num: Tensor
    error: Tensor
    converged: Tensor
    status: Tensor


# ----------------------------------------------------------------------------------------
# Data: shapes, batching, products that work for shared (2-d) and batched (3-d) matrices
# ----------------------------------------------------------------------------------------


def _mv(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` per problem: ``M`` (r, n) shared or (B, r, n); ``v`` (B, n) -> (B, r).

    Batched, it is computed as the row ``vᵀ Mᵀ``: a batched row-times-matrix product is several
    times faster on the CPU than matrix-times-column.
    """
    if M.dim() == 2:
        return v @ M.mT
    return (v.unsqueeze(-2) @ M.mT).squeeze(-2)


def _rmv(M: Tensor, u: Tensor) -> Tensor:
    """``Mᵀ u`` per problem: ``M`` (r, n) shared or (B, r, n); ``u`` (B, r) -> (B, n)."""
    if M.dim() == 2:
        return u @ M
    return (u.unsqueeze(-2) @ M).squeeze(-2)


def _pair(value: Any, what: str, names: tuple[str, str], required: bool) -> tuple:
    if value is None:
        if required:
            raise ValueError(f"{what} is required: a pair {names}")
        return None, None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{what} must be a pair {names}, got {type(value).__name__}")
    return tuple(value)


class _Data:
    """Checked QP data: sizes ``n, p, m``, batch size, dtype and device, with clear errors."""

    def __init__(self, Q, c, A, b, G, h):
        named = {"Q": Q, "c": c, "A": A, "b": b, "G": G, "h": h}
        for name, t in named.items():
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"QP data {name} must be a tensor, got {type(t).__name__}")
        if Q is None or c is None:
            raise ValueError("QP data: params_obj must be a pair of tensors (Q, c)")
        if (A is None) != (b is None) or (G is None) != (h is None):
            raise ValueError("QP data: give both A and b, and both G and h (or neither)")
        if not c.is_floating_point():
            raise TypeError(f"QP data must be floating point, got c of dtype {c.dtype}")
        if c.dim() not in (1, 2):
            raise ValueError(f"c must have shape (n,) or (B, n), got {tuple(c.shape)}")
        self.n = n = c.shape[-1]
        batch = {}
        for name, t in named.items():
            if t is None:
                continue
            if t.dtype != c.dtype:
                raise TypeError(f"QP data must share one dtype: c is {c.dtype}, {name} {t.dtype}")
            if t.device != c.device:
                raise ValueError(
                    f"QP data must be on one device: c is on {c.device}, {name} on {t.device}"
                )
            matrix = name in ("Q", "A", "G")
            base = 2 if matrix else 1
            if t.dim() not in (base, base + 1):
                dims = "(r, n) or (B, r, n)" if matrix else "(r,) or (B, r)"
                raise ValueError(f"QP data {name} must have shape {dims}, got {tuple(t.shape)}")
            if t.dim() == base + 1:
                batch[name] = t.shape[0]
        if Q.shape[-2:] != (n, n):
            raise ValueError(
                f"Q must be (n, n) = ({n}, {n}) per problem (n = the size of c), "
                f"got {tuple(Q.shape)}"
            )
        self.p = self._check_pair(A, b, "A", "b")
        self.m = self._check_pair(G, h, "G", "h")
        sizes = set(batch.values())
        if len(sizes) > 1:
            raise ValueError(f"QP data have different batch sizes: {batch}")
        self.batched = bool(sizes)
        self.B = sizes.pop() if sizes else 1
        self.N = self.n + self.p + self.m
        self.dtype, self.device = c.dtype, c.device

    def _check_pair(self, M, v, mname, vname) -> int:
        if M is None:
            return 0
        if M.shape[-1] != self.n:
            raise ValueError(
                f"{mname} must have n = {self.n} columns (the size of c), got {tuple(M.shape)}"
            )
        if v.shape[-1] != M.shape[-2]:
            raise ValueError(
                f"{vname} must have {M.shape[-2]} entries (the rows of {mname}), "
                f"got {tuple(v.shape)}"
            )
        return M.shape[-2]


def _sym(Q: Tensor) -> Tensor:
    return 0.5 * (Q + Q.mT)


def _kkt_residual(z: Tensor, Q, c, A, b, G, h) -> Tensor:
    """The KKT residual of ``z = [x; ν; λ]`` (B, n+p+m), the optimality function
    differentiated implicitly: ``[Qₛx + c + Aᵀν + Gᵀλ; Ax − b; λ ⊙ (Gx − h)]`` (B, n+p+m).
    ``ν`` (``λ``) is empty when ``A`` (``G``) is None."""
    n = c.shape[-1]
    p = 0 if A is None else A.shape[-2]
    x = z[:, :n]
    out = [_mv(_sym(Q), x) + c]
    if A is not None:
        out[0] = out[0] + _rmv(A, z[:, n : n + p])
        out.append(_mv(A, x) - b)
    if G is not None:
        lam = z[:, n + p :]
        out[0] = out[0] + _rmv(G, lam)
        out.append(lam * (_mv(G, x) - h))
    return torch.cat(out, -1) if len(out) > 1 else out[0]


def active_constraints(z: Tensor, c: Tensor, A, G, h) -> Tensor:
    """Per problem and inequality, whether it is active at ``z``: its multiplier exceeds its
    slack, ``λᵢ > hᵢ − Gᵢx`` (B, m). Under strict complementarity one of the two is zero at
    the solution and the other positive, so the test is decided far from rounding."""
    n = c.shape[-1]
    p = 0 if A is None else A.shape[-2]
    x, lam = z[:, :n], z[:, n + p :]
    return lam > h - _mv(G, x)


def _kkt_residual_active_set(z: Tensor, active: Tensor, Q, c, A, b, G, h) -> Tensor:
    """The KKT residual with the complementarity rows of a known active set: ``Gᵢx − hᵢ`` for
    an active inequality, ``λᵢ`` for an inactive one (B, n+p+m).

    Zero at a solution with that active set, like :func:`_kkt_residual`; its Jacobian is the
    reduced KKT system (active constraints held as equalities, inactive multipliers fixed at
    zero), so its implicit derivatives are those of the QP with the active set frozen: exactly
    zero for an inactive multiplier and exactly ``Gᵢ dx = dhᵢ`` for an active constraint,
    where the interior point's own complementarity ``λ ⊙ (Gx − h)`` leaves terms of the size
    of its last ``λ`` or slack.
    """
    n = c.shape[-1]
    p = 0 if A is None else A.shape[-2]
    head = _kkt_residual(z, Q, c, A, b, G, h)[:, : n + p]
    gap = _mv(G, z[:, :n]) - h
    return torch.cat([head, torch.where(active, gap, z[:, n + p :])], -1)


def _kkt_error(z: Tensor, Q, c, A, b, G, h) -> Tensor:
    """Per problem ``‖KKT residual‖∞`` and, with inequalities, ``‖(Gx − h)₊‖∞``: (B,)."""
    error = _kkt_residual(z, Q, c, A, b, G, h).abs().amax(-1)
    if G is not None and G.shape[-2]:
        error = torch.maximum(error, (_mv(G, z[:, : c.shape[-1]]) - h).amax(-1).clamp_min(0))
    return error


def _to_flat(params: KKTSolution) -> tuple[Tensor, bool]:
    parts = [t for t in params if t is not None]
    single = parts[0].dim() == 1
    if single:
        parts = [t.unsqueeze(0) for t in parts]
    return torch.cat(parts, -1), single


def _from_flat(z: Tensor, n: int, p: int, has_eq: bool, has_ineq: bool, single: bool):
    if single:
        z = z.squeeze(0)
    nu = z[..., n : n + p] if has_eq else None
    lam = z[..., n + p :] if has_ineq else None
    return KKTSolution(z[..., :n], nu, lam)


def _optimality(params: KKTSolution, params_obj, params_eq, params_ineq) -> KKTSolution:
    Q, c = _pair(params_obj, "params_obj", ("Q", "c"), True)
    A, b = _pair(params_eq, "params_eq", ("A", "b"), False)
    G, h = _pair(params_ineq, "params_ineq", ("G", "h"), False)
    z, single = _to_flat(params)
    r = _kkt_residual(z, Q, c, A, b, G, h)
    p = 0 if A is None else A.shape[-2]
    return _from_flat(r, c.shape[-1], p, A is not None, G is not None, single)


def _expand(t: Tensor | None, B: int, dims: int) -> Tensor | None:
    """``t`` with a batch dimension (a view for shared data)."""
    if t is None or t.dim() == dims + 1:
        return t
    return t.expand(B, *t.shape)


def _kkt_matrix(data: _Data, Qs: Tensor, A: Tensor | None, G: Tensor | None) -> Tensor:
    """``K = [[Qₛ, Aᵀ, Gᵀ], [A, 0, 0], [G, 0, 0]]``, (B, N, N), N = n + p + m: the
    symmetric matrix of the linear part of the KKT residual."""
    B, n = data.B, data.n
    C = [M for M in (A, G) if M is not None]
    if not C:
        return Qs.expand(B, n, n)
    C = torch.cat([_expand(M, B, 2) for M in C], -2) if len(C) > 1 else _expand(C[0], B, 2)
    top = torch.cat([Qs.expand(B, n, n), C.mT], -1)
    k = C.shape[-2]
    bottom = torch.cat([C, C.new_zeros(B, k, k)], -1)
    return torch.cat([top, bottom], -2)
