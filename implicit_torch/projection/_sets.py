"""Closed-form Euclidean projections onto simple sets: the orthant, boxes, the simplex, the
ℓ1 / ℓ2 / ℓ∞ balls, the sphere, hyperplanes, halfspaces and affine sets (JAXopt's names,
re-exported by :mod:`implicit_torch.projection`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from implicit_torch import _runtime
from implicit_torch._tree import tree_l2_norm, tree_map

Tensor = torch.Tensor


def _unpack(who: str, hyperparams: Any, names: tuple[str, ...]) -> tuple:
    """``hyperparams`` as the tuple ``names`` describes, or a ``TypeError`` that says so (a
    projection without defaults given ``None`` or a wrong shape of arguments)."""
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != len(names):
        got = type(hyperparams).__name__
        if isinstance(hyperparams, (tuple, list)):
            got += f" of {len(hyperparams)}"
        raise TypeError(f"{who}: hyperparams must be a tuple ({', '.join(names)}), got {got}")
    return tuple(hyperparams)


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
    lower, upper = _unpack("projection_box", hyperparams, ("lower", "upper"))
    return tree_map(lambda v: _clip(v, lower, upper), x)


def projection_hypercube(x: Any, scale: Any = 1.0) -> Any:
    """Projection onto the hypercube ``{p : 0 ≤ p ≤ scale}``: ``min(max(x, 0), scale)``."""
    return tree_map(lambda v: _clip(v, 0.0, scale), x)


def projection_simplex(x: Tensor, value: Any = 1.0) -> Tensor:
    """Projection onto the simplex ``{p : p ≥ 0, Σ p = value}`` (``value ≥ 0``).

    ``p = max(x − τ, 0)`` with ``τ = (Σ_{i ≤ ρ} u_i − value) / ρ``, where ``u`` is ``x`` sorted
    in decreasing order and ``ρ = max{j : u_j > (Σ_{i ≤ j} u_i − value) / j}`` (Held et al.,
    1974; Duchi et al., 2008). Differentiated by autograd through the sort: on the support
    ``S = {p > 0}`` (with indicator ``s``) the Jacobian is ``diag(s) − s sᵀ / |S|``, and
    ``∂p/∂value = s / |S|``.

    Computed on ``x − max(x)`` (the projection does not change when every entry moves by the
    same amount): the result is in the set to rounding at any scale of ``x``. Edge values, as
    limits: a ``−inf`` entry gets 0, ``+inf`` entries share all of ``value`` equally; a NaN
    gives NaN (as does an ``x`` of ``−inf`` only, where the limit depends on the rates).

    Args:
        x: a non-empty tensor of any shape (0-d: one entry), projected as one vector.
        value: the sum, a finite non-negative number or 0-d tensor.

    Returns:
        ``p``, shaped like ``x``.

    Raises:
        ValueError: an empty ``x``, or a negative or non-finite ``value``.
    """
    if x.numel() == 0:
        raise ValueError(
            f"projection_simplex: x is empty (shape {tuple(x.shape)}): the simplex has no point"
        )
    return simplex_rows(x.reshape(1, -1), value, who="projection_simplex").reshape(x.shape)


def simplex_rows(x: Tensor, value: Any = 1.0, *, who: str = "simplex_rows") -> Tensor:
    """:func:`projection_simplex` of every row of ``x`` (the last dimension), vectorised:
    ``max(u − τ, 0)`` with ``u = simplex_shift(x)`` and ``τ = simplex_threshold(u, value)``.

    ``x`` needs at least one dimension and a non-empty last one; ``value`` is a finite
    non-negative number or a tensor broadcastable to ``x.shape[:-1]``. ``who`` names the caller
    in the errors.
    """
    check_simplex_input(who, x, value)
    u = simplex_shift(x)
    return torch.relu(u - simplex_threshold(u, value).unsqueeze(-1))


def check_simplex_input(who: str, x: Tensor, value: Any = 1.0, arg: str = "x") -> None:
    """``ValueError`` for what no simplex projection of the rows of ``x`` can take: a 0-d or
    empty last dimension, a negative or non-finite ``value`` (a tensor ``value`` is checked
    where values can be read)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{who}: {arg} must be a floating-point tensor, got {got}")
    if x.dim() == 0:
        raise ValueError(f"{who}: {arg} is 0-d; it needs a last dimension to project along")
    if x.shape[-1] == 0:
        raise ValueError(
            f"{who}: the last dimension of {arg} is empty (shape {tuple(x.shape)}): the simplex "
            "has no point"
        )
    check_simplex_value(who, value)


def check_simplex_value(who: str, value: Any) -> None:
    """``ValueError`` unless ``value`` (a simplex's sum) is finite and non-negative."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{who}: value must be a floating-point tensor, got {value.dtype}")
        if not _runtime.can_inspect_values(value):
            return
        v = value.detach()
        ok, shown = bool((torch.isfinite(v) & (v >= 0)).all()), v
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ok, shown = math.isfinite(value) and value >= 0, value
    else:
        raise ValueError(f"{who}: value must be a number or a tensor, got {value!r}")
    if not ok:
        raise ValueError(f"{who}: value (the sum) must be finite and non-negative, got {shown}")


def simplex_shift(x: Tensor) -> Tensor:
    """``x − max(x)`` per row (last dimension), with the limits of the simplex projection at
    infinities: in a row holding ``+inf`` those entries become 0 and the others ``−inf``; a row
    holding NaN stays NaN.

    The projection and the sparsemax loss do not change when a row moves by a constant, and
    on the shifted row they have no cancellation (``x − τ`` of two large numbers loses all
    the digits of the result). The maximum is detached: by that invariance its derivative
    contributes nothing.
    """
    top = x.detach().amax(-1, keepdim=True)  # NaN if the row holds one
    u = x - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    plus_inf = x == math.inf
    limit = plus_inf.any(-1, keepdim=True) & ~torch.isnan(top)
    return torch.where(limit, torch.where(plus_inf, 0.0, -math.inf).to(x.dtype), u)


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
    a, b = _unpack("projection_hyperplane", hyperparams, ("a", "b"))
    return x - ((a * x).sum() - b) / (a * a).sum() * a


def projection_halfspace(x: Tensor, hyperparams: tuple) -> Tensor:
    """Projection onto the halfspace ``{p : ⟨a, p⟩ ≤ b}``:
    ``x − max(⟨a, x⟩ − b, 0) / ‖a‖² · a``.

    Args:
        x: a tensor of any shape.
        hyperparams: ``(a, b)`` as in :func:`projection_hyperplane`.
    """
    a, b = _unpack("projection_halfspace", hyperparams, ("a", "b"))
    return x - torch.relu((a * x).sum() - b) / (a * a).sum() * a


def projection_affine_set(x: Tensor, hyperparams: tuple) -> Tensor:
    """Projection onto the affine set ``{p : A p = b}``: ``x − Aᵀ (A Aᵀ)⁻¹ (A x − b)``.

    Args:
        x: shape ``(n,)``.
        hyperparams: ``(A, b)`` with ``A`` of shape ``(m, n)`` and full row rank ``m ≤ n``,
            ``b`` of shape ``(m,)``.
    """
    A, b = _unpack("projection_affine_set", hyperparams, ("A", "b"))
    return x - A.mT @ torch.linalg.solve(A @ A.mT, A @ x - b)
