"""Loss functions, with JAXopt's names, argument order and meanings: ``loss(label, prediction)``.

JAXopt defines each loss on one sample (and batches with ``vmap``); here every loss also
broadcasts over leading dimensions: a label of shape ``(...)`` (binary and integer-class losses)
or ``(..., k)`` (Fenchel–Young losses), with predictions of shape ``(...)`` or ``(..., k)``,
gives a loss of shape ``(...)``, one value per sample. Average or sum them yourself (the
objectives of :mod:`implicit_torch.objective` average).

All losses are torch ops, differentiable by autograd and the ``torch.func`` transforms in the
predictions (and, where it makes sense, in real-valued labels), with no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from implicit_torch.projection._sets import check_simplex_input, simplex_rows, simplex_shift

__all__ = [
    "binary_logistic_loss",
    "huber_loss",
    "make_fenchel_young_loss",
    "multiclass_hinge_loss",
    "multiclass_logistic_loss",
    "multiclass_sparsemax_loss",
    "sparsemax",
    "squared_loss",
]

Tensor = torch.Tensor


def _as_float_label(label: Any, like: Tensor) -> Tensor:
    return torch.as_tensor(label, device=like.device).to(like.dtype)


def _pick(scores: Tensor, label: Any) -> Tensor:
    """``scores[..., label]``: the score of each sample's class (labels of shape ``(...)``)."""
    index = torch.as_tensor(label, device=scores.device).long()
    index = index.expand(scores.shape[:-1]).unsqueeze(-1)
    return torch.gather(scores, -1, index).squeeze(-1)


def binary_logistic_loss(label: Any, logit: Tensor) -> Tensor:
    """Binary logistic loss: ``softplus(logit) − label · logit``.

    Equal to ``−label · log σ(logit) − (1 − label) · log(1 − σ(logit))``, the negative
    log-likelihood of a Bernoulli with mean ``σ(logit)``; computed stably with ``softplus``.
    At infinite logits it is the limit, ``(1 − label) · ∞`` at ``+inf`` and ``label · ∞`` at
    ``−inf`` (0 for a label of 1, resp. 0), with a zero derivative.

    Args:
        label: in ``{0, 1}`` (or ``[0, 1]``), shape ``(...)`` broadcastable with ``logit``.
        logit: real, shape ``(...)``.

    Returns:
        The loss, shape of the broadcast of ``label`` and ``logit``.
    """
    label = _as_float_label(label, logit)
    infinite = torch.isinf(logit)
    # The formula on a finite stand-in (so that ∞ − ∞ never reaches it, nor its derivative).
    z = torch.where(infinite, torch.zeros_like(logit), logit)
    finite = F.softplus(z) - label * z
    weight = torch.where(logit > 0, 1 - label, label).detach()  # what multiplies ∞ in the limit
    limit = torch.where(weight == 0, 0.0, torch.where(weight > 0, math.inf, -math.inf))
    return torch.where(infinite, limit.to(finite.dtype), finite)


def squared_loss(target: Any, pred: Tensor) -> Tensor:
    """Squared loss ``½ (target − pred)²``, elementwise (shape of the broadcast)."""
    return 0.5 * (pred - _as_float_label(target, pred)) ** 2


def huber_loss(target: Any, pred: Tensor, delta: float = 1.0) -> Tensor:
    """Huber loss, elementwise: with ``r = |target − pred|``,
    ``½ r²`` if ``r ≤ delta``, else ``delta · (r − ½ delta)``.

    Quadratic near zero and linear in the tails, with a continuous derivative
    ``clip(pred − target, −delta, delta)``.

    Args:
        target: shape broadcastable with ``pred``.
        pred: real tensor.
        delta: the switch point, ``> 0``.
    """
    r = torch.abs(pred - _as_float_label(target, pred))
    return torch.where(r > delta, delta * (r - 0.5 * delta), 0.5 * r * r)


def multiclass_logistic_loss(label: Any, logits: Tensor) -> Tensor:
    """Multiclass logistic (softmax cross-entropy) loss: ``logsumexp(logits) − logits[label]``.

    Args:
        label: integer class indices in ``[0, k)``, shape ``(...)``.
        logits: shape ``(..., k)``.

    Returns:
        Shape ``(...)``.
    """
    return torch.logsumexp(logits, -1) - _pick(logits, label)


def sparsemax(scores: Tensor) -> Tensor:
    """Sparsemax ``argmin_{p ∈ Δᵏ} ‖p − scores‖²`` over the last dimension (Martins & Astudillo,
    2016): the Euclidean projection of each row onto the probability simplex.

    ``scores`` needs a non-empty last dimension. Edge values as in
    :func:`~implicit_torch.projection.projection_simplex`: ``−inf`` scores get 0, ``+inf`` ones
    share all the mass, a NaN makes its row NaN.
    """
    check_simplex_input("sparsemax", scores, arg="scores")
    return simplex_rows(scores, who="sparsemax")


def multiclass_sparsemax_loss(label: Any, scores: Tensor) -> Tensor:
    """Multiclass sparsemax loss (Martins & Astudillo, 2016), the Fenchel–Young loss of the Gini
    negentropy ``Ω(p) = ½(‖p‖² − 1)`` on the simplex:

    ``loss = Ω*(s) − s[label] = ⟨p, s⟩ − ½‖p‖² + ½ − s[label]``, ``p = sparsemax(s)``.

    Non-negative, zero iff ``s[label] ≥ s[j] + 1`` for all ``j ≠ label``; its gradient in
    ``s`` is ``p − e_label``. Computed on ``s − max(s)`` (the loss does not change when the
    scores move together), so large scores lose no digits. At infinite scores it is the limit:
    a ``−inf`` class drops out (the loss of the other classes), a label at ``+inf`` gives 0
    (``1/4`` when two classes share ``+inf``, ...), another label ``+inf``; NaN gives NaN.

    Args:
        label: integer class indices in ``[0, k)``, shape ``(...)``.
        scores: shape ``(..., k)``.

    Returns:
        Shape ``(...)``.
    """
    # Differentiating through p too is exact: its contribution Jₚᵀ(s − p) vanishes (s − p is
    # constant on the support), so the gradient is p − e_label and the Hessian Jₚ.
    check_simplex_input("multiclass_sparsemax_loss", scores, arg="scores")
    u = simplex_shift(scores)
    p = simplex_rows(u, who="multiclass_sparsemax_loss")
    # ⟨p, u⟩ over the support only: 0 · (−inf) is 0 there (an entry at −inf has p = 0).
    finite_u = torch.where(torch.isinf(u), torch.zeros_like(u), u)
    conj = (p * finite_u).sum(-1) - 0.5 * (p * p).sum(-1) + 0.5
    return conj - _pick(u, label)


def multiclass_hinge_loss(label: Any, scores: Tensor) -> Tensor:
    """Multiclass hinge loss (Crammer & Singer, 2001): ``max_j (s_j + 1[j ≠ label]) − s_label``.

    Args:
        label: integer class indices in ``[0, k)``, shape ``(...)``.
        scores: shape ``(..., k)``.

    Returns:
        Shape ``(...)``.
    """
    k = scores.shape[-1]
    index = torch.as_tensor(label, device=scores.device).long()
    one_hot = F.one_hot(index.expand(scores.shape[:-1]), k).to(scores.dtype)
    return (scores + 1 - one_hot).amax(-1) - _pick(scores, label)


def make_fenchel_young_loss(max_fun: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Fenchel–Young loss of a regularised max: ``loss(y, s) = max_fun(s) − ⟨y, s⟩``.

    ``max_fun(s) = Ω*(s) = max_{p ∈ dom Ω} ⟨p, s⟩ − Ω(p)`` (Blondel, Martins & Niculae, 2020);
    the full Fenchel–Young loss also adds ``Ω(y)``, which does not depend on ``s`` and is left
    out, as in JAXopt. E.g. ``max_fun = lambda s: torch.logsumexp(s, -1)`` gives the multiclass
    logistic loss for one-hot ``y``. The gradient in ``s`` is ``∇max_fun(s) − y``.

    Args:
        max_fun: ``max_fun(scores, *args)``, reducing the last dimension: ``(..., k) → (...)``.

    Returns:
        ``fy_loss(y_true, scores, *args)`` with ``y_true`` and ``scores`` of shape ``(..., k)``
        (``y_true`` a one-hot label or a point of ``dom Ω``), returning shape ``(...)``.
    """

    def fy_loss(y_true: Tensor, scores: Tensor, *args: Any) -> Tensor:
        y_true = _as_float_label(y_true, scores)
        return max_fun(scores, *args) - (y_true * scores).sum(-1)

    return fy_loss
