"""Implicit differentiation of the root of an optimality condition.

For a solution ``x*(θ)`` of ``F(x, θ) = 0``, with ``A = ∂F/∂x`` and ``B = ∂F/∂θ`` at
``(x*, θ)``, the implicit function theorem gives ``∂x*/∂θ = −A⁻¹ B`` (Blondel et al., 2022,
"Efficient and Modular Implicit Differentiation", eq. 2). Hence

* reverse mode: for a cotangent ``v``, solve ``Aᵀ u = −v``, then ``θ̄ = uᵀ B``;
* forward mode: for a tangent ``θ̇``, solve ``A w = −B θ̇``; ``w`` is the tangent of ``x*``.

``Aᵀ u`` and ``uᵀ B`` are vector-Jacobian products of ``F`` (``torch.func.vjp``), ``A w`` and
``B θ̇`` Jacobian-vector products (``torch.func.jvp``); ``A`` is formed only by a dense solver.

One module-level ``torch.autograd.Function``, :class:`_ImplicitRoot`, carries every public
entry point. Its forward returns the solution found by the user's solver (run under
``torch.no_grad``); its ``backward`` and ``jvp`` apply the formulas above. Both linear solves
are themselves implicit roots (of ``Aᵀ u + v = 0`` and ``A w + Bθ̇ = 0``) going through the
same Function, so derivatives of any order are those of the exact solution, not of the linear
solver's iterations; and because the linearisation point is the Function's *output*, second
derivatives include the dependence of ``A`` and ``B`` on ``x*(θ)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _runtime, linear_solve
from implicit_torch._tree import (
    Raveler,
    describe,
    tree_flatten,
    tree_leaves,
    tree_sub,
    tree_unflatten,
)

__all__ = ["custom_fixed_point", "custom_root", "implicit_solve", "root_jvp", "root_vjp"]

Tensor = torch.Tensor
Solve = str | Callable[..., Any]


class _Problem:
    """An optimality condition ``F(sol, *params)`` with its static parts split off.

    The tensor leaves of ``params`` travel through autograd; everything else (Python numbers,
    strings, ``None``) is static and kept here. Only floating-point tensor leaves are
    differentiated.
    """

    def __init__(
        self,
        optimality_fn,
        sol: Any,
        params: tuple,
        solve: Solve,
        batched: bool,
        linear: tuple | None = None,
    ):
        self.optimality_fn = optimality_fn
        # For F(x, rhs, *ops) = op(x, *ops) − rhs (a linear solve): the factories
        # (make_A, make_At), each ops -> (x -> A x) / (u -> Aᵀ u). Knowing Aᵀ explicitly avoids
        # differentiating a vjp to transpose it.
        self.linear = linear
        self.solve = linear_solve.get_solver(solve)
        self.batched = batched
        self.raveler = Raveler(sol, batched, what="the solution")
        self.sol_spec = self.raveler.spec
        leaves, self.params_spec = tree_flatten(tuple(params))
        self.leaves_template = [None if isinstance(x, Tensor) else x for x in leaves]
        self.tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        tensors = [leaves[i] for i in self.tensor_pos]
        self.diff = [k for k, t in enumerate(tensors) if t.is_floating_point()]
        _check_devices(sol, tensors)

    # -- rebuilding user-facing structures ------------------------------------------------

    def n_sol(self) -> int:
        return len(self.raveler.shapes)

    def sol_tree(self, sol_leaves) -> Any:
        return tree_unflatten(list(sol_leaves), self.sol_spec)

    def params(self, tensors) -> tuple:
        leaves = list(self.leaves_template)
        for i, t in zip(self.tensor_pos, tensors):
            leaves[i] = t
        return tree_unflatten(leaves, self.params_spec)

    def residual(self, sol_tree, tensors) -> Any:
        """``F(sol, *params)``, checked to have the solution's structure and shapes."""
        out = self.optimality_fn(sol_tree, *self.params(tensors))
        self.raveler.check(out, "the output of optimality_fn")
        return out

    def with_diff(self, tensors, diff_values) -> list:
        """``tensors`` with its floating leaves replaced by ``diff_values``."""
        tensors = list(tensors)
        for k, v in zip(self.diff, diff_values):
            tensors[k] = v
        return tensors

    # -- the two derivative rules ---------------------------------------------------------

    def matvec_factories(self):
        """``(make_A, make_At)``: operands ``(*sol_leaves, *tensors)`` -> the maps ``w ↦ A w``
        and ``u ↦ Aᵀ u`` with ``A = ∂F/∂x`` there."""
        if self.linear is not None:
            make_A, make_At = self.linear
            n = self.n_sol()

            # A linear problem's Jacobian does not depend on x or on its rhs (the first n
            # tensors); only on the operator's own operands.
            def linear_A(*operands):
                return make_A(*operands[2 * n :])

            def linear_At(*operands):
                return make_At(*operands[2 * n :])

            return linear_A, linear_At
        n = self.n_sol()

        def make_A(*operands):
            s, ts = self.sol_tree(operands[:n]), operands[n:]
            return lambda w: _runtime.jvp(lambda x: self.residual(x, ts), (s,), (w,))[1]

        def make_At(*operands):
            s, ts = self.sol_tree(operands[:n]), operands[n:]
            _, vjp_x = torch.func.vjp(lambda x: self.residual(x, ts), s)
            return lambda u: vjp_x(u)[0]

        return make_A, make_At

    def plain_transpose_factory(self):
        """A value-only ``u ↦ Aᵀ u`` for the linear solver, from one retained autograd graph.

        ``torch.func.vjp`` records a differentiable graph at every application; outside any
        torch.func transform, where the linear solver only needs values, plain
        ``torch.autograd.grad`` on a retained graph is several times cheaper per matvec.
        Returns None where it does not apply: inside transforms, for linear sub-problems, and
        for solvers that transform the matvec (dense solvers vmap it, normal CG transposes it).
        """
        if (
            self.linear is not None
            or _runtime.under_functorch()
            or not linear_solve.only_applies_matvec(self.solve)
        ):
            return None
        n = self.n_sol()

        def make_At(*operands):
            with torch.enable_grad():
                xs = [x.detach().requires_grad_() for x in operands[:n]]
                out = tree_leaves(
                    self.residual(self.sol_tree(xs), [t.detach() for t in operands[n:]])
                )

            def At(u):
                grads = torch.autograd.grad(
                    out, xs, tree_leaves(u), retain_graph=True, allow_unused=True
                )
                return self.sol_tree(
                    [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
                )

            return At

        return make_At

    def vjp(self, sol_leaves, tensors, cotangents) -> list:
        """``uᵀ ∂F/∂θ`` with ``Aᵀ u = −v``: one gradient per tensor leaf (None if static)."""
        sol = self.sol_tree(sol_leaves)
        cot = [torch.zeros_like(s) if c is None else c for s, c in zip(sol_leaves, cotangents)]
        neg_v = self.sol_tree([-c for c in cot])
        make_A, make_At = self.matvec_factories()
        u = _implicit_linear_solve(
            make_At,
            make_A,
            neg_v,
            (*sol_leaves, *tensors),
            self.solve,
            self.batched,
            make_solver_matvec=self.plain_transpose_factory(),
        )
        grads: list = [None] * len(tensors)
        if not self.diff:
            return grads
        diff_in = [tensors[k] for k in self.diff]
        _, vjp_p = torch.func.vjp(
            lambda *d: self.residual(sol, self.with_diff(tensors, d)), *diff_in
        )
        for k, g in zip(self.diff, vjp_p(u)):
            grads[k] = g
        return grads

    def jvp(self, sol_leaves, tensors, tangents) -> list:
        """``w = −A⁻¹ B θ̇``: the tangent of every solution leaf."""
        sol = self.sol_tree(sol_leaves)
        moving = [k for k in self.diff if tangents[k] is not None]
        if not moving:
            return [torch.zeros_like(s) for s in sol_leaves]

        def residual_of_moving(*d):
            ts = list(tensors)
            for k, v in zip(moving, d):
                ts[k] = v
            return self.residual(sol, ts)

        _, b_dot = _runtime.jvp(
            residual_of_moving,
            tuple(tensors[k] for k in moving),
            tuple(tangents[k] for k in moving),
        )
        neg_b_dot = self.sol_tree([-x for x in tree_leaves(b_dot)])
        make_A, make_At = self.matvec_factories()
        w = _implicit_linear_solve(
            make_A, make_At, neg_b_dot, (*sol_leaves, *tensors), self.solve, self.batched
        )
        return tree_leaves(w)


class _ImplicitRoot(torch.autograd.Function):
    """Identity on the solution leaves, differentiated by the implicit function theorem.

    ``apply(problem, *sol_leaves, *param_tensors)``: the solution leaves come from the user's
    solver (detached); the parameter tensors are the tensor leaves of ``params``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: _Problem, *leaves: Tensor):
        # Clones: an autograd.Function must not return its inputs unchanged.
        return tuple(x.clone() for x in leaves[: problem.n_sol()])

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem = inputs[0]
        ctx.problem = problem
        tensors = inputs[1 + problem.n_sol() :]
        # The *outputs* are saved, so that a derivative of the backward (or jvp) flows
        # through x*(θ) too: second derivatives need the dependence of A and B on x*.
        ctx.save_for_backward(*output, *tensors)
        ctx.save_for_forward(*output, *tensors)

    @staticmethod
    def backward(ctx, *grad_sol):
        if any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grad_sol):
            raise NotImplementedError(
                "torch.autograd.grad(..., is_grads_batched=True) uses torch's legacy batching, "
                "which cannot run implicit_torch's backward (its detach and loops have no "
                "legacy batching rules). Use torch.func.jacrev, or torch.func.vmap over "
                "torch.func.vjp, to get batched vector-Jacobian products."
            )
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        n = problem.n_sol()
        # Autocast off, and float16/bfloat16 promoted: the solve runs in float32 or float64.
        with _runtime.full_precision():
            up = [_runtime.upcast(t) for t in saved]
            grads = problem.vjp(up[:n], up[n:], [_runtime.upcast(g) for g in grad_sol])
        grads = [g if g is None else g.to(t.dtype) for g, t in zip(grads, saved[n:])]
        return (None, *([None] * n), *grads)

    @staticmethod
    def jvp(ctx, _problem_tangent, *tangents):
        if _runtime.forward_over_forward():
            raise NotImplementedError(
                "forward-over-forward differentiation (e.g. jacfwd(jacfwd(f)) or jvp of a jvp) "
                "through implicit_torch is not supported: torch.func drops the outer tangents "
                "inside a torch.autograd.Function's jvp rule (pytorch issue 197867), which "
                "would give a silently wrong result. Use jacfwd(jacrev(f)) (= "
                "torch.func.hessian), jacrev(jacfwd(f)) or jacrev(jacrev(f)) instead."
            )
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        n = problem.n_sol()
        with _runtime.running_jvp_rule(), _runtime.full_precision():
            up = [_runtime.upcast(t) for t in saved]
            outs = problem.jvp(up[:n], up[n:], [_runtime.upcast(t) for t in tangents[n:]])
        return tuple(o.to(x.dtype) for o, x in zip(outs, saved[:n]))


def _implicit_linear_solve(make_A, make_At, rhs, operands, solve, batched, make_solver_matvec=None):
    """``x`` with ``A(operands) x = rhs``, differentiable in ``rhs`` and ``operands``.

    ``make_A(*operands)`` returns the linear map ``x ↦ A x`` (possibly a cached linearisation,
    cheap to apply repeatedly) and ``make_At(*operands)`` its transpose; ``make_solver_matvec``,
    if given, builds a value-only ``A`` for the linear solver itself. Derivatives go through
    :class:`_ImplicitRoot` with the optimality condition ``A x − rhs = 0``, whose Jacobian in
    ``x`` is ``A`` itself; so the backward of this solve is a solve with ``Aᵀ`` and its jvp
    one with ``A``, at any order.
    """

    def solver(_init, rhs, *operands):
        matvec = (make_solver_matvec or make_A)(*operands)
        return linear_solve.call_solver(solve, matvec, rhs, batched=batched)

    def optimality(x, rhs, *operands):
        return tree_sub(make_A(*operands)(x), rhs)

    return _implicit(
        solver,
        optimality,
        None,
        (rhs, *operands),
        solve,
        False,
        batched,
        check_closure=False,
        linear=(make_A, make_At),
    )


def _implicit(
    solver, optimality_fn, init, params, solve, has_aux, batched, check_closure, linear=None
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
    sol_leaves = [x.detach() if isinstance(x, Tensor) else x for x in sol_leaves]
    sol = tree_unflatten(sol_leaves, sol_spec)
    problem = _Problem(optimality_fn, sol, params, solve, batched, linear)
    param_leaves = tree_flatten(tuple(params))[0]
    tensors = [param_leaves[i] for i in problem.tensor_pos]
    if check_closure and torch.is_grad_enabled():
        _check_closure(problem, sol, tensors)
    outs = _ImplicitRoot.apply(problem, *sol_leaves, *tensors)
    sol = problem.sol_tree(outs)
    return (sol, aux) if has_aux else sol


def _check_closure(problem: _Problem, sol, tensors) -> None:
    """Raise if ``F`` depends on a tensor that requires grad but is not among the params.

    With every input detached, a residual that still requires grad can only come from a tensor
    the function closes over; its gradient would silently be lost.
    """
    detached = [t.detach() for t in tensors]
    with torch.enable_grad():
        res = problem.residual(sol, detached)
    if any(isinstance(r, Tensor) and r.requires_grad for r in tree_leaves(res)):
        raise ValueError(
            "the optimality function uses a tensor that requires grad but is not one of its "
            "params (it closes over it), so that tensor would silently get no gradient. Pass "
            "it as an explicit parameter: optimality_fn(sol, *params) and solver(init, "
            "*params) must receive every differentiable tensor through params."
        )


def _check_devices(sol, tensors) -> None:
    device = tree_leaves(sol)[0].device
    for t in tensors:
        # 0-d CPU tensors mix with any device in torch ops, so they are allowed here too.
        if t.device != device and not (t.device.type == "cpu" and t.dim() == 0):
            raise ValueError(
                f"a parameter tensor of shape {tuple(t.shape)} is on {t.device} "
                f"but the solution is on {device}: move them to one device"
            )


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

    Returns:
        ``x*`` (or ``(x*, aux)``), differentiable by ``backward``, ``torch.autograd.grad``
        (any order) and the ``torch.func`` transforms.

    Raises:
        ValueError: if ``optimality_fn`` closes over a tensor that requires grad, or shapes,
            dtypes or devices do not fit.
    """
    return _implicit(
        solver, optimality_fn, init, params, solve, has_aux, batched, check_closure=True
    )


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: Solve = "cg",
    has_aux: bool = False,
    batched: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``solver(init, *params)`` returns a root of ``optimality_fn(x, *params)``.

    The decorated solver's output is differentiable in ``params`` by the implicit function
    theorem (see :func:`implicit_solve` for the arguments)::

        @implicit_torch.custom_root(lambda w, lam: X.T @ (X @ w - y) + lam * w)
        def ridge(init, lam):
            return torch.linalg.solve(X.T @ X + lam * torch.eye(d), X.T @ y)
    """

    def decorator(solver):
        @functools.wraps(solver)
        def wrapped(init, *params):
            return _implicit(
                solver, optimality_fn, init, params, solve, has_aux, batched, check_closure=True
            )

        return wrapped

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    solve: Solve = "gmres",
    has_aux: bool = False,
    batched: bool = False,
):
    """Decorator: ``solver(init, *params)`` returns a fixed point ``x = T(x, *params)``.

    Equivalent to :func:`custom_root` with ``F(x, θ) = T(x, θ) − x``. The default linear
    solver is GMRES, since ``∂T/∂x − I`` is not symmetric in general.
    """

    def optimality_fn(x, *params):
        return tree_sub(fixed_point_fn(x, *params), x)

    return custom_root(optimality_fn, solve=solve, has_aux=has_aux, batched=batched)


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
    params = tuple(params)
    problem = _Problem(optimality_fn, sol, params, solve, batched)
    leaves = [tree_flatten(tuple(params))[0][i] for i in problem.tensor_pos]
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
    params, tangents = tuple(params), tuple(tangents)
    if len(tangents) != len(params):
        raise ValueError(
            f"root_jvp needs one tangent per param: {len(params)} params, {len(tangents)} tangents"
        )
    problem = _Problem(optimality_fn, sol, params, solve, batched)
    p_leaves = tree_flatten(params)[0]
    t_leaves: list = []
    for p, t in zip(params, tangents):
        n = len(tree_flatten(p)[0])
        if t is None:
            t_leaves.extend([None] * n)
            continue
        leaves = tree_flatten(t)[0]
        if len(leaves) != n:
            raise ValueError(f"a tangent ({describe(t)}) does not match its param ({describe(p)})")
        t_leaves.extend(leaves)
    tensors = [p_leaves[i] for i in problem.tensor_pos]
    tans = [t_leaves[i] for i in problem.tensor_pos]
    w = problem.jvp(tree_leaves(sol), tensors, tans)
    return problem.sol_tree(w)
