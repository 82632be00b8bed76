"""Closed-form Euclidean projections onto simple sets: the orthant, boxes, the simplex, the
ℓ1 / ℓ2 / ℓ∞ balls, the sphere, hyperplanes, halfspaces and affine sets (JAXopt's names,
re-exported by :mod:`implicit_torch.projection`)."""

from __future__ import annotations

from typing import Any

import torch

from implicit_torch._tree import tree_l2_norm, tree_map

Tensor = torch.Tensor


def _clip(x: Tensor, lower: Any, upper: Any) -> Tensor:
    # where() rather than clamp: the derivative is 1 for x, or 1 for the active bound, at
    # every point, including ties (which take x's branch).
    if lower is not None:
        x = torch.where(x < lower, lower, x)
    if upper is not None:
        x = torch.where(x > upper, upper, x)
    return x


def projection_non_negative(x: Any, hyperparams: Any = None) -> Any:
    """Projection onto the non-negative orthant ``{p : p ≥ 0}``: ``max(x, 0)``.

    ``x`` may be a pytree of tensors; ``hyperparams`` is ignored.
    """
    del hyperparams
    return tree_map(torch.relu, x)


def projection_box(x: Any, hyperparams: tuple) -> Any:
    """Projection onto the box ``{p : lower ≤ p ≤ upper}``: ``min(max(x, lower), upper)``.

    Args:
        x: tensor or pytree of tensors.
        hyperparams: ``(lower, upper)``, numbers or tensors broadcastable to every leaf
            (``lower ≤ upper``); ``None`` for an unbounded side.
    """
    lower, upper = hyperparams
    return tree_map(lambda v: _clip(v, lower, upper), x)


def projection_hypercube(x: Any, scale: Any = 1.0) -> Any:
    """Projection onto the hypercube ``{p : 0 ≤ p ≤ scale}``: ``min(max(x, 0), scale)``."""
    return tree_map(lambda v: _clip(v, 0.0, scale), x)


def projection_simplex(x: Tensor, value: Any = 1.0) -> Tensor:
    """Projection onto the simplex ``{p : p ≥ 0, Σ p = value}`` (``value > 0``).

    ``p = max(x − τ, 0)`` with ``τ = (Σ_{i ≤ ρ} u_i − value) / ρ``, where ``u`` is ``x`` sorted
    in decreasing order and ``ρ = max{j : u_j > (Σ_{i ≤ j} u_i − value) / j}`` (Held et al.,
    1974; Duchi et al., 2008). Differentiated by autograd through the sort: on the support
    ``S = {p > 0}`` (with indicator ``s``) the Jacobian is ``diag(s) − s sᵀ / |S|``, and
    ``∂p/∂value = s / |S|``.

    Args:
        x: a tensor of any shape, projected as one vector.
        value: the sum, a positive number or 0-d tensor.

    Returns:
        ``p``, shaped like ``x``.
    """
    return simplex_rows(x.reshape(1, -1), value).reshape(x.shape)


def simplex_rows(x: Tensor, value: Any = 1.0) -> Tensor:
    """:func:`projection_simplex` of every row of ``x`` (the last dimension), vectorised:
    ``max(x − τ, 0)`` with ``τ = simplex_threshold(x, value)``."""
    return torch.relu(x - simplex_threshold(x, value).unsqueeze(-1))


def simplex_threshold(x: Tensor, value: Any) -> Tensor:
    """The threshold ``τ`` (shape ``x.shape[:-1]``) with ``Σ_j max(x_j − τ, 0) = value`` for
    every row of ``x`` (``value ≥ 0``, a number or a tensor broadcastable to
    ``x.shape[:-1]``).

    ``τ = (Σ_{i ≤ ρ} u_i − value) / ρ`` with ``u`` the row sorted in decreasing order and
    ``ρ = max{j : u_j > (Σ_{i ≤ j} u_i − value) / j}``; for ``value = 0`` it is the row's
    maximum (``ρ = 1``).
    """
    u = torch.sort(x, dim=-1, descending=True).values
    css = torch.cumsum(u, -1) - torch.as_tensor(value, dtype=x.dtype, device=x.device)[..., None]
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    # ρ ≥ 1 for value > 0 (the largest entry satisfies the condition); the clamp covers 0.
    rho = (u * k > css).sum(-1, keepdim=True).clamp(min=1)
    return (torch.gather(css, -1, rho - 1) / rho).squeeze(-1)


def projection_l1_ball(x: Tensor, max_norm: Any = 1.0) -> Tensor:
    """Projection onto the ℓ1 ball ``{p : ‖p‖₁ ≤ max_norm}``.

    ``x`` itself when ``‖x‖₁ ≤ max_norm``, otherwise ``sign(x) · proj_simplex(|x|, max_norm)``
    (Duchi et al., 2008).

    Args:
        x: a tensor of any shape, projected as one vector.
        max_norm: the radius, a positive number or 0-d tensor.
    """
    inside = x.abs().sum() <= max_norm
    return torch.where(inside, x, torch.sign(x) * projection_simplex(x.abs(), max_norm))


def projection_l2_ball(x: Any, max_norm: Any = 1.0) -> Any:
    """Projection onto the ℓ2 ball ``{p : ‖p‖₂ ≤ max_norm}``: ``x · min(1, max_norm / ‖x‖₂)``.

    ``x`` may be a pytree (the norm is over all its leaves).
    """
    sq = tree_l2_norm(x, squared=True)
    inside = sq <= max_norm * max_norm
    # The norm is replaced by 1 in the branch not taken, so a zero x gives neither a division
    # by zero nor a NaN gradient.
    norm = torch.sqrt(torch.where(inside, torch.ones_like(sq), sq))
    factor = torch.where(inside, torch.ones_like(norm), max_norm / norm)
    return tree_map(lambda v: factor * v, x)


def projection_linf_ball(x: Any, max_value: Any = 1.0) -> Any:
    """Projection onto the ℓ∞ ball ``{p : ‖p‖∞ ≤ max_value}``: ``clip(x, −max_value,
    max_value)``. ``x`` may be a pytree."""
    return tree_map(lambda v: _clip(v, -max_value, max_value), x)


def projection_l2_sphere(x: Any, value: Any = 1.0) -> Any:
    """Projection onto the ℓ2 sphere ``{p : ‖p‖₂ = value}``: ``value · x / ‖x‖₂``.

    ``x`` may be a pytree (the norm is over all its leaves). At ``x = 0``, where every point of
    the sphere is nearest, ``0`` is returned (with zero derivative) rather than NaN.
    """
    sq = tree_l2_norm(x, squared=True)
    zero = sq == 0
    norm = torch.sqrt(torch.where(zero, torch.ones_like(sq), sq))
    return tree_map(lambda v: (value / norm) * v, x)


def projection_hyperplane(x: Tensor, hyperparams: tuple) -> Tensor:
    """Projection onto the hyperplane ``{p : ⟨a, p⟩ = b}``: ``x − (⟨a, x⟩ − b) / ‖a‖² · a``.

    Args:
        x: a tensor of any shape.
        hyperparams: ``(a, b)``, ``a`` a nonzero tensor shaped like ``x`` and ``b`` a number or
            0-d tensor.
    """
    a, b = hyperparams
    return x - ((a * x).sum() - b) / (a * a).sum() * a


def projection_halfspace(x: Tensor, hyperparams: tuple) -> Tensor:
    """Projection onto the halfspace ``{p : ⟨a, p⟩ ≤ b}``:
    ``x − max(⟨a, x⟩ − b, 0) / ‖a‖² · a``.

    Args:
        x: a tensor of any shape.
        hyperparams: ``(a, b)`` as in :func:`projection_hyperplane`.
    """
    a, b = hyperparams
    return x - torch.relu((a * x).sum() - b) / (a * a).sum() * a


def projection_affine_set(x: Tensor, hyperparams: tuple) -> Tensor:
    """Projection onto the affine set ``{p : A p = b}``: ``x − Aᵀ (A Aᵀ)⁻¹ (A x − b)``.

    Args:
        x: shape ``(n,)``.
        hyperparams: ``(A, b)`` with ``A`` of shape ``(m, n)`` and full row rank ``m ≤ n``,
            ``b`` of shape ``(m,)``.
    """
    A, b = hyperparams
    return x - A.mT @ torch.linalg.solve(A @ A.mT, A @ x - b)
