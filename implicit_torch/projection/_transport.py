"""Projections onto the transportation and Birkhoff polytopes, Euclidean and KL (JAXopt's
names, re-exported by :mod:`implicit_torch.projection`).

Both are solved iteratively under ``torch.no_grad`` — the Euclidean ones by L-BFGS on the
semi-dual, polished by dual block-coordinate ascent; the KL ones by Sinkhorn — and
differentiated by the implicit function theorem on their dual optimality conditions
(:func:`implicit_torch.implicit_solve`), never by unrolling the iterations. The polishing and
Sinkhorn loops run on the package's driver (:func:`implicit_torch._loop.iterate`: a host check
of the marginals every sweep on the CPU, every 10 on an accelerator, none under vmap or
compile); failures are reported by :func:`implicit_torch._result.report`. Each problem is a
single system, so the sweeps between two checks are not masked: they only refine it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _result, _runtime
from implicit_torch._implicit_diff import custom_fixed_point, implicit_solve
from implicit_torch._loop import Cadence, iterate
from implicit_torch.projection._sets import simplex_threshold
from implicit_torch.solvers.lbfgs import LBFGS

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------
# Checks and reports shared by the four projections
# ------------------------------------------------------------------------------------------


def _check_sim(name: str, sim: Any) -> None:
    if not (isinstance(sim, Tensor) and sim.is_floating_point() and sim.dim() == 2):
        got = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"{name}: sim_matrix must be a 2-d floating tensor, got {got}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"{name}: sim_matrix is empty ({tuple(sim.shape)})")


def _check_options(name: str, maxiter: int, tol: float, on_failure: str) -> None:
    _result.check_on_failure(on_failure)
    _result.check_tolerances(tol)
    if maxiter is None or _result.check_maxiter(maxiter) < 1:
        raise ValueError(f"{name}: maxiter must be an int >= 1, got {maxiter!r}")


def _check_marginals(name: str, sim: Tensor, marginals: Any, strict: bool) -> tuple:
    _check_sim(name, sim)
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


def _on_transport(name, sim, marginals, options: tuple, strict: bool, project):
    """``project`` onto the transportation polytope of ``marginals``, checked (``strict``:
    positive marginals)."""
    _check_options(name, *options)
    a, b = _check_marginals(name, sim, marginals, strict)
    return project(name, sim, a, b, *options)


def _on_birkhoff(name: str, sim: Tensor, options: tuple, project: Callable[..., Tensor]):
    """``project`` onto the transportation polytope with unit marginals, for a square
    ``sim``."""
    _check_sim(name, sim)
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"{name}: sim_matrix must be square and non-empty, got {tuple(sim.shape)}")
    _check_options(name, *options)
    ones = torch.ones(sim.shape[0], dtype=sim.dtype, device=sim.device)
    return project(name, sim, ones, ones, *options)


def _solve_marginals(
    name: str,
    sweep: Callable[[Any], Any],
    state: Any,
    violation: Callable[[Any], Tensor],
    threshold: Tensor,
    options: tuple,
    cadence: Cadence,
    start: int = 0,
) -> Any:
    """Sweep until ``violation(state) ≤ threshold`` (checked at the cadence's host reads) or
    ``maxiter`` sweeps; report a failure as ``on_failure`` says."""
    maxiter, _, on_failure = options
    state, sweeps = iterate(
        sweep,
        state,
        active=lambda s: violation(s) > threshold,
        maxiter=maxiter,
        cadence=cadence,
        start=start,
    )
    if cadence.inspect:
        worst = violation(state).detach()
        converged = worst <= threshold
        info = _result.SolveInfo(
            iterations=torch.tensor(sweeps),
            residual_norm=worst,
            converged=converged,
            status=_result.status_codes(converged, worst),
            method=name,
            target=threshold.detach(),
        )
        _result.report(
            name,
            info,
            on_failure,
            measure="largest marginal violation",
            target=f"tol · max(a) = {float(threshold):.3g}",
            maxiter=maxiter,
            fix="raise maxiter or tol.",
        )
    return state


# ------------------------------------------------------------------------------------------
# Transportation polytope (Euclidean)
# ------------------------------------------------------------------------------------------


def _transport_plan(sim: Tensor, f: Tensor, g: Tensor) -> Tensor:
    return torch.relu(sim + f.unsqueeze(-1) + g.unsqueeze(-2))


def _row_potential(sim: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """The ``f`` that makes every row of ``max(S + f ⊕ g, 0)`` sum to ``a`` (a simplex
    threshold per row)."""
    return -simplex_threshold(sim + g.unsqueeze(-2), a)


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
    f = _row_potential(sim, g, a)
    plan = _transport_plan(sim, f, g)
    return -((f * a).sum() + (g * b).sum() - 0.5 * (plan * plan).sum())


def _transport_dual_ascent(name: str, options: tuple):
    maxiter, tol, _ = options

    def solve(_init, sim, a, b):
        # 1. L-BFGS on the semi-dual in g (as JAXopt), to tol on ‖Pᵀ1 − b‖₂ (≥ the max norm).
        # 2. Polish by exact block-coordinate ascent on the dual: for fixed f each g_j makes
        #    column j sum to b_j (a simplex threshold), then symmetrically for f. A sweep ends
        #    with the rows exact, so the columns measure convergence. These sweeps reach the
        #    last digits where the line search of L-BFGS stalls on rounding.
        threshold = tol * a.abs().max()
        lbfgs = LBFGS(
            _neg_semi_dual, maxiter=maxiter, tol=threshold, implicit_diff=False, on_failure="ignore"
        )
        g = lbfgs.run(torch.zeros_like(b), sim, a, b).params

        def sweep(dual):
            g = -simplex_threshold((sim + dual[0].unsqueeze(-1)).mT, b)
            return _row_potential(sim, g, a), g

        def violation(dual):
            return (_transport_plan(sim, *dual).sum(-2) - b).abs().max()

        cadence = Cadence(sim.device, sim, a, b)
        dual = (_row_potential(sim, g, a), g)
        return _solve_marginals(name, sweep, dual, violation, threshold, options, cadence)

    return solve


def projection_transport(
    sim_matrix: Tensor,
    marginals: tuple,
    maxiter: int = 1000,
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
        maxiter: the most L-BFGS iterations, and then the most polishing sweeps.
        tol: what the result's marginals meet, relative to ``max(a)``: every column sum is
            within ``tol · max(a)`` of ``b`` (``‖Pᵀ1 − b‖∞ ≤ tol · max(a)``) and every row sum
            equals ``a`` to rounding (each polishing sweep ends with the rows exact), unless a
            failure is reported (or under vmap and compile, where nothing is checked).
        on_failure: ``"warn"`` (:class:`ConvergenceWarning`), ``"raise"``
            (:class:`ConvergenceError`) or ``"ignore"`` when ``tol`` is not met (the result
            is returned either way).

    Returns:
        ``P``, shape ``(m, n)``.

    Raises:
        ValueError: bad shapes, negative marginals or unequal sums.
    """
    options = (maxiter, tol, on_failure)
    args = ("projection_transport", sim_matrix, marginals, options, False)
    return _on_transport(*args, _projection_transport)


def _projection_transport(name, sim, a, b, *options):
    solver = _transport_dual_ascent(name, options)
    # The polishing loop reports its own failures: the engine's root check would repeat them.
    f, g = implicit_solve(
        solver, _transport_dual_optimality, None, sim, a, b, solve="cg", on_failure="ignore"
    )
    return _transport_plan(sim, f, g)


def projection_birkhoff(
    sim_matrix: Tensor, maxiter: int = 1000, tol: float = 1e-5, on_failure: str = "warn"
) -> Tensor:
    """Projection onto the Birkhoff polytope of doubly stochastic matrices
    ``{P ≥ 0 : P1 = 1, Pᵀ1 = 1}``: :func:`projection_transport` with ``a = b = 1``.

    What ``tol`` bounds: on return ``P ≥ 0``, every row sums to 1 to rounding and every column
    sum is within ``tol`` of 1 (``max_j |Σ_i P_ij − 1| ≤ tol``; e.g. ``4.4e-6`` at the default
    ``tol=1e-5``), unless a failure is reported. Lower ``tol`` for tighter columns.

    Args:
        sim_matrix: shape ``(n, n)``.
        maxiter, tol, on_failure: as for :func:`projection_transport`.

    Returns:
        ``P``, shape ``(n, n)``.
    """
    options = (maxiter, tol, on_failure)
    return _on_birkhoff("projection_birkhoff", sim_matrix, options, _projection_transport)


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


def _sinkhorn(name: str, options: tuple):
    tol = options[1]

    def solve(_init, sim, a, b):
        log_a, log_b = torch.log(a), torch.log(b)

        def sweep(potentials):
            f = log_a - torch.logsumexp(sim + potentials[1].unsqueeze(-2), -1)
            return f, log_b - torch.logsumexp(sim + f.unsqueeze(-1), -2)

        def violation(potentials):  # a sweep ends with the columns exact: the rows measure
            f, g = potentials
            return (torch.exp(sim + f.unsqueeze(-1) + g.unsqueeze(-2)).sum(-1) - a).abs().max()

        cadence = Cadence(sim.device, sim, a, b)
        threshold = tol * a.abs().max()
        # The first sweep runs before any check: there is no row potential to measure yet.
        first = sweep((None, torch.zeros_like(b)))
        _, g = _solve_marginals(name, sweep, first, violation, threshold, options, cadence, 1)
        return g - g.mean(-1, keepdim=True)

    return solve


def kl_projection_transport(
    sim_matrix: Tensor,
    marginals: tuple,
    maxiter: int = 1000,
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
    ``max_i |(P1)_i − a_i| ≤ tol · max(a)`` (``maxiter`` sweeps at most; checked on the host,
    not under vmap and compile). Sinkhorn converges slowly when ``S`` has a large spread
    (``exp(S)`` close to a permutation): raise ``maxiter`` there. The derivative comes from
    the implicit function theorem on the Sinkhorn fixed point in ``g`` (gauge fixed by
    ``mean(g) = 0``; GMRES), not from unrolling; ``f`` and ``P`` are then recomputed from
    ``g`` by autograd.

    Derivatives in the marginals: along directions that break ``Σa = Σb`` the Sinkhorn fixed
    point (gauge-fixed as above) keeps ``P1 = a`` exact and gives the columns ``b · Σa/Σb``;
    derivatives are those of this extension.

    Args:
        sim_matrix: ``S``, shape ``(m, n)``.
        marginals: ``(a, b)``, shapes ``(m,)`` and ``(n,)``, positive, ``Σa = Σb``.
        maxiter, tol, on_failure: as for :func:`projection_transport`
            (``maxiter`` counts Sinkhorn sweeps).

    Returns:
        ``P``, shape ``(m, n)``, positive.

    Raises:
        ValueError: bad shapes, non-positive marginals or unequal sums.
    """
    options = (maxiter, tol, on_failure)
    args = ("kl_projection_transport", sim_matrix, marginals, options, True)
    return _on_transport(*args, _kl_projection_transport)


def _kl_projection_transport(name, sim, a, b, *options):
    # Sinkhorn reports its own failures: the engine's root check would repeat them.
    fixed_point = custom_fixed_point(_sinkhorn_map, solve="gmres", on_failure="ignore")
    solver = fixed_point(_sinkhorn(name, options))
    g = solver(None, sim, a, b)
    f = _kl_row_potential(g, sim, a)
    return torch.exp(sim + f.unsqueeze(-1) + g.unsqueeze(-2))


def kl_projection_birkhoff(
    sim_matrix: Tensor, maxiter: int = 1000, tol: float = 1e-5, on_failure: str = "warn"
) -> Tensor:
    """KL projection of ``exp(S)`` onto the Birkhoff polytope (Sinkhorn normalisation):
    :func:`kl_projection_transport` with ``a = b = 1``.

    Args:
        sim_matrix: shape ``(n, n)``.
        maxiter, tol, on_failure: as for :func:`kl_projection_transport`.

    Returns:
        ``P``, shape ``(n, n)``, doubly stochastic and positive.
    """
    options = (maxiter, tol, on_failure)
    return _on_birkhoff("kl_projection_birkhoff", sim_matrix, options, _kl_projection_transport)
