"""The end of every linear solve: judge the result, report a failure, package the output."""

from __future__ import annotations

import torch

from implicit_torch import _result
from implicit_torch._result import SolveInfo, Status
from implicit_torch.linear.operator import FlatSystem

__all__ = ["finish"]

Tensor = torch.Tensor

# What to do, by failure; every message is written by implicit_torch._result.report.
_FIX = {
    Status.INDEFINITE: "use solve='gmres', 'bicgstab', 'lu' or 'auto'.",
    Status.DIVERGED: (
        "the spectral radius of I − A is 1 or more (the fixed-point map is not contractive); "
        "use solve='gmres' or 'lu'."
    ),
    Status.BREAKDOWN: "use solve='gmres' or 'lu'.",
    Status.SINGULAR: "the system has no unique solution; add a ridge, or check the problem.",
}
_DEFAULT_FIX = "raise maxiter, loosen tol, add a preconditioner M, or use another solver."
# A direct solve is exact up to rounding: missing the target means the target is below what
# the dtype attains for this system's conditioning (residual ≈ eps · ‖A‖ · ‖x‖).
_UNATTAINABLE = (
    "{method} is exact up to rounding, so the target is below what {dtype} attains for this "
    "system's conditioning: loosen tol or set atol, or solve in float64."
)


def finish(
    sys: FlatSystem,
    x: Tensor,
    method: str,
    iters: Tensor,
    converged: Tensor,
    failures: dict[str, Tensor],
    on_failure: str,
    return_info: bool,
    maxiter: int | None = None,
    *,
    direct: bool = False,
):
    """Check the outcome of a solve on ``sys``, then return ``x`` as a pytree (and a
    :class:`~implicit_torch._result.SolveInfo` when ``return_info``).

    ``converged`` means that the true residual ``‖b − A x‖`` meets the target: the residual is
    recomputed (one matvec) whenever it is reported or returned, and a system whose recurrence
    claimed convergence but whose true residual misses the target (or is not finite) is
    reported as not converged. ``direct`` marks a direct solve (LU, Cholesky), whose miss means
    the target is unattainable in the dtype, as the message then says.
    """
    _result.check_on_failure(on_failure)
    check = on_failure != "ignore" and sys.inspect and x.shape[0] > 0
    residual = sys.residual_norm(x) if (return_info or check) else None
    if residual is not None:
        converged = converged & (residual <= sys.threshold)
    info = None
    if residual is not None:
        status = _result.status_codes(converged, residual, **failures)
        info = SolveInfo(iters, residual, converged, status, method, sys.threshold)
    if check:
        code = Status(int(info.status.max()))
        fix = _FIX.get(code, _DEFAULT_FIX)
        if direct and code == Status.MAX_ITERATIONS:
            fix = _UNATTAINABLE.format(method=method.upper(), dtype=str(sys.b.dtype)[6:])
        _result.report(
            f"solve_{method}",
            info,
            on_failure,
            measure="residual ‖b − Ax‖",
            target=lambda worst: _describe_target(sys, worst),
            fix=fix,
            maxiter=None if direct else maxiter,
            batched=sys.batched,
            stacklevel=5,
        )
    out = sys.raveler.unravel(x)
    if not return_info:
        return out
    return out, (info if sys.batched else info.squeeze())


def _describe_target(sys: FlatSystem, worst: int) -> str:
    return (
        f"{float(sys.threshold[worst]):.3e} (tol={sys.tol:g} · ‖b‖ = "
        f"{float(sys.bnorm[worst]):.3e}, atol={sys.atol:g})"
    )
