"""``solve="auto"``: the choice of a linear solver, and every threshold it uses.

Each threshold sits next to the measurement that set it (benchmarks/RESULTS.md, 2-core CPU,
torch 2.13, condition numbers 1e2–1e6 unless stated).
"""

from __future__ import annotations

import torch

from implicit_torch import ops
from implicit_torch.linear import dense, krylov
from implicit_torch.linear.operator import FlatSystem, LinearOperator, norm

__all__ = [
    "AUTO_DENSE_MAX_ENTRIES",
    "AUTO_DENSE_MAX_N",
    "AUTO_FUSED_MIN_N",
    "auto_fused_budget",
    "choose_and_solve",
    "solve_formed",
]

Tensor = torch.Tensor

# Direct solves form the (B, N, N) matrix with N matvecs. Up to this many unknowns per system
# (and this many matrix entries in all), "auto" prefers that for a single system: it is exact,
# indifferent to conditioning and symmetry, and N matvecs cost about what an iterative solve of
# a moderately conditioned system does.
AUTO_DENSE_MAX_N = 256
AUTO_DENSE_MAX_ENTRIES = 2**24

# The fused batched CG (implicit_torch.ops.batched_cg) on formed symmetric blocks.
# * From 16 unknowns per system it beat batched Cholesky at every size measured
#   ("Fused batched CG" table: 1.40x at (4096, 16) float32, 2.09x float64; 1.7-4.2x above);
#   below 16 it was not measured, so Cholesky (exact) keeps those.
# * A fused CG iteration costs about 1/n-th of a batched Cholesky solve for n <= 64 and about
#   1/100-th to 1/190-th for n in 128..256: the fused CG gets a budget of clamp(1.5 n, 32, 128)
#   iterations and the systems that miss the tolerance within it are solved by Cholesky, so a
#   well-conditioned batch costs the fused CG alone, an ill-conditioned one at most about twice
#   a Cholesky solve.
# * Matrix-free CG never forms blocks to use the kernel: forming them takes N vmapped matvecs,
#   which on batched problems cost 1.4-20x a whole matrix-free CG solve
#   (benchmarks/batched_backward.py; vmap copies the unbatched operands once per column).
# Only devices with a compiled, measured kernel qualify: the pure-PyTorch fallback is slower
# than Cholesky, and the CUDA kernel has no measurements yet (no GPU so far).
AUTO_FUSED_MIN_N = 16
FUSED_MEASURED_DEVICES = ("cpu",)

# The fused CG stops on its recurrence residual; the true residual ‖b − A x‖ it returns lies a
# few times above that in float32 (up to 6.7x at rtol 1e-6, benchmarks/batched_cg.py). A system
# whose true residual misses the target gets one more fused run from where it stopped
# (residual replacement: the restart recomputes r = b − A x). What then still misses goes on
# to Cholesky, unless it is already at the dtype's rounding level, ‖b − A x‖ ≤
# FUSED_ROUNDOFF_FACTOR · n · eps · ‖A‖_F ‖x‖, where a Cholesky solve is no more accurate
# (the final report then says that the target is below what the dtype attains).
FUSED_RESTARTS = 1
FUSED_ROUNDOFF_FACTOR = 10.0

# Matrix-free symmetry test (two matvecs) before choosing CG: CG tolerates round-off asymmetry.
MATRIX_FREE_SYMMETRY_RTOL = 1e-6
# CG's budget, in multiples of N, before "auto" gives up on it for a small batched system.
AUTO_CG_BUDGET_PER_N = 2
# GMRES's restart length when "auto" falls back to it.
AUTO_GMRES_RESTART = 20


def auto_fused_budget(n: int) -> int:
    """Iterations the fused CG gets in "auto" before Cholesky takes over: clamp(1.5 n, 32, 128)."""
    return int(min(max(1.5 * n, 32), 128))


def _fused_kernel_serves(sys: FlatSystem) -> bool:
    """Whether the compiled fused CG runs, measured, on this system's device (and values can be
    read, which the fallback to Cholesky needs)."""
    device = sys.b.device
    return sys.inspect and device.type in FUSED_MEASURED_DEVICES and ops.extension_available(device)


def _fused_cg(sys: FlatSystem, A: Tensor, maxiter: int, x0: Tensor | None):
    """The fused batched CG on formed symmetric blocks: ``(x, solved, at_roundoff)``, with
    ``solved`` judged on the true residual the kernel returns, and ``at_roundoff`` where it
    misses the target only by rounding (see ``FUSED_ROUNDOFF_FACTOR``)."""
    # The operator itself: the inputs are checked and the threshold known already.
    x, _, res = torch.ops.implicit_torch.batched_cg(A, sys.b, x0, sys.tol, sys.atol, maxiter, False)
    finite = torch.isfinite(res)
    n, eps = A.shape[-1], torch.finfo(A.dtype).eps
    rounding = FUSED_ROUNDOFF_FACTOR * n * eps * torch.linalg.matrix_norm(A) * norm(x)
    return x, finite & (res <= sys.threshold), finite & (res <= rounding)


def solve_formed(A: Tensor, b: Tensor, *, tol: float | None = None, atol: float = 0.0):
    """``solve="auto"``'s choice for formed blocks: solve ``A[i] x[i] = b[i]``.

    Symmetric blocks of at least ``AUTO_FUSED_MIN_N`` unknowns on a device with a compiled,
    measured fused kernel go to :func:`implicit_torch.ops.batched_cg` with a budget of
    :func:`auto_fused_budget` iterations; the systems that miss ``max(tol ‖b_i‖, atol)`` within
    it, and every other symmetric case, go to Cholesky; blocks that are not symmetric positive
    definite go to LU.

    Args:
        A: ``(B, N, N)`` float blocks.
        b: ``(B, N)``.
        tol, atol: as for the solvers (``tol=None``: the linear-solve default of the dtype).

    Returns:
        ``(x, method)`` with ``x`` of shape ``(B, N)`` and ``method`` one of ``"batched_cg"``,
        ``"batched_cg+cholesky"``, ``"cholesky"``, ``"lu"``.
    """
    op = LinearOperator(lambda v: torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), batched=True)
    x, method, _ = _solve_blocks(FlatSystem(op, b, None, None, None, tol, atol), A)
    return x, method


def _solve_blocks(sys: FlatSystem, A: Tensor) -> tuple[Tensor, str, Tensor]:
    """:func:`solve_formed` on a system: ``(x, method, singular)``."""
    N = sys.shape[1]
    if not (sys.inspect and dense.formed_is_symmetric(A)):
        x, singular = dense.lu_solve(A, sys.b)
        return x, "lu", singular
    if N < AUTO_FUSED_MIN_N or not _fused_kernel_serves(sys):
        return dense.cholesky_or_lu(A, sys.b)
    x, solved, at_roundoff = _fused_cg(
        sys, A, auto_fused_budget(N), sys.x0 if sys.init_given else None
    )
    solved = solved | at_roundoff  # a restart cannot do better than rounding
    for _ in range(FUSED_RESTARTS):
        if bool(solved.all()):
            break
        x_again, solved_again, at_roundoff = _fused_cg(sys, A, auto_fused_budget(N), x)
        x = torch.where(solved.unsqueeze(1), x, x_again)
        solved = solved | solved_again | at_roundoff
    if bool(solved.all()):
        return x, "batched_cg", torch.zeros_like(solved)
    missed = (~solved).nonzero().squeeze(-1)
    x_missed, method, singular_missed = dense.cholesky_or_lu(A[missed], sys.b[missed])
    singular = torch.zeros_like(solved).index_copy(0, missed, singular_missed)
    return x.index_copy(0, missed, x_missed), f"batched_cg+{method}", singular


def _is_symmetric(sys: FlatSystem) -> bool:
    """The operator's own word where it has one, else two probe matvecs."""
    if sys.op.symmetric is not None:  # a ridge r·I keeps either answer
        return bool(sys.op.symmetric)
    B, N = sys.shape

    def apply2(P: Tensor) -> Tensor:
        return torch.stack([sys.A(P[:, 0].expand(B, N)), sys.A(P[:, 1].expand(B, N))], dim=2)

    return dense.symmetric_within(apply2, N, sys.b, MATRIX_FREE_SYMMETRY_RTOL)


def choose_and_solve(sys: FlatSystem, maxiter: int):
    """Solve ``sys`` the way ``solve="auto"`` chooses (see :func:`implicit_torch.solve_auto`).

    Returns ``(x, method, iterations, converged, failures)``; ``converged`` is ``None`` for a
    direct solve (judged on the residual by the caller).
    """
    B, N = sys.shape
    small = N <= AUTO_DENSE_MAX_N and B * N * N <= AUTO_DENSE_MAX_ENTRIES

    def formed(prefix: str = ""):
        x, method, singular = _solve_blocks(sys, sys.materialise())
        return x, prefix + method, None, None, {"singular": singular}

    if small and (not sys.batched or not sys.inspect):
        return formed()
    if sys.inspect and _is_symmetric(sys):
        budget = min(maxiter, AUTO_CG_BUDGET_PER_N * N) if small else maxiter
        x, iters, conv, failures = krylov.cg(sys, budget)
        if bool(conv.all()):
            return x, "cg", iters, conv, failures
        if small:
            return formed("cg+")
        sys = sys.restarted_from(x)
    elif small:
        return formed()
    x, iters, conv, failures = krylov.gmres(sys, maxiter, AUTO_GMRES_RESTART)
    return x, "gmres", iters, conv, failures
