"""Projections onto polytopes with closed forms or direct solvers: the sparse simplex, the KL
projection onto the simplex, the box section and the polyhedron (JAXopt's names, re-exported by
:mod:`implicit_torch.projection`).

The sparse simplex and the box section have closed forms once a support or a scalar dual
variable is known: they are differentiated by autograd through that form. The polyhedron is a
QP (:class:`~implicit_torch.QP`), differentiated through its KKT conditions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from implicit_torch import _runtime
from implicit_torch._result import Status
from implicit_torch.projection._sets import _unpack, simplex_rows
from implicit_torch.solvers.qp import QP, EqualityConstrainedQP, report_qp

Tensor = torch.Tensor


def projection_sparse_simplex(x: Tensor, max_nz: int, value: Any = 1.0) -> Tensor:
    """Projection onto the sparse simplex ``{p : p ≥ 0, Σ p = value, ‖p‖₀ ≤ max_nz}``.

    The set is not convex, but its Euclidean projection has a closed form (Kyrillidis et al.,
    "Sparse projections onto the simplex", ICML 2013): keep the ``max_nz`` largest entries of
    ``x`` (set ``T``), project them onto the simplex and set the rest to zero,
    ``p_T = proj_simplex(x_T, value)``, ``p_{∖T} = 0``. Where the top-``max_nz`` set is unique
    the Jacobian is that of the simplex projection on ``T`` and zero elsewhere:
    ``diag(s) − s sᵀ / |S|`` with ``s`` the indicator of the support ``S = {p > 0} ⊆ T``, and
    ``∂p/∂value = s / |S|``; autograd computes it through ``topk`` and the sort.

    Args:
        x: a tensor of any shape, projected as one vector (``torch.func.vmap`` for a batch).
        max_nz: the largest number of nonzeros, an int ``≥ 1`` (``≥ x.numel()``: the plain
            simplex projection).
        value: the sum, a positive number or 0-d tensor.

    Returns:
        ``p``, shaped like ``x``.
    """
    if isinstance(max_nz, bool) or not isinstance(max_nz, int) or max_nz < 1:
        raise ValueError(f"projection_sparse_simplex: max_nz must be an int >= 1, got {max_nz!r}")
    if x.numel() == 0:
        raise ValueError("projection_sparse_simplex: x is empty")
    flat = x.reshape(-1)
    k = min(max_nz, flat.numel())
    top, idx = torch.topk(flat, k)
    p_top = simplex_rows(top, value)
    return torch.zeros_like(flat).scatter(0, idx, p_top).reshape(x.shape)


def kl_projection_simplex(x: Tensor, value: Any = 1.0) -> Tensor:
    """KL projection of ``exp(x)`` onto the simplex ``{p : p ≥ 0, Σ p = value}``.

    ``argmin_p KL(p, exp(x)) = value · softmax(x)`` with ``KL(p, q) = Σ p log(p/q) − p + q``
    (the stationarity condition ``log p − x + τ = 0`` gives ``p ∝ exp(x)``).

    Args:
        x: a tensor of any shape, one vector.
        value: the sum, a positive number or 0-d tensor.
    """
    return value * torch.softmax(x.reshape(-1), 0).reshape(x.shape)


# ------------------------------------------------------------------------------------------
# Box section
# ------------------------------------------------------------------------------------------


def _box_section_tau(x, alpha, beta, w, c):
    """The root ``τ`` (shape ``x.shape[:-1]``) of the dual equation
    ``φ(τ) = Σᵢ wᵢ clip(xᵢ − τ wᵢ, αᵢ, βᵢ) = c``, exactly, by sorting its breakpoints; also
    ``φ(+∞) = Σ min(wα, wβ)`` and ``φ(−∞) = Σ max(wα, wβ)`` (possibly infinite).

    ``φ`` is continuous, non-increasing and piecewise linear: element ``i`` is free (slope
    ``−wᵢ²``) for ``τ`` between ``(xᵢ − βᵢ)/wᵢ`` and ``(xᵢ − αᵢ)/wᵢ``, contributes
    ``max(wᵢαᵢ, wᵢβᵢ)`` before that interval and ``min(wᵢαᵢ, wᵢβᵢ)`` after it. With the
    breakpoints sorted, ``φ = A − τ B`` on each segment, ``A`` and ``B`` the initial values plus
    cumulative sums of the jumps; the root is ``(A − c) / B`` on the segment where ``φ``
    crosses ``c``. Breakpoints at ``±∞`` (infinite bounds) and those of elements with ``w = 0``
    carry no jump: they are folded into the initial values and kept only as evaluation points.
    """
    zero_w = w == 0
    safe_w = torch.where(zero_w, torch.ones_like(w), w)
    t1, t2 = (x - beta) / safe_w, (x - alpha) / safe_w
    lo = torch.where(zero_w, torch.zeros_like(w), torch.minimum(t1, t2))
    hi = torch.where(zero_w, torch.zeros_like(w), torch.maximum(t1, t2))
    wa = torch.where(zero_w, torch.zeros_like(w), w * alpha)
    wb = torch.where(zero_w, torch.zeros_like(w), w * beta)
    top, bottom = torch.maximum(wa, wb), torch.minimum(wa, wb)
    free_at_start = torch.isinf(lo)  # free from τ = −∞ (an infinite top bound)
    lo_real, hi_real = ~free_at_start & ~zero_w, torch.isfinite(hi) & ~zero_w
    wx, w2 = w * x, w * w
    fin = torch.zeros_like(w)
    start_a = torch.where(free_at_start, wx, torch.where(zero_w, fin, top)).sum(-1, keepdim=True)
    start_b = torch.where(free_at_start, w2, fin).sum(-1, keepdim=True)
    times = torch.cat([torch.where(lo_real, lo, fin), torch.where(hi_real, hi, fin)], -1)
    jump_a = torch.cat(
        [torch.where(lo_real, wx - top, fin), torch.where(hi_real, bottom - wx, fin)], -1
    )
    jump_b = torch.cat([torch.where(lo_real, w2, fin), torch.where(hi_real, -w2, fin)], -1)
    times, order = torch.sort(times, -1)
    coef_a = start_a + torch.cumsum(torch.gather(jump_a, -1, order), -1)
    coef_b = start_b + torch.cumsum(torch.gather(jump_b, -1, order), -1)
    phi = coef_a - times * coef_b
    c = c.unsqueeze(-1)
    m = times.shape[-1]
    k = (phi > c).sum(-1, keepdim=True)  # the root lies in [t_{k−1}, t_k]
    # Coefficients of that segment (before the first breakpoint: the initial values).
    seg_a = torch.where(k == 0, start_a, torch.gather(coef_a, -1, (k - 1).clamp(min=0)))
    seg_b = torch.where(k == 0, start_b, torch.gather(coef_b, -1, (k - 1).clamp(min=0)))
    # A flat segment (B = 0) meets c only at its end: take the nearest breakpoint.
    nearest = torch.gather(times, -1, k.clamp(max=m - 1))
    tau = torch.where(seg_b > 0, (seg_a - c) / torch.where(seg_b > 0, seg_b, 1.0), nearest)
    # Keep τ inside the bracketing breakpoints (rounding).
    low_t = torch.where(k == 0, -math.inf, torch.gather(times, -1, (k - 1).clamp(min=0)))
    high_t = torch.where(k == m, math.inf, torch.gather(times, -1, k.clamp(max=m - 1)))
    tau = torch.minimum(torch.maximum(tau, low_t), high_t)
    return tau.squeeze(-1), bottom.sum(-1), top.sum(-1)


def _finite(t: Tensor) -> Tensor:
    return torch.where(torch.isinf(t), torch.zeros_like(t), t)


def projection_box_section(x: Tensor, hyperparams: tuple, check_feasible: bool = False) -> Tensor:
    """Projection onto the box section ``{p : α ≤ p ≤ β, ⟨w, p⟩ = c}``.

    ``p = clip(x − τ w, α, β)`` where the dual variable ``τ`` solves the scalar equation
    ``φ(τ) = ⟨w, clip(x − τ w, α, β)⟩ = c`` (``φ`` is non-increasing and piecewise linear; its
    root is found exactly by sorting the ``2n`` breakpoints, no iteration). Differentiation
    uses the implicit function theorem on that equation, in closed form: with the free set
    ``S = {α ≤ x − τw ≤ β}`` and the sets ``L``, ``U`` at the lower and upper bound,
    ``τ = (Σ_S wᵢxᵢ + Σ_L wᵢαᵢ + Σ_U wᵢβᵢ − c) / Σ_S wᵢ²`` and ``p = x − τw`` on ``S``,
    ``α`` on ``L``, ``β`` on ``U``; autograd differentiates this in every argument.

    Args:
        x: shape ``(n,)``, or ``(..., n)`` for independent problems along the leading dims.
        hyperparams: ``(alpha, beta, w, c)``: ``alpha ≤ beta`` and ``w`` numbers or tensors
            broadcastable to ``x`` (bounds may be infinite; ``w`` of any sign, ``wᵢ = 0``
            leaves ``pᵢ = clip(xᵢ)``),
            ``c`` a number or a tensor broadcastable to ``x.shape[:-1]``.
        check_feasible: raise ``ValueError`` when the set is empty (``c`` outside
            ``[Σ min(wα, wβ), Σ max(wα, wβ)]``) or ``alpha > beta`` somewhere. This reads
            values (a host synchronisation) and is skipped under vmap and compile. Without it,
            an empty set gives the point of the box whose ``⟨w, p⟩`` is nearest to ``c``.

    Returns:
        ``p``, shaped like ``x``.
    """
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1):
        raise ValueError("projection_box_section: x must be a floating tensor of shape (..., n)")
    alpha, beta, w, c = _unpack("projection_box_section", hyperparams, ("alpha", "beta", "w", "c"))
    like = dict(dtype=x.dtype, device=x.device)
    try:
        alpha, beta, w = (torch.as_tensor(v, **like).expand(x.shape) for v in (alpha, beta, w))
        c = torch.as_tensor(c, **like).expand(x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            "projection_box_section: alpha, beta and w must broadcast to x's shape "
            f"{tuple(x.shape)} and c to {tuple(x.shape[:-1])}"
        ) from None
    with torch.no_grad():
        tau0, low_sum, high_sum = _box_section_tau(
            x.detach(), alpha.detach(), beta.detach(), w.detach(), c.detach()
        )
        z = x.detach() - tau0.unsqueeze(-1) * w.detach()
        at_lower, at_upper = z < alpha.detach(), z > beta.detach()
        free = ~(at_lower | at_upper)
        scale = torch.maximum(_finite(alpha.detach()).abs(), _finite(beta.detach()).abs())
        slack = 16 * torch.finfo(x.dtype).eps * (w.detach().abs() * scale).sum(-1)
        feasible = (c.detach() >= low_sum - slack) & (c.detach() <= high_sum + slack)
    if check_feasible and _runtime.can_inspect_values(x):
        if bool((alpha > beta).any()):
            raise ValueError("projection_box_section: alpha > beta somewhere: the box is empty")
        if not bool(feasible.all()):
            raise ValueError(
                "projection_box_section: the box section is empty: c must lie in "
                "[Σ min(w·alpha, w·beta), Σ max(w·alpha, w·beta)]"
            )
    zero = torch.zeros_like(x)
    # _finite: an infinite bound is never active, but 0 · ∞ in the products' derivatives
    # would be NaN.
    num = (
        torch.where(free, w * x, zero)
        + torch.where(at_lower, w * _finite(alpha), zero)
        + torch.where(at_upper, w * _finite(beta), zero)
    ).sum(-1) - c
    den = torch.where(free, w * w, zero).sum(-1)
    tau = num / torch.where(den > 0, den, torch.ones_like(den))
    p = torch.where(at_lower, alpha, torch.where(at_upper, beta, x - tau.unsqueeze(-1) * w))
    # An empty set: the free elements may overshoot their bounds; clip them back.
    clipped = torch.where(p < alpha, alpha, torch.where(p > beta, beta, p))
    return torch.where(feasible.unsqueeze(-1), p, clipped)


# ------------------------------------------------------------------------------------------
# Polyhedron
# ------------------------------------------------------------------------------------------


def projection_polyhedron(x: Tensor, hyperparams: tuple, check_feasible: bool = False) -> Tensor:
    """Euclidean projection onto the polyhedron ``{y : A y = b, G y ≤ h}``, via
    :class:`~implicit_torch.QP`.

    ``argmin_y ½‖y − x‖²`` subject to ``A y = b``, ``G y ≤ h`` (the QP with ``Q = I``,
    ``c = −x``), differentiable in ``x``, ``A``, ``b``, ``G``, ``h`` through its KKT
    conditions.

    Args:
        x: ``(n,)``, or ``(B, n)`` for a batch of points.
        hyperparams: ``(A, b, G, h)``, shared (``A (p, n)``, ...) or per point (``A (B, p,
            n)``, ...); ``(A, b)`` may be ``(None, None)``, and ``(G, h)`` likewise.
        check_feasible: raise :class:`~implicit_torch.ConvergenceError` if the projection
            fails (an empty polyhedron) instead of warning.

    Returns:
        The projection, shaped like ``x`` (NaN or an inaccurate point where it failed).

    An empty polyhedron (no ``y`` with ``A y = b``, ``G y ≤ h``: a Farkas certificate, or
    inconsistent equalities) is reported as such, "the polyhedron is empty", as is any other
    failure of the QP (e.g. linearly dependent equality constraints), by
    :func:`~implicit_torch.solvers.qp.report_qp`.
    """
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != 4:
        raise ValueError("projection_polyhedron: hyperparams must be a tuple (A, b, G, h)")
    A, b, G, h = hyperparams
    if not isinstance(x, Tensor) or x.dim() not in (1, 2):
        raise ValueError(f"projection_polyhedron: x must be a tensor (n,) or (B, n), got {x!r}")
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    params_eq = None if A is None else (A, b)
    # The QP stays silent: its failures are reported here, in the projection's words.
    if G is None:
        solver = EqualityConstrainedQP(on_failure="ignore")
        out = solver.run(None, (eye, -x), params_eq)
    else:
        out = QP(on_failure="ignore").run(None, (eye, -x), params_eq, (G, h))
    if _runtime.can_inspect_values(x):
        on_failure = "raise" if check_feasible else "warn"
        report_qp("projection_polyhedron", out.state, on_failure, failures=_EMPTY)
    return out.params.primal


_EMPTY = {
    Status.INFEASIBLE: (
        "did not converge",
        "the polyhedron is empty: no point y satisfies A y = b, G y ≤ h",
        "check the constraints (A, b, G, h).",
    )
}
