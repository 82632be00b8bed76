"""Fused batched ops: ``batched_cg`` solves many small SPD systems at once; ``qp_ipm`` runs the
interior-point iterations of :class:`implicit_torch.solvers.QP`.

The work is done by the operators ``torch.ops.implicit_torch.batched_cg`` and ``.qp_ipm``,
whose schemas are defined once, in :mod:`implicit_torch.ops._schemas`. They are served by the
compiled extension ``implicit_torch._C`` (CPU kernels parallel over the batch and, in a CUDA
build, a CUDA ``batched_cg`` kernel that solves every system in one launch) or, for every
backend it lacks (no extension at all, CUDA tensors with a CPU-only build, other devices), by
pure-PyTorch kernels that follow the same algorithms step for step
(:mod:`implicit_torch.ops._reference`, :mod:`implicit_torch.ops._qp_reference`).
:func:`batched_cg` gives the same results either way; :func:`extension_available` says which
one runs. ``IMPLICIT_TORCH_NO_EXT=1`` (at build or run time) forces the pure-PyTorch kernels.

``batched_cg`` is differentiable (``grad_b = A⁻¹ grad_x`` by one more batched CG, ``grad_A =
−grad_b xᵀ``), has a fake kernel for ``torch.compile`` and a vmap rule. ``qp_ipm`` has a fake
kernel; its outputs are not differentiable (QP differentiates its solution implicitly).
"""

from __future__ import annotations

import math

import torch

from implicit_torch import _result
from implicit_torch._result import SolveInfo, status_codes
from implicit_torch.ops import _registration
from implicit_torch.ops._reference import batched_cg_reference, check_inputs, default_maxiter
from implicit_torch.ops._registration import ExtensionWarning

__all__ = [
    "BatchedCGInfo",
    "ExtensionWarning",
    "batched_cg",
    "batched_cg_reference",
    "extension_available",
]

Tensor = torch.Tensor


# The package's one result type (iterations, residual_norm, converged, status, method, target);
# the old name stays as an alias for existing callers.
BatchedCGInfo = SolveInfo


def extension_available(device: str | torch.device | None = None) -> bool:
    """Whether the compiled kernel serves :func:`batched_cg`.

    Args:
        device: ``None`` for "was the extension loaded at all", or a device (``"cpu"``,
            ``"cuda"``) for "is there a compiled kernel for tensors on it" (a CPU-only build
            serves CUDA tensors with the pure-PyTorch kernel).
    """
    if _registration.extension_module is None:
        return False
    if device is None:
        return True
    return torch.device(device).type.upper() in _registration.COMPILED_BACKENDS


def _number(value):
    """A 0-d tensor option as the Python number it holds (then checked like any number)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def _check_options(rtol, atol, maxiter):
    """``(rtol, atol, maxiter)`` checked by the package's core rules
    (:func:`~implicit_torch._result.check_tolerances`, :func:`~implicit_torch._result.
    check_maxiter`), as every solver checks its options; errors name the option."""
    rtol, atol, maxiter = _number(rtol), _number(atol), _number(maxiter)
    try:
        if rtol is None:  # the core's tol=None means "the default"; batched_cg has no such rtol
            raise TypeError("rtol must be a number, got NoneType")
        if torch.compiler.is_compiling():
            # torch.compile traces a number passed to the compiled function as a symbolic
            # number, which the core's math.isfinite cannot take: the same rules, as
            # comparisons that trace (check_inputs repeats the value rules for the raw op).
            for name, value in (("rtol", rtol), ("atol", atol)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{name} must be a number, got {type(value).__name__}")
                if not (value >= 0 and value != math.inf):
                    raise ValueError(f"{name} must be finite and non-negative, got {value}")
        else:
            _result.check_tolerances(rtol, atol, names=("rtol", "atol"))
        maxiter = _result.check_maxiter(maxiter)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"batched_cg: {exc}") from None
    return rtol, atol, maxiter


def batched_cg(
    A: Tensor,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    jacobi: bool = False,
) -> tuple[Tensor, BatchedCGInfo]:
    """Solve ``B`` independent symmetric positive-definite systems ``A[i] x[i] = b[i]`` by CG.

    Each system has its own step sizes and its own stopping test, and a stopped system is
    frozen while the others go on: system ``i`` stops when
    ``‖b_i − A_i x_i‖ ≤ max(rtol ‖b_i‖, atol)`` (measured on the CG residual recurrence),
    after ``maxiter`` iterations, or when it meets a curvature ``pᵀAp ≤ 0`` (an indefinite or
    singular matrix, or NaN/Inf in the input), which leaves it unconverged; the call never
    raises or hangs because of the values in ``A`` and ``b``.

    ``A`` must be symmetric: the kernels use its rows and columns interchangeably (a
    non-symmetric ``A`` gives no meaningful result; it is not checked, to avoid a host sync).
    Inputs may be non-contiguous or expanded (they are copied to a contiguous layout).

    Args:
        A: ``(B, n, n)``, float32 or float64.
        b: ``(B, n)``, same dtype and device as ``A``.
        x0: optional initial guess ``(B, n)`` (zeros when ``None``); it gets no gradient.
        rtol, atol: relative and absolute tolerances on the residual norm.
        maxiter: iteration cap per system; ``None`` means ``10 n``.
        jacobi: precondition with ``diag(A)⁻¹`` (a system whose diagonal is not positive is
            not positive definite and stops at once, unconverged).

    Returns:
        ``(x, info)``: the ``(B, n)`` solutions and a :class:`~implicit_torch.SolveInfo` (per
        system: ``iterations``, ``residual_norm`` ``‖b_i − A_i x_i‖`` recomputed after the
        iterations, ``converged``, ``status``, and the ``target`` ``max(rtol ‖b_i‖, atol)``).
        ``x`` is differentiable in ``A`` and ``b`` (the gradient of ``A⁻¹b``, as from
        ``torch.linalg.solve``; the backward pass is one more batched CG with the same
        options).

    Raises:
        TypeError: a non-tensor, a non-float dtype or mixed dtypes; a tolerance that is not a
            number (a 0-d tensor is taken as the number it holds), a ``maxiter`` that is not
            an integer (``2.5``, ``True``).
        ValueError: shapes that do not match ``(B, n, n)`` / ``(B, n)``, tensors on different
            devices, negative or non-finite tolerances, a negative ``maxiter``.

    The options are checked as every solver of the package checks its own
    (``implicit_torch._result.check_tolerances`` / ``check_maxiter``).
    """
    rtol, atol, maxiter = _check_options(rtol, atol, maxiter)
    if maxiter is None:
        maxiter = default_maxiter(A.shape[-1] if isinstance(A, torch.Tensor) else 0)
    check_inputs(A, b, x0, rtol, atol, maxiter)
    x, iterations, residual_norm = torch.ops.implicit_torch.batched_cg(
        A, b, x0, float(rtol), float(atol), int(maxiter), bool(jacobi)
    )
    with torch.no_grad():
        threshold = torch.clamp(rtol * torch.linalg.vector_norm(b, dim=-1), min=atol)
        converged = (residual_norm <= threshold) & torch.isfinite(residual_norm)
        status = status_codes(converged, residual_norm)
    return x, SolveInfo(iterations, residual_norm, converged, status, "batched_cg", threshold)
