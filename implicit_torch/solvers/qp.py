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
problem); :class:`QP` solves with it through its structure (:class:`KKTLinearSolve`,
one per run, holding that run's factorisation),
:class:`EqualityConstrainedQP` by dense LU (``"lu"``), and any engine solver can be chosen
with ``implicit_diff_solve``.

Shapes. Every piece of data is either shared by the batch (no batch dimension: ``Q (n, n)``,
``c (n,)``, ``A (p, n)``, ``b (p,)``, ``G (m, n)``, ``h (m,)``) or given per problem (one more
leading dimension ``B``). A shared tensor that requires grad receives the *sum* of the
per-problem gradients. When no piece has a batch dimension the problem is a single one and the
solution is unbatched (``x (n,)``).

Modules: :mod:`._qp_data` (checked data, the KKT residual and matrix), :mod:`._ipm` (the
interior-point iterations), :mod:`._kkt` (the structured linear solve of the derivatives);
here the two solvers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from implicit_torch import _runtime
from implicit_torch._loop import Cadence
from implicit_torch._result import (
    SolveInfo,
    Status,
    check_on_failure,
    check_tolerances,
    default_rtol,
    report,
    status_codes,
)
from implicit_torch.adjoint import Adjoint, ImplicitAdjoint, from_flags
from implicit_torch.ops import _registration
from implicit_torch.solvers._ipm import _IPM, _PATIENCE
from implicit_torch.solvers._kkt import KKTLinearSolve
from implicit_torch.solvers._qp_data import (
    KKTSolution,
    QPState,
    _Data,
    _from_flat,
    _kkt_error,
    _kkt_matrix,
    _kkt_residual,
    _kkt_residual_active_set,
    _optimality,
    _pair,
    _sym,
    active_constraints,
)
from implicit_torch.solvers.base import DiffFields, IterativeSolver, OptStep

__all__ = [
    "DIRECT_RTOL",
    "QP",
    "EqualityConstrainedQP",
    "KKTLinearSolve",
    "KKTSolution",
    "QPState",
    "report_qp",
]

Tensor = torch.Tensor

# EqualityConstrainedQP's default tol (float64, lower precisions). Not DEFAULT_RTOL["qp"]: it is
# no stopping target but a check that the one LU solve met no singular or ill-conditioned KKT
# matrix. LU is backward stable, so its residual is about n·eps·‖K‖‖z‖, which exceeds 1e-6 of
# 1 + ‖[c; b]‖∞ in float32 on well-conditioned problems (up to 6.4e-6 measured, n = 20, p = 5).
DIRECT_RTOL = (1e-8, 1e-3)

# Run the interior-point iterations in the extension's CPU kernel where it applies (see
# QP._use_compiled_kernel); tests set it to False to compare with the PyTorch loop.
_USE_COMPILED_KERNEL = True
# The kernel factors its (p + m)-square reduced matrix with a plain, unblocked Cholesky: up to
# here it beats the batched loop (LAPACK), measured on a 2-core CPU, one thread: 4.7x at
# p + m = 30, 3.5x at 20 (B = 64), 2.8x at 50, 2.0x at 105, 1.05x at 200, 0.83x at 300.
_KERNEL_MAX_CONSTRAINTS = 200

# What a failed QP is told to check, by status: (headline, detail, fix) as in
# implicit_torch.solvers.base.Failure; the headline stays "did not converge", the detail says
# why.
_QP_FIX = (
    "the problem may be infeasible, unbounded or degenerate (Q not positive definite, "
    "dependent equality constraints), or need a larger maxiter or tol."
)
_QP_FAILURES: dict[Status, tuple[str, str, str]] = {
    Status.UNBOUNDED: (
        "did not converge",
        "Qₛ = ½(Q + Qᵀ) is not positive semidefinite: the objective is not convex, and "
        "unbounded below where the constraints allow; no point is returned (NaN), since a "
        "stationary point would be a saddle",
        "make Q positive semidefinite (e.g. add μ·I with μ above minus its smallest "
        "eigenvalue), or use a solver for non-convex problems.",
    ),
    Status.SINGULAR: (
        "did not converge",
        "Qₛ is singular, or the equality constraints are linearly dependent: this "
        "interior-point method needs Qₛ positive definite and A of full row rank",
        "add a small ridge μ·I to Q (e.g. μ = 1e-8 · ‖Q‖), or remove the dependent rows of A.",
    ),
    Status.INFEASIBLE: (
        "did not converge",
        "the problem is infeasible: no x satisfies A x = b, G x ≤ h (the multipliers give a "
        "Farkas certificate)",
        "check the constraints (A, b, G, h).",
    ),
}


def _finish(z: Tensor, state: QPState, data: _Data, has_eq: bool, has_ineq: bool) -> OptStep:
    """Split ``z`` into a :class:`KKTSolution`, dropping the batch dim of a single problem."""
    single = not data.batched
    if single:
        state = QPState(*(t.squeeze(0) for t in state))
    return OptStep(_from_flat(z, data.n, data.p, has_eq, has_ineq, single), state)


def _through_kkt(adjoint: Adjoint, solve: Any, args: tuple, default_solve: Any) -> tuple:
    """``solve(None, *args) -> (z, state)``, with ``z`` (B, N) differentiable in ``args`` as
    ``adjoint`` says, through the KKT residual (``batched=True``: one block per problem). The
    solvers report their own failures, so the engine's root check is off (one report)."""
    return adjoint.apply(
        solve,
        _kkt_residual,
        None,
        args,
        has_aux=True,
        batched=True,
        default_solve=default_solve,
        check_root=False,
    )


def report_qp(
    who: str,
    state: QPState,
    on_failure: str,
    *,
    fix: str = _QP_FIX,
    failures: dict[Status, tuple[str, str, str]] | None = None,
    target: Tensor | None = None,
    maxiter: int | None = None,
) -> None:
    """Report the problems of ``state`` that did not converge, as ``on_failure`` says, each
    with what its ``state.status`` means (:data:`_QP_FAILURES`, updated by ``failures``, e.g.
    a projection's own words) and ``fix`` otherwise; ``target``: the threshold per problem."""
    info = SolveInfo(state.iter_num, state.error, state.converged, state.status, who, target)
    messages = {**_QP_FAILURES, **(failures or {})}
    worst = Status(int(state.status.max()))
    report(
        who,
        info,
        on_failure,
        measure="KKT error",
        fix=messages[worst][2] if worst in messages else fix,
        explain={code: (headline, detail) for code, (headline, detail, _) in messages.items()},
        maxiter=maxiter,
        stacklevel=4,
    )


# ----------------------------------------------------------------------------------------
# EqualityConstrainedQP
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class EqualityConstrainedQP(DiffFields):
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
            ill-conditioned KKT matrix) is reported; None: :data:`DIRECT_RTOL` (``1e-8`` in
            float64, ``1e-3`` in lower precision).
        implicit_diff, implicit_diff_solve, unroll, on_failure: see
            :class:`~implicit_torch.solvers.base.DiffFields`; ``implicit_diff=False`` (or
            ``unroll``) differentiates by autograd through the dense solve, and the default
            linear solver of the implicit derivatives is ``"lu"`` (per problem).
    """

    tol: float | None = None

    def default_implicit_diff_solve(self) -> str:
        """Dense LU per problem: the Jacobian is the (small) symmetric indefinite KKT
        matrix."""
        return "lu"

    def optimality_fun(self, params: KKTSolution, params_obj, params_eq=None) -> KKTSolution:
        """The KKT residual ``KKTSolution(Qₛx + c + Aᵀν, Ax − b, None)``, shaped like
        ``params``."""
        return _optimality(params, params_obj, params_eq, None)

    def run(self, init_params: Any = None, params_obj=None, params_eq=None) -> OptStep:
        """Solve; ``init_params`` is ignored (the solve is direct). See the class docstring."""
        check_on_failure(self.on_failure)
        check_tolerances(self.tol)
        Q, c = _pair(params_obj, "params_obj", ("Q", "c"), True)
        A, b = _pair(params_eq, "params_eq", ("A", "b"), False)
        data = _Data(Q, c, A, b, None, None)
        tol = self.tol
        if tol is None:
            tol = DIRECT_RTOL[0] if data.dtype == torch.float64 else DIRECT_RTOL[1]
        # Internally every problem is batched: a single one gets a batch of one through c.
        args = (Q, c if data.batched else c.unsqueeze(0), A, b, None, None)

        def solve(_init, Q, c, A, b, G, h):
            K = _kkt_matrix(data, _sym(Q), A, None)
            rhs = -c.expand(data.B, data.n)
            if A is not None:
                rhs = torch.cat([rhs, b.expand(data.B, data.p)], -1)
            z, info = torch.linalg.solve_ex(K, rhs)  # a singular K: reported below
            error = _kkt_error(z, Q, c, A, b, None, None)
            ones = torch.ones(data.B, dtype=torch.int64, device=data.device)
            converged = error <= tol * (1 + rhs.abs().amax(-1))
            status = _direct_status(converged, error, info != 0, A, b)
            return z, QPState(ones, error, converged, status)

        z, state = _through_kkt(self.adjoint, solve, args, self.default_implicit_diff_solve())
        if _runtime.can_inspect_values():
            fix = "Q may be singular on the null space of A, or A rank-deficient."
            report_qp(type(self).__name__, state, self.on_failure, fix=fix)
        return _finish(z, state, data, A is not None, False)


def _direct_status(converged, error, singular, A: Tensor | None, b: Tensor | None) -> Tensor:
    """Status codes of a direct KKT solve: a failed problem whose ``A x = b`` has no solution
    (its least-squares residual is not ~0) is ``INFEASIBLE``, another with a ``singular`` KKT
    matrix ``SINGULAR``."""
    infeasible = None
    if A is not None and _runtime.can_inspect_values() and not bool(converged.all()):
        A, b = A.detach(), b.detach()
        x = (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)
        gap = (A @ x.unsqueeze(-1)).squeeze(-1) - b
        scale = 1 + b.abs().amax(-1) + A.abs().amax((-2, -1)) * x.abs().amax(-1)
        eps = torch.finfo(b.dtype).eps
        infeasible = ~converged & (gap.abs().amax(-1) > math.sqrt(eps) * scale)
    return status_codes(converged, error, infeasible=infeasible, singular=singular)


# ----------------------------------------------------------------------------------------
# QP with inequality constraints: batched primal-dual interior point
# ----------------------------------------------------------------------------------------


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
    IPOPT's acceptable termination). A problem that has not converged is reported as
    ``on_failure`` says, with its cause in ``state.status`` and the message: ``UNBOUNDED``
    when ``Qₛ`` is not positive semidefinite (not convex: its Cholesky factorisation fails
    even with a shift of ``10 n eps ‖Qₛ‖``; NaN is returned, never a saddle point),
    ``SINGULAR`` when ``Qₛ`` is singular or ``A`` rank-deficient, ``INFEASIBLE`` when the
    multipliers give a Farkas certificate (found by rerunning the iterations of the failed
    problems without their early stop, :meth:`_IPM.certify_infeasible`). The compiled kernel
    and the PyTorch loop report the same: the causes are found from the same matrices, in
    PyTorch, after either.

    Attributes:
        maxiter: maximum interior-point iterations (default 50; 8 to 15 is usual).
        tol: relative KKT tolerance: problem ``i`` has converged when ``state.error[i] ≤ tol ·
            (1 + ‖[c; b; h]‖∞)``; None: ``DEFAULT_RTOL["qp"]`` of :mod:`implicit_torch._result`
            (``1e-10`` when computing in float64, see ``compute_dtype``; ``1e-6`` in lower
            precision).
        acceptable_tol: the relative error below which a problem that stalls counts as
            converged; None: ``1e-6`` in float64, ``1e-3`` in lower precision.
        exact_active_set: differentiate with the active set frozen (implicit differentiation
            only): inequality ``i`` is active where ``λᵢ > hᵢ − Gᵢx`` at the solution, and the
            derivatives are those of the reduced KKT system (active constraints as equalities,
            inactive multipliers fixed at 0), solved by LU per problem. Where strict
            complementarity holds this is the exact derivative: a quantity that does not
            depend on a parameter gets exactly 0, where the interior point's complementarity
            ``λ ⊙ (Gx − h)`` leaves terms of the size of its last multiplier or slack (up to
            ~1e-6 at the default tolerances, which Adam magnifies into full steps). At a
            degenerate point (a constraint active with ``λᵢ = 0``) the QP is not
            differentiable and the frozen set gives one of its one-sided derivatives.
        compute_dtype: the dtype of the interior-point iterations; None: float64 on the CPU
            (where small batched problems cost the same in float32 and float64, and float64
            reaches ~1e-7 relative accuracy in float32 results instead of ~1e-3), the data's
            dtype on accelerators. Results and gradients have the data's dtype either way.
        implicit_diff_solve: the engine's linear solver; None: a :class:`KKTLinearSolve`
            built for each run.
        verbose, implicit_diff, unroll, on_failure, check_every: see
            :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    maxiter: int = 50
    tol: float | None = None  # type: ignore[assignment]
    acceptable_tol: float | None = None
    compute_dtype: torch.dtype | None = None
    exact_active_set: bool = False

    def optimality_fun(
        self, params: KKTSolution, params_obj, params_eq=None, params_ineq=None
    ) -> KKTSolution:
        """The KKT residual ``KKTSolution(Qₛx + c + Aᵀν + Gᵀλ, Ax − b, λ ⊙ (Gx − h))``, shaped
        like ``params`` (a missing constraint block gives None)."""
        return _optimality(params, params_obj, params_eq, params_ineq)

    def default_implicit_diff_solve(self) -> KKTLinearSolve:
        """A new :class:`KKTLinearSolve`, which :meth:`run` binds to its solution."""
        return KKTLinearSolve()

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
        # This run's structured solve: the forward binds it to the solution it returns, so
        # the factorisation travels with that solution and the QP object is not modified.
        kkt = self.default_implicit_diff_solve()

        def solve(_init, *args):
            z, state, ipm = self._solve(data, args)
            kkt.bind(z, ipm)
            return z, state

        adjoint = self.adjoint
        if isinstance(self.implicit_diff_solve, KKTLinearSolve):  # the same as None
            adjoint = from_flags(self.implicit_diff, None, self.unroll)
        if self.exact_active_set and isinstance(adjoint, ImplicitAdjoint):
            z, state = self._through_active_set(adjoint, data, args)
        else:
            z, state = _through_kkt(adjoint, solve, args, kkt)
        return _finish(z, state, data, A is not None, True)

    def _through_active_set(self, adjoint: ImplicitAdjoint, data: _Data, args: tuple):
        """The forward, then its solution differentiated through the KKT residual of its
        active set (see ``exact_active_set``)."""
        with torch.no_grad():
            z, state, _ = self._solve(data, args)
            _, c, A, _, G, h = args
            active = active_constraints(z, c, A, G, h)
        return adjoint.apply(
            lambda _init, *a: (z, state),
            _kkt_residual_active_set,
            None,
            (active, *args),
            has_aux=True,
            batched=True,
            default_solve="lu",
            check_root=False,
        )

    def _validate(self) -> None:
        super()._validate()
        if self.acceptable_tol is not None:
            try:
                check_tolerances(self.acceptable_tol)
            except (TypeError, ValueError) as e:
                raise type(e)(f"acceptable_tol: {e}") from None

    def _tol(self, dtype) -> float:
        return self.tol if self.tol is not None else default_rtol(dtype, "qp")

    def _acceptable_tol(self, dtype) -> float:
        if self.acceptable_tol is not None:
            return self.acceptable_tol
        return 1e-6 if dtype == torch.float64 else 1e-3

    def _compute_dtype(self, data: _Data) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float64 if data.device.type == "cpu" else data.dtype

    def _solve(self, data: _Data, args: tuple) -> tuple[Tensor, QPState, _IPM]:
        """The forward: ``(z, state, ipm)`` with ``z`` (B, N) in the data's dtype, by the
        compiled kernel or the PyTorch loop, failures reported."""
        dtype = self._compute_dtype(data)
        if dtype != data.dtype:
            args = tuple(None if t is None else t.to(dtype) for t in args)
        tol, acceptable_tol = self._tol(dtype), self._acceptable_tol(dtype)
        ipm = _IPM(data, *args)
        cadence = Cadence(data.device, check_every=self.check_every)
        if self._use_compiled_kernel(ipm):
            z, iters, error, converged = torch.ops.implicit_torch.qp_ipm(
                ipm.K,
                ipm.q.squeeze(1),
                ipm.M1,
                ipm.W,
                ipm.T,
                ipm.neg_Gt,
                self.maxiter,
                tol,
                acceptable_tol,
                _PATIENCE,
            )
        else:
            on_check = self._print if self.verbose else None
            z, iters, error, converged = ipm.solve(
                self.maxiter, tol, acceptable_tol, cadence, on_check
            )
        z, error, converged, status = ipm.diagnose(z, error, converged, self.maxiter, cadence)
        state = QPState(iters, error, converged, status)
        if cadence.inspect:
            report_qp(
                type(self).__name__,
                state,
                self.on_failure,
                target=ipm.limit(tol),
                maxiter=self.maxiter,
            )
        return z.to(data.dtype), state._replace(error=error.to(data.dtype)), ipm

    def _print(self, k: int, loop_state: Any) -> None:
        print(f"QP iteration {k}: max error {float(loop_state.best_error.max()):.3e}")

    def _use_compiled_kernel(self, ipm: _IPM) -> bool:
        """Whether the iterations can run in the extension's CPU kernel (the same algorithm,
        problem by problem): CPU data that nothing differentiates through (the implicit path
        runs the forward without recording), at most ``_KERNEL_MAX_CONSTRAINTS`` constraints,
        outside ``torch.func`` transforms and ``torch.compile``, without ``verbose`` (whose
        per-iteration print is this loop's)."""
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
