"""Linear solvers for the implicit-differentiation engine.

Every solver has the signature ``solve_X(matvec, b, *, init=None, ridge=None, tol=None,
atol=0.0, maxiter=None, M=None, batched=None, on_failure="warn", return_info=False)`` and
returns ``x`` (a pytree shaped like ``b``) with ``A x = b``, where ``A`` is ``matvec``: a
function from pytrees shaped like ``b`` to pytrees shaped like ``b``, or a
:class:`LinearOperator`, which also carries what is known of ``A``'s structure (its
transpose, symmetry, batching).

Conventions, shared by all solvers:

* ``ridge=r`` solves ``(A + r I) x = b`` (``solve_normal_cg``: ``(AᵀA + r I) x = Aᵀ b``).
* Convergence of system ``i``: ``‖b_i − A x_i‖ ≤ max(tol · ‖b_i‖, atol)``. ``tol=None`` means
  1e-10 for float64 and 1e-5 for lower precisions (the table in :mod:`implicit_torch._result`).
* ``batched=True``: dim 0 of every leaf of ``b`` indexes independent systems and ``matvec`` is
  block diagonal (output ``i`` depends on input ``i`` only). Step sizes, inner products and the
  convergence test are then per system: a converged system is frozen while the others go on.
  ``batched=None`` takes the operator's own ``batched`` (``False`` for a plain function).
* ``M`` is a preconditioner, a callable approximating ``A⁻¹`` (same pytree in and out).
* ``init`` is a warm start for the iterative solvers. The direct solvers (``solve_lu``,
  ``solve_cholesky``) need no initial guess, iteration cap or preconditioner: they accept
  ``init``, ``maxiter`` and ``M`` so that every solver can be called the same way (a
  :class:`WarmStart` passes ``init`` to any of them) and do not use them.
* No host synchronisation happens inside the iteration loops except the convergence check of
  the one driver (:mod:`implicit_torch._loop`: every iteration on the CPU, every 10 on an
  accelerator); under ``torch.func.vmap`` or ``torch.compile`` the loops run all ``maxiter``
  iterations, masked.
* All operations are differentiable torch ops, but do not differentiate *through* these loops:
  the engine wraps each solve in an implicit linear solve whose derivatives are exact.
* Failure: a solve that misses its tolerance, meets non-positive curvature (CG), breaks down
  or diverges warns with :class:`~implicit_torch.ConvergenceWarning` (``on_failure="warn"``,
  the default), raises :class:`~implicit_torch.ConvergenceError` (``"raise"``) or stays silent
  (``"ignore"``). The check reads values, so it is skipped under vmap and compile.
* ``return_info=True`` returns ``(x, SolveInfo)`` with per-system iterations, the final
  residual norm ``‖b − A x‖``, the target, a converged flag and a status code.

Modules: :mod:`.operator` (the operator type and the flat system), :mod:`.krylov`,
:mod:`.dense`, :mod:`.auto` (the choice of ``"auto"`` and its thresholds), :mod:`.outcome`
(reporting), and here the public functions, the registry of names and :class:`WarmStart`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _result, _runtime
from implicit_torch._result import SolveInfo
from implicit_torch._tree import tree_flatten, tree_map
from implicit_torch.linear import auto, dense, krylov
from implicit_torch.linear.auto import solve_formed
from implicit_torch.linear.operator import FlatSystem, LinearOperator
from implicit_torch.linear.outcome import finish

__all__ = [
    "SOLVERS",
    "LinearOperator",
    "SolveInfo",
    "WarmStart",
    "get_solver",
    "is_builtin",
    "solve_auto",
    "solve_bicgstab",
    "solve_cg",
    "solve_cholesky",
    "solve_formed",
    "solve_gmres",
    "solve_lu",
    "solve_neumann",
    "solve_normal_cg",
]

Tensor = torch.Tensor


def _system(matvec, b, init, ridge, M, batched, tol, atol) -> FlatSystem:
    if isinstance(matvec, LinearOperator):
        op = matvec
        if batched is not None and batched != op.batched:
            op = LinearOperator(op.apply, transpose=op.transpose_fn, batched=batched,
                                symmetric=op.symmetric, transposed=op.transposed,
                                apply_values=op.apply_values)  # fmt: skip
    else:
        op = LinearOperator(matvec, batched=bool(batched))
    return FlatSystem(op, b, init, ridge, M, tol, atol)


def _public(algorithm: Callable[..., tuple]) -> Callable[..., Any]:
    """The public solver around ``algorithm(sys, maxiter, **extra) -> (x, method, iterations,
    converged, failures)``: builds the flat system, validates the shared options, reports and
    packages the result. ``iterations=None`` marks a direct solve; ``converged=None`` means
    "finite" (the true residual then decides, as for every solver)."""

    @functools.wraps(algorithm)
    def solve(
        matvec,
        b,
        *,
        init=None,
        ridge=None,
        tol=None,
        atol=0.0,
        maxiter=None,
        M=None,
        batched=None,
        on_failure="warn",
        return_info=False,
        **extra,
    ):
        _result.check_on_failure(on_failure)
        sys = _system(matvec, b, init, ridge, M, batched, tol, atol)
        sys.report_fallbacks = on_failure != "ignore"
        maxiter = _result.check_maxiter(maxiter)
        cap = 10 * sys.shape[1] if maxiter is None else maxiter
        x, method, iters, conv, failures = algorithm(sys, cap, **extra)
        direct = iters is None
        if direct:
            iters = torch.zeros(sys.shape[0], dtype=torch.int64, device=x.device)
        if conv is None:
            conv = torch.isfinite(x).all(dim=1)
        return finish(
            sys, x, method, iters, conv, failures, on_failure, return_info, cap, direct=direct
        )

    # The signature users see: the shared options, then the algorithm's own (restart, ...).
    params = list(inspect.signature(solve, follow_wrapped=False).parameters.values())[:-1]
    extra = list(inspect.signature(algorithm).parameters.values())[2:]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
    solve.__signature__ = inspect.Signature(params)
    solve.__annotations__ = {}
    return solve


@_public
def solve_cg(sys: FlatSystem, maxiter: int):
    """Solve ``A x = b`` for symmetric definite ``A`` by (preconditioned) conjugate gradient.

    Matrix-free: ``A`` is only applied through ``matvec``. ``maxiter`` defaults to ``10 N``.
    Non-positive or sign-changing curvature is reported as an indefinite system. See the module
    docstring for the shared arguments.
    """
    return _named("cg", krylov.cg(sys, maxiter))


@_public
def solve_neumann(sys: FlatSystem, maxiter: int, alpha: float = 1.0, fixed_steps: bool = False):
    """Solve ``A x = b`` by Richardson iteration ``x ← x ± α M(b − A x)`` (without ``M``, the
    truncated Neumann series ``α Σₖ (I ∓ αA)ᵏ (±b)``; the sign, per system, is that of
    ``⟨b, A b⟩``).

    For fixed-point systems ``A = ±(I − ∂f/∂z)`` with a contractive ``f`` (deep equilibrium
    models): one matvec per iteration, no inner products, convergence at the contraction rate.
    It diverges when the spectral radius of ``I − αA`` is 1 or more; a residual that grows
    1e6-fold is reported as divergence. ``maxiter`` defaults to ``10 N``.

    Args:
        alpha: the step size (torchopt's ``alpha``), ``0 < alpha``; a smaller step converges
            for a less contractive ``f`` at a slower rate.
        fixed_steps: sum exactly ``maxiter`` terms, whatever the residual (torchopt's
            truncated Neumann series; only divergence stops a system early). The result is
            still reported against ``tol``.
    """
    if not alpha > 0:
        raise ValueError(f"solve_neumann: alpha must be positive, got {alpha}")
    return _named("neumann", krylov.neumann(sys, maxiter, float(alpha), bool(fixed_steps)))


@_public
def solve_gmres(sys: FlatSystem, maxiter: int, restart: int = 20):
    """Solve ``A x = b`` for any nonsingular ``A`` by restarted GMRES (Saad & Schultz, 1986).

    ``restart`` is the Krylov dimension of a cycle; ``maxiter`` (default ``10 N``) counts
    Arnoldi steps over all cycles. ``M`` is applied as a right preconditioner, so the
    convergence test is on the true residual.
    """
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
        raise ValueError(f"solve_gmres: restart must be a positive integer, got {restart!r}")
    return _named("gmres", krylov.gmres(sys, maxiter, restart))


@_public
def solve_bicgstab(sys: FlatSystem, maxiter: int):
    """Solve ``A x = b`` for any nonsingular ``A`` by BiCGSTAB (two matvecs per iteration)."""
    return _named("bicgstab", krylov.bicgstab(sys, maxiter))


@_public
def solve_normal_cg(sys: FlatSystem, maxiter: int):
    """Solve ``A x = b`` for any nonsingular ``A`` by CG on ``(AᵀA + ridge I) x = Aᵀ b``.

    ``Aᵀ`` is the operator's known transpose when it carries one (the engine's operators do),
    else the vector-Jacobian product of the (linear) ``matvec``. The normal equations square
    the condition number: prefer GMRES, BiCGSTAB or LU for badly conditioned non-symmetric
    systems. ``M`` preconditions the normal equations. Convergence is judged on the original
    system's residual ``‖b − A x‖`` (CG on the normal equations can stall far from a solution
    of ``A x = b`` when ``A`` is ill-conditioned or singular, and that is reported); with a
    ``ridge``, on the regularised normal equations, which are then the problem solved.
    """
    sys.A(sys.x0)  # checks the matvec's output (the transpose below would fail obscurely)
    op, At = sys.op, sys.op.T
    normal = LinearOperator(lambda v: At(op(v)), batched=op.batched, symmetric=True)
    rhs = At(sys.raveler.unravel(sys.b))
    init = sys.raveler.unravel(sys.x0) if sys.init_given else None
    normal_sys = FlatSystem(normal, rhs, init, sys.ridge, sys._M, sys.tol, sys.atol)
    x, iters, conv, failures = krylov.cg(normal_sys, maxiter)
    if sys.ridge is not None:
        # A ridge changes the problem: the regularised normal equations are what was solved,
        # and what the result is judged on.
        sys.__dict__.update(normal_sys.__dict__)
    return x, "normal_cg", iters, conv, failures


def _direct(sys: FlatSystem, method: str):
    A = sys.materialise()
    if method == "lu" or not sys.inspect:
        # Symmetry and definiteness cannot be checked under vmap: LU is right in every case.
        x, singular = dense.lu_solve(A, sys.b)
        return x, "lu", None, None, {"singular": singular}
    x, used, singular = dense.cholesky_or_lu(A, sys.b, warn=sys.report_fallbacks)
    return x, used, None, None, {"singular": singular}


@_public
def solve_lu(sys: FlatSystem, maxiter: int):
    """Solve ``A x = b`` by forming ``A`` (``N`` matvecs; per ``N × N`` block when batched)
    and an LU factorisation with partial pivoting. ``tol``/``atol`` only judge the reported
    residual."""
    return _direct(sys, "lu")


@_public
def solve_cholesky(sys: FlatSystem, maxiter: int):
    """Solve ``A x = b`` for symmetric positive-definite ``A`` by forming it and a Cholesky
    factorisation. A formed matrix that is not symmetric or not positive definite is solved by
    LU instead, with a :class:`~implicit_torch.ConvergenceWarning` saying so (under vmap, where
    that cannot be checked, LU is always used)."""
    return _direct(sys, "cholesky")


@_public
def solve_auto(sys: FlatSystem, maxiter: int):
    """Choose a solver by size, structure and device, then solve ``A x = b``.

    "Small" means at most ``AUTO_DENSE_MAX_N`` = 256 unknowns per system and at most 2**24
    matrix entries in all; "forming" a small system takes N vmapped matvecs and then
    :func:`solve_formed` solves the blocks (symmetric ones of 16 or more unknowns by the fused
    batched CG where its compiled kernel runs, with Cholesky for the systems it leaves
    unconverged within its iteration budget; other symmetric positive-definite blocks by
    Cholesky; the rest by LU).

    * A single small system (``batched=False``) is formed and solved directly: exact, and
      indifferent to conditioning and symmetry.
    * Batched and large systems use the operator's symmetry when it carries it (a stationarity
      condition's Hessian does), else probe for it with two matvecs (``vᵀAw = wᵀAv``). A
      symmetric one goes to matrix-free CG: forming B blocks by vmap costs more than a whole
      CG solve on batched problems (1.6-19x slower than CG in
      benchmarks/batched_backward.py). If CG meets indefiniteness or has not converged after
      ``2 N`` iterations, a small system is formed and solved directly instead, a large one is
      handed to GMRES from CG's iterate.
    * A non-symmetric batched system is formed when small (LU), GMRES otherwise.
    * Under ``torch.func.vmap`` values cannot be inspected: small systems are formed (LU),
      larger ones go to GMRES.

    The thresholds, with the measurements that set them, are in :mod:`.auto`.
    """
    return auto.choose_and_solve(sys, maxiter)


def _named(method: str, outcome: tuple) -> tuple:
    x, iters, conv, failures = outcome
    return x, method, iters, conv, failures


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

SOLVERS: dict[str, Callable[..., Any]] = {
    "cg": solve_cg,
    "normal_cg": solve_normal_cg,
    "neumann": solve_neumann,
    "gmres": solve_gmres,
    "bicgstab": solve_bicgstab,
    "lu": solve_lu,
    "cholesky": solve_cholesky,
    "auto": solve_auto,
}
_BUILTIN = frozenset(SOLVERS.values())


def get_solver(solve: str | Callable[..., Any]) -> Callable[..., Any]:
    """The solver callable for a name in ``SOLVERS`` or a user callable ``solve(matvec, b)``."""
    if isinstance(solve, str):
        try:
            return SOLVERS[solve]
        except KeyError:
            raise ValueError(
                f"unknown solve={solve!r}; choose one of {sorted(SOLVERS)} or pass "
                f"a callable solve(matvec, b) -> x"
            ) from None
    if not callable(solve):
        raise TypeError(
            f"solve must be a name or a callable solve(matvec, b), got {type(solve).__name__}"
        )
    return solve


def is_builtin(solve: Callable[..., Any]) -> bool:
    """True for the solvers of this module, also behind ``functools.partial`` or a
    :class:`WarmStart`."""
    while isinstance(solve, (functools.partial, WarmStart)):
        solve = solve.func if isinstance(solve, functools.partial) else solve.solve
    return solve in _BUILTIN


ITERATIONS_KEPT = 1000


class WarmStart:
    """A built-in solver that starts each solve from its previous solution.

    In a training loop the systems of consecutive steps differ little (the parameters move a
    little), so the previous step's backward adjoint is a good initial guess for the next:
    ``solve=WarmStart("gmres")`` in a layer or ``custom_root`` feeds it as ``init`` whenever
    the right-hand side has the same shapes and dtypes. ``iterations`` records the iterations
    of the recent solves (at least the last 1000; the most of any system), to measure what the
    warm start saves; ``reset()`` forgets the stored solution. Inside ``torch.func``
    transforms nothing is stored or reused.

    Args:
        solve: a built-in solver's name or function (possibly a ``functools.partial``), which
            must accept ``init``.
    """

    def __init__(self, solve: str | Callable[..., Any] = "gmres"):
        self.solve = get_solver(solve)
        if not is_builtin(self.solve):
            raise TypeError("WarmStart wraps a built-in solver (a name, or one of solve_*)")
        self.last: Any = None
        self.iterations: list[int] = []

    def reset(self) -> None:
        """Forget the stored solution: the next solve starts from zero."""
        self.last = None

    def _fits(self, b) -> bool:
        if self.last is None:
            return False
        leaves_b, spec_b = tree_flatten(b)
        leaves_l, spec_l = tree_flatten(self.last)
        return spec_b == spec_l and all(
            x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            for x, y in zip(leaves_b, leaves_l)
        )

    def __call__(self, matvec, b, **kwargs):
        if _runtime.under_functorch():
            return self.solve(matvec, b, **kwargs)
        init = self.last if self._fits(b) else None
        x, info = self.solve(matvec, b, init=init, return_info=True, **kwargs)
        # A solution with NaN or Inf (a failed solve, already reported) is no guess to start from.
        finite = all(bool(torch.isfinite(t).all()) for t in tree_flatten(x)[0])
        self.last = tree_map(lambda t: t.detach(), x) if finite else None
        self.iterations.append(int(info.iterations.max()))
        if len(self.iterations) > 2 * ITERATIONS_KEPT:  # a training loop runs on and on
            del self.iterations[:-ITERATIONS_KEPT]
        return x
