"""Objective functions of the usual learning problems, with JAXopt's names and signatures.

``objective(W, *hyperparams, data)`` returns a scalar (0-d) tensor; ``data = (X, y)`` with
``X`` of shape ``(n, d)``. Labels: real targets ``y`` of shape ``(n,)`` or ``(n, k)`` (least
squares), ``{0, 1}`` labels of shape ``(n,)`` (binary logistic), integer classes in ``[0, k)``
of shape ``(n,)`` (multiclass logistic), one-hot ``Y`` of shape ``(n, k)`` (SVM dual).

The objectives that are a smooth function of a linear map of ``W`` are
:class:`CompositeLinearFunction` instances: callable like any objective, and also exposing
that structure (``predictions = A W + c``, the gradient of the outer function, column-wise
Lipschitz constants), which :class:`~implicit_torch.solvers.block_coordinate_descent.
BlockCoordinateDescent` needs to update one block of ``W`` in ``O(size of A's column)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from implicit_torch.loss import binary_logistic_loss, multiclass_logistic_loss

# The structure block coordinate descent exploits is defined with that solver (a solver states
# what it needs of a problem); re-exported here, where JAXopt has it.
from implicit_torch.solvers.block_coordinate_descent import CompositeLinearFunction

__all__ = [
    "CompositeLinearFunction",
    "binary_logistic_regression",
    "l2_multiclass_logistic_regression",
    "l2_multiclass_logistic_regression_with_intercept",
    "least_squares",
    "multiclass_linear_svm_dual",
    "multiclass_logistic_regression",
    "multiclass_logistic_regression_with_intercept",
    "ridge_regression",
]

Tensor = torch.Tensor


def _data(args: tuple) -> tuple[Tensor, Tensor]:
    return args[-1]


def _design(*args: Any) -> Tensor:
    return _data(args)[0]


# -- least squares ------------------------------------------------------------------------


def _ls_subfun(z: Tensor, data: tuple) -> Tensor:
    return 0.5 * (z * z).mean()


def _ls_grad(z: Tensor, data: tuple) -> Tensor:
    return z / z.numel()


least_squares = CompositeLinearFunction(
    _ls_subfun,
    _design,
    offset=lambda data: -data[1],
    subfun_grad=_ls_grad,
    subfun_lipschitz=lambda data: 1.0 / data[1].numel(),
    name="least_squares",
    doc="""Least squares: ``least_squares(W, data) = ½ · mean((X W − y)²)``.

    The mean runs over all ``n`` (or ``n · k``) entries of the residual.

    Args:
        W: ``(d,)`` for ``y`` of shape ``(n,)``, or ``(d, k)`` for ``y`` of shape ``(n, k)``.
        data: ``(X, y)``, ``X`` of shape ``(n, d)``.

    Returns:
        A 0-d tensor. A :class:`CompositeLinearFunction` (``A = X``, ``c = −y``).
    """,
)


def ridge_regression(W: Tensor, l2reg: Any, data: tuple) -> Tensor:
    """Ridge regression: ``½ · mean((X W − y)²) + ½ · l2reg · ‖W‖²``.

    Args:
        W: ``(d,)`` or ``(d, k)`` as in :data:`least_squares`.
        l2reg: ``≥ 0``, a number or 0-d tensor (or a tensor broadcastable to ``W``, one weight
            per coefficient: then ``½ Σ l2reg ⊙ W²``).
        data: ``(X, y)``.
    """
    return least_squares(W, data) + 0.5 * (l2reg * W * W).sum()


# -- logistic regression ------------------------------------------------------------------


def _blr_subfun(z: Tensor, data: tuple) -> Tensor:
    return binary_logistic_loss(data[1], z).mean()


def _blr_grad(z: Tensor, data: tuple) -> Tensor:
    return (torch.sigmoid(z) - data[1].to(z.dtype)) / z.shape[0]


binary_logistic_regression = CompositeLinearFunction(
    _blr_subfun,
    _design,
    subfun_grad=_blr_grad,
    subfun_lipschitz=lambda data: 0.25 / data[1].shape[0],
    name="binary_logistic_regression",
    doc="""Binary logistic regression: ``mean_i binary_logistic_loss(y_i, x_iᵀ W)``.

    Args:
        W: ``(d,)``.
        data: ``(X, y)``, ``y`` of shape ``(n,)`` in ``{0, 1}``.

    Returns:
        A 0-d tensor. A :class:`CompositeLinearFunction` (``A = X``, ``σ' ≤ ¼``).
    """,
)


def _mlr_subfun(z: Tensor, data: tuple) -> Tensor:
    return multiclass_logistic_loss(data[1], z).mean()


def _mlr_grad(z: Tensor, data: tuple) -> Tensor:
    one_hot = F.one_hot(data[1].long(), z.shape[-1]).to(z.dtype)
    return (torch.softmax(z, -1) - one_hot) / z.shape[0]


multiclass_logistic_regression = CompositeLinearFunction(
    _mlr_subfun,
    _design,
    subfun_grad=_mlr_grad,
    # The Hessian of logsumexp, diag(p) − p pᵀ, has eigenvalues ≤ ½.
    subfun_lipschitz=lambda data: 0.5 / data[1].shape[0],
    name="multiclass_logistic_regression",
    doc="""Multiclass logistic regression: ``mean_i multiclass_logistic_loss(y_i, x_iᵀ W)``.

    Args:
        W: ``(d, k)``.
        data: ``(X, y)``, ``y`` of shape ``(n,)``, integer classes in ``[0, k)``.

    Returns:
        A 0-d tensor. A :class:`CompositeLinearFunction` (``A = X``).
    """,
)


def multiclass_logistic_regression_with_intercept(params: tuple, data: tuple) -> Tensor:
    """Multiclass logistic regression with intercept:
    ``mean_i multiclass_logistic_loss(y_i, x_iᵀ W + b)``.

    Args:
        params: ``(W, b)``, shapes ``(d, k)`` and ``(k,)``.
        data: ``(X, y)``, ``y`` integer classes of shape ``(n,)``.
    """
    W, b = params
    X, y = data
    return multiclass_logistic_loss(y, X @ W + b).mean()


def l2_multiclass_logistic_regression(W: Tensor, l2reg: Any, data: tuple) -> Tensor:
    """ℓ2-regularised multiclass logistic regression:
    ``mean_i multiclass_logistic_loss(y_i, x_iᵀ W) + ½ · l2reg · ‖W‖²``.

    Args:
        W: ``(d, k)``.
        l2reg: ``≥ 0``, a number or 0-d tensor.
        data: ``(X, y)``, ``y`` integer classes of shape ``(n,)``.
    """
    return multiclass_logistic_regression(W, data) + 0.5 * l2reg * (W * W).sum()


def l2_multiclass_logistic_regression_with_intercept(
    params: tuple, l2reg: Any, data: tuple
) -> Tensor:
    """:func:`multiclass_logistic_regression_with_intercept` ``+ ½ · l2reg · ‖W‖²`` (the
    intercept ``b`` is not regularised)."""
    W, _ = params
    return multiclass_logistic_regression_with_intercept(params, data) + 0.5 * l2reg * (W * W).sum()


# -- multiclass linear SVM, dual ------------------------------------------------------------


def _svm_subfun(z: Tensor, l2reg: Any, data: tuple) -> Tensor:
    return 0.5 * (z * z).sum() / l2reg


def _svm_grad(z: Tensor, l2reg: Any, data: tuple) -> Tensor:
    return z / l2reg


multiclass_linear_svm_dual = CompositeLinearFunction(
    _svm_subfun,
    lambda l2reg, data: data[0].T,
    offset=lambda l2reg, data: -(data[0].T @ data[1].to(data[0].dtype)),
    linear_term=lambda l2reg, data: data[1].to(data[0].dtype),
    subfun_grad=_svm_grad,
    subfun_lipschitz=lambda l2reg, data: 1.0 / l2reg,
    # Xᵀ(β − Y) in one product, not Xᵀβ − XᵀY.
    predictions_fun=lambda beta, l2reg, data: data[0].T @ (beta - data[1].to(beta.dtype)),
    name="multiclass_linear_svm_dual",
    doc="""Dual of the multiclass linear SVM (Crammer & Singer, 2001), to minimise over
    ``β`` with every row on the simplex:

    ``multiclass_linear_svm_dual(β, l2reg, data) = ½ / l2reg · ‖Xᵀ(Y − β)‖² + ⟨β, Y⟩``.

    It is the negated dual objective ``⟨β, 1 − Y⟩ − ½ / l2reg · ‖Xᵀ(Y − β)‖²`` of the primal
    ``min_W ½ l2reg ‖W‖² + Σ_i max_j (1 − Y_ij + x_iᵀ W_j − x_iᵀ W_{y_i})``, up to the
    constant ``n = Σ β`` on the simplices; the primal solution is
    ``W = Xᵀ(Y − β) / l2reg``, shape ``(d, k)``.

    Args:
        β: ``(n, k)``, rows on the probability simplex.
        l2reg: ``> 0``, a number or 0-d tensor.
        data: ``(X, Y)``, ``X`` of shape ``(n, d)`` and one-hot ``Y`` of shape ``(n, k)``.

    Returns:
        A 0-d tensor. A :class:`CompositeLinearFunction` with ``A = Xᵀ``, ``c = −XᵀY``,
        ``subfun(z) = ½‖z‖² / l2reg`` and ``b = Y``, whose blocks are the rows of ``β``
        (samples).
    """,
)
