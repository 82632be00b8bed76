"""The schemas of the ``implicit_torch`` operators, defined here and nowhere else.

:mod:`implicit_torch.ops._registration` defines them with :func:`torch.library.define`
whether or not the compiled extension is built; the extension (``csrc/``) only registers
kernels under these names (declared in ``csrc/batched_cg.h`` and ``csrc/qp_ipm.h``), and the
dispatcher checks their C++ signatures against these schemas when they are defined.
"""

from __future__ import annotations

__all__ = ["NAMESPACE", "SCHEMAS"]

NAMESPACE = "implicit_torch"

# name -> schema without the name (torch.library.define's form).
SCHEMAS = {
    # B symmetric positive-definite systems A[i] x[i] = b[i] by conjugate gradient
    # (implicit_torch/ops/_reference.py, csrc/batched_cg.h).
    "batched_cg": (
        "(Tensor A, Tensor b, Tensor? x0, float rtol, float atol, int maxiter, "
        "bool jacobi=False) -> (Tensor x, Tensor iterations, Tensor residual_norm)"
    ),
    # The interior-point iterations of implicit_torch.solvers.QP
    # (implicit_torch/ops/_qp_reference.py, csrc/qp_ipm.h).
    "qp_ipm": (
        "(Tensor K, Tensor q, Tensor M1, Tensor W, Tensor T, Tensor nGt, int maxiter, "
        "float tol, float acceptable_tol, int patience) -> (Tensor z, Tensor iterations, "
        "Tensor error, Tensor converged)"
    ),
}
