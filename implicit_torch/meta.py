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

import warnings
from collections.abc import Callable
from typing import Any

import torch

from implicit_torch import _runtime
from implicit_torch._errors import ConvergenceWarning
from implicit_torch._implicit_diff import implicit_solve
from implicit_torch._tree import tree_leaves, tree_map

__all__ = ["imaml_adapt"]

Tensor = torch.Tensor


def _report_inner(step: Any, n_tasks: int, inner_steps: int, tol: float) -> None:
    """Warn when gradient descent ran out of steps (or diverged) before ``tol``."""
    if not _runtime.can_inspect_values():
        return
    norms = sum(g.reshape(n_tasks, -1).square().sum(-1) for g in tree_leaves(step)).sqrt()
    bad = ~(norms <= tol)  # NaN counts as not converged
    if bool(bad.any()):
        warnings.warn(
            f"implicit_torch: imaml_adapt's inner gradient descent did not converge for "
            f"{int(bad.sum())} of {n_tasks} tasks in {inner_steps} steps: gradient norm up to "
            f"{float(norms.max()):.3e} > tol={tol:g}. The adapted parameters and the "
            f"meta-gradient are inaccurate: raise inner_steps, tune inner_lr (too large "
            f"diverges), or pass an inner_solver.",
            ConvergenceWarning,
            stacklevel=3,
        )


def imaml_adapt(
    task_loss: Callable[..., Tensor],
    meta_params: Any,
    *task_data: Tensor,
    reg: float,
    inner_lr: float,
    inner_steps: int = 100,
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
        inner_lr, inner_steps, tol: the default inner solver, gradient descent on the
            regularised objective, stopping for all tasks once every task's gradient norm is
            ``≤ tol`` (``inner_lr`` must be below ``2 / (L + reg)``, ``L`` the task losses'
            smoothness).
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

    def gradient_descent(_init, theta, shared, *data):
        phi = tree_map(lambda t: t.detach().expand(n_tasks, *t.shape).clone(), theta)
        for _ in range(inner_steps):
            step = optimality(phi, theta, shared, *data)
            leaves = tree_leaves(step)
            norms = torch.stack([g.reshape(n_tasks, -1).square().sum(-1) for g in leaves])
            if bool((norms.sum(0).sqrt() <= tol).all()):
                break
            phi = tree_map(lambda p, g: p - inner_lr * g, phi, step)
        else:
            _report_inner(optimality(phi, theta, shared, *data), n_tasks, inner_steps, tol)
        return phi

    if inner_solver is None:
        solver = gradient_descent
    else:

        def solver(_init, theta, shared, *data):
            return inner_solver(theta, shared, *data)

    return implicit_solve(
        solver, optimality, None, meta_params, shared, *task_data, solve=solve, batched=True
    )
