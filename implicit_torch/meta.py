"""Meta-learning with implicit gradients: iMAML (Rajeswaran et al., 2019).

Each task ``i`` adapts the meta-parameters ``θ`` by solving a proximally regularised problem

    φᵢ*(θ) = argmin_φ  Lᵢ(φ) + (reg / 2) ‖φ − θ‖²,

and the meta-gradient of an outer loss through ``φᵢ*`` follows from the stationarity
condition ``∇Lᵢ(φᵢ*) + reg (φᵢ* − θ) = 0``:

    dφᵢ*/dθ = reg (∇²Lᵢ(φᵢ*) + reg I)⁻¹,

one linear solve per task (CG: the matrix is symmetric, and positive definite where the task
loss is convex or ``reg`` dominates its negative curvature), whatever inner optimiser and
however many inner steps found ``φᵢ*``. :func:`imaml_adapt` solves all tasks at once: the
task losses are vmapped, the inner loop runs on the stacked parameters, and the engine's
``batched=True`` mode keeps the backward solves per task (the shared ``θ`` gets the sum of
the per-task gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit_torch._implicit_diff import implicit_solve
from implicit_torch._loop import Cadence, iterate
from implicit_torch._result import SolveInfo, check_maxiter, check_tolerances, report, status_codes
from implicit_torch._tree import tree_leaves, tree_map

__all__ = ["imaml_adapt"]

Tensor = torch.Tensor


def _task_norms(grads: Any, n_tasks: int) -> Tensor:
    """``‖∇Lᵢ(φᵢ) + reg (φᵢ − θ)‖`` per task (T,), over all leaves."""
    return sum(g.reshape(n_tasks, -1).square().sum(-1) for g in tree_leaves(grads)).sqrt()


def _gradient_descent(optimality, n_tasks: int, inner_lr: float, maxiter: int, tol: float):
    """The default inner solver: ``φ ← φ − inner_lr · (∇L(φ) + reg (φ − θ))`` for all tasks at
    once from ``φ = θ``, each task frozen once its gradient norm is ``≤ tol`` (so the result
    does not depend on the cadence of the host checks), on the package's driver."""

    def solve(_init, theta, shared, *data):
        phi = tree_map(lambda t: t.detach().expand(n_tasks, *t.shape).clone(), theta)
        grads = optimality(phi, theta, shared, *data)
        norms = _task_norms(grads, n_tasks)
        iters = torch.zeros(n_tasks, dtype=torch.int64, device=norms.device)

        def step(state):
            phi, grads, norms, iters = state
            active = norms > tol  # NaN: not active; reported below

            def move(p, g):
                mask = active.reshape(-1, *(1,) * (p.dim() - 1))
                return torch.where(mask, p - inner_lr * g, p)

            phi = tree_map(move, phi, grads)
            grads = optimality(phi, theta, shared, *data)
            return phi, grads, _task_norms(grads, n_tasks), iters + active

        cadence = Cadence(norms.device, norms)
        (phi, _, norms, iters), _ = iterate(
            step,
            (phi, grads, norms, iters),
            active=lambda state: state[2] > tol,
            maxiter=maxiter,
            cadence=cadence,
        )
        if cadence.inspect:
            converged = norms <= tol
            info = SolveInfo(iters, norms, converged, status_codes(converged, norms))
            report(
                "imaml_adapt's inner gradient descent",
                info,
                "warn",
                measure="gradient norm",
                target=f"tol={tol:g}",
                maxiter=maxiter,
                fix="raise maxiter, tune inner_lr (too large diverges), or pass an inner_solver.",
            )
        return phi

    return solve


def imaml_adapt(
    task_loss: Callable[..., Tensor],
    meta_params: Any,
    *task_data: Tensor,
    reg: float,
    inner_lr: float,
    maxiter: int = 100,
    tol: float = 1e-6,
    solve: Any = "cg",
    shared: Any = None,
    inner_solver: Callable[..., Any] | None = None,
) -> Any:
    """Adapt ``meta_params`` to every task, differentiably (iMAML).

    Args:
        task_loss: ``task_loss(params, *data) -> scalar`` for ONE task, ``params`` a pytree
            like ``meta_params`` (e.g. a dict of a model's parameters, used with
            :func:`torch.func.functional_call`).
        meta_params: ``θ``, a tensor or pytree of tensors (no task dimension).
        *task_data: tensors whose dim 0 indexes the ``T`` tasks (e.g. ``(T, K, d)`` inputs
            and ``(T, K)`` targets); each task's slice is passed to ``task_loss``.
        reg: the proximal strength ``reg > 0``.
        inner_lr, maxiter, tol: the default inner solver, gradient descent on the
            regularised objective for at most ``maxiter`` steps, each task stopping once its
            gradient norm is ``≤ tol`` (``inner_lr`` must be below ``2 / (L + reg)``, ``L`` the
            task losses' smoothness). A task that does not converge is reported with a
            :class:`~implicit_torch.ConvergenceWarning`.
        inner_solver: any other forward solver, ``inner_solver(theta, shared, *task_data) ->
            φ*`` with a leading task dimension (run without autograd; only its result matters,
            the gradient comes from the stationarity condition).
        solve: the engine's linear solver for ``∇²Lᵢ + reg I`` (per task).
        shared: optional parameters every task uses but does not adapt (e.g. a feature
            extractor meta-learned in the outer loop, with only a head adapted per task);
            passed last, ``task_loss(params, *data, shared)``, and differentiable too (it gets
            the sum of the per-task gradients).

    Returns:
        ``φ*``: a pytree like ``meta_params`` whose leaves have a leading task dimension
        ``T``; differentiable in ``meta_params`` (and in ``task_data``) by the implicit
        function theorem.

    Raises:
        ValueError: for ``reg ≤ 0``, no task data, or task data whose dim 0 disagree.
    """
    if not reg > 0:
        raise ValueError(f"reg must be positive, got {reg}")
    check_maxiter(maxiter)
    check_tolerances(tol)
    if not task_data:
        raise ValueError("imaml_adapt needs task data: tensors whose dim 0 indexes the tasks")
    n_tasks = task_data[0].shape[0]
    if any(t.shape[0] != n_tasks for t in task_data):
        raise ValueError(
            "every task_data tensor must have the number of tasks as dim 0, got shapes "
            f"{[tuple(t.shape) for t in task_data]}"
        )
    in_dims = (0,) * (1 + len(task_data)) + (() if shared is None else (None,))
    task_grads = torch.func.vmap(torch.func.grad(task_loss), in_dims=in_dims)

    def optimality(phi, theta, shared, *data):
        # ∇Lᵢ(φᵢ) + reg (φᵢ − θ), for all tasks at once
        grads = task_grads(phi, *data) if shared is None else task_grads(phi, *data, shared)
        return tree_map(lambda g, p, t: g + reg * (p - t), grads, phi, theta)

    if inner_solver is None:
        solver = _gradient_descent(optimality, n_tasks, inner_lr, maxiter, tol)
    else:

        def solver(_init, theta, shared, *data):
            return inner_solver(theta, shared, *data)

    # The engine checks that a user's inner solver returned a root; gradient descent reports
    # its own failures, so the check would repeat them.
    check = "warn" if inner_solver is not None else "ignore"
    return implicit_solve(
        solver,
        optimality,
        None,
        meta_params,
        shared,
        *task_data,
        solve=solve,
        batched=True,
        on_failure=check,
    )
