"""Proximal operators, with JAXopt's signature ``prox(x, hyperparams=None, scaling=1.0)``.

``prox_g(x, hyperparams, scaling) = argmin_z ½‖z − x‖² + scaling · g(z, hyperparams)``. The
solvers call ``prox(v, hyperparams, η)`` with their step ``η``.

``x`` may be a tensor or a pytree of tensors; the regularisation strength is a number, a tensor
broadcastable to each leaf, or a pytree of those matching ``x``. All operators are torch ops,
differentiable by autograd and ``torch.func`` in ``x``, the hyperparameters and ``scaling``, with
the almost-everywhere derivative at the kinks (e.g. 0 for a lasso coordinate exactly at the
threshold) and never a NaN.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch._tree import tree_flatten, tree_leaves, tree_map, tree_unflatten

__all__ = [
    "make_prox_from_projection",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_lasso",
    "prox_non_negative_lasso",
    "prox_non_negative_ridge",
    "prox_none",
    "prox_ridge",
    "with_default_hyperparams",
]


def _leafwise(fn: Callable[..., torch.Tensor], x: Any, *hps: Any) -> Any:
    """``fn(x_leaf, *hp_leaf)`` for every leaf, a hyperparameter being shared by all leaves
    (number or tensor) or given per leaf (a pytree with ``x``'s structure)."""
    if isinstance(x, torch.Tensor):
        return fn(x, *hps)
    leaves, spec = tree_flatten(x)
    per_leaf = []
    for hp in hps:
        if isinstance(hp, (int, float, torch.Tensor)) or hp is None:
            per_leaf.append([hp] * len(leaves))
        else:
            hp_leaves, hp_spec = tree_flatten(hp)
            if hp_spec != spec:
                raise ValueError(
                    f"a hyperparameter pytree ({hp_spec}) does not match x's structure ({spec})"
                )
            per_leaf.append(hp_leaves)
    return tree_unflatten([fn(leaf, *hp) for leaf, *hp in zip(leaves, *per_leaf)], spec)


def _soft_threshold(x: torch.Tensor, t: Any) -> torch.Tensor:
    # sign(x)·relu(|x| − t): torch's abs and relu have derivative 0 at 0, so no NaN anywhere.
    return torch.sign(x) * torch.relu(torch.abs(x) - t)


def prox_none(x: Any, hyperparams: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g = 0``: the identity, ``prox(x) = x``."""
    del hyperparams, scaling
    return x


def prox_lasso(x: Any, l1reg: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g(z) = l1reg · ‖z‖₁`` (soft thresholding).

    ``prox(x) = sign(x) · max(|x| − l1reg · scaling, 0)`` elementwise.

    Args:
        x: tensor or pytree of tensors.
        l1reg: ``≥ 0``; number, tensor broadcastable to ``x`` (one weight per coordinate), or
            pytree matching ``x``. ``None`` means 1.0.
        scaling: the step ``η`` multiplying ``g``.
    """
    l1reg = 1.0 if l1reg is None else l1reg
    return _leafwise(lambda v, lam: _soft_threshold(v, lam * scaling), x, l1reg)


def prox_non_negative_lasso(x: Any, l1reg: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g(z) = l1reg · Σ z + ι(z ≥ 0)``.

    ``prox(x) = max(x − l1reg · scaling, 0)`` elementwise. ``l1reg`` as in :func:`prox_lasso`.
    """
    l1reg = 1.0 if l1reg is None else l1reg
    return _leafwise(lambda v, lam: torch.relu(v - lam * scaling), x, l1reg)


def prox_elastic_net(x: Any, hyperparams: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g(z) = l1reg · ‖z‖₁ + ½ l2reg · ‖z‖₂²``.

    ``prox(x) = sign(x) · max(|x| − l1reg · scaling, 0) / (1 + l2reg · scaling)``.

    Args:
        x: tensor or pytree of tensors.
        hyperparams: ``(l1reg, l2reg)``, each as ``l1reg`` in :func:`prox_lasso`; ``None``
            means ``(1.0, 1.0)``.
        scaling: the step ``η`` multiplying ``g``.
    """
    l1reg, l2reg = (1.0, 1.0) if hyperparams is None else hyperparams
    return _leafwise(
        lambda v, a, b: _soft_threshold(v, a * scaling) / (1 + b * scaling), x, l1reg, l2reg
    )


def prox_group_lasso(x: Any, l2reg: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g(z) = l2reg · ‖z‖₂`` (block soft thresholding).

    ``prox(x) = x · max(1 − l2reg · scaling / ‖x‖₂, 0)``, with ``‖x‖₂`` the norm of all of
    ``x`` (every leaf of a pytree): ``x`` is one group. For several groups apply it per group,
    e.g. with ``torch.func.vmap`` over the rows of a ``(groups, size)`` tensor.

    Args:
        x: tensor or pytree of tensors.
        l2reg: ``≥ 0``, a number or 0-d tensor; ``None`` means 1.0.
        scaling: the step ``η`` multiplying ``g``.
    """
    l2reg = 1.0 if l2reg is None else l2reg
    sq = sum((v * v).sum() for v in tree_leaves(x))
    t = l2reg * scaling
    keep = sq > t * t
    # The norm of a (near-)zero x is never differentiated: sqrt of 1 in the branch not taken.
    norm = torch.sqrt(torch.where(keep, sq, torch.ones_like(sq)))
    factor = torch.where(keep, 1 - t / norm, torch.zeros_like(norm))
    return tree_map(lambda v: factor * v, x)


def prox_ridge(x: Any, l2reg: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g(z) = ½ l2reg · ‖z‖₂²``: ``prox(x) = x / (1 + l2reg · scaling)``.

    ``l2reg`` as ``l1reg`` in :func:`prox_lasso`; ``None`` means 1.0.
    """
    l2reg = 1.0 if l2reg is None else l2reg
    return _leafwise(lambda v, lam: v / (1 + lam * scaling), x, l2reg)


def prox_non_negative_ridge(x: Any, l2reg: Any = None, scaling: Any = 1.0) -> Any:
    """Proximal operator of ``g(z) = ½ l2reg · ‖z‖₂² + ι(z ≥ 0)``:
    ``prox(x) = max(x, 0) / (1 + l2reg · scaling)``."""
    l2reg = 1.0 if l2reg is None else l2reg
    return _leafwise(lambda v, lam: torch.relu(v) / (1 + lam * scaling), x, l2reg)


def with_default_hyperparams(projection: Callable[..., Any]) -> Callable[..., Any]:
    """``projection`` with hyperparameters of ``None`` meaning its defaults (JAXopt's
    convention): ``projection(x, None)`` calls ``projection(x)`` when the projection's second
    parameter has a default, and passes ``None`` through otherwise (a projection written as
    ``lambda v, hp: ...`` gets its ``None``).

    The one place where the callers that pass a projection's hyperparameters through
    (:func:`make_prox_from_projection`, :class:`~implicit_torch.ProjectedGradient`,
    :meth:`~implicit_torch.MirrorDescent.make_projection_grad`) read ``None``, so that every
    projection with a default (``projection_simplex``'s ``value=1``, the balls' radius 1, ...)
    works there without its hyperparameters.
    """
    try:
        return _with_defaults_cached(projection)  # solvers ask for it at every iteration
    except TypeError:  # an unhashable callable
        return _with_defaults(projection)


def _with_defaults(projection: Callable[..., Any]) -> Callable[..., Any]:
    try:
        params = list(inspect.signature(projection).parameters.values())
    except (TypeError, ValueError):  # no signature to read: call it as given
        return projection
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) < 2 or params[1].kind not in positional or params[1].default is params[1].empty:
        return projection

    @functools.wraps(projection)
    def with_defaults(x, hyperparams=None):
        return projection(x) if hyperparams is None else projection(x, hyperparams)

    return with_defaults


_with_defaults_cached = functools.lru_cache(maxsize=256)(_with_defaults)


def make_prox_from_projection(projection: Callable[..., Any]) -> Callable[..., Any]:
    """The proximal operator of the indicator ``ι_C`` of a closed convex set ``C``.

    ``prox(x, hyperparams, scaling) = projection(x, hyperparams)``: the prox of an indicator is
    the projection onto ``C`` whatever the scaling (JAXopt's convention), so ``scaling`` is
    ignored. ``hyperparams=None`` means the projection's defaults (e.g. ``value=1`` for
    :func:`~implicit_torch.projection.projection_simplex`).

    Args:
        projection: ``projection(x, hyperparams)`` (see :mod:`implicit_torch.projection`).
    """
    project = with_default_hyperparams(projection)

    def prox(x, hyperparams=None, scaling=1.0):
        del scaling
        return project(x, hyperparams)

    return prox
