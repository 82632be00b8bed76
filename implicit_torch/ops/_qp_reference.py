"""Pure-PyTorch ``implicit_torch::qp_ipm``: the fallback kernel and the test oracle.

It runs the iterations of the compiled CPU kernel (``csrc/cpu/qp_ipm_cpu.cpp``; semantics in
``csrc/qp_ipm.h``) on whole batches, with masks where the kernel takes one problem at a time:
Mehrotra's predictor-corrector primal-dual interior-point method (Mehrotra, "On the
implementation of a primal-dual interior point method", SIAM J. Optim. 1992) from CVXOPT's
starting point (Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010),
on the reduced system ``(W + diag(0, s/λ)) y = ...`` with ``W = C Qₛ⁻¹ Cᵀ``.
``implicit_torch/solvers/qp.py`` (class ``_IPM``) holds the derivation and builds the inputs
(``K``, ``q``, ``M1``, ``W``, ``T``, ``nGt``) once per batch.

Each problem stops on its own: at the tolerance, after ``maxiter`` steps, after ``patience``
steps without improving its best error, or when the factorisation of its reduced matrix
fails (not positive definite: degenerate data or the precision floor), and its best iterate
is returned. Stopped problems are frozen by masking; the loop leaves early when every
problem has stopped, except where values cannot be inspected (``torch.compile``, ``vmap``),
where it runs ``maxiter`` masked steps with the same results.
"""

from __future__ import annotations

import math

import torch

from implicit_torch import _runtime

Tensor = torch.Tensor

__all__ = ["check_qp_ipm_inputs", "qp_ipm_reference"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


def check_qp_ipm_inputs(K, q, M1, W, T, nGt, maxiter, tol, acceptable_tol, patience) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the argument) for inputs the op rejects.

    The same rules as ``check_qp_ipm_inputs`` in ``csrc/qp_ipm.h``, checked in the same order
    and with the same messages (values written as Python writes them: ``torch.int64``,
    ``(3, 9)``, ``1e-06``), so that the raw op raises the same error with and without the
    compiled extension; for the fake kernel and the pure-PyTorch kernel. The arguments are
    those of :func:`qp_ipm_reference`.
    """
    tensors = {"K": K, "q": q, "M1": M1, "W": W, "T": T, "nGt": nGt}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"qp_ipm: {name} must be a tensor, got {type(t).__name__}")
    if K.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qp_ipm: the data must be float32 or float64, got {K.dtype}")
    if any(t.dim() != 3 for t in (K, M1, W, nGt)):
        raise ValueError("qp_ipm: K, M1, W and nGt must be batched matrices (3-d)")
    B, N, n, k, m = K.shape[0], K.shape[1], M1.shape[1], W.shape[1], nGt.shape[2]
    if not (m > 0 and k >= m and n + k == N):
        raise ValueError(f"qp_ipm: inconsistent sizes: N={N}, n={n}, k={k}, m={m}")
    shapes = {
        "K": (B, N, N),
        "q": (B, N),
        "M1": (B, n, n + k),
        "W": (B, k, k),
        "T": (B, k, n + k + m),
        "nGt": (B, n, m),
    }
    for name, t in tensors.items():
        if t.layout != torch.strided:
            raise TypeError(f"qp_ipm: {name} must be a dense (strided) tensor, got {t.layout}")
        if t.dtype != K.dtype:
            raise TypeError(f"qp_ipm: {name} has dtype {t.dtype} but K has {K.dtype}")
        if t.device != K.device:
            raise ValueError(f"qp_ipm: {name} is on {t.device} but K is on {K.device}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"qp_ipm: {name} must have shape {shapes[name]}, got {tuple(t.shape)}")
    if maxiter < 0:
        raise ValueError(f"qp_ipm: maxiter must be non-negative, got {maxiter}")
    if patience < 1:
        raise ValueError(f"qp_ipm: patience must be at least 1, got {patience}")
    for name, value in (("tol", tol), ("acceptable_tol", acceptable_tol)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"qp_ipm: {name} must be finite and non-negative, got {float(value)!r}"
            )


def qp_ipm_reference(
    K: Tensor,
    q: Tensor,
    M1: Tensor,
    W: Tensor,
    T: Tensor,
    nGt: Tensor,
    maxiter: int,
    tol: float,
    acceptable_tol: float,
    patience: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the interior-point iterations of ``B`` QPs (see ``csrc/qp_ipm.h``).

    With ``n`` variables, ``p`` equalities, ``m ≥ 1`` inequalities, ``k = p + m`` and
    ``N = n + k``:

    Args:
        K: ``(B, N, N)`` the symmetric KKT matrix ``[[Qₛ, Cᵀ], [C, 0]]``, ``C = [A; G]``.
        q: ``(B, N)`` ``[c; −b; −h]``.
        M1: ``(B, n, n + k)`` ``−[Qₛ⁻¹, Qₛ⁻¹Cᵀ]``.
        W: ``(B, k, k)`` ``C Qₛ⁻¹ Cᵀ`` (its lower triangle is read).
        T: ``(B, k, n + k + m)`` ``[−C Qₛ⁻¹, I, C Qₛ⁻¹ Gᵀ]``.
        nGt: ``(B, n, m)`` ``−Gᵀ``.
        maxiter: step cap per problem.
        tol, acceptable_tol: problem ``i`` converges when its KKT error is at most
            ``tol (1 + ‖q_i‖∞)``, or when it stalls below ``acceptable_tol (1 + ‖q_i‖∞)``.
        patience: steps without improvement after which a problem stops.

    Returns:
        ``(z, iterations, error, converged)``: the best iterates' ``[x; ν; λ]`` ``(B, N)``,
        the steps taken ``(B,)`` int64, their KKT errors ``(B,)`` and ``(B,)`` bool. A
        problem whose first factorisation fails gets ``z = NaN`` and ``error = NaN``.
    """
    check_qp_ipm_inputs(K, q, M1, W, T, nGt, maxiter, tol, acceptable_tol, patience)
    with torch.no_grad():
        problem = _Problem(K, q, M1, W, T, nGt)
        return problem.solve(int(maxiter), float(tol), float(acceptable_tol), int(patience))


def _times(v: Tensor, M: Tensor) -> Tensor:
    """Row vectors times matrices: ``(B, r)`` and ``(B, r, c)`` give ``(B, c)``."""
    return torch.bmm(v.unsqueeze(1), M).squeeze(1)


class _Problem:
    """The batch's data and the steps of the method on iterates ``u = [x; ν; λ; s]``
    ``(B, N + m)``."""

    def __init__(self, K, q, M1, W, T, nGt):
        self.K, self.q, self.M1, self.W, self.T, self.nGt = K, q, M1, W, T, nGt
        self.n, self.k, self.m = M1.shape[1], W.shape[1], nGt.shape[2]
        self.p = self.k - self.m
        self.N = self.n + self.k

    def factor(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """Cholesky factor of ``W + diag(0, d)`` (``d`` is ``(B, m)``) and whether it exists."""
        d = torch.cat([d.new_zeros(d.shape[0], self.p), d], -1)
        L, info = torch.linalg.cholesky_ex(self.W + torch.diag_embed(d))
        return L, info == 0

    def residual(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``R = q + u[:N] K = [r_d; r_p; Gx − h]`` and the KKT error: the largest of
        ``|r_d|``, ``|r_p|``, ``|λ ⊙ (Gx − h)|`` and ``(Gx − h)₊`` (NaN propagates)."""
        kp, N = self.n + self.p, self.N
        R = self.q + _times(u[:, :N], self.K)
        gap = R[:, kp:]
        error = torch.cat([R[:, :kp].abs(), (u[:, kp:N] * gap).abs(), gap], -1).amax(-1)
        return R, error

    def start(self) -> tuple[Tensor, Tensor]:
        """CVXOPT's starting point: the Newton system with ``s/λ = 1`` solved from zero, then
        ``s`` and ``λ`` shifted to be positive; and whether its factorisation succeeded."""
        n, p, m = self.n, self.p, self.m
        L, ok = self.factor(self.q.new_ones(self.q.shape[0], m))
        c = self.q[:, :n]
        # (W + diag(0, I)) y = −C Qₛ⁻¹ c − [b; h];  x = −Qₛ⁻¹(c + Cᵀ y).
        rhs = self.q[:, n:] + _times(c, self.M1[:, :, n:])
        y = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        x = _times(c, self.M1[:, :, :n]) + _times(y, self.T[:, :, :n])
        s0 = _times(x, self.nGt) - self.q[:, n + p :]  # h − G x
        # The shifts use the extreme values that are not NaN (as the kernel's std::min/max).
        nan = s0.isnan()
        lo = s0.masked_fill(nan, math.inf).amin(-1, keepdim=True)
        hi = s0.masked_fill(nan, -math.inf).amax(-1, keepdim=True)
        s = torch.where(-lo >= 0, s0 + 1 - lo, s0)
        lam = torch.where(hi >= 0, 1 + hi - s0, -s0)
        return torch.cat([x, y[:, :p], lam, s], -1), ok

    def step(self, u: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        """One predictor-corrector step from ``u`` with residual ``R``, and whether the
        factorisation it needs succeeded (where it failed the new iterate is meaningless)."""
        n, p, m, N = self.n, self.p, self.m, self.N
        kp = n + p
        lam, s, v = u[:, kp:N], u[:, N:], u[:, kp:]
        inv_lam = 1 / lam
        L, ok = self.factor(s * inv_lam)
        P = _times(R[:, :n], self.M1)  # [−Qₛ⁻¹ r_d; −C Qₛ⁻¹ r_d]
        Y_e = P[:, n : n + p] + R[:, n:kp]
        Y_i = P[:, n + p :] + R[:, kp:N] + s
        D0 = torch.cat([P[:, :n], torch.zeros_like(P[:, n:]), -Y_i], -1)
        sl = s * lam
        neg_inv_v = -1 / v
        sl_sum = sl.sum(-1, keepdim=True)

        def direction(rc: Tensor) -> Tensor:  # [dx; dν; dλ; ds] = D0 + y T
            r = torch.cat([Y_e, Y_i - rc * inv_lam], -1)
            y = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
            return D0 + _times(y, self.T)

        # Predictor (affine scaling): the largest α ≤ 1 keeping v = [λ; s] ≥ 0.
        du = direction(sl)
        dv = du[:, kp:]
        alpha = 1 / (dv * neg_inv_v).amax(-1, keepdim=True).clamp_min(1.0)
        t_dot = ((lam + alpha * dv[:, :m]) * (s + alpha * dv[:, m:])).sum(-1, keepdim=True)
        ratio = (t_dot / sl_sum).clamp(0.0, 1.0)
        sigma_mu = ratio * ratio * ratio * (sl_sum / m)
        # Corrector: Mehrotra's second-order term and centring, 0.99 of the way to the boundary.
        du = direction(sl - sigma_mu + du[:, N:] * dv[:, :m])
        alpha = 0.99 / (du[:, kp:] * neg_inv_v).amax(-1, keepdim=True).clamp_min(0.99)
        return u + alpha * du, ok

    def solve(self, maxiter: int, tol: float, acceptable_tol: float, patience: int):
        q_max = self.q.abs().amax(-1)
        limit, acceptable = tol * (1 + q_max), acceptable_tol * (1 + q_max)
        u, ok = self.start()
        R, error = self.residual(u)
        nan = torch.full_like(error, math.nan)
        best = torch.where(ok.unsqueeze(-1), u, nan.unsqueeze(-1))
        best_error = torch.where(ok, error, nan)  # NaN: never iterated, never converged
        iters = torch.zeros(error.shape, dtype=torch.int64, device=error.device)
        stall = torch.zeros_like(iters)
        inspect = _runtime.can_inspect_values()
        for _ in range(maxiter):
            active = (best_error > limit) & (stall < patience)
            if inspect and not bool(active.any()):
                break
            stepped, factored = self.step(u, R)
            iters = iters + active
            moved = active & factored
            stall = torch.where(active & ~factored, patience, stall)  # cannot go on: stop
            u = torch.where(moved.unsqueeze(-1), stepped, u)
            R, error = self.residual(u)
            improved = moved & (error < best_error)
            best = torch.where(improved.unsqueeze(-1), u, best)
            best_error = torch.where(improved, error, best_error)
            stall = torch.where(improved, 0, torch.where(moved, stall + 1, stall))
        converged = (best_error <= limit) | ((stall >= patience) & (best_error <= acceptable))
        return best[:, : self.N].contiguous(), iters, best_error, converged
