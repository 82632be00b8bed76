"""The implicit root: an optimality condition, its linearisation, and the one autograd.Function.

For a solution ``x*(θ)`` of ``F(x, θ) = 0``, with ``A = ∂F/∂x`` and ``B = ∂F/∂θ`` at
``(x*, θ)``, the implicit function theorem gives ``∂x*/∂θ = −A⁻¹ B`` (Blondel et al., 2022,
"Efficient and Modular Implicit Differentiation", eq. 2). Hence

* reverse mode: for a cotangent ``v``, solve ``Aᵀ u = −v``, then ``θ̄ = uᵀ B``;
* forward mode: for a tangent ``θ̇``, solve ``A w = −B θ̇``; ``w`` is the tangent of ``x*``.

:class:`_Problem` holds ``F`` with the static parts of its parameters split off, builds ``A``
and ``Aᵀ`` as :class:`~implicit_torch.linear.LinearOperator` objects (a Jacobian-vector and a
vector-Jacobian product of ``F``; ``A`` is formed only by a dense solver) and applies the two
rules. :class:`_ImplicitRoot` is the one module-level ``torch.autograd.Function`` that every
public entry point (:mod:`implicit_torch._implicit_diff`) goes through. Both linear solves are
themselves implicit roots (of ``Aᵀ u + v = 0`` and ``A w + Bθ̇ = 0``, :class:`_LinearProblem`)
going through the same Function, so derivatives of any order are those of the exact solution,
not of the linear solver's iterations; and because the linearisation point is the Function's
*output*, second derivatives include the dependence of ``A`` and ``B`` on ``x*(θ)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _result, _runtime
from implicit_torch._tree import (
    Raveler,
    describe,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_sub,
    tree_unflatten,
)
from implicit_torch.linear import LinearOperator, get_solver, is_builtin

__all__ = ["SYMMETRIC_JACOBIAN", "Problem", "Solve", "apply_root"]

Tensor = torch.Tensor
Solve = str | Callable[..., Any]

# An optimality function with this attribute set to True declares that its Jacobian in the
# solution is symmetric (a stationarity condition F = ∇ₓf, whose Jacobian is a Hessian);
# the engine's operators carry it, and "auto" then chooses CG without probing. The builders of
# implicit_torch.optimality set it.
SYMMETRIC_JACOBIAN = "jacobian_is_symmetric"


class Problem:
    """An optimality condition ``F(sol, *params)`` with its static parts split off.

    The tensor leaves of ``params`` travel through autograd; everything else (Python numbers,
    strings, ``None``) is static and kept here. Only floating-point tensor leaves are
    differentiated.
    """

    def __init__(self, optimality_fn, sol: Any, params: tuple, solve: Solve, batched: bool):
        self.optimality_fn = optimality_fn
        self.solve = get_solver(solve)
        self.batched = batched
        # A stationarity condition F = ∇ₓf says its Jacobian (a Hessian) is symmetric.
        self.symmetric = getattr(optimality_fn, SYMMETRIC_JACOBIAN, None)
        # A layer counting its failures (implicit_torch._result.collecting) around the forward
        # counts those of the backward and jvp too, which run later, outside its forward.
        self.failure_log = _result.current_log()
        self.raveler = Raveler(sol, batched, what="the solution")
        self.sol_spec = self.raveler.spec
        leaves, self.params_spec = tree_flatten(tuple(params))
        self.leaves_template = [None if isinstance(x, Tensor) else x for x in leaves]
        self.tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        tensors = [leaves[i] for i in self.tensor_pos]
        self.diff = [k for k, t in enumerate(tensors) if t.is_floating_point()]
        _check_devices(sol, tensors)

    def tensors_of(self, params: tuple) -> list[Tensor]:
        """The tensor leaves of ``params`` (the inputs autograd sees)."""
        leaves = tree_flatten(tuple(params))[0]
        return [leaves[i] for i in self.tensor_pos]

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
        leaves = self.raveler.check(out, "the output of optimality_fn")
        if any(not leaf.is_floating_point() for leaf in leaves):
            raise TypeError(
                "the output of optimality_fn must have floating-point leaves (a residual "
                f"without a derivative cannot be differentiated), got {describe(out)}"
            )
        return out

    def with_diff(self, tensors, diff_values) -> list:
        """``tensors`` with its floating leaves replaced by ``diff_values``."""
        tensors = list(tensors)
        for k, v in zip(self.diff, diff_values):
            tensors[k] = v
        return tensors

    # -- the two derivative rules ---------------------------------------------------------

    def linearize(self, sol_leaves, tensors, *, transposed: bool) -> LinearOperator:
        """``A = ∂ₓF`` at ``(sol, params)`` as an operator, or ``Aᵀ`` when ``transposed``.

        ``w ↦ A w`` is a Jacobian-vector product and ``u ↦ Aᵀ u`` a vector-Jacobian product
        of ``F`` in ``x`` (``torch.func``, so the operator composes with transforms and is
        differentiable in ``sol`` and ``params``); the vjp is linearised once, on first use.
        Outside torch.func transforms the transpose also gets a value-only version from one
        retained autograd graph, several times cheaper per matvec, which the Krylov solvers
        use (``apply_values``).
        """
        s = self.sol_tree(sol_leaves)

        def F_of_x(x):
            return self.residual(x, tensors)

        def A(w):
            return _runtime.jvp(F_of_x, (s,), (w,))[1]

        vjp_x = None

        def At(u):
            nonlocal vjp_x
            if vjp_x is None:
                _, vjp_x = torch.func.vjp(F_of_x, s)
            return vjp_x(u)[0]

        values = None
        if transposed and not _runtime.under_functorch():
            values = self._values_only_transpose(sol_leaves, tensors)
        forward, backward = (At, A) if transposed else (A, At)
        return LinearOperator(
            forward,
            transpose=backward,
            batched=self.batched,
            symmetric=self.symmetric,
            transposed=transposed,
            apply_values=values,
        )

    def _values_only_transpose(self, sol_leaves, tensors):
        """``u ↦ Aᵀ u`` by ``torch.autograd.grad`` on one retained graph (values only)."""
        graph = None

        def At(u):
            nonlocal graph
            if graph is None:
                with torch.enable_grad():
                    xs = [x.detach().requires_grad_() for x in sol_leaves]
                    out = tree_leaves(
                        self.residual(self.sol_tree(xs), [t.detach() for t in tensors])
                    )
                graph = (xs, out)
            xs, out = graph
            grads = torch.autograd.grad(
                out, xs, tree_leaves(u), retain_graph=True, allow_unused=True
            )
            return self.sol_tree(
                [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]
            )

        return At

    def _linear_solve(self, rhs, sol_leaves, tensors, *, transposed: bool):
        """``x`` with ``Aᵀ x = rhs`` (``transposed``) or ``A x = rhs`` at ``(sol, params)``,
        differentiable in all three (see :func:`_implicit_linear_solve`)."""
        make_op = self.operator_factory(transposed=transposed)
        return _implicit_linear_solve(
            make_op, rhs, (*sol_leaves, *tensors), self.solve, self.batched
        )

    def operator_factory(self, *, transposed: bool) -> Callable[..., LinearOperator]:
        """``operands = (*sol_leaves, *tensors) ↦`` the operator to solve with (``A`` or
        ``Aᵀ``), so that a linear solve built on it is differentiable in those operands."""
        n = self.n_sol()

        def make(*operands):
            return self.linearize(operands[:n], operands[n:], transposed=transposed)

        return make

    def vjp(self, sol_leaves, tensors, cotangents) -> list:
        """``uᵀ ∂F/∂θ`` with ``Aᵀ u = −v``: one gradient per tensor leaf (None if static)."""
        sol = self.sol_tree(sol_leaves)
        cot = [torch.zeros_like(s) if c is None else c for s, c in zip(sol_leaves, cotangents)]
        neg_v = self.sol_tree([-c for c in cot])
        u = self._linear_solve(neg_v, sol_leaves, tensors, transposed=True)
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
        w = self._linear_solve(neg_b_dot, sol_leaves, tensors, transposed=False)
        return tree_leaves(w)


class _ImplicitRoot(torch.autograd.Function):
    """Identity on the solution leaves, differentiated by the implicit function theorem.

    ``apply(problem, *sol_leaves, *param_tensors)``: the solution leaves come from the user's
    solver (detached); the parameter tensors are the tensor leaves of ``params``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: Problem, *leaves: Tensor):
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
        if any(g is not None and _runtime.is_legacy_batched(g) for g in grad_sol):
            raise NotImplementedError(
                "torch.autograd.grad(..., is_grads_batched=True) uses torch's legacy batching, "
                "which cannot run implicit_torch's backward (its detach and loops have no "
                "legacy batching rules). Use torch.func.jacrev, or torch.func.vmap over "
                "torch.func.vjp, to get batched vector-Jacobian products."
            )
        problem: Problem = ctx.problem
        saved = ctx.saved_tensors
        n = problem.n_sol()
        # Autocast off, and float16/bfloat16 promoted: the solve runs in float32 or float64.
        with _runtime.full_precision(), _result.collecting(problem.failure_log):
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
        problem: Problem = ctx.problem
        saved = ctx.saved_tensors
        n = problem.n_sol()
        with (
            _runtime.running_jvp_rule(),
            _runtime.full_precision(),
            _result.collecting(problem.failure_log),
        ):
            up = [_runtime.upcast(t) for t in saved]
            outs = problem.jvp(up[:n], up[n:], [_runtime.upcast(t) for t in tangents[n:]])
        return tuple(o.to(x.dtype) for o, x in zip(outs, saved[:n]))


def _check_user_solve(x, rhs, solve_fn) -> None:
    """A user's ``solve`` must return a pytree shaped like the right-hand side, and finite
    values (a NaN adjoint is a silent NaN gradient; the built-in solvers report their own)."""
    leaves = Raveler(rhs, False, what="the right-hand side").check(
        x, f"the output of solve={solve_fn!r}"
    )
    if not _runtime.can_inspect_values(*leaves):
        return
    finite = torch.stack([torch.isfinite(t).all() for t in leaves]).all().reshape(1)
    if bool(finite.all()):
        return
    status = _result.status_codes(finite, torch.full((1,), torch.nan))
    nan = torch.full((1,), torch.nan, dtype=leaves[0].dtype)
    _result.report(
        f"the linear solve solve={solve_fn!r}",
        _result.SolveInfo(torch.zeros(1, dtype=torch.int64), nan, finite, status, "user"),
        "warn",
        measure="its output is",
        fix="the gradient is NaN or Inf. Check the solver, or use a built-in one.",
        stacklevel=6,
    )


class _LinearProblem(Problem):
    """The optimality condition ``F(x, rhs, *operands) = op(x) − rhs`` of a linear solve with
    ``op = make_op(*operands)``: its Jacobian in ``x`` is ``op`` itself, whose transpose the
    operator knows; so the backward of a linear solve is a solve with ``opᵀ`` and its jvp one
    with ``op``, at any order, without differentiating a vjp to transpose it."""

    def __init__(self, make_op, rhs, params, solve, batched):
        self.make_op = make_op

        def optimality(x, rhs, *operands):
            return tree_sub(make_op(*operands)(x), rhs)

        super().__init__(optimality, rhs, params, solve, batched)

    def operator_factory(self, *, transposed: bool) -> Callable[..., LinearOperator]:
        # operands = (*x_leaves, *rhs_leaves, *op_operands); A does not depend on x or rhs.
        skip = 2 * self.n_sol()

        def make(*operands):
            op = self.make_op(*operands[skip:])
            return op.T if transposed else op

        return make


def _implicit_linear_solve(make_op, rhs, operands, solve, batched):
    """``x`` with ``make_op(*operands) x = rhs``, differentiable in ``rhs`` and ``operands``.

    ``make_op(*operands)`` returns the :class:`~implicit_torch.linear.LinearOperator` to
    invert (a cached linearisation, cheap to apply repeatedly, that knows its transpose).
    Derivatives go through :class:`_ImplicitRoot` with the condition ``op(x) − rhs = 0``
    (:class:`_LinearProblem`).
    """
    solve_fn = get_solver(solve)

    def solver(_init, rhs, *operands):
        return solve_fn(make_op(*operands), rhs)

    params = (rhs, *operands)
    with torch.no_grad():
        sol = solver(None, *params)
    if not is_builtin(solve_fn):
        _check_user_solve(sol, rhs, solve_fn)
    sol = tree_map(torch.Tensor.detach, sol)
    problem = _LinearProblem(make_op, sol, params, solve, batched)
    return apply_root(problem, sol, params)


def apply_root(problem: Problem, sol, params):
    """The solution, through :class:`_ImplicitRoot`: differentiable in the params' tensors."""
    outs = _ImplicitRoot.apply(problem, *tree_leaves(sol), *problem.tensors_of(params))
    return problem.sol_tree(outs)


def _check_devices(sol, tensors) -> None:
    device = tree_leaves(sol)[0].device
    for t in tensors:
        # 0-d CPU tensors mix with any device in torch ops, so they are allowed here too.
        if t.device != device and not (t.device.type == "cpu" and t.dim() == 0):
            raise ValueError(
                f"a parameter tensor of shape {tuple(t.shape)} is on {t.device} "
                f"but the solution is on {device}: move them to one device"
            )
