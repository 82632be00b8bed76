"""OptNet's layer (Amos & Kolter, 2017): a batched quadratic program as a module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from implicit_torch._result import check_maxiter, check_on_failure, check_tolerances
from implicit_torch.solvers.qp import QP

__all__ = ["QPLayer"]

Tensor = torch.Tensor


class QPLayer(nn.Module):
    """``x*(Q, p, A, b, G, h) = argmin_x ½ xᵀQx + pᵀx  s.t.  A x = b,  G x ≤ h`` (OptNet).

    ``forward(Q, p, G=None, h=None, A=None, b=None)``: each tensor is shared by the batch
    (``Q (n, n)``, ``p (n,)``, ``G (m, n)``, ...) or per problem with a leading batch
    dimension (``Q (B, n, n)``, ``p (B, n)``, ...); register learnable ones as parameters of
    a surrounding module and pass them in. Returns ``x*`` of shape ``(B, n)`` (``(n,)`` when
    nothing is batched), differentiable in every tensor through the KKT conditions.

    A tensor shared by the batch gets, by ``shared_grad``, the sum of the per-problem
    gradients (``"sum"``, the default: the gradient of the loss as written, as autograd gives
    for any broadcast tensor) or their mean (``"mean"``: qpth's convention; ported qpth code
    that tuned its learning rate to it keeps its step sizes).

    Solved by :class:`~implicit_torch.QP` (batched primal-dual interior point), which also
    differentiates the solution (implicitly, through its factorised KKT system); ``Q`` must
    be positive definite and ``A`` of full row rank. Non-convergence (an infeasible problem)
    warns, or raises with ``on_failure="raise"``; ``last_state``, a diagnostic set by each
    forward, holds the solver's state.

    Args:
        maxiter, tol, on_failure: passed to :class:`~implicit_torch.QP`.
        shared_grad: ``"sum"`` or ``"mean"``, see above.
        exact_active_set: differentiate with the solution's active set frozen (see
            :class:`~implicit_torch.QP`): exact zeros where the exact derivative is zero (an
            inactive ReLU constraint, say), where the interior point's own derivative leaves
            terms up to ~1e-6, as qpth's and cvxpylayers' do.
    """

    def __init__(
        self,
        *,
        maxiter: int = 50,
        tol: float | None = None,
        on_failure: str = "warn",
        shared_grad: str = "sum",
        exact_active_set: bool = False,
    ):
        super().__init__()
        self.exact_active_set = bool(exact_active_set)
        if shared_grad not in ("sum", "mean"):
            raise ValueError(f"QPLayer: shared_grad must be 'sum' or 'mean', got {shared_grad!r}")
        self.shared_grad = shared_grad
        check_tolerances(tol)
        self.maxiter, self.tol = check_maxiter(maxiter), tol
        self.on_failure = check_on_failure(on_failure)
        self.last_state: Any = None

    def forward(self, Q, p, G=None, h=None, A=None, b=None) -> Tensor:
        if (G is None) != (h is None) or (A is None) != (b is None):
            raise ValueError("QPLayer: pass G with h, and A with b")
        if G is None:
            raise ValueError(
                "QPLayer: no inequality constraints given (G, h); for equality constraints "
                "only use implicit_torch.EqualityConstrainedQP"
            )
        if self.shared_grad == "mean":
            Q, p, G, h, A, b = _mean_shared_grads(Q, p, G, h, A, b)
        solver = QP(
            maxiter=self.maxiter,
            tol=self.tol,
            on_failure=self.on_failure,
            exact_active_set=self.exact_active_set,
        )
        params_eq = None if A is None else (A, b)
        solution, self.last_state = solver.run(None, (Q, p), params_eq, (G, h))
        return solution.primal

    def extra_repr(self) -> str:
        return f"maxiter={self.maxiter}, tol={self.tol}, shared_grad={self.shared_grad!r}"


# The number of dimensions of each argument when it is shared by the batch.
_SHARED_DIMS = (2, 1, 2, 1, 2, 1)  # Q, p, G, h, A, b


def _mean_shared_grads(*tensors):
    """The arguments, with the gradient of each shared one divided by the batch size ``B``
    (values unchanged: ``t + (t − t)/B`` in autograd's eyes, ``t`` in value)."""
    sizes = {
        t.shape[0] for t, d in zip(tensors, _SHARED_DIMS) if t is not None and t.dim() == d + 1
    }
    if len(sizes) != 1:
        return tensors  # nothing batched (B = 1), or shapes the QP will reject with a message
    scale = 1.0 / sizes.pop()
    return tuple(
        t if t is None or t.dim() != d else t.detach() + scale * (t - t.detach())
        for t, d in zip(tensors, _SHARED_DIMS)
    )
