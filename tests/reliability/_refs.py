"""Independent float64 references and error bounds for the reliability catalogue.

Nothing here uses implicit_torch: references are dense ``torch.linalg`` solves of the
implicit-function-theorem system, built from ``torch.autograd.functional.jacobian``.

Tolerances are derived, never tuned: a backward solve with relative residual ``tol`` on a
system of condition number ``κ`` gives an adjoint with relative error at most ``κ · tol``
(plus rounding, ``κ · n · eps``); the gradient ``uᵀB`` then has absolute error at most
``‖B‖₂ · ‖δu‖``. :func:`gradient_bound` turns that into a number, with a safety factor of 10
for the constants the classical bounds leave out.
"""

from __future__ import annotations

import torch

DT = torch.float64
EPS = torch.finfo(DT).eps
SAFETY = 10.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cond(A: torch.Tensor) -> float:
    """The 2-norm condition number of a square matrix (or the worst of a batch)."""
    s = torch.linalg.svdvals(A.to(DT))
    return float((s[..., 0] / s[..., -1]).max())


def jacobians(F, x: torch.Tensor, params: tuple):
    """``A = ∂ₓF`` (``n × n``) and ``[∂_θF]`` (``n × size(θ)`` per param) at ``(x, θ)``."""
    n = x.numel()
    A = torch.autograd.functional.jacobian(lambda z: F(z, *params), x).reshape(n, n)
    Bs = []
    for k, p in enumerate(params):

        def f(q, k=k):
            args = list(params)
            args[k] = q
            return F(x, *args)

        Bs.append(torch.autograd.functional.jacobian(f, p).reshape(n, -1))
    return A, Bs


def ift_vjp(F, x: torch.Tensor, params: tuple, v: torch.Tensor):
    """``(grads, bound_scale, κ(A))``: ``vᵀ ∂x*/∂θ = −(A⁻ᵀ v)ᵀ B`` per param, densely, and the
    scale ``‖B‖₂ ‖u‖`` of each gradient's error per unit relative error of the adjoint ``u``."""
    A, Bs = jacobians(F, x, params)
    u = torch.linalg.solve(A.T, -v.reshape(-1))
    grads, scales = [], []
    for B, p in zip(Bs, params):
        grads.append((u @ B).reshape(p.shape))
        scales.append(float(torch.linalg.matrix_norm(B, 2)) * float(torch.linalg.vector_norm(u)))
    return grads, scales, cond(A)


def gradient_bound(scale: float, kappa: float, n: int, tol: float) -> float:
    """The absolute error a gradient may carry: ``SAFETY · κ · (tol + n · eps) · ‖B‖ ‖u‖``."""
    return SAFETY * kappa * (tol + n * EPS) * scale + EPS


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: float, what: str = ""):
    """``‖actual − expected‖₂ ≤ bound`` (a norm-wise bound, which is what the theory gives)."""
    err = float(torch.linalg.vector_norm((actual - expected).reshape(-1)))
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e}"


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = ""):
    """``‖actual − expected‖ ≤ rel · ‖expected‖`` (plus one eps, for an expected of zero)."""
    scale = float(torch.linalg.vector_norm(expected.reshape(-1)))
    assert_within(actual, expected, rel * scale + EPS, what)
