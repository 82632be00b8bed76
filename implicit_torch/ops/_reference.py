"""Pure-PyTorch batched conjugate gradient: the fallback kernel and the test oracle.

It implements exactly the algorithm of the compiled kernels (``csrc/``), on whole batches
with masking instead of one system at a time:

* ``x = x0`` (zeros when absent), ``r = b − A x``, ``z = D⁻¹ r`` with ``D = diag(A)`` under
  Jacobi preconditioning (``z = r`` otherwise), ``p = z``.
* Each iteration: ``α = rᵀz / pᵀAp``, ``x += α p``, ``r −= α Ap``, then
  ``β = r'ᵀz' / rᵀz`` and ``p = z' + β p``.
* System ``i`` stops when ``‖r_i‖ ≤ max(rtol ‖b_i‖, atol)`` (converged), after ``maxiter``
  iterations, or when ``p_iᵀA_i p_i`` is not positive (indefinite, singular or NaN input; so is
  a Jacobi diagonal that is not positive, before the first iteration). A stopped system is
  frozen: its ``x`` and iteration count no longer change.
* ``iterations`` counts the updates applied to each system; ``residual_norm`` is the true
  residual ``‖b_i − A_i x_i‖`` of the returned ``x``, computed afresh after the loop.

There is no host synchronisation inside the loop except an optional check that every system
has stopped (see :mod:`implicit_torch._runtime`), so the function also runs, masked, under
``torch.compile`` and ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch

from implicit_torch import _runtime

Tensor = torch.Tensor

__all__ = ["batched_cg_reference", "check_inputs", "default_maxiter"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


def default_maxiter(n: int) -> int:
    """The iteration cap used when ``maxiter`` is not given: ``10 n``."""
    return 10 * n


def check_inputs(
    A: Tensor, b: Tensor, x0: Tensor | None, rtol: float, atol: float, maxiter: int
) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the argument) for inputs the op rejects.

    The same rules as ``check_batched_cg_inputs`` in ``csrc/batched_cg.h``, checked in the
    same order and with the same messages (values written as Python writes them:
    ``torch.int64``, ``(3, 4, 5)``, ``1e-06``), so that the raw op raises the same error with
    and without the compiled extension; for the fake kernel and the Python-registered kernel.
    The options are checked by value only: the op's schema makes them a float and an int (the
    public wrapper checks their types first, with the package's core checks).
    """
    tensors = [("A", A), ("b", b)] + ([] if x0 is None else [("x0", x0)])
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batched_cg: {name} must be a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"batched_cg: {name} must be a dense (strided) tensor, got {t.layout}")
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"batched_cg: A must be float32 or float64, got {A.dtype}")
    if A.dim() != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"batched_cg: A must have shape (B, n, n), got {tuple(A.shape)}")
    B, n = A.shape[0], A.shape[1]
    for name, t in tensors[1:]:
        if t.dtype != A.dtype:
            raise TypeError(
                f"batched_cg: {name} has dtype {t.dtype} but A has {A.dtype}; they must match"
            )
        if tuple(t.shape) != (B, n):
            raise ValueError(
                f"batched_cg: {name} must have shape (B, n) = {(B, n)} to match A of shape "
                f"{tuple(A.shape)}, got {tuple(t.shape)}"
            )
        if t.device != A.device:
            raise ValueError(
                f"batched_cg: {name} is on {t.device} but A is on {A.device}; they must match"
            )
    for name, value in (("rtol", rtol), ("atol", atol)):
        # comparisons, not math.isfinite: they also take a 0-d tensor and a symbolic float
        if not (value >= 0 and value != math.inf):
            raise ValueError(
                f"batched_cg: {name} must be finite and non-negative, got {float(value)!r}"
            )
    if maxiter < 0:
        raise ValueError(f"batched_cg: maxiter must be non-negative, got {maxiter}")


def _matvec(A: Tensor, v: Tensor) -> Tensor:
    return torch.bmm(A, v.unsqueeze(-1)).squeeze(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=-1)


def _col(v: Tensor) -> Tensor:
    return v.unsqueeze(-1)


def batched_cg_reference(
    A: Tensor,
    b: Tensor,
    x0: Tensor | None,
    rtol: float,
    atol: float,
    maxiter: int,
    jacobi: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``A[i] x[i] = b[i]`` for symmetric positive-definite ``A[i]`` by masked CG.

    Args:
        A: ``(B, n, n)``, float32 or float64, symmetric positive definite per system.
        b: ``(B, n)``, same dtype and device.
        x0: ``(B, n)`` initial guess, or ``None`` for zeros.
        rtol, atol: system ``i`` converges when ``‖b_i − A_i x_i‖ ≤ max(rtol ‖b_i‖, atol)``.
        maxiter: iteration cap per system.
        jacobi: precondition with ``diag(A)⁻¹``.

    Returns:
        ``(x, iterations, residual_norm)``: ``(B, n)``, ``(B,)`` int64 and ``(B,)`` in the
        dtype of ``A``. No autograd graph is recorded (the op's autograd rule differentiates
        the solution, not the iterations).
    """
    check_inputs(A, b, x0, rtol, atol, maxiter)
    with torch.no_grad():
        return _solve(A, b, x0, float(rtol), float(atol), int(maxiter), bool(jacobi))


def _solve(A, b, x0, rtol, atol, maxiter, jacobi):
    B, _n = b.shape
    fresh = torch.contiguous_format
    x = torch.zeros_like(b, memory_format=fresh) if x0 is None else x0.clone(memory_format=fresh)
    r = b.clone() if x0 is None else b - _matvec(A, x)
    threshold = torch.clamp(rtol * torch.linalg.vector_norm(b, dim=-1), min=atol)
    if jacobi:
        diag = torch.diagonal(A, dim1=-2, dim2=-1)
        ok = (diag > 0).all(dim=-1) & torch.isfinite(diag).all(dim=-1)
        dinv = torch.where(diag > 0, 1.0 / diag, torch.zeros_like(diag))
        z = dinv * r
    else:
        ok = torch.ones(B, dtype=torch.bool, device=b.device)
        dinv, z = None, r
    p = z.clone()
    rz = _dot(r, z)
    # "not (‖r‖ ≤ threshold)" rather than "‖r‖ > threshold": a NaN residual keeps the system
    # running, and its NaN curvature then stops it, reported as not converged.
    active = ok & ~(torch.linalg.vector_norm(r, dim=-1) <= threshold)
    iters = torch.zeros(B, dtype=torch.int64, device=b.device)
    inspect, interval = _runtime.can_inspect_values(), _runtime.check_interval(b.device)
    for k in range(maxiter):
        if inspect and k % interval == 0 and not bool(active.any()):
            break
        Ap = _matvec(A, p)
        pAp = _dot(p, Ap)
        step = active & (pAp > 0)
        alpha = torch.where(step, rz / torch.where(step, pAp, torch.ones_like(pAp)), 0.0)
        x = x + _col(alpha) * p
        r = r - _col(alpha) * Ap
        iters = iters + step.to(iters.dtype)
        active = step & ~(torch.linalg.vector_norm(r, dim=-1) <= threshold)
        z = r if dinv is None else dinv * r
        rz_new = _dot(r, z)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), 0.0)
        p = torch.where(_col(active), z + _col(beta) * p, p)
        rz = torch.where(active, rz_new, rz)
    residual_norm = torch.linalg.vector_norm(b - _matvec(A, x), dim=-1)
    return x, iters, residual_norm
