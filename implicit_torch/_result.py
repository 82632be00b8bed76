"""One result type, one status vocabulary, one validation of options and one reporter.

Every iterative computation in the package — the linear solves, the fused ``batched_cg`` op,
the solver classes, the QP, Sinkhorn and the other inner loops — describes its outcome with
the same :class:`SolveInfo` (iterations, residual, target, converged, a :class:`Status` code
per system), validates ``on_failure`` / ``tol`` / ``atol`` / ``maxiter`` with the functions
below, and reports failures through :func:`report`, the one place where non-convergence
messages are written.

Default tolerances, chosen once per dtype (the table is :data:`DEFAULT_RTOL`):

============================  =========  =========  ===============================
what                          float64    float32    why
============================  =========  =========  ===============================
linear solves (``"linear"``)  1e-10      1e-5       the backward solve: exact gradients
fused ``batched_cg`` op       1e-6       1e-6       the op's own default (documented)
interior-point QP (``"qp"``)  1e-10      1e-6       duality gap and residuals
iterative solvers             1e-3       1e-3       JAXopt's default ``tol``
============================  =========  =========  ===============================
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import math
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

from implicit_torch._errors import ConvergenceError, ConvergenceWarning, IndefiniteSystemError

__all__ = [
    "DEFAULT_RTOL",
    "ON_FAILURE",
    "FailureLog",
    "SolveInfo",
    "Status",
    "check_maxiter",
    "check_on_failure",
    "check_tolerances",
    "collecting",
    "current_log",
    "default_rtol",
    "report",
    "status_codes",
]

Tensor = torch.Tensor

ON_FAILURE = ("warn", "raise", "ignore")

# kind -> (float64 default, default for lower precisions); see the module docstring.
DEFAULT_RTOL: dict[str, tuple[float, float]] = {
    "linear": (1e-10, 1e-5),
    "batched_cg": (1e-6, 1e-6),
    "qp": (1e-10, 1e-6),
    "solver": (1e-3, 1e-3),
}


class Status(enum.IntEnum):
    """Why a system stopped (one code per system in :attr:`SolveInfo.status`)."""

    CONVERGED = 0
    MAX_ITERATIONS = 1  # ran out of iterations with the residual above its target
    INDEFINITE = 2  # CG met non-positive or sign-changing curvature
    BREAKDOWN = 3  # a Krylov recurrence divided by zero before convergence
    NONFINITE = 4  # NaN or Inf in the iterate or the residual
    INFEASIBLE = 5  # constraints that no point satisfies
    DIVERGED = 6  # the residual grew without bound (a non-contractive iteration)
    UNBOUNDED = 7  # the objective is unbounded below (or the problem is not convex)
    SINGULAR = 8  # a direct solve met a singular matrix
    STALLED = 9  # the iterations can no longer move the iterate (e.g. a line search failed)


@dataclasses.dataclass
class SolveInfo:
    """The outcome of an iterative computation (one entry per system when batched, 0-d
    tensors otherwise).

    Attributes:
        iterations: iterations run, int64 (matvecs for CG/GMRES, double-matvec steps for
            BiCGSTAB, 0 for the dense solvers).
        residual_norm: the measure of error the target applies to, for the returned point
            (``‖b − A x‖`` for linear solves; a solver's optimality error otherwise).
        converged: ``residual_norm ≤ target`` (and finite, and no failure recorded).
        status: :class:`Status` codes, int64, shaped like ``converged``.
        method: the algorithm that produced the result (``"cg"``, ``"lu"``, ``"QP"``, ...).
        target: the threshold each system had to meet, or ``None`` where it is a plain ``tol``.
    """

    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    status: Tensor
    method: str = ""
    target: Tensor | None = None

    @property
    def indefinite(self) -> Tensor:
        """Per system: CG met non-positive or sign-changing curvature."""
        return self.status == Status.INDEFINITE

    def __getitem__(self, field: str) -> Tensor:  # info["iterations"] also works
        return getattr(self, field)

    def squeeze(self) -> SolveInfo:
        """The same result with one-system ``(1,)`` tensors as 0-d tensors."""

        def sq(t):
            return t if t is None else t.reshape(())

        return dataclasses.replace(
            self,
            iterations=sq(self.iterations),
            residual_norm=sq(self.residual_norm),
            converged=sq(self.converged),
            status=sq(self.status),
            target=sq(self.target),
        )


def status_codes(
    converged: Tensor,
    residual: Tensor | None = None,
    **failures: Tensor | None,
) -> Tensor:
    """Per-system :class:`Status` codes.

    Args:
        converged: bool, the systems that met their target.
        residual: the final residual norms; a non-finite one is ``NONFINITE``.
        **failures: bool masks keyed by a lower-case :class:`Status` name (``indefinite=``,
            ``breakdown=``, ``diverged=``, ``infeasible=``, ``unbounded=``); ``None`` skips.
            Earlier keywords win over later ones, and all of them over ``NONFINITE``; a system
            in none of them that has not converged ran out of iterations.
    """
    codes = torch.full_like(converged, int(Status.MAX_ITERATIONS), dtype=torch.int64)
    if residual is not None:
        codes = torch.where(torch.isfinite(residual), codes, int(Status.NONFINITE))
    # A named failure explains a non-finite result better than "non-finite".
    for name, mask in reversed(list(failures.items())):
        if mask is not None:
            codes = torch.where(mask, int(Status[name.upper()]), codes)
    return torch.where(converged, int(Status.CONVERGED), codes)


# --------------------------------------------------------------------------------------------
# Validation of the shared options
# --------------------------------------------------------------------------------------------


def check_on_failure(on_failure: str) -> str:
    """``on_failure`` itself, or ``ValueError`` if it is not one of :data:`ON_FAILURE`."""
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
    return on_failure


def check_tolerances(
    tol: float | None, atol: float = 0.0, *, names: tuple[str, str] = ("tol", "atol")
) -> None:
    """``ValueError`` unless ``tol`` (when given) and ``atol`` are finite and non-negative.

    ``names``: what the messages call ``tol`` and ``atol`` (e.g. ``("rtol", "atol")``).
    """
    for i, (name, value) in enumerate(zip(names, (tol, atol))):
        if value is None and i == 0:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and non-negative, got {value}")


def check_maxiter(maxiter: int | None, name: str = "maxiter") -> int | None:
    """``maxiter`` as an ``int`` (``None`` stays ``None``), or an error for a negative or
    non-integer value."""
    if maxiter is None:
        return None
    if isinstance(maxiter, bool) or not isinstance(maxiter, int):
        raise TypeError(f"{name} must be an integer, got {type(maxiter).__name__}")
    if maxiter < 0:
        raise ValueError(f"{name} must be non-negative, got {maxiter}")
    return int(maxiter)


def default_rtol(dtype: torch.dtype, kind: str = "linear") -> float:
    """The default relative tolerance of ``kind`` (a key of :data:`DEFAULT_RTOL`) in ``dtype``."""
    double, single = DEFAULT_RTOL[kind]
    return double if dtype == torch.float64 else single


# --------------------------------------------------------------------------------------------
# The reporter
# --------------------------------------------------------------------------------------------


class FailureLog:
    """Counts the failures reported while it collects (see :func:`collecting`), and thins the
    warnings out: a training loop that fails every step warns at the 1st, 10th, 100th, ...
    failure of each kind, each time with the count, instead of every step.

    ``on_failure="raise"`` is not thinned. The counts are kept whatever is shown.

    Attributes:
        counts: failures by ``(who, what)``, e.g. ``("solve_gmres", "did not converge")``.
        last: the last message, shown or not.
        hint: appended to every message shown (what to do in the owner's terms).
    """

    def __init__(self, hint: str = ""):
        self.counts: collections.Counter = collections.Counter()
        self.last: str | None = None
        self.hint = hint

    @property
    def total(self) -> int:
        """All failures recorded."""
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.last = None

    def record(self, key: tuple[str, str], msg: str) -> str | None:
        """Count one failure; the message to show now (with the count), or ``None``."""
        self.counts[key] += 1
        self.last = msg
        n = self.counts[key]
        if n != 10 ** int(math.log10(n)):  # 1, 10, 100, ...
            return None
        tail = f" {self.hint}" if self.hint else ""
        if n > 1:
            tail += (
                f" [failure {n} of this kind here; the 1st, 10th, 100th, ... are shown, the "
                f"counts are in the layer's `failures`]"
            )
        return msg + tail


_active = threading.local()


def current_log() -> FailureLog | None:
    """The log collecting in this thread, if any (the engine keeps it for the backward)."""
    stack = _active.__dict__.get("stack")
    return stack[-1] if stack else None


@contextlib.contextmanager
def collecting(log: FailureLog | None) -> Iterator[FailureLog | None]:
    """Within this block (this thread), failures reported with ``on_failure="warn"`` go
    through ``log`` (counted, and thinned out; see :class:`FailureLog`). ``None``: no change.
    """
    if log is None:
        yield None
        return
    stack = _active.__dict__.setdefault("stack", [])
    stack.append(log)
    try:
        yield log
    finally:
        stack.pop()


# What went wrong, by status: a headline (which "on k of n systems" follows) and a detail.
_EXPLAIN: dict[Status, tuple[str, str]] = {
    Status.MAX_ITERATIONS: ("did not converge", ""),
    Status.INDEFINITE: (
        "met non-positive or sign-changing curvature pᵀAp",
        "the system is not symmetric definite, so conjugate gradient does not apply",
    ),
    Status.BREAKDOWN: ("broke down", "a Krylov recurrence divided by zero before convergence"),
    Status.NONFINITE: ("did not converge", "NaN or Inf in its result"),
    Status.INFEASIBLE: ("did not converge", "the problem is infeasible"),
    Status.DIVERGED: ("diverged", "the residual grew without bound"),
    Status.UNBOUNDED: ("did not converge", "the problem is unbounded below or not convex"),
    Status.SINGULAR: ("met a singular matrix", "the system has no unique solution"),
    Status.STALLED: ("stalled", "its iterations can no longer move the iterate"),
}


def report(
    who: str,
    info: SolveInfo,
    on_failure: str,
    *,
    measure: str = "error",
    target: str | Callable[[int], str] | None = None,
    fix: str = "",
    maxiter: int | None = None,
    batched: bool | None = None,
    explain: dict[Status, str | tuple[str, str]] | None = None,
    stacklevel: int = 3,
) -> None:
    """Warn (``on_failure="warn"``) or raise (``"raise"``) if any system in ``info`` failed.

    The message names ``who``, what went wrong (the worst system's :class:`Status`), how many
    systems failed, the worst residual against its target, the iterations run, and ``fix``
    (what to do about it). Reads values on the host: call it only where values can be read.

    Args:
        who: the computation, e.g. ``"solve_cg"`` or ``"GradientDescent"``.
        info: the result to check.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        measure: how the residual is named in the message (``"residual ‖b − Ax‖"``).
        target: how the target is described (e.g. ``"tol=1e-10 · ‖b‖ = ..."``), or a function
            of the worst system's index returning that text; defaults to the number itself.
        fix: the advice that ends the message.
        maxiter: shown next to the iteration count when given.
        batched: whether to count systems ("2 of 5 systems"); default: more than one system.
        explain: what went wrong, by status, where the standard wording does not fit: a
            headline, or a pair (headline, detail).
        stacklevel: passed to :func:`warnings.warn` (2 = the caller of ``report``).
    """
    if check_on_failure(on_failure) == "ignore":
        return
    bad = ~info.converged.reshape(-1)
    if not bool(bad.any()):
        return
    status = info.status.reshape(-1)
    residual = info.residual_norm.reshape(-1).detach()
    # The worst failure: a structural one (indefinite, breakdown, ...) before running out of
    # iterations; among equals, the largest residual.
    ranked = torch.where(bad, status, torch.full_like(status, -1))
    code = Status(int(ranked.max()))
    same = bad & (status == int(code))
    score = torch.where(same, torch.nan_to_num(residual, nan=math.inf), -math.inf)
    worst = int(torch.argmax(score))
    count = int(bad.sum())
    total = bad.numel()
    if batched is None:
        batched = total > 1
    where = f" on {count} of {total} systems" if batched else ""
    iters = int(info.iterations.reshape(-1)[worst]) if info.iterations.numel() else 0
    cap = f" (maxiter={maxiter})" if maxiter is not None else ""
    if callable(target):
        target = target(worst)
    elif target is None and info.target is not None:
        target = f"{float(info.target.reshape(-1)[worst]):.3e}"
    against = f" > target {target}" if target is not None else ""
    after = f" after {iters} iterations{cap}" if (iters or maxiter is not None) else ""
    headline, detail = _EXPLAIN[code]
    override = (explain or {}).get(code)
    if isinstance(override, tuple):
        headline, detail = override
    elif override is not None:
        headline = override
    detail = f" ({detail})" if detail else ""
    msg = (
        f"implicit_torch: {who} {headline}{where}{after}{detail}: {measure} "
        f"{float(residual[worst]):.3e}{against}. The result, and any gradient computed from "
        f"it, is inaccurate"
    )
    msg += f": {fix}" if fix else "."
    if on_failure == "raise":
        error = IndefiniteSystemError if code == Status.INDEFINITE else ConvergenceError
        raise error(msg)
    stack = _active.__dict__.get("stack")
    if stack:
        msg = stack[-1].record((who, headline), msg)
        if msg is None:
            return
    warnings.warn(msg, ConvergenceWarning, stacklevel=stacklevel)
