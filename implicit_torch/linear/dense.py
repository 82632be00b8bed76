"""Direct solvers on formed blocks: LU, Cholesky, and the one symmetry test of the package.

A matrix-free operator is formed with ``N`` vmapped matvecs
(:meth:`~implicit_torch.linear.operator.FlatSystem.materialise`); these functions then solve
the ``(B, N, N)`` blocks. They read values on the host (to choose Cholesky or LU), so callers
use them only where values can be read, except :func:`lu_solve`, which never does.
"""

from __future__ import annotations

import warnings

import torch

from implicit_torch._errors import ConvergenceWarning

__all__ = ["CPU_BATCHED_LU_SAFE_N", "cholesky_or_lu", "lu_solve", "symmetric_within"]

Tensor = torch.Tensor

# Batched LU on the CPU with several threads gives invalid pivots for n >= 160 in torch 2.13
# (pytorch issue 142815: "Pivots given to lu_solve must all be greater or equal to 1", MKL's
# "Parameter 6 was incorrect on entry to DLASWP", or a hang; reproduced here with 2 threads
# for B in {2, 4, 16}, n in {160, 200, 300}). Unbatched LU is not affected, so such systems
# are solved block by block. Measured on the 2-core CPU (float64, median of 9, one thread):
# per-block loop 56.7 ms vs batched 79.8 ms at (B, n) = (64, 256); 51.3 vs 50.2 ms at
# (8, 512): the loop costs nothing, and unlike the earlier guard it leaves the process-wide
# thread count alone.
CPU_BATCHED_LU_SAFE_N = 160


def lu_solve(A: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``A⁻¹ b`` for blocks ``A`` (B, N, N) and ``b`` (B, N) by LU with partial pivoting.

    Returns ``(x, singular)``: a singular block (an exactly zero pivot) gets NaN in ``x`` and
    ``True`` in the ``(B,)`` mask, and leaves the other blocks solved; nothing raises.
    """
    if A.device.type == "cpu" and A.shape[0] > 1 and A.shape[-1] >= CPU_BATCHED_LU_SAFE_N:
        if torch.get_num_threads() > 1:
            pairs = [torch.linalg.solve_ex(A[i], b[i]) for i in range(A.shape[0])]
            return torch.stack([x for x, _ in pairs]), torch.stack([i for _, i in pairs]) != 0
    x, info = torch.linalg.solve_ex(A, b)
    return x, info != 0


def symmetric_within(apply2, n: int, like: Tensor, rtol: float) -> bool:
    """Whether ``vᵀ(A w) = wᵀ(A v)`` per block for two fixed generic probes ``v, w``.

    Args:
        apply2: ``P ↦ A P`` for ``P`` of shape ``(B, N, 2)`` (the probes as two columns):
            one GEMM for formed blocks, two matvecs for a matrix-free operator.
        n: ``N``; ``like``: a tensor with the dtype and device to use.
        rtol: tolerance relative to ``‖A P‖ ‖P‖``. Formed blocks about to be handed to
            Cholesky (which reads one triangle) use ``1e3·eps``; the choice of CG for a
            matrix-free operator, which tolerates round-off asymmetry, uses ``1e-6``.

    Comparing ``A`` with ``Aᵀ`` entry by entry reads ``A`` transposed and cost three fused CG
    solves in benchmarks/batched_cg.py; the probes need one pass.
    """
    idx = torch.arange(n, dtype=like.dtype, device=like.device)
    probes = torch.stack([torch.sin(1.7 * idx + 0.3), torch.cos(2.3 * idx + 1.1)], dim=1)
    AP = apply2(probes)  # (B, N, 2): A v, A w
    C = AP.mT @ probes  # (B, 2, 2): C[i, 0, 1] = (A v)ᵀ w, C[i, 1, 0] = (A w)ᵀ v
    scale = torch.linalg.vector_norm(AP, dim=(1, 2)) * torch.linalg.vector_norm(probes)
    return bool(((C[:, 0, 1] - C[:, 1, 0]).abs() <= rtol * scale).all())


def formed_is_symmetric(A: Tensor) -> bool:
    """:func:`symmetric_within` for formed blocks ``A`` (B, N, N), at ``1e3·eps``."""
    B, N, _ = A.shape
    eps = torch.finfo(A.dtype).eps
    return symmetric_within(lambda P: (A.reshape(B * N, N) @ P).reshape(B, N, 2), N, A, 1e3 * eps)


def cholesky_or_lu(A: Tensor, b: Tensor, *, warn: bool = False) -> tuple[Tensor, str, Tensor]:
    """Cholesky for symmetric positive-definite blocks, LU when any block is not.

    Returns ``(x, method, singular)`` (see :func:`lu_solve`); with ``warn``, falling back to LU
    warns with the reason (the caller asked for Cholesky explicitly).
    """
    if formed_is_symmetric(A):
        L, info = torch.linalg.cholesky_ex(A)
        if not bool(info.any()):
            x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
            return x, "cholesky", torch.zeros_like(info, dtype=torch.bool)
        why = "the matrix is not positive definite"
    else:
        why = "the matrix is not symmetric"
    if warn:
        warnings.warn(
            f"implicit_torch: solve_cholesky fell back to LU: {why}",
            ConvergenceWarning,
            stacklevel=5,
        )
    x, singular = lu_solve(A, b)
    return x, "lu", singular
