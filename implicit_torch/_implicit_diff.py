"""The public entry points of implicit differentiation: ``implicit_solve``, ``custom_root``,
``custom_fixed_point``, ``root_vjp`` and ``root_jvp``.

Each runs (or takes) a solution of ``F(x, *params) = 0`` and makes it differentiable in
``params`` through the one ``torch.autograd.Function`` of :mod:`implicit_torch._root`, which
applies the implicit function theorem ``∂x*/∂θ = −(∂ₓF)⁻¹ ∂_θF`` (Blondel et al., 2022) in
reverse mode, forward mode and every ``torch.func`` transform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _result, _runtime
from implicit_torch._root import Problem, Solve, apply_root
from implicit_torch._tree import (
    describe,
    tree_flatten,
    tree_leaves,
    tree_like,
    tree_map,
    tree_sub,
    tree_unflatten,
)
from implicit_torch.linear import get_solver

__all__ = ["custom_fixed_point", "custom_root", "implicit_solve", "root_jvp", "root_vjp"]

Tensor = torch.Tensor


# The default of ``root_tol`` (see implicit_solve): loose enough that a solver stopped at its own
# tolerance (JAXopt's default tol is 1e-3) passes, tight enough that a point that is not a root
# (an unconverged or wrong solver, a forgotten loop) does not.
DEFAULT_ROOT_TOL = 1e-2


def _check_options(root_tol, on_failure, solve="cg") -> None:
    get_solver(solve)  # an unknown name or a non-callable fails here, not at the first call
    _result.check_on_failure(on_failure)
    if root_tol is not None:
        _result.check_tolerances(root_tol)


def _implicit(
    solver, optimality_fn, init, params, solve, has_aux, batched, check, root_tol, on_failure
):
    with torch.no_grad():
        out = solver(init, *params)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "has_aux=True: the solver must return a pair (solution, aux), got "
                f"{type(out).__name__}"
            )
        sol, aux = out
    else:
        sol, aux = out, None
    # detach() also drops forward-mode tangents that the solver's ops may have computed.
    sol_leaves, sol_spec = tree_flatten(sol)
    sol = tree_unflatten([x.detach() if isinstance(x, Tensor) else x for x in sol_leaves], sol_spec)
    problem = Problem(optimality_fn, sol, params, solve, batched)
    if check and torch.is_grad_enabled():
        # Only where a derivative can follow: the checks guard gradients.
        _check_solution(problem, sol, problem.tensors_of(params), root_tol, on_failure)
    sol = apply_root(problem, sol, params)
    return (sol, aux) if has_aux else sol


def _check_solution(problem: Problem, sol, tensors, root_tol, on_failure) -> None:
    """The checks on a solver's output, from one evaluation of ``F(x*, θ)``:

    * ``F`` must not depend on a tensor that requires grad but is not among the params: with
      every input detached, a residual that still requires grad can only come from a tensor
      the function closes over, whose gradient would silently be lost (an error);
    * ``x*`` must be a root: a non-finite solution or residual, or a residual with
      ``‖F(x*, θ)‖∞ > root_tol · (1 + ‖x*‖∞)`` (per problem when batched), is reported as
      ``on_failure`` says, since the implicit gradient at a point that is not a root is
      meaningless.
    """
    detached = [t.detach() for t in tensors]
    try:
        # Autocast off, as for the derivative computations: the check must not see bfloat16
        # rounding that the backward will not see either.
        with torch.enable_grad(), _runtime.full_precision():
            res = problem.residual(sol, detached)
    except RuntimeError as exc:
        if "does not require grad" not in str(exc):
            raise
        raise TypeError(
            "the optimality function calls torch.autograd.grad on its inputs (the torchopt "
            "habit), but implicit_torch evaluates it on detached tensors and inside torch.func "
            "transforms, where that cannot work. Write the gradient with torch.func.grad, e.g. "
            "optimality_fn = torch.func.grad(inner_loss), or build it with "
            "implicit_torch.optimality.make_stationarity_fun(inner_loss)."
        ) from exc
    if any(isinstance(r, Tensor) and r.requires_grad for r in tree_leaves(res)):
        raise ValueError(
            "the optimality function uses a tensor that requires grad but is not one of its "
            "params (it closes over it), so that tensor would silently get no gradient. Pass "
            "it as an explicit parameter: optimality_fn(sol, *params) and solver(init, "
            "*params) must receive every differentiable tensor through params."
        )
    if on_failure == "ignore" or not _runtime.can_inspect_values(*tree_leaves(sol)):
        return
    if problem.raveler.size == 0 or problem.raveler.batch_size == 0:
        return  # nothing to check in an empty problem
    x = problem.raveler.ravel(sol).detach()
    r = problem.raveler.ravel(tree_map(torch.Tensor.detach, res))
    size = r.abs().amax(dim=1)
    finite = torch.isfinite(x).all(dim=1) & torch.isfinite(size)
    # A half-precision solution is a root only to its own rounding (‖F‖ ≈ ‖∂ₓF‖·eps·‖x*‖, and
    # eps is 8e-3 in bfloat16), which this test cannot tell from a wrong point: NaN test only.
    low = any(t.dtype in _runtime.LOW_PRECISION for t in tree_leaves(sol))
    off = root_tol is None or low
    limit = (1 + x.abs().amax(dim=1)) * (torch.inf if off else root_tol)
    ok = finite & (size <= limit)
    if bool(ok.all()):
        return
    status = _result.status_codes(ok, torch.where(finite, size, torch.nan))
    info = _result.SolveInfo(torch.zeros_like(status), size, ok, status, "root", limit)
    _result.report(
        "the forward solver",
        info,
        on_failure,
        explain={
            _result.Status.MAX_ITERATIONS: "returned a point that is not a root of optimality_fn",
            _result.Status.NONFINITE: (
                "returned a solution that is not finite",
                "NaN or Inf in x* or in optimality_fn there",
            ),
        },
        measure="‖F(x*, θ)‖∞ =",
        target=None if root_tol is None else f"root_tol · (1 + ‖x*‖∞) with root_tol={root_tol:g}",
        fix=(
            "the implicit gradient at a point that is not a root is meaningless. Check that "
            "the solver converged and that optimality_fn is zero at its solution, or set "
            "root_tol (None turns this check off)."
        ),
        batched=problem.batched,
        stacklevel=5,
    )


def _params_tuple(params, who: str) -> tuple:
    """``params`` as a tuple; a bare tensor (whose rows would be taken as separate params) or
    another non-sequence is a ``TypeError``."""
    if not isinstance(params, (tuple, list)):
        raise TypeError(
            f"{who}: params (and tangents) must be a tuple with one entry per parameter of "
            f"optimality_fn, e.g. (lam,) for one parameter; got {type(params).__name__}"
        )
    return tuple(params)


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def implicit_solve(
    solver: Callable[..., Any],
    optimality_fn: Callable[..., Any],
    init: Any,
    *params: Any,
    solve: Solve = "cg",
    has_aux: bool = False,
    batched: bool = False,
    root_tol: float | None = DEFAULT_ROOT_TOL,
    on_failure: str = "warn",
) -> Any:
    """Run ``solver(init, *params)`` and make its solution differentiable in ``params``.

    Args:
        solver: any forward solver; it runs under ``torch.no_grad()`` and returns the solution
            ``x*`` (a tensor or pytree of floating tensors), or ``(x*, aux)`` with ``has_aux``.
        optimality_fn: ``F(x, *params)``, zero at the solution, returning a pytree with the
            structure and shapes of ``x*``.
        init: passed to ``solver`` as is; it never receives a gradient.
        *params: tensors, pytrees of tensors, or static non-tensor constants. Every tensor leaf
            that requires grad gets the implicit gradient ``−vᵀ A⁻¹ B``.
        solve: linear solver for ``A`` (or ``Aᵀ``): a name ("cg", "normal_cg", "gmres",
            "bicgstab", "lu", "cholesky", "auto") or a callable ``solve(matvec, b) -> x``, e.g.
            ``functools.partial(implicit_torch.solve_cg, tol=1e-8)``. "cg" needs ``A``
            symmetric definite (true for a stationarity condition ``F = ∇ₓf``).
        has_aux: the solver returns ``(x*, aux)``; ``aux`` is passed through untouched.
        batched: dim 0 of every leaf of ``x*`` indexes independent problems, residual ``i``
            depending on ``x*[i]`` only; every linear solve then runs per problem, and a
            parameter shared by all problems gets the sum of their gradients.
        root_tol: where a derivative can follow (grad mode on), the solver's output is
            checked to be a root: ``‖F(x*, θ)‖∞ ≤ root_tol · (1 + ‖x*‖∞)`` (per problem when
            batched; one evaluation of ``F``, shared with the closure check). A solver stopped
            at its own tolerance passes the default ``1e-2``; a NaN or Inf solution is always
            reported. ``None`` turns the residual test off (so does a float16 / bfloat16
            solution, a root only to its own rounding).
        on_failure: what a failed check does: ``"warn"`` (a
            :class:`~implicit_torch.ConvergenceWarning`), ``"raise"``
            (:class:`~implicit_torch.ConvergenceError`) or ``"ignore"``.

    Returns:
        ``x*`` (or ``(x*, aux)``), differentiable by ``backward``, ``torch.autograd.grad``
        (any order) and the ``torch.func`` transforms.

    Raises:
        ValueError: if ``optimality_fn`` closes over a tensor that requires grad, or shapes,
            dtypes or devices do not fit.
        TypeError: if ``optimality_fn`` differentiates with ``torch.autograd.grad`` (use
            ``torch.func.grad``).
    """
    _check_options(root_tol, on_failure, solve)
    return _implicit(
        solver, optimality_fn, init, params, solve, has_aux, batched, True, root_tol, on_failure
    )


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: Solve = "cg",
    has_aux: bool = False,
    batched: bool = False,
    root_tol: float | None = DEFAULT_ROOT_TOL,
    on_failure: str = "warn",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``solver(init, *params)`` returns a root of ``optimality_fn(x, *params)``.

    The decorated solver's output is differentiable in ``params`` by the implicit function
    theorem (see :func:`implicit_solve` for the arguments)::

        @implicit_torch.custom_root(lambda w, lam: X.T @ (X @ w - y) + lam * w)
        def ridge(init, lam):
            return torch.linalg.solve(X.T @ X + lam * torch.eye(d), X.T @ y)
    """

    _check_options(root_tol, on_failure, solve)

    def decorator(solver):
        @functools.wraps(solver)
        def wrapped(init, *params):
            return _implicit(
                solver, optimality_fn, init, params, solve, has_aux, batched, True, root_tol,
                on_failure,
            )  # fmt: skip

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    solve: Solve = "gmres",
    has_aux: bool = False,
    batched: bool = False,
    root_tol: float | None = DEFAULT_ROOT_TOL,
    on_failure: str = "warn",
):
    """Decorator: ``solver(init, *params)`` returns a fixed point ``x = T(x, *params)``.

    Equivalent to :func:`custom_root` with ``F(x, θ) = T(x, θ) − x``. The default linear
    solver is GMRES, since ``∂T/∂x − I`` is not symmetric in general.
    """

    def optimality_fn(x, *params):
        return tree_sub(fixed_point_fn(x, *params), x)

    return custom_root(
        optimality_fn,
        solve=solve,
        has_aux=has_aux,
        batched=batched,
        root_tol=root_tol,
        on_failure=on_failure,
    )


def root_vjp(
    optimality_fn: Callable[..., Any],
    sol: Any,
    params: tuple,
    cotangent: Any,
    solve: Solve = "cg",
    batched: bool = False,
) -> tuple:
    """``vᵀ ∂x*/∂θ = −vᵀ A⁻¹ B`` at a root ``sol`` of ``optimality_fn(sol, *params)``.

    Returns a tuple with one entry per element of ``params``: a pytree shaped like that
    parameter holding its gradient (``None`` for static or non-floating leaves).
    """
    params = _params_tuple(params, "root_vjp")
    problem = Problem(optimality_fn, sol, params, solve, batched)
    leaves = problem.tensors_of(params)
    cot = problem.raveler.check(cotangent, "the cotangent")
    grads = problem.vjp(tree_leaves(sol), leaves, cot)
    out = problem.params(grads)
    # Static leaves of params must not be echoed back as if they were gradients.
    flat, spec = tree_flatten(out)
    is_tensor = set(problem.tensor_pos)
    return tree_unflatten([g if i in is_tensor else None for i, g in enumerate(flat)], spec)


def root_jvp(
    optimality_fn: Callable[..., Any],
    sol: Any,
    params: tuple,
    tangents: tuple,
    solve: Solve = "cg",
    batched: bool = False,
) -> Any:
    """``∂x*/∂θ · θ̇ = −A⁻¹ B θ̇`` at a root ``sol``; ``tangents`` has one entry per param (a
    pytree like it, or ``None`` for a param held fixed). Returns a pytree shaped like ``sol``.
    """
    params, tangents = _params_tuple(params, "root_jvp"), _params_tuple(tangents, "root_jvp")
    if len(tangents) != len(params):
        raise ValueError(
            f"root_jvp needs one tangent per param: {len(params)} params, {len(tangents)} tangents"
        )
    problem = Problem(optimality_fn, sol, params, solve, batched)
    p_leaves = tree_flatten(params)[0]
    t_leaves: list = []
    for p, t in zip(params, tangents):
        n = len(tree_flatten(p)[0])
        if t is None:
            t_leaves.extend([None] * n)
            continue
        t = tree_like(t, p)  # dicts paired by key, as torch.func.jvp requires
        leaves, t_spec = tree_flatten(t)
        p_own, p_spec = tree_flatten(p)
        if t_spec != p_spec or any(
            isinstance(q, Tensor) and (not isinstance(u, Tensor) or u.shape != q.shape)
            for q, u in zip(p_own, leaves)
            if u is not None
        ):
            raise ValueError(
                f"root_jvp: the tangent ({describe(t)}) does not match its param "
                f"({describe(p)}): every tangent leaf must have its param leaf's shape"
            )
        t_leaves.extend(leaves)
    tensors = [p_leaves[i] for i in problem.tensor_pos]
    tans = [t_leaves[i] for i in problem.tensor_pos]
    w = problem.jvp(tree_leaves(sol), tensors, tans)
    return problem.sol_tree(w)
