"""Projections onto polytopes: sparse simplex, box section, Birkhoff and transportation
polytopes (Euclidean and KL), re-exported by :mod:`implicit_torch.projection`.

JAXopt's names and meanings. The sparse simplex and the box section have closed forms once a
support or a scalar dual variable is known: they are differentiated by autograd through that
form. The Birkhoff and transport projections are solved iteratively (L-BFGS on the semi-dual,
polished by dual block-coordinate ascent, for the Euclidean ones; Sinkhorn for the KL ones)
under ``torch.no_grad`` and
differentiated by the implicit function theorem on their dual optimality conditions
(:func:`implicit_torch.implicit_solve`), never by unrolling the iterations.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from implicit_torch import _runtime
from implicit_torch._errors import ConvergenceError, ConvergenceWarning
from implicit_torch._implicit_diff import custom_fixed_point, implicit_solve

__all__ = [
    "kl_projection_birkhoff",
    "kl_projection_simplex",
    "kl_projection_transport",
    "projection_birkhoff",
    "projection_box_section",
    "projection_sparse_simplex",
    "projection_transport",
]

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------
# Sparse simplex
# ------------------------------------------------------------------------------------------


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
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    p_top = torch.relu(top + _shift_to_sum(top, value))
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
    alpha, beta, w, c = hyperparams
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
# Transportation polytope (Euclidean)
# ------------------------------------------------------------------------------------------


def _shift_to_sum(z: Tensor, s: Tensor) -> Tensor:
    """``t`` (shape ``z.shape[:-1]``) with ``Σ_j max(z_j + t, 0) = s`` for every row (``s ≥
    0``): minus the threshold of the simplex projection of the row onto ``{Σ = s}``."""
    u = torch.sort(z, dim=-1, descending=True).values
    css = torch.cumsum(u, -1) - s.unsqueeze(-1)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    # rho ≥ 1 always when s > 0; for s = 0 the threshold is the row's maximum (rho = 1).
    rho = (u * k > css).sum(-1, keepdim=True).clamp(min=1)
    return -(torch.gather(css, -1, rho - 1) / rho).squeeze(-1)


def _check_transport_inputs(name: str, sim: Tensor, marginals: Any, strict: bool):
    if not (isinstance(sim, Tensor) and sim.is_floating_point() and sim.dim() == 2):
        got = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"{name}: sim_matrix must be a 2-d floating tensor, got {got}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"{name}: sim_matrix is empty ({tuple(sim.shape)})")
    if not (isinstance(marginals, (tuple, list)) and len(marginals) == 2):
        raise ValueError(f"{name}: marginals must be a pair (a, b)")
    a, b = (torch.as_tensor(v, dtype=sim.dtype, device=sim.device) for v in marginals)
    m, n = sim.shape
    if a.shape != (m,) or b.shape != (n,):
        raise ValueError(
            f"{name}: for sim_matrix of shape {(m, n)} the marginals must have shapes "
            f"({m},) and ({n},), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if _runtime.can_inspect_values(sim, a, b):
        bad = (a <= 0).any() | (b <= 0).any() if strict else (a < 0).any() | (b < 0).any()
        if bool(bad):
            what = "positive" if strict else "non-negative"
            raise ValueError(f"{name}: the marginals must be {what}")
        sa, sb = float(a.detach().sum()), float(b.detach().sum())
        if abs(sa - sb) > math.sqrt(torch.finfo(sim.dtype).eps) * max(sa, sb, 1e-300):
            raise ValueError(
                f"{name}: the marginals must have equal sums (the polytope is empty "
                f"otherwise), got sum(a) = {sa:.6g} and sum(b) = {sb:.6g}"
            )
        if not bool(torch.isfinite(sim).all()):
            raise ValueError(f"{name}: sim_matrix has non-finite entries")
    return a, b


def _report(name: str, err: Tensor, iters: int, tol: float, on_failure: str) -> None:
    msg = (
        f"{name} did not converge in {iters} iterations: the largest marginal violation is "
        f"{float(err):.3g}, above tol · max(a) = {tol:.3g} · max(a); the result (and its "
        "derivative) is inaccurate. Raise max_iter or tol."
    )
    if on_failure == "raise":
        raise ConvergenceError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=3)


def _check_options(name: str, max_iter: int, tol: float, on_failure: str) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name}: max_iter must be an int >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"{name}: tol must be non-negative, got {tol!r}")
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"{name}: on_failure must be 'warn', 'raise' or 'ignore'")


def _transport_plan(sim: Tensor, f: Tensor, g: Tensor) -> Tensor:
    return torch.relu(sim + f.unsqueeze(-1) + g.unsqueeze(-2))


def _balanced(a, b):
    """``b · Σa / Σb``: equal to ``b`` for valid marginals, and the column marginals used when a
    derivative moves ``a`` and ``b`` off ``Σa = Σb`` (Sinkhorn's fixed point, with ``P1 = a``
    exact, has the same columns)."""
    sa, sb = a.sum(-1, keepdim=True), b.sum(-1, keepdim=True)
    return b * torch.where(sb > 0, sa / torch.where(sb > 0, sb, torch.ones_like(sb)), 1.0)


def _transport_dual_optimality(dual, sim, a, b):
    """Minus the gradient of the dual ``D(f, g) = ⟨f, a⟩ + ⟨g, b⟩ − ½‖max(S + f ⊕ g, 0)‖²``:
    the marginal violations ``(P1 − a, Pᵀ1 − b)`` of ``P = max(S + f ⊕ g, 0)``, with ``b``
    read as ``b · Σa/Σb`` (no change at a solution). That reading keeps the linear systems
    consistent for every tangent of ``(a, b)``: without it a tangent with ``Σȧ ≠ Σḃ`` has no
    component along the Jacobian's null direction ``(1, −1)`` to cancel."""
    f, g = dual
    plan = _transport_plan(sim, f, g)
    return plan.sum(-1) - a, plan.sum(-2) - _balanced(a, b)


def _neg_semi_dual(g, sim, a, b):
    """Minus the semi-dual ``max_f D(f, g)``: ``f`` is the exact row maximiser (each row a
    simplex threshold), so its gradient in ``g`` is ``Pᵀ1 − b`` (Danskin) and it is convex."""
    f = _shift_to_sum(sim + g.unsqueeze(-2), a)
    plan = _transport_plan(sim, f, g)
    return -((f * a).sum() + (g * b).sum() - 0.5 * (plan * plan).sum())


def _transport_dual_ascent(name, max_iter, tol, on_failure):
    def solve(_init, sim, a, b):
        # 1. L-BFGS on the semi-dual in g (as JAXopt), to tol on ‖Pᵀ1 − b‖₂ (≥ the max norm).
        # 2. Polish by exact block-coordinate ascent on the dual: for fixed g each f_i makes
        #    row i sum to a_i (a simplex threshold), and symmetrically for g. After a g step
        #    the columns are exact, so the row violation measures convergence. These sweeps
        #    reach the last digits where the line search of L-BFGS stalls on rounding.
        from implicit_torch.solvers.lbfgs import LBFGS  # the solvers import projections

        threshold = tol * a.abs().max()
        lbfgs = LBFGS(
            _neg_semi_dual,
            maxiter=max_iter,
            tol=threshold,
            implicit_diff=False,
            on_failure="ignore",
        )
        g = lbfgs.run(torch.zeros_like(b), sim, a, b).params
        inspect = _runtime.can_inspect_values(sim, a, b)
        interval = _runtime.check_interval(sim.device)
        f = _shift_to_sum(sim + g.unsqueeze(-2), a)
        err = (_transport_plan(sim, f, g).sum(-2) - b).abs().max()
        it = 0
        if not (inspect and bool(err <= threshold)):
            for it in range(1, max_iter + 1):
                g = _shift_to_sum((sim + f.unsqueeze(-1)).mT, b)
                f = _shift_to_sum(sim + g.unsqueeze(-2), a)
                if inspect and (it % interval == 0 or it == max_iter):
                    err = (_transport_plan(sim, f, g).sum(-2) - b).abs().max()
                    if bool(err <= threshold):
                        break
        if inspect and on_failure != "ignore" and not bool(err <= threshold):
            _report(name, err, it, tol, on_failure)
        return f, g

    return solve


def projection_transport(
    sim_matrix: Tensor,
    marginals: tuple,
    max_iter: int = 1000,
    tol: float = 1e-5,
    on_failure: str = "warn",
) -> Tensor:
    """Projection onto the transportation polytope ``{P ≥ 0 : P1 = a, Pᵀ1 = b}``.

    ``P = argmin ½‖P − S‖²`` over the polytope, ``S = sim_matrix`` (equivalently optimal
    transport with cost ``−S`` and quadratic regularisation; Blondel, Seguy & Rolet, "Smooth
    and Sparse Optimal Transport", AISTATS 2018). By duality ``P = max(S + f ⊕ g, 0)``
    (``(f ⊕ g)_ij = fᵢ + gⱼ``) where ``(f, g)`` maximises the concave dual
    ``⟨f, a⟩ + ⟨g, b⟩ − ½‖max(S + f ⊕ g, 0)‖²``, i.e. solves ``P1 = a``, ``Pᵀ1 = b``.

    Forward, under ``torch.no_grad``: :class:`~implicit_torch.LBFGS` on the semi-dual
    ``max_f D(f, g)`` in ``g`` (the maximising ``f`` is a row-wise simplex threshold; Blondel
    et al., 2018, eq. 10, as in JAXopt), then, if needed, exact block-coordinate ascent on the
    dual (alternating row and column thresholds) to polish, until the largest marginal
    violation is ``≤ tol · max(a)`` (checked on the host; under vmap and compile all iterations
    run and nothing is reported). Backward and forward mode: the implicit
    function theorem on ``F(f, g) = (P1 − a, Pᵀ1 − b) = 0``, whose Jacobian in ``(f, g)`` is
    the symmetric positive semi-definite Laplacian of the support of ``P`` (solved by CG). It
    is singular along ``(1_C, −1_C)`` for each connected component ``C`` of the support, but
    ``P`` does not move along those directions and the right-hand sides lie in the range, so
    the derivative of ``P`` is well defined.

    Derivatives in the marginals: along directions that break ``Σa = Σb`` (the polytope is
    then empty) the derivative is that of the projection with ``P1 = a`` and column marginals
    ``b · Σa/Σb``, as for :func:`kl_projection_transport`; gradients in ``a`` and ``b`` are
    those of this extension (along valid directions, any extension gives the same values).

    Args:
        sim_matrix: ``S``, shape ``(m, n)`` (``torch.func.vmap`` for a batch).
        marginals: ``(a, b)``, shapes ``(m,)`` and ``(n,)``, non-negative, ``Σa = Σb``.
        max_iter: the most L-BFGS iterations, and then the most polishing sweeps.
        tol: the tolerance on the marginals, relative to ``max(a)``.
        on_failure: ``"warn"`` (:class:`ConvergenceWarning`), ``"raise"``
            (:class:`ConvergenceError`) or ``"ignore"`` when ``tol`` is not met (the result
            is returned either way).

    Returns:
        ``P``, shape ``(m, n)``.

    Raises:
        ValueError: bad shapes, negative marginals or unequal sums.
    """
    name = "projection_transport"
    _check_options(name, max_iter, tol, on_failure)
    a, b = _check_transport_inputs(name, sim_matrix, marginals, strict=False)
    return _projection_transport(name, sim_matrix, a, b, max_iter, tol, on_failure)


def _projection_transport(name, sim, a, b, max_iter, tol, on_failure):
    solver = _transport_dual_ascent(name, max_iter, tol, on_failure)
    f, g = implicit_solve(solver, _transport_dual_optimality, None, sim, a, b, solve="cg")
    return _transport_plan(sim, f, g)


def projection_birkhoff(
    sim_matrix: Tensor, max_iter: int = 1000, tol: float = 1e-5, on_failure: str = "warn"
) -> Tensor:
    """Projection onto the Birkhoff polytope of doubly stochastic matrices
    ``{P ≥ 0 : P1 = 1, Pᵀ1 = 1}``: :func:`projection_transport` with ``a = b = 1``.

    Args:
        sim_matrix: shape ``(n, n)``.
        max_iter, tol, on_failure: as for :func:`projection_transport`.

    Returns:
        ``P``, shape ``(n, n)``.
    """
    name = "projection_birkhoff"
    _check_square(name, sim_matrix)
    _check_options(name, max_iter, tol, on_failure)
    ones = torch.ones(sim_matrix.shape[0], dtype=sim_matrix.dtype, device=sim_matrix.device)
    return _projection_transport(name, sim_matrix, ones, ones, max_iter, tol, on_failure)


def _check_square(name, sim):
    if not (isinstance(sim, Tensor) and sim.is_floating_point() and sim.dim() == 2):
        got = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"{name}: sim_matrix must be a 2-d floating tensor, got {got}")
    if sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"{name}: sim_matrix must be square and non-empty, got {tuple(sim.shape)}")


# ------------------------------------------------------------------------------------------
# Transportation polytope (KL): Sinkhorn
# ------------------------------------------------------------------------------------------


def _kl_row_potential(g, sim, a):
    """``f = log a − logsumexp_j(S + g)``: the row scaling that makes ``P1 = a``."""
    return torch.log(a) - torch.logsumexp(sim + g.unsqueeze(-2), -1)


def _sinkhorn_map(g, sim, a, b):
    """One Sinkhorn sweep in the log domain, ``g ↦ log b − logsumexp_i(S + f(g))``, minus its
    mean. The mean removal fixes the gauge (``g + t`` and ``g`` give the same ``P``): the
    fixed points are the Sinkhorn potentials with ``mean(g) = 0``, and ``I − ∂T`` is
    nonsingular there."""
    f = _kl_row_potential(g, sim, a)
    t = torch.log(b) - torch.logsumexp(sim + f.unsqueeze(-1), -2)
    return t - t.mean(-1, keepdim=True)


def _sinkhorn(name, max_iter, tol, on_failure):
    def solve(_init, sim, a, b):
        log_a, log_b = torch.log(a), torch.log(b)
        g = torch.zeros_like(b)
        inspect = _runtime.can_inspect_values(sim, a, b)
        interval = _runtime.check_interval(sim.device)
        threshold = tol * a.abs().max()
        err = None
        it = 0
        for it in range(1, max_iter + 1):
            f = log_a - torch.logsumexp(sim + g.unsqueeze(-2), -1)
            g = log_b - torch.logsumexp(sim + f.unsqueeze(-1), -2)
            if inspect and (it % interval == 0 or it == max_iter):
                err = (torch.exp(sim + f.unsqueeze(-1) + g.unsqueeze(-2)).sum(-1) - a).abs()
                err = err.max()
                if bool(err <= threshold):
                    break
        if inspect and on_failure != "ignore" and not bool(err <= threshold):
            _report(name, err, it, tol, on_failure)
        return g - g.mean(-1, keepdim=True)

    return solve


def kl_projection_transport(
    sim_matrix: Tensor,
    marginals: tuple,
    max_iter: int = 1000,
    tol: float = 1e-5,
    on_failure: str = "warn",
) -> Tensor:
    """KL projection of ``K = exp(S)`` onto the transportation polytope
    ``{P ≥ 0 : P1 = a, Pᵀ1 = b}``.

    ``P = argmin KL(P, exp(S))`` with ``KL(P, K) = Σ P log(P/K) − P + K`` (entropic optimal
    transport with cost ``−S`` and unit regularisation). The solution is
    ``P = diag(u) K diag(v) = exp(S + f ⊕ g)``, found by Sinkhorn's iterations in the log
    domain (Cuturi, "Sinkhorn Distances", NeurIPS 2013): ``f = log a − logsumexp_j(S + g)``,
    ``g = log b − logsumexp_i(S + f)``, under ``torch.no_grad`` until
    ``max_i |(P1)_i − a_i| ≤ tol · max(a)`` (``max_iter`` sweeps at most; checked on the host,
    not under vmap and compile). Sinkhorn converges slowly when ``S`` has a large spread
    (``exp(S)`` close to a permutation): raise ``max_iter`` there. The derivative comes from
    the implicit function theorem on the Sinkhorn fixed point in ``g`` (gauge fixed by
    ``mean(g) = 0``; GMRES), not from unrolling; ``f`` and ``P`` are then recomputed from
    ``g`` by autograd.

    Derivatives in the marginals: along directions that break ``Σa = Σb`` the Sinkhorn fixed
    point (gauge-fixed as above) keeps ``P1 = a`` exact and gives the columns ``b · Σa/Σb``;
    derivatives are those of this extension.

    Args:
        sim_matrix: ``S``, shape ``(m, n)``.
        marginals: ``(a, b)``, shapes ``(m,)`` and ``(n,)``, positive, ``Σa = Σb``.
        max_iter, tol, on_failure: as for :func:`projection_transport`
            (``max_iter`` counts Sinkhorn sweeps).

    Returns:
        ``P``, shape ``(m, n)``, positive.

    Raises:
        ValueError: bad shapes, non-positive marginals or unequal sums.
    """
    name = "kl_projection_transport"
    _check_options(name, max_iter, tol, on_failure)
    a, b = _check_transport_inputs(name, sim_matrix, marginals, strict=True)
    return _kl_projection_transport(name, sim_matrix, a, b, max_iter, tol, on_failure)


def _kl_projection_transport(name, sim, a, b, max_iter, tol, on_failure):
    solver = custom_fixed_point(_sinkhorn_map, solve="gmres")(
        _sinkhorn(name, max_iter, tol, on_failure)
    )
    g = solver(None, sim, a, b)
    f = _kl_row_potential(g, sim, a)
    return torch.exp(sim + f.unsqueeze(-1) + g.unsqueeze(-2))


def kl_projection_birkhoff(
    sim_matrix: Tensor, max_iter: int = 1000, tol: float = 1e-5, on_failure: str = "warn"
) -> Tensor:
    """KL projection of ``exp(S)`` onto the Birkhoff polytope (Sinkhorn normalisation):
    :func:`kl_projection_transport` with ``a = b = 1``.

    Args:
        sim_matrix: shape ``(n, n)``.
        max_iter, tol, on_failure: as for :func:`kl_projection_transport`.

    Returns:
        ``P``, shape ``(n, n)``, doubly stochastic and positive.
    """
    name = "kl_projection_birkhoff"
    _check_square(name, sim_matrix)
    _check_options(name, max_iter, tol, on_failure)
    ones = torch.ones(sim_matrix.shape[0], dtype=sim_matrix.dtype, device=sim_matrix.device)
    return _kl_projection_transport(name, sim_matrix, ones, ones, max_iter, tol, on_failure)
