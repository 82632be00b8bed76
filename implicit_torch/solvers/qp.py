"""Quadratic programs: an equality-constrained QP (one KKT solve) and a batched
interior-point QP with inequality constraints, both differentiated through their KKT
conditions.

The problem, for each of ``B`` independent problems (dim 0):

    min_x ½ xᵀQx + cᵀx   subject to   A x = b,   G x ≤ h,

with ``x ∈ ℝⁿ``, ``A ∈ ℝᵖˣⁿ``, ``G ∈ ℝᵐˣⁿ`` and ``Q`` symmetric positive semidefinite (a
non-symmetric ``Q`` stands for its symmetric part ``Qₛ = ½(Q + Qᵀ)``, which is what the
objective sees). Its KKT conditions, in the primal ``x``, the equality multipliers ``ν`` and
the inequality multipliers ``λ ≥ 0``, are the optimality function differentiated by
:func:`implicit_torch.implicit_solve` (Blondel et al., 2022, §2.2, "KKT conditions"):

    Qₛ x + c + Aᵀν + Gᵀλ = 0,    A x − b = 0,    λ ⊙ (G x − h) = 0.

Its Jacobian in ``(x, ν, λ)`` is ``[[Qₛ, Aᵀ, Gᵀ], [A, 0, 0], [diag(λ) G, 0, diag(Gx − h)]]``,
not symmetric; it is invertible under the usual conditions (``Qₛ`` positive definite on the
null space of the active constraints, linearly independent active constraints, strict
complementarity). The engine runs with ``batched=True`` (one ``(n+p+m)``-square block per
problem); :class:`QP` solves with it through its structure (:class:`KKTLinearSolve`),
:class:`EqualityConstrainedQP` by dense LU (``"lu"``), and any engine solver can be chosen
with ``implicit_diff_solve``.

Shapes. Every piece of data is either shared by the batch (no batch dimension: ``Q (n, n)``,
``c (n,)``, ``A (p, n)``, ``b (p,)``, ``G (m, n)``, ``h (m,)``) or given per problem (one more
leading dimension ``B``). A shared tensor that requires grad receives the *sum* of the
per-problem gradients. When no piece has a batch dimension the problem is a single one and the
solution is unbatched (``x (n,)``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import torch

from implicit_torch import _runtime
from implicit_torch._errors import ConvergenceError, ConvergenceWarning
from implicit_torch._implicit_diff import implicit_solve
from implicit_torch.solvers.base import IterativeSolver, OptStep

__all__ = [
    "QP",
    "EqualityConstrainedQP",
    "KKTLinearSolve",
    "KKTSolution",
    "QPState",
    "projection_polyhedron",
]

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
    """

    iter_num: Tensor
    error: Tensor
    converged: Tensor


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


def _kkt_error(z: Tensor, Q, c, A, b, G, h) -> Tensor:
    """Per problem ``‖KKT residual‖∞`` and, with inequalities, ``‖(Gx − h)₊‖∞``: (B,)."""
    error = _kkt_residual(z, Q, c, A, b, G, h).abs().amax(-1)
    if G is not None and G.shape[-2]:
        error = torch.maximum(error, (_mv(G, z[:, : c.shape[-1]]) - h).amax(-1).clamp_min(0))
    return error


def _report(name: str, error: Tensor, converged: Tensor, tol: float, iters, maxiter, on_failure):
    bad = ~converged
    if on_failure == "ignore" or not bool(bad.any()):
        return
    worst = float(error.detach()[bad].nan_to_num(nan=float("inf")).max())
    msg = (
        f"implicit_torch: {name} did not converge on {int(bad.sum())} of {error.numel()} "
        f"problem(s): worst KKT error {worst:.3e} (tol={tol:g}) after {int(iters.max())} "
        f"iteration(s) (maxiter={maxiter}). The solution, and any gradient computed from it, is "
        "inaccurate: the problem may be infeasible, unbounded or degenerate (Q not positive "
        "definite, dependent equality constraints), or need a larger maxiter or tol."
    )
    if on_failure == "raise":
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _validate_on_failure(on_failure: str) -> None:
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")


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


def _finish(z: Tensor, state: QPState, data: _Data, has_eq: bool, has_ineq: bool) -> OptStep:
    """Split ``z`` into a :class:`KKTSolution`, dropping the batch dim of a single problem."""
    single = not data.batched
    if single:
        state = QPState(*(t.squeeze(0) for t in state))
    return OptStep(_from_flat(z, data.n, data.p, has_eq, has_ineq, single), state)


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


# ----------------------------------------------------------------------------------------
# EqualityConstrainedQP
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class EqualityConstrainedQP:
    """``min_x ½ xᵀQx + cᵀx`` subject to ``A x = b``, by one dense KKT solve.

    The solution solves ``[[Qₛ, Aᵀ], [A, 0]] [x; ν] = [−c; b]`` (``Qₛ = ½(Q + Qᵀ)``), by LU
    per problem. It is differentiable in ``Q``, ``c``, ``A`` and ``b`` by implicit
    differentiation of :meth:`optimality_fun`, the KKT residual
    ``(Qₛx + c + Aᵀν, Ax − b)``, whose Jacobian is that same KKT matrix.

    ``run(init_params=None, params_obj=(Q, c), params_eq=(A, b))`` (JAXopt's API) returns
    ``OptStep(KKTSolution(x, ν, None), QPState)``. Shapes and batching are those of the
    module docstring: ``x`` is ``(n,)`` for a single problem, ``(B, n)`` when any piece of
    data has a batch dimension. ``params_eq=None`` solves the unconstrained ``Qₛ x = −c``.

    Attributes:
        tol: a KKT residual ∞-norm above ``tol · (1 + ‖[c; b]‖∞)`` (a singular or
            ill-conditioned KKT matrix) is reported; None: ``1e-8`` in float64, ``1e-3`` in
            lower precision.
        implicit_diff: differentiate implicitly; if False (or with ``unroll``), by autograd
            through the dense solve.
        implicit_diff_solve: the engine's linear solver (default ``"lu"``, per problem).
        unroll: differentiate through the forward solve instead.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"``.
    """

    tol: float | None = None
    implicit_diff: bool = True
    implicit_diff_solve: Any = None
    unroll: bool = False
    on_failure: str = "warn"

    def optimality_fun(self, params: KKTSolution, params_obj, params_eq=None) -> KKTSolution:
        """The KKT residual ``KKTSolution(Qₛx + c + Aᵀν, Ax − b, None)``, shaped like
        ``params``."""
        return _optimality(params, params_obj, params_eq, None)

    def run(self, init_params: Any = None, params_obj=None, params_eq=None) -> OptStep:
        """Solve; ``init_params`` is ignored (the solve is direct). See the class docstring."""
        _validate_on_failure(self.on_failure)
        Q, c = _pair(params_obj, "params_obj", ("Q", "c"), True)
        A, b = _pair(params_eq, "params_eq", ("A", "b"), False)
        data = _Data(Q, c, A, b, None, None)
        tol = self.tol
        if tol is None:
            tol = 1e-8 if data.dtype == torch.float64 else 1e-3
        # Internally every problem is batched: a single one gets a batch of one through c.
        args = (Q, c if data.batched else c.unsqueeze(0), A, b, None, None)

        def solver(_init, Q, c, A, b, G, h):
            K = _kkt_matrix(data, _sym(Q), A, None)
            rhs = -c.expand(data.B, data.n)
            if A is not None:
                rhs = torch.cat([rhs, b.expand(data.B, data.p)], -1)
            z = torch.linalg.solve_ex(K, rhs)[0]  # a singular K gives NaN, reported below
            error = _kkt_error(z, Q, c, A, b, None, None)
            ones = torch.ones(data.B, dtype=torch.int64, device=data.device)
            return z, QPState(ones, error, error <= tol * (1 + rhs.abs().amax(-1)))

        if self.unroll or not self.implicit_diff:
            z, state = solver(None, *args)
        else:
            z, state = implicit_solve(
                solver,
                _kkt_residual,
                None,
                *args,
                solve=self.implicit_diff_solve or "lu",
                has_aux=True,
                batched=True,
            )
        if _runtime.can_inspect_values():
            _report(
                type(self).__name__,
                state.error,
                state.converged,
                tol,
                state.iter_num,
                1,
                self.on_failure,
            )
        return _finish(z, state, data, A is not None, False)


# ----------------------------------------------------------------------------------------
# QP with inequality constraints: batched primal-dual interior point
# ----------------------------------------------------------------------------------------

# Iterations without improvement after which a problem stops at its best iterate.
_PATIENCE = 3
# Run the interior-point iterations in the extension's CPU kernel where it applies (see
# QP._use_compiled_kernel); tests set it to False to compare with the PyTorch loop.
_USE_COMPILED_KERNEL = True
# The kernel factors its (p + m)-square reduced matrix with a plain, unblocked Cholesky: up to
# here it beats the batched loop (LAPACK), measured on a 2-core CPU, one thread: 4.7x at
# p + m = 30, 3.5x at 20 (B = 64), 2.8x at 50, 2.0x at 105, 1.05x at 200, 0.83x at 300.
_KERNEL_MAX_CONSTRAINTS = 200


class _IPM:
    """Mehrotra's predictor-corrector primal-dual interior-point method, batched.

    With slacks ``s = h − Gx ≥ 0`` the iterates ``(x, ν, λ, s)`` keep ``s, λ > 0`` and
    follow the central path ``s ⊙ λ = σμ`` (``μ = sᵀλ / m``). The Newton system

        Qₛ dx + Aᵀ dν + Gᵀ dλ = −r_d,   A dx = −r_p,   G dx + ds = −r_i,   Λ ds + S dλ = −r_c

    (``r_d = Qₛx + c + Aᵀν + Gᵀλ``, ``r_p = Ax − b``, ``r_i = Gx + s − h``) is reduced to the
    constraints' multipliers ``y = (dν, dλ)``: with ``C = [A; G]`` and ``W = C Qₛ⁻¹ Cᵀ``,

        (W + diag(0, s/λ)) y = [r_p; r_i − r_c/λ] − C Qₛ⁻¹ r_d,

    then ``dx = −Qₛ⁻¹(r_d + Cᵀ y)`` and ``ds = −r_i − G dx``. This ``(p+m)``-square matrix is
    symmetric positive definite (for ``Qₛ`` positive definite and ``A`` of full row rank) and
    stays well conditioned as ``s/λ`` goes to 0 or ∞ on active or inactive constraints, where
    the primal form ``Qₛ + Gᵀ diag(λ/s) G`` does not (its Cholesky fails in float32). ``Qₛ⁻¹``
    and ``W`` are computed once; each iteration is one batched Cholesky factorisation, shared
    by the affine (predictor, ``r_c = s ⊙ λ``) and the corrector step (``r_c = s ⊙ λ +
    ds_aff ⊙ dλ_aff − σμ`` with ``σ = (μ_aff / μ)³``; Mehrotra, 1992). Steps go 0.99 of the
    way to the boundary of ``s, λ ≥ 0``. The start is CVXOPT's: the solution of the Newton
    system with ``s/λ = 1`` from zero, with ``s`` and ``λ`` shifted to be positive
    (Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010).

    Layout and fused products. The iterate is one row ``u = [x; ν; λ; s]`` (B, 1, N + m),
    ``N = n + p + m``, and the linear maps are batched row-times-matrix products with matrices
    formed once (the per-operation overhead of tiny tensors dominates on the CPU, and a
    row-times-matrix product is several times faster there than matrix-times-column):

    * ``R = [r_d; r_p; Gx − h] = u[:N] K + [c; −b; −h]``, with ``K`` the symmetric KKT matrix
      of :func:`_kkt_matrix`; ``r_i = (Gx − h) + s``;
    * ``r_d [−Qₛ⁻¹, −Qₛ⁻¹Cᵀ]`` gives ``−Qₛ⁻¹ r_d`` and ``−C Qₛ⁻¹ r_d``;
    * ``du = [dx; y; ds] = [−Qₛ⁻¹ r_d; 0; G Qₛ⁻¹ r_d − r_i] + y T`` with
      ``T = [−C Qₛ⁻¹, I, C Qₛ⁻¹ Gᵀ]``.
    """

    def __init__(self, data: _Data, Q, c, A, b, G, h):
        self.data = data
        B, n, p, m, N = data.B, data.n, data.p, data.m, data.N
        self.n, self.p, self.m, self.N = n, p, m, N
        k = p + m
        Qs = _sym(Q)
        K = _kkt_matrix(data, Qs, A, G)
        dtype, device = K.dtype, K.device
        eye_k = torch.eye(k, dtype=dtype, device=device).expand(B, k, k)
        zeros = functools.partial(torch.zeros, dtype=dtype, device=device)
        self.K = K
        q = [c.expand(B, n)]
        if A is not None:
            q.append(-b.expand(B, p))
        q.append(-h.expand(B, m))
        self.q = torch.cat(q, -1).unsqueeze(1)  # (B, 1, N)
        L, _ = torch.linalg.cholesky_ex(Qs.expand(B, n, n))
        Ct = K[:, :n, n:]  # [A; G]ᵀ, (B, n, p+m)
        eye_n = torch.eye(n, dtype=dtype, device=device).expand(B, n, n)
        X = torch.cholesky_solve(torch.cat([eye_n, Ct], -1), L)  # [Qₛ⁻¹, Qₛ⁻¹Cᵀ]
        self.W = Ct.mT @ X[..., n:]  # C Qₛ⁻¹ Cᵀ, (B, p+m, p+m)
        self.M1 = -X  # (n, n + p + m)
        self.neg_Qinv, self.nqc = self.M1[..., :n], self.M1[..., n:]  # −Qₛ⁻¹ (symmetric), −Qₛ⁻¹Cᵀ
        W, nqc = self.W, self.nqc
        self.zeros_k = zeros(B, 1, k)
        self.T = torch.cat([nqc.mT, eye_k, W[..., p:]], -1)  # (p+m, n + p + 2m)
        self.neg_Gt = -Ct[..., p:]
        self.h = h.expand(B, m).unsqueeze(1)

    def residual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``R = [r_d; r_p; Gx − h]`` (B, 1, N) and the error of :func:`_kkt_error` (B,)."""
        k, N = self.n + self.p, self.N
        R = torch.baddbmm(self.q, u[..., :N], self.K)
        gap = R[..., k:]
        error = torch.maximum(
            torch.cat([R[..., :k], u[..., k:N] * gap], -1).abs().amax((1, 2)), gap.amax((1, 2))
        )
        return R, error

    def start(self) -> Tensor:
        B, n, p, m = self.data.B, self.n, self.p, self.m
        L = self._factor(torch.ones(B, m, dtype=self.q.dtype, device=self.q.device))
        c = self.q[..., :n]
        # (W + diag(0, I)) y = −C Qₛ⁻¹ c − [b; h]; x = −Qₛ⁻¹(c + Cᵀ y).
        rhs = torch.baddbmm(self.q[..., n:], c, self.nqc)
        y = torch.cholesky_solve(rhs.mT, L).mT
        x = torch.baddbmm(c @ self.neg_Qinv, y, self.nqc.mT)
        s0 = torch.baddbmm(self.h, x, self.neg_Gt)  # h − Gx
        # CVXOPT's shift: s = s0 + (1 + α_p) if α_p = −min s0 ≥ 0; λ likewise from −s0.
        ap = -s0.amin(-1, keepdim=True)
        s = torch.where(ap >= 0, s0 + 1 + ap, s0)
        ad = s0.amax(-1, keepdim=True)
        lam = torch.where(ad >= 0, 1 + ad - s0, -s0)
        return torch.cat([x, y[..., :p], lam, s], -1)

    def _factor(self, d: Tensor) -> Tensor:
        """Cholesky factor of ``W + diag(0, d)``; ``d`` (B, m)."""
        if self.p:
            d = torch.cat([d.new_zeros(d.shape[0], self.p), d], -1)
        return torch.linalg.cholesky_ex(self.W + torch.diag_embed(d))[0]

    def step(self, u: Tensor, R: Tensor) -> Tensor:
        """One predictor-corrector step from ``u = [x; ν; λ; s]`` with residual ``R``."""
        p, m, N = self.p, self.m, self.N
        k = self.n + p
        v = u[..., k:]  # [λ; s]
        lam, s = u[..., k:N], u[..., N:]
        inv_lam = lam.reciprocal()
        L = self._factor((s * inv_lam).squeeze(1))
        n = self.n
        P = R[..., :n] @ self.M1  # [−Qₛ⁻¹ r_d; −C Qₛ⁻¹ r_d]
        Y_i = P[..., n + p :] + R[..., k:] + s  # r_i − G Qₛ⁻¹ r_d
        if p:
            Y_e = P[..., n : n + p] + R[..., n:k]
        D0 = torch.cat([P[..., :n], self.zeros_k, -Y_i], -1)
        sl = s * lam
        neg_inv_v = -1.0 / v

        def direction(rc):
            r = torch.addcmul(Y_i, rc, inv_lam, value=-1.0)
            if p:
                r = torch.cat([Y_e, r], -1)
            y = torch.cholesky_solve(r.mT, L).mT
            return torch.baddbmm(D0, y, self.T)  # [dx; dν; dλ; ds]

        # Predictor (affine scaling). The largest α ≤ 1 with v + α dv ≥ 0 is
        # 1 / max(1, max_i(−dv_i / v_i)).
        du = direction(sl)
        dv = du[..., k:]
        alpha = (dv * neg_inv_v).amax(-1, keepdim=True).clamp_min(1.0).reciprocal()
        t = torch.addcmul(v, alpha, dv)
        ratio = (t[..., :m] * t[..., m:]).sum(-1, keepdim=True) / sl.sum(-1, keepdim=True)
        sigma_mu = ratio.clamp(0, 1) ** 3 * sl.mean(-1, keepdim=True)
        # Corrector (Mehrotra's second-order term and centring), 0.99 of the way to the
        # boundary.
        du = direction(torch.addcmul(sl - sigma_mu, du[..., N:], dv[..., :m]))
        alpha = 0.99 / (du[..., k:] * neg_inv_v).amax(-1, keepdim=True).clamp_min(0.99)
        return torch.addcmul(u, alpha, du)


@dataclasses.dataclass(kw_only=True)
class QP(IterativeSolver):
    """Batched QP with inequality constraints, by a primal-dual interior-point method.

    Solves ``min_x ½ xᵀQx + cᵀx`` subject to ``A x = b`` and ``G x ≤ h`` for a batch of
    problems (see the module docstring for shapes and batching) with Mehrotra's
    predictor-corrector method (:class:`_IPM`): per iteration one batched Cholesky
    factorisation of a ``(p+m)``-square matrix and a few batched products, no host
    synchronisation except the convergence check every ``check_every`` iterations. ``Qₛ`` must
    be positive definite and ``A`` of full row rank. On the CPU, when the compiled extension
    is loaded and nothing differentiates through the iterations (the default implicit
    differentiation), the same iterations run in its kernel ``implicit_torch::qp_ipm``, one
    problem at a time with its matrices in cache, each problem stopping on its own (about 4×
    faster than the batched operations for 64 problems of 20 variables; same iterates to
    rounding), for up to 200 constraints, beyond which the batched LAPACK factorisations of
    the loop are faster.

    ``run(init_params=None, params_obj=(Q, c), params_eq=None or (A, b), params_ineq=(G, h))``
    (JAXopt's API) returns ``OptStep(KKTSolution(x, ν, λ), QPState)``. The solution is
    differentiable in every tensor of the data by implicit differentiation of
    :meth:`optimality_fun`, the KKT residual ``(Qₛx + c + Aᵀν + Gᵀλ, Ax − b, λ ⊙ (Gx − h))``
    (``batched=True``), or, with ``unroll=True``, through the interior-point iterations.
    The default linear solver of the implicit derivatives, :class:`KKTLinearSolve`, uses the
    KKT Jacobian's structure (one batched Cholesky factorisation of the forward's reduced
    system); ``implicit_diff_solve="lu"`` forms the Jacobian from ``N`` vector-Jacobian products
    and factors it by LU instead (same result, slower).

    Convergence: problem ``i`` stops when ``state.error[i]`` (the ∞-norm of its KKT residual
    and of its inequality violation) is at most ``tol · (1 + ‖[c; b; h]‖∞)``, or when its
    error has not decreased for 3 iterations (the precision floor); the best iterate is
    returned. It has converged if it met ``tol``, or stalled below ``acceptable_tol`` (as
    IPOPT's acceptable termination). A problem that has not converged (infeasible, unbounded,
    degenerate) is reported as ``on_failure`` says.

    Attributes:
        maxiter: maximum interior-point iterations (default 50; 8 to 15 is usual).
        tol: relative KKT tolerance: problem ``i`` has converged when ``state.error[i] ≤ tol ·
            (1 + ‖[c; b; h]‖∞)``; None: ``1e-10`` when computing in float64 (see
            ``compute_dtype``), ``1e-6`` in lower precision.
        acceptable_tol: the relative error below which a problem that stalls counts as
            converged; None: ``1e-6`` in float64, ``1e-3`` in lower precision.
        compute_dtype: the dtype of the interior-point iterations; None: float64 on the CPU
            (where small batched problems cost the same in float32 and float64, and float64
            reaches ~1e-7 relative accuracy in float32 results instead of ~1e-3), the data's
            dtype on accelerators. Results and gradients have the data's dtype either way.
        implicit_diff_solve: the engine's linear solver; None: :class:`KKTLinearSolve`.
        verbose, implicit_diff, unroll, on_failure, check_every: see
            :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    maxiter: int = 50
    tol: float | None = None  # type: ignore[assignment]
    acceptable_tol: float | None = None
    compute_dtype: torch.dtype | None = None

    def optimality_fun(
        self, params: KKTSolution, params_obj, params_eq=None, params_ineq=None
    ) -> KKTSolution:
        """The KKT residual ``KKTSolution(Qₛx + c + Aᵀν + Gᵀλ, Ax − b, λ ⊙ (Gx − h))``, shaped
        like ``params`` (a missing constraint block gives None)."""
        return _optimality(params, params_obj, params_eq, params_ineq)

    def run(  # type: ignore[override]
        self, init_params: Any = None, params_obj=None, params_eq=None, params_ineq=None
    ) -> OptStep:
        """Solve the batch; ``init_params`` is ignored (the interior-point method starts from
        its own point). See the class docstring."""
        self._validate()
        Q, c = _pair(params_obj, "params_obj", ("Q", "c"), True)
        A, b = _pair(params_eq, "params_eq", ("A", "b"), False)
        G, h = _pair(params_ineq, "params_ineq", ("G", "h"), True)
        data = _Data(Q, c, A, b, G, h)
        if data.m == 0:
            raise ValueError("QP needs at least one inequality; use EqualityConstrainedQP")
        args = (Q, c if data.batched else c.unsqueeze(0), A, b, G, h)
        if self.unroll or not self.implicit_diff:
            z, state, _ = self._iterate(data, args)
            return _finish(z, state, data, A is not None, True)
        solve = self.implicit_diff_solve
        if solve is None:
            solve = KKTLinearSolve()

        def solver(_init, *args):
            z, state, ipm = self._iterate(data, args)
            if isinstance(solve, KKTLinearSolve):
                solve.at(z, ipm)
            return z, state

        z, state = implicit_solve(
            solver, _kkt_residual, None, *args, solve=solve, has_aux=True, batched=True
        )
        return _finish(z, state, data, A is not None, True)

    def _tol(self, dtype) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-10 if dtype == torch.float64 else 1e-6

    def _acceptable_tol(self, dtype) -> float:
        if self.acceptable_tol is not None:
            return self.acceptable_tol
        return 1e-6 if dtype == torch.float64 else 1e-3

    def _compute_dtype(self, data: _Data) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float64 if data.device.type == "cpu" else data.dtype

    def _iterate(self, data: _Data, args: tuple):
        dtype = self._compute_dtype(data)
        if dtype != data.dtype:
            args = tuple(None if t is None else t.to(dtype) for t in args)
        tol = self._tol(dtype)
        ipm = _IPM(data, *args)
        if self._use_compiled_kernel(ipm):
            return self._iterate_compiled(data, ipm, tol, dtype)
        u = ipm.start()
        R, error = ipm.residual(u)
        # The best iterate so far is returned: once μ nears the precision limit, the reduced
        # matrix is so ill-conditioned that further steps can lose accuracy. A problem stops
        # when it has converged or has not improved for `patience` iterations.
        best, best_error = u, error
        stall = torch.zeros(data.B, dtype=torch.int64, device=data.device)
        iters = torch.zeros_like(stall)
        patience = _PATIENCE
        inspect = _runtime.can_inspect_values()
        interval = self.check_every or _runtime.check_interval(data.device)
        # Stop at error ≤ tol · (1 + ‖[c; b; h]‖∞): residuals are computed to about machine
        # precision times the size of the data.
        limit = tol * (1 + ipm.q.abs().amax((1, 2)))
        for k in range(self.maxiter):
            active = (best_error > limit) & (stall < patience)
            if inspect and k % interval == 0:
                if self.verbose:
                    print(f"QP iteration {k}: max error {float(best_error.max()):.3e}")
                if not bool(active.any()):
                    break
            u = torch.where(active[:, None, None], ipm.step(u, R), u)
            iters = iters + active
            R, error = ipm.residual(u)
            improved = error < best_error
            best = torch.where(improved[:, None, None], u, best)
            best_error = torch.where(improved, error, best_error)
            stall = torch.where(improved, 0, stall + active)
        # Converged: the target met, or stalled below the acceptable level (IPOPT's
        # "acceptable" termination; in float32 the attainable accuracy varies by problem).
        acceptable = self._acceptable_tol(dtype) * (1 + ipm.q.abs().amax((1, 2)))
        converged = (best_error <= limit) | ((stall >= patience) & (best_error <= acceptable))
        if inspect:
            _report(
                type(self).__name__,
                best_error,
                converged,
                tol,
                iters,
                self.maxiter,
                self.on_failure,
            )
        z = best[:, 0, : data.N].to(data.dtype)
        return z, QPState(iters, best_error.to(data.dtype), converged), ipm

    def _use_compiled_kernel(self, ipm: _IPM) -> bool:
        """Whether the iterations can run in the extension's CPU kernel (the same algorithm,
        problem by problem): CPU data that nothing differentiates through (the implicit path
        runs the forward without recording), at most ``_KERNEL_MAX_CONSTRAINTS`` constraints,
        outside ``torch.func`` transforms and ``torch.compile``, without ``verbose`` (whose
        per-iteration print is this loop's)."""
        from implicit_torch.ops import _registration

        tensors = (ipm.K, ipm.q, ipm.M1, ipm.W, ipm.T, ipm.neg_Gt)
        return (
            _USE_COMPILED_KERNEL
            and ipm.p + ipm.m <= _KERNEL_MAX_CONSTRAINTS
            and not self.verbose
            and ipm.q.device.type == "cpu"
            and _registration.qp_ipm_available()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not _runtime.under_functorch()
            and _runtime.can_inspect_values()
        )

    def _iterate_compiled(self, data: _Data, ipm: _IPM, tol: float, dtype: torch.dtype):
        """:meth:`_iterate` by the kernel ``implicit_torch::qp_ipm`` (csrc/cpu/qp_ipm_cpu.cpp)."""
        z, iters, error, converged = torch.ops.implicit_torch.qp_ipm(
            ipm.K,
            ipm.q.squeeze(1),
            ipm.M1,
            ipm.W,
            ipm.T,
            ipm.neg_Gt,
            self.maxiter,
            tol,
            self._acceptable_tol(dtype),
            _PATIENCE,
        )
        _report(type(self).__name__, error, converged, tol, iters, self.maxiter, self.on_failure)
        return z.to(data.dtype), QPState(iters, error.to(data.dtype), converged), ipm


class KKTLinearSolve:
    """The implicit-derivative linear solver of :class:`QP`: the KKT Jacobian's structure.

    At ``z = [x; ν; λ]`` the Jacobian of :func:`_kkt_residual` is

        J = [[Qₛ, Aᵀ, Gᵀ], [A, 0, 0], [diag(λ) G, 0, diag(g)]],    g = Gx − h,

    and with ``d = −g/λ`` (the interior point's ``s/λ`` at the solution) both ``J w = r`` and
    ``Jᵀ u = v`` reduce to the forward solve's symmetric positive definite system
    ``(C Qₛ⁻¹ Cᵀ + diag(0, d)) y = C Qₛ⁻¹ r₁ − [r₂; r̃₃]`` (``C = [A; G]``), one batched
    Cholesky factorisation shared by all solves:

    * ``J w = r``: ``r̃₃ = r₃/λ``, ``(w₂, w₃) = y``, ``w₁ = Qₛ⁻¹(r₁ − Cᵀy)``;
    * ``Jᵀ u = v``: ``r̃₃ = v₃``, ``(u₂, λ ⊙ u₃) = y``, ``u₁ = Qₛ⁻¹(v₁ − Cᵀy)``.

    The engine calls ``solve(matvec, r)`` with either ``J`` or ``Jᵀ`` (reverse mode asks for
    ``Jᵀ``, forward mode for ``J``); one ``matvec`` of a probe vector tells which, and checks
    that the closed form matches the engine's Jacobian. Where it cannot (inside ``torch.func``
    transforms or ``torch.compile``, or if the probe matches neither), the system is solved by
    :func:`implicit_torch.linear_solve.solve_lu` on ``matvec`` instead.
    """

    def __init__(self):
        self.z = self.ipm = self._L = None

    def at(self, z: Tensor, ipm: _IPM) -> None:
        """Set the linearisation point: the solution ``z`` (B, N) and the forward's
        matrices."""
        self.z, self.ipm, self._L = z, ipm, None

    def _setup(self):
        if self._L is None:
            ipm, z = self.ipm, self.z
            k, N = ipm.n + ipm.p, ipm.N
            z = z.to(ipm.q.dtype)
            self.lam = z[:, k:N].unsqueeze(1)
            gap = torch.baddbmm(ipm.q[..., k:], z.unsqueeze(1), ipm.K[..., k:])
            self.gap = gap
            self._L = ipm._factor((-gap / self.lam).squeeze(1))
        return self._L

    def _apply(self, r: Tensor, transpose: bool) -> Tensor:
        ipm, L = self.ipm, self._setup()
        n = ipm.n
        dtype = r.dtype
        r = r.to(ipm.q.dtype).unsqueeze(1)
        r1 = r[..., :n]
        rest = r[..., n:]
        if not transpose:
            rest = torch.cat([rest[..., : ipm.p], rest[..., ipm.p :] / self.lam], -1)
        rhs = -(r1 @ ipm.nqc) - rest  # C Qₛ⁻¹ r₁ − [r₂; r̃₃]
        y = torch.cholesky_solve(rhs.mT, L).mT
        w1 = torch.baddbmm(-(r1 @ ipm.neg_Qinv), y, ipm.nqc.mT)
        if transpose:
            y = torch.cat([y[..., : ipm.p], y[..., ipm.p :] / self.lam], -1)
        return torch.cat([w1, y], -1).squeeze(1).to(dtype)

    def _products(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """``(J e, Jᵀ e)`` for ``e`` (B, N), from ``K`` and ``λ``, ``g``."""
        ipm = self.ipm
        k = ipm.n + ipm.p
        dtype = e.dtype
        e = e.to(ipm.q.dtype).unsqueeze(1)
        scale = torch.cat([torch.ones_like(e[..., :k]), self.lam], -1)
        diag = torch.cat([torch.zeros_like(e[..., :k]), self.gap * e[..., k:]], -1)
        Je = (e @ ipm.K) * scale + diag
        Jte = (e * scale) @ ipm.K + diag
        return Je.squeeze(1).to(dtype), Jte.squeeze(1).to(dtype)

    def __call__(self, matvec, r):
        from implicit_torch import linear_solve

        usable = (
            self.z is not None
            and isinstance(r, Tensor)
            and r.shape == self.z.shape
            and not _runtime.under_functorch()
            and _runtime.can_inspect_values(r)
        )
        if usable:
            self._setup()
            probe = torch.cos(torch.arange(r.numel(), dtype=r.dtype, device=r.device)).view_as(r)
            out = matvec(probe)
            Jp, Jtp = self._products(probe)
            scale = out.abs().amax() + torch.finfo(r.dtype).tiny
            e_n = float((out - Jp).abs().amax() / scale)
            e_t = float((out - Jtp).abs().amax() / scale)
            if min(e_n, e_t) <= (1e-8 if r.dtype == torch.float64 else 1e-3):
                return self._apply(r, transpose=e_t < e_n)
        return linear_solve.solve_lu(matvec, r, batched=True)


def projection_polyhedron(x: Tensor, hyperparams: tuple, check_feasible: bool = False) -> Tensor:
    """Euclidean projection onto the polyhedron ``{y : A y = b, G y ≤ h}``, via :class:`QP`.

    ``argmin_y ½‖y − x‖²`` subject to ``A y = b``, ``G y ≤ h`` (the QP with ``Q = I``,
    ``c = −x``), differentiable in ``x``, ``A``, ``b``, ``G``, ``h`` through its KKT
    conditions.

    Args:
        x: ``(n,)``, or ``(B, n)`` for a batch of points.
        hyperparams: ``(A, b, G, h)``, shared (``A (p, n)``, ...) or per point (``A (B, p,
            n)``, ...); ``(A, b)`` may be ``(None, None)``, and ``(G, h)`` likewise.
        check_feasible: raise :class:`~implicit_torch.ConvergenceError` if the projection
            fails (an empty polyhedron) instead of warning.

    Returns:
        The projection, shaped like ``x``.
    """
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != 4:
        raise ValueError("projection_polyhedron: hyperparams must be a tuple (A, b, G, h)")
    A, b, G, h = hyperparams
    if not isinstance(x, Tensor) or x.dim() not in (1, 2):
        raise ValueError(f"projection_polyhedron: x must be a tensor (n,) or (B, n), got {x!r}")
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    on_failure = "raise" if check_feasible else "warn"
    params_eq = None if A is None else (A, b)
    if G is None:
        solver = EqualityConstrainedQP(on_failure=on_failure)
        return solver.run(None, (eye, -x), params_eq).params.primal
    return QP(on_failure=on_failure).run(None, (eye, -x), params_eq, (G, h)).params.primal
