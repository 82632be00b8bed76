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
}
_DEFAULT_FIX = "raise maxiter, loosen tol, add a preconditioner M, or use another solver."


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
):
    """Check the outcome of a solve on ``sys``, then return ``x`` as a pytree (and a
    :class:`~implicit_torch._result.SolveInfo` when ``return_info``).

    The residual ``‖b − A x‖`` is recomputed (one matvec) whenever it is reported or returned;
    a non-finite one is never converged.
    """
    _result.check_on_failure(on_failure)
    check = on_failure != "ignore" and sys.inspect
    residual = sys.residual_norm(x) if (return_info or check) else None
    if residual is not None:
        converged = converged & torch.isfinite(residual)
    info = None
    if residual is not None:
        status = _result.status_codes(converged, residual, **failures)
        info = SolveInfo(iters, residual, converged, status, method, sys.threshold)
    if check:
        code = Status(int(info.status.max()))
        _result.report(
            f"solve_{method}",
            info,
            on_failure,
            measure="residual ‖b − Ax‖",
            target=lambda worst: _describe_target(sys, worst),
            fix=_FIX.get(code, _DEFAULT_FIX),
            maxiter=maxiter,
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
