"""Layers whose outputs are solutions of inner problems, with implicit gradients.

* :class:`ImplicitLayer` — subclass it, define ``solve_forward`` (any forward solver) and
  ``optimality`` (a residual ``F(x, *inputs)`` that is zero at the solution, written with the
  module's own parameters and buffers). ``layer(*inputs)`` returns ``x*`` differentiable in
  the inputs and in every registered parameter by the implicit function theorem.
* :class:`ArgminLayer` — ``x* = argmin_x objective(x, *inputs)``: define ``objective`` (and
  ``initial``); the forward runs gradient descent, the backward differentiates the
  stationarity condition ``∇ₓ objective = 0``.
* :class:`QPLayer` — OptNet-style (Amos & Kolter, 2017) batched quadratic program
  ``argmin_x ½xᵀQx + pᵀx  s.t.  Ax = b, Gx ≤ h`` as a layer, differentiable in all its data.
* :class:`Sparsemax` and :class:`SimplexProjection` — Euclidean projections onto the simplex
  along a dimension (Martins & Astudillo, 2016), with their exact Jacobians.
* :class:`BirkhoffProjection` — scores to doubly-stochastic matrices: Sinkhorn (KL projection)
  or the sparse Euclidean projection, differentiated implicitly.
* :class:`DEQ` — a deep-equilibrium layer ``z* = f(z*, x)`` around any ``nn.Module`` ``f``:
  forward by Anderson acceleration (or plain fixed-point iteration), backward by the implicit
  fixed-point system, or by the cheap phantom / one-step gradient.

Parameters reach the engine through :func:`torch.func.functional_call`: the optimality
function is evaluated with the parameters passed explicitly, so the engine sees them as
inputs and returns their gradients (a module attribute read inside ``optimality`` would
otherwise be a tensor the function closes over, which the engine refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from implicit_torch._implicit_diff import implicit_solve
from implicit_torch._tree import tree_detach, tree_leaves
from implicit_torch.linear_solve import WarmStart, is_builtin
from implicit_torch.projection import kl_projection_birkhoff, projection_birkhoff, simplex_rows
from implicit_torch.solvers.anderson import AndersonAcceleration
from implicit_torch.solvers.broyden import Broyden
from implicit_torch.solvers.fixed_point_iteration import FixedPointIteration
from implicit_torch.solvers.gradient_descent import GradientDescent
from implicit_torch.solvers.qp import QP

__all__ = [
    "DEQ",
    "ArgminLayer",
    "BirkhoffProjection",
    "ImplicitLayer",
    "QPLayer",
    "SimplexProjection",
    "Sparsemax",
]

Tensor = torch.Tensor


class _Call(nn.Module):
    """Calls ``method`` of a module as this module's forward, so that
    :func:`torch.func.functional_call` can run it with substituted parameters. Not registered
    as a child of that module (it would be a cycle); its own child is the module."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args):
        return getattr(self.module, self.method)(*args)


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters (by their names in ``module``): what the engine differentiates."""
    return dict(module.named_parameters())


class ImplicitLayer(nn.Module):
    """An ``nn.Module`` whose output is the solution of an inner problem.

    Subclasses define two methods, using ``self``'s parameters and buffers freely:

    * ``solve_forward(self, init, *inputs) -> x*``: any forward solver (runs under
      ``torch.no_grad``; ``init`` is ``None``, the caller's ``init=``, or the last solution
      when ``warm_start=True``);
    * ``optimality(self, x, *inputs) -> F``: a residual shaped like ``x``, zero at ``x*``.

    ``layer(*inputs, init=None)`` returns ``x*``, differentiable in every tensor input and in
    every registered parameter: ``dx*/dθ = −(∂ₓF)⁻¹ ∂_θF`` (the implicit function theorem),
    with ``∂ₓF`` inverted by the engine's linear solver ``solve``. ``state_dict``, ``.to``,
    ``train``/``eval`` and parameter registration behave as for any module.

    Args:
        solve: linear solver for ``∂ₓF`` (a name such as ``"cg"``, ``"gmres"``, ``"auto"``, or
            a callable ``solve(matvec, b)``); ``"cg"`` needs ``∂ₓF`` symmetric definite, as
            for a stationarity condition.
        batched: dim 0 of the solution indexes independent problems (per-sample inner
            problems): the backward solves them separately.
        warm_start: start each forward solve from the previous call's solution when its
            shape matches (counted in ``warm_starts``); reset with :meth:`reset_warm_start`.
    """

    def __init__(self, *, solve: Any = "cg", batched: bool = False, warm_start: bool = False):
        super().__init__()
        self.solve = solve
        self.batched = batched
        self.warm_start = warm_start
        self.warm_starts = 0
        self._last_solution: Any = None
        # Outside the module registry on purpose (a child holding its parent is a cycle).
        object.__setattr__(self, "_optimality_call", _Call(self, "optimality"))

    def solve_forward(self, init: Any, *inputs: Any) -> Any:
        raise NotImplementedError("subclasses define solve_forward(init, *inputs)")

    def optimality(self, x: Any, *inputs: Any) -> Any:
        raise NotImplementedError("subclasses define optimality(x, *inputs)")

    def reset_warm_start(self) -> None:
        """Forget the stored solution: the next forward starts from ``init`` again."""
        self._last_solution = None

    def _initial_guess(self, init: Any) -> Any:
        if init is not None or not self.warm_start or self._last_solution is None:
            return init
        self.warm_starts += 1
        return self._last_solution

    def forward(self, *inputs: Any, init: Any = None) -> Any:
        params = _named_tensors(self)
        names = tuple(params)
        call = self._optimality_call

        def optimality_fn(x, tensors, *inputs):
            prefixed = {f"module.{n}": t for n, t in zip(names, tensors)}
            return torch.func.functional_call(call, prefixed, (x, *inputs), strict=False)

        def solver(init, _tensors, *inputs):
            return self.solve_forward(init, *inputs)

        init = self._initial_guess(init)
        if self.warm_start and init is not None:
            shapes = [t.shape for t in tree_leaves(init)]
        x = implicit_solve(
            solver,
            optimality_fn,
            init,
            tuple(params.values()),
            *inputs,
            solve=self.solve,
            batched=self.batched,
        )
        if self.warm_start:
            solution = tree_detach(x)
            if init is not None and [t.shape for t in tree_leaves(solution)] != shapes:
                self.warm_starts -= 1  # the guess did not fit: not a warm start after all
            self._last_solution = solution
        return x


class ArgminLayer(ImplicitLayer):
    """``x* = argmin_x objective(x, *inputs)`` as a layer, for a smooth objective.

    Subclasses define ``objective(self, x, *inputs) -> scalar`` (using the module's
    parameters) and ``initial(self, *inputs) -> x0`` (or pass ``init=`` to the call). The
    forward pass runs accelerated gradient descent with a backtracking line search
    (:class:`~implicit_torch.GradientDescent`, ``maxiter``, ``tol`` on ``‖∇ₓ objective‖``;
    non-convergence warns); the backward pass differentiates the stationarity condition
    ``∇ₓ objective(x*, *inputs) = 0``, whose Jacobian is the Hessian, by CG (``solve``).
    """

    def __init__(
        self,
        *,
        maxiter: int = 1000,
        tol: float = 1e-6,
        solve: Any = "cg",
        batched: bool = False,
        warm_start: bool = False,
    ):
        super().__init__(solve=solve, batched=batched, warm_start=warm_start)
        self.maxiter, self.tol = maxiter, tol
        self.last_state: Any = None

    def objective(self, x: Any, *inputs: Any) -> Tensor:
        raise NotImplementedError("subclasses define objective(x, *inputs) -> scalar")

    def initial(self, *inputs: Any) -> Any:
        raise NotImplementedError(
            "define initial(*inputs) -> x0 in the subclass, or call the layer with init="
        )

    def solve_forward(self, init: Any, *inputs: Any) -> Any:
        x0 = self.initial(*inputs) if init is None else init
        solver = GradientDescent(
            fun=self.objective,
            stepsize=0.0,
            acceleration=True,
            maxiter=self.maxiter,
            tol=self.tol,
            implicit_diff=False,
        )
        x, self.last_state = solver.run(x0, *inputs)
        return x

    def optimality(self, x: Any, *inputs: Any) -> Any:
        return torch.func.grad(self.objective)(x, *inputs)


class QPLayer(nn.Module):
    """``x*(Q, p, A, b, G, h) = argmin_x ½ xᵀQx + pᵀx  s.t.  A x = b,  G x ≤ h`` (OptNet).

    ``forward(Q, p, G=None, h=None, A=None, b=None)``: each tensor is shared by the batch
    (``Q (n, n)``, ``p (n,)``, ``G (m, n)``, ...) or per problem with a leading batch
    dimension (``Q (B, n, n)``, ``p (B, n)``, ...); register learnable ones as parameters of
    a surrounding module and pass them in. Returns ``x*`` of shape ``(B, n)`` (``(n,)`` when
    nothing is batched), differentiable in every tensor through the KKT conditions (a shared
    tensor gets the sum of the per-problem gradients: unlike qpth, which averages them).

    Solved by :class:`~implicit_torch.QP` (batched primal-dual interior point); ``Q`` must be
    positive definite and ``A`` of full row rank. Non-convergence (an infeasible problem)
    warns, or raises with ``on_failure="raise"``; ``last_state`` holds the solver's state.

    Args:
        maxiter, tol, on_failure: passed to :class:`~implicit_torch.QP`.
    """

    def __init__(self, *, maxiter: int = 50, tol: float | None = None, on_failure: str = "warn"):
        super().__init__()
        self.maxiter, self.tol, self.on_failure = maxiter, tol, on_failure
        self.last_state: Any = None

    def forward(self, Q, p, G=None, h=None, A=None, b=None) -> Tensor:
        if (G is None) != (h is None) or (A is None) != (b is None):
            raise ValueError("QPLayer: pass G with h, and A with b")
        if G is None:
            raise ValueError(
                "QPLayer: no inequality constraints given (G, h); for equality constraints "
                "only use implicit_torch.EqualityConstrainedQP"
            )
        solver = QP(maxiter=self.maxiter, tol=self.tol, on_failure=self.on_failure)
        params_eq = None if A is None else (A, b)
        solution, self.last_state = solver.run(None, (Q, p), params_eq, (G, h))
        return solution.primal

    def extra_repr(self) -> str:
        return f"maxiter={self.maxiter}, tol={self.tol}"


class SimplexProjection(nn.Module):
    """``argmin_{p ∈ Δ} ‖p − x‖²`` along ``dim``, with ``Δ = {p ≥ 0, Σp = value}``.

    The Jacobian is exact (``diag(s) − s sᵀ/|s|`` on the support ``s``), from
    :func:`implicit_torch.projection.simplex_rows`. Any shape; ``dim`` is projected.
    """

    def __init__(self, dim: int = -1, value: float = 1.0):
        super().__init__()
        self.dim, self.value = dim, value

    def forward(self, x: Tensor) -> Tensor:
        return simplex_rows(x.movedim(self.dim, -1), self.value).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, value={self.value}"


class Sparsemax(SimplexProjection):
    """Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of the scores onto the
    probability simplex along ``dim``; like softmax, but with exact zeros."""

    def __init__(self, dim: int = -1):
        super().__init__(dim=dim, value=1.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class BirkhoffProjection(nn.Module):
    """Score matrices ``S`` (``(..., n, n)``) to doubly-stochastic matrices ``P``.

    * ``kind="kl"``: ``P = argmin_{P ∈ B} KL(P ‖ exp S)``, Sinkhorn's normalisation (dense,
      positive ``P``), differentiated through the Sinkhorn fixed point
      (:func:`implicit_torch.projection.kl_projection_birkhoff`);
    * ``kind="euclidean"``: ``P = argmin_{P ∈ B} ‖P − S‖²`` (sparse ``P``; a permutation for
      well-separated scores), differentiated through its optimality conditions
      (:func:`implicit_torch.projection.projection_birkhoff`).

    Leading dimensions are a batch, projected one matrix at a time. Non-convergence within
    ``max_iter`` warns (``on_failure="raise"``: an error).
    """

    def __init__(
        self, kind: str = "kl", *, max_iter: int = 1000, tol: float = 1e-6, on_failure="warn"
    ):
        super().__init__()
        if kind not in ("kl", "euclidean"):
            raise ValueError(f"kind must be 'kl' or 'euclidean', got {kind!r}")
        self.kind, self.max_iter, self.tol, self.on_failure = kind, max_iter, tol, on_failure

    def forward(self, scores: Tensor) -> Tensor:
        if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
            raise ValueError(
                f"BirkhoffProjection: scores must have shape (..., n, n), got {tuple(scores.shape)}"
            )
        project = kl_projection_birkhoff if self.kind == "kl" else projection_birkhoff
        flat = scores.reshape(-1, *scores.shape[-2:])
        out = [project(S, self.max_iter, self.tol, self.on_failure) for S in flat.unbind(0)]
        return torch.stack(out).reshape(scores.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, max_iter={self.max_iter}, tol={self.tol}"


class DEQ(nn.Module):
    """Deep-equilibrium layer: ``z* = f(z*, x)`` for an ``nn.Module`` ``f(z, x) -> z``.

    Forward: Anderson acceleration (``solver="anderson"``), limited-memory Broyden on
    ``f(z) − z`` (``"broyden"``, ``4 · history_size`` rank-one terms) or fixed-point iteration
    (``"fixed_point"``) from ``z0`` (zeros, or the previous solution with ``warm_start``), at
    most ``maxiter`` iterations to ``‖f(z, x) − z‖ ≤ tol``; non-convergence warns (or raises
    with ``on_failure="raise"``), and ``last_state`` holds the solver's final state.

    Backward, by ``backward``:

    * ``"implicit"``: the exact gradient at the fixed point, ``dz*/dθ = (I − ∂_z f)⁻¹ ∂_θ f``,
      with ``(I − ∂_z f)ᵀ`` inverted by ``backward_solve`` (``"gmres"`` by default; any engine
      solver name or callable, e.g. ``"neumann"`` for the truncated Neumann series when ``f``
      is contractive). With ``warm_start=True`` the backward solve also starts from the
      previous call's adjoint (:class:`~implicit_torch.WarmStart`; its ``iterations`` list,
      ``deq.backward_solve.iterations``, records what each solve took).
    * ``"phantom"``: the phantom gradient (Geng et al., 2021): ``k = phantom_steps`` damped
      steps ``z ← (1 − λ) z + λ f(z, x)`` from ``z*`` with autograd recording
      (``λ = phantom_damping``); ``k = 1, λ = 1`` is the one-step (Jacobian-free) gradient of
      Fung et al. (2022). Cheaper than the implicit gradient, and only an approximation.

    Shapes: ``x`` and ``z`` are whatever ``f`` takes; ``z0`` defaults to ``zeros(z_shape)``
    where ``z_shape`` is given at construction or ``x``'s shape.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        z_shape: Callable[[Tensor], tuple[int, ...]] | None = None,
        solver: str = "anderson",
        maxiter: int = 50,
        tol: float = 1e-4,
        history_size: int = 5,
        backward: str = "implicit",
        backward_solve: Any = "gmres",
        phantom_steps: int = 1,
        phantom_damping: float = 1.0,
        warm_start: bool = False,
        on_failure: str = "warn",
    ):
        super().__init__()
        if solver not in ("anderson", "broyden", "fixed_point"):
            raise ValueError(
                f"solver must be 'anderson', 'broyden' or 'fixed_point', got {solver!r}"
            )
        if backward not in ("implicit", "phantom"):
            raise ValueError(f"backward must be 'implicit' or 'phantom', got {backward!r}")
        if phantom_steps < 1 or not 0 < phantom_damping <= 1:
            raise ValueError(
                "phantom_steps must be ≥ 1 and phantom_damping in (0, 1], got "
                f"{phantom_steps} and {phantom_damping}"
            )
        self.f = f
        self.z_shape = z_shape
        self.solver = solver
        self.maxiter, self.tol, self.history_size = maxiter, tol, history_size
        if warm_start and not isinstance(backward_solve, WarmStart):
            # built-in solvers get the previous adjoint as init; a user callable is left alone
            if isinstance(backward_solve, str) or is_builtin(backward_solve):
                backward_solve = WarmStart(backward_solve)
        self.backward, self.backward_solve = backward, backward_solve
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.warm_start = warm_start
        self.on_failure = on_failure
        self.last_state: Any = None
        self.warm_starts = 0
        self._last_solution: Tensor | None = None
        object.__setattr__(self, "_f_call", _Call(f, "forward"))

    def reset_warm_start(self) -> None:
        self._last_solution = None
        if isinstance(self.backward_solve, WarmStart):
            self.backward_solve.reset()

    def _fixed_point_solver(self, T, implicit: bool):
        common = dict(
            maxiter=self.maxiter,
            tol=self.tol,
            implicit_diff=implicit,
            implicit_diff_solve=self.backward_solve,
            on_failure=self.on_failure,
        )
        if self.solver == "anderson":
            return AndersonAcceleration(fixed_point_fun=T, history_size=self.history_size, **common)
        if self.solver == "broyden":
            # limited-memory Broyden on F(z) = f(z) − z, starting from J₀ = −I (exact when
            # ∂f/∂z = 0); its implicit derivative is the same fixed-point system's
            return Broyden(
                fun=lambda z, *a: T(z, *a) - z,
                jacobian_init=-1.0,
                memory_size=max(self.history_size, 1) * 4,
                **common,
            )
        return FixedPointIteration(fixed_point_fun=T, **common)

    def _z0(self, x: Tensor, z0: Tensor | None) -> Tensor:
        if z0 is not None:
            return z0
        shape = tuple(self.z_shape(x)) if self.z_shape is not None else tuple(x.shape)
        last = self._last_solution
        if self.warm_start and last is not None and tuple(last.shape) == shape:
            self.warm_starts += 1
            return last
        return torch.zeros(shape, dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        params = _named_tensors(self.f)
        names = tuple(params)
        call = self._f_call

        def T(z, tensors, x):
            prefixed = {f"module.{n}": t for n, t in zip(names, tensors)}
            return torch.func.functional_call(call, prefixed, (z, x), strict=False)

        init = self._z0(x, z0)
        tensors = tuple(params.values())
        if self.backward == "implicit":
            z, state = self._fixed_point_solver(T, implicit=True).run(init, tensors, x)
        else:
            with torch.no_grad():
                z, state = self._fixed_point_solver(T, implicit=False).run(init, tensors, x)
            lam = self.phantom_damping
            for _ in range(self.phantom_steps):
                z = (1 - lam) * z + lam * self.f(z, x)
        self.last_state = state
        if self.warm_start:
            self._last_solution = z.detach()
        return z
