"""Limited-memory BFGS with a backtracking (Armijo) line search."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from implicit_torch._loop import Cadence
from implicit_torch._tree import Raveler
from implicit_torch.optimality import make_stationarity_fun
from implicit_torch.solvers.base import (
    IterativeSolver,
    OptStep,
    moved,
    objective_value_and_grad,
)

__all__ = ["LBFGS", "LbfgsState"]

Tensor = torch.Tensor


class LbfgsState(NamedTuple):
    """State of :class:`LBFGS`; ``N`` is the number of unknowns (all leaves, flattened).

    Attributes:
        iter_num: iterations run (int64, 0-d).
        value: ``fun(x)`` at the current iterate (0-d).
        grad: ``∇fun(x)``, flattened, ``(N,)``.
        error: ``‖∇fun(x)‖`` at the current iterate.
        stepsize: the step ``t`` of the last iteration's line search (0-d).
        s_history: ``(history_size, N)``, the last steps ``s_i = x_{i+1} − x_i``, oldest
            first (rows with ``rho = 0`` are empty).
        y_history: ``(history_size, N)``, the gradient changes ``y_i = ∇fun(x_{i+1}) −
            ∇fun(x_i)``.
        rho_history: ``(history_size,)``, ``1 / ⟨s_i, y_i⟩``, or 0 for an empty row.
        stalled: the last iteration did not move ``x`` although it had nothing left to try: its
            line search failed along steepest descent (an empty history), or accepted a step
            below the rounding of ``x``. The next iteration would be the same, so the solver
            stops and reports it (bool, 0-d).
    """

    iter_num: Tensor
    value: Tensor
    grad: Tensor
    error: Tensor
    stepsize: Tensor
    s_history: Tensor
    y_history: Tensor
    rho_history: Tensor
    stalled: Tensor


@dataclasses.dataclass
class LBFGS(IterativeSolver):
    """Limited-memory BFGS (Nocedal, 1980; Liu & Nocedal, 1989) for ``min_x fun(x, *args)``.

    Direction ``d = −H ∇fun(x)``, with ``H`` the inverse-Hessian approximation given by the
    two-loop recursion over the last ``history_size`` pairs ``(s_i, y_i)`` and the initial
    scaling ``H₀ = ⟨s, y⟩ / ⟨y, y⟩ · I`` of the newest pair (Nocedal & Wright, 2006, Alg. 7.4
    and eq. 7.20). Without a pair yet (first iteration, or after a failed line search),
    ``H₀ = I / max(1, ‖∇fun(x)‖)``, so that the first trial step has length at most 1.

    Step: ``x⁺ = x + t d``, with ``φ(t) = fun(x + t d)``. With ``stepsize > 0``,
    ``t = stepsize``. Otherwise a line search starting from ``t = max_stepsize``:

    * ``linesearch="zoom"`` (default, as JAXopt's): strong Wolfe conditions, sufficient
      decrease ``φ(t) ≤ φ(0) + c1 t φ'(0)`` and curvature ``|φ'(t)| ≤ c2 |φ'(0)|``, by
      bracketing (doubling ``t``) and zooming with safeguarded cubic interpolation (Nocedal &
      Wright, 2006, Alg. 3.5–3.6). If the conditions are not met within ``maxls`` trials, the
      trial with sufficient decrease and the lowest ``φ`` is taken.
    * ``linesearch="backtracking"``: ``t = max_stepsize · decrease_factorʲ``, ``j = 0 … maxls −
      1``, the first with sufficient decrease (Armijo).

    Sufficient decrease is tested up to float rounding of ``fun``. If no trial has it, the
    iterate does not move and the history is cleared (the next direction is steepest descent);
    if that happens along steepest descent already, or an accepted step no longer moves ``x``
    (below its rounding), the line search has nothing left to try: the solver stops and
    reports it (``state.stalled``, e.g. ``fun`` NaN beyond the returned point).
    A pair ``(s, y)`` enters the history only with positive curvature ``⟨s, y⟩ > ε ‖s‖ ‖y‖``
    (always true after a strong-Wolfe step), which keeps ``H`` positive definite. Iterations
    have static shapes: the history is a shift register and the line searches are masked
    ``torch.where`` state machines with ``maxls`` trials (on the CPU outside transforms they
    stop at the first accepted trial).

    ``run(init_params, *args)``; ``init_params`` a tensor or pytree (flattened internally, so leaves
    may have any shapes; one problem, not batched). The solution is differentiable in ``args``
    through the stationarity condition ``∇ₓfun(x*, *args) = 0`` (default linear solver CG, the
    Hessian being symmetric). ``state.error = ‖∇fun(x)‖`` at the returned iterate.

    Attributes:
        fun: ``fun(x, *args)``, a scalar (0-d) tensor.
        history_size: number of pairs ``(s_i, y_i)`` kept (``m``).
        stepsize: ``> 0`` a fixed step ``t``; ``≤ 0`` (default) the line search.
        max_stepsize: first trial step of the line search (1: the quasi-Newton step).
        decrease_factor: step shrink factor of the backtracking line search.
        linesearch: ``"zoom"`` (strong Wolfe) or ``"backtracking"`` (Armijo).
        maxls: maximum number of trials (function and gradient evaluations) per line search.
        c1: sufficient-decrease (Armijo) constant.
        c2: curvature constant of the strong Wolfe conditions (``c1 < c2 < 1``).
        value_and_grad: ``fun`` returns ``(value, gradient)`` itself (JAXopt's option), e.g.
            an analytic gradient, saving the autograd pass of every evaluation; the gradient
            must be written in torch operations, since implicit differentiation (and
            ``unroll``) differentiates it.
        maxiter, tol, ...: see :class:`~implicit_torch.solvers.base.IterativeSolver`.
    """

    fun: Callable[..., Tensor]
    history_size: int = 10
    stepsize: float = 0.0
    max_stepsize: float = 1.0
    decrease_factor: float = 0.5
    linesearch: str = "zoom"
    maxls: int = 20
    c1: float = 1e-4
    c2: float = 0.9
    value_and_grad: bool = False

    def default_implicit_diff_solve(self) -> str:
        """CG: ``∂ₓF`` is the Hessian of ``fun``, symmetric."""
        return "cg"

    def _check(self) -> None:
        if self.history_size < 1:
            raise ValueError(f"history_size must be a positive integer, got {self.history_size}")
        if self.stepsize <= 0:
            if not 0 < self.decrease_factor < 1:
                raise ValueError(f"decrease_factor must be in (0, 1), got {self.decrease_factor}")
            if self.maxls < 1 or not self.max_stepsize > 0:
                raise ValueError("maxls must be a positive integer and max_stepsize positive")
            if self.linesearch not in ("zoom", "backtracking"):
                raise ValueError(
                    f"linesearch must be 'zoom' or 'backtracking', got {self.linesearch!r}"
                )
            if not 0 < self.c1 < self.c2 < 1:
                raise ValueError(f"need 0 < c1 < c2 < 1, got c1={self.c1}, c2={self.c2}")

    def init_state(self, init_params: Any, *args: Any) -> LbfgsState:
        """Evaluates ``fun`` and its gradient at ``init_params``; an empty history."""
        self._check()
        raveler = Raveler(init_params, batched=False, what="init_params")
        value, grad = self._value_and_grad(init_params, args)
        g = raveler.ravel(grad).reshape(-1)
        m, n = self.history_size, g.numel()
        kw = dict(dtype=g.dtype, device=g.device)
        return LbfgsState(
            iter_num=torch.zeros((), dtype=torch.int64, device=g.device),
            value=value.to(g.dtype),
            grad=g,
            error=torch.linalg.vector_norm(g),
            stepsize=torch.tensor(self.max_stepsize if self.stepsize <= 0 else self.stepsize, **kw),
            s_history=torch.zeros((m, n), **kw),
            y_history=torch.zeros((m, n), **kw),
            rho_history=torch.zeros((m,), **kw),
            stalled=torch.zeros((), dtype=torch.bool, device=g.device),
        )

    def update(self, params: Any, state: LbfgsState, *args: Any) -> OptStep:
        """One L-BFGS iteration: two-loop direction, line search, history update."""
        raveler = Raveler(params, batched=False, what="params")
        x = raveler.ravel(params).reshape(-1)
        g = state.grad
        d = -_two_loop(g, state.s_history, state.y_history, state.rho_history)
        slope = torch.dot(g, d)
        # H is positive definite by construction; the guard only catches rounding.
        descent = slope < 0
        d = torch.where(descent, d, -g)
        slope = torch.where(descent, slope, -torch.dot(g, g))

        def evaluate(t):
            x_t = x + t * d
            value, grad = self._value_and_grad(raveler.unravel(x_t.reshape(1, -1)), args)
            return x_t, value.to(x.dtype), raveler.ravel(grad).reshape(-1)

        if self.stepsize > 0:
            t = torch.full_like(state.value, self.stepsize)
            x_new, f_new, g_new = evaluate(t)
            accepted = torch.ones((), dtype=torch.bool, device=x.device)
        else:
            search = self._zoom if self.linesearch == "zoom" else self._backtracking
            t, x_new, f_new, g_new, accepted = search(evaluate, state.value, slope, d)
        x_new = torch.where(accepted, x_new, x)
        f_new = torch.where(accepted, f_new, state.value)
        g_new = torch.where(accepted, g_new, g)
        # Nothing left to try: the search failed along steepest descent (no history), or its
        # step is below the rounding of x. Either way the next iteration would repeat this one.
        steepest = (state.rho_history == 0).all()
        stalled = ~moved(x_new, x) & (accepted | steepest) & (state.error > 0)

        s, y = x_new - x, g_new - g
        sy = torch.dot(s, y)
        eps = torch.finfo(x.dtype).eps
        curvature = sy > eps * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)
        push = accepted & curvature
        S = torch.where(push, torch.cat([state.s_history[1:], s[None]]), state.s_history)
        Y = torch.where(push, torch.cat([state.y_history[1:], y[None]]), state.y_history)
        rho_new = torch.where(curvature, 1 / torch.where(curvature, sy, 1), 0)
        rho = torch.where(
            push, torch.cat([state.rho_history[1:], rho_new[None]]), state.rho_history
        )
        # A failed line search clears the history: the next direction is steepest descent.
        rho = torch.where(accepted, rho, torch.zeros_like(rho))
        new_state = LbfgsState(
            iter_num=state.iter_num + 1,
            value=f_new,
            grad=g_new,
            error=torch.linalg.vector_norm(g_new),
            stepsize=torch.where(accepted, t, torch.zeros_like(t)),
            s_history=S,
            y_history=Y,
            rho_history=rho,
            stalled=stalled,
        )
        return OptStep(raveler.unravel(x_new.reshape(1, -1)), new_state)

    def _backtracking(self, evaluate, f0: Tensor, slope: Tensor, d: Tensor):
        """Backtracking from ``max_stepsize``; returns ``(t, x_t, f_t, g_t, accepted)`` for the
        first accepted trial (the last trial if none is)."""
        stop_early = Cadence(f0.device, f0).every_step
        # Near a minimum the decrease of fun falls below its float resolution.
        slack = 10 * torch.finfo(f0.dtype).eps * f0.abs()
        accepted = torch.zeros((), dtype=torch.bool, device=f0.device)
        t = torch.full_like(f0, self.max_stepsize)
        out = None
        for _ in range(self.maxls):
            trial = evaluate(t)
            ok = (trial[1] <= f0 + self.c1 * t * slope + slack) & torch.isfinite(trial[1])
            if out is None:
                out = (t, *trial)
            else:
                out = tuple(torch.where(accepted, a, b) for a, b in zip(out, (t, *trial)))
            accepted = accepted | ok
            if stop_early and bool(accepted):
                break
            t = t * self.decrease_factor
        return (*out, accepted)

    def _zoom(self, evaluate, f0: Tensor, slope: Tensor, d: Tensor):
        """A strong-Wolfe line search (Nocedal & Wright, 2006, Alg. 3.5 and 3.6), masked.

        Looks for ``t`` with ``φ(t) ≤ φ(0) + c1 t φ'(0)`` and ``|φ'(t)| ≤ c2 |φ'(0)|``, where
        ``φ(t) = fun(x + t d)``. Bracketing phase: from ``max_stepsize``, the step doubles
        while it keeps sufficient decrease and a negative slope; once an interval
        ``[lo, hi]`` holding such a ``t`` is known, the zoom phase tries the minimiser of the
        cubic interpolating ``φ`` and ``φ'`` at both ends (the midpoint when that falls outside
        the middle 80% of the interval). ``lo`` always has sufficient decrease: if no trial
        satisfies both conditions within ``maxls``, ``lo`` is returned (accepted if
        ``lo > 0``). Every branch is a ``torch.where`` on 0-d tensors, so all ``maxls`` trials
        run under transforms and on accelerators; on the CPU the search stops once it
        succeeds.
        """
        stop_early = Cadence(f0.device, f0).every_step
        slack = 10 * torch.finfo(f0.dtype).eps * f0.abs()
        zero = torch.zeros_like(f0)
        false = torch.zeros((), dtype=torch.bool, device=f0.device)
        # lo: (t, f, φ', x, g); hi: (t, f, φ'). lo starts at t = 0, where x and g are unknown
        # here: the caller keeps x when lo stays at 0 (accepted is False then).
        t_lo, f_lo, d_lo = zero, f0, slope
        x_lo = g_lo = None
        t_hi, f_hi, d_hi = zero, f0, slope
        bracketed, done = false, false
        t = torch.full_like(f0, self.max_stepsize)
        for _ in range(self.maxls):
            x_t, f_t, g_t = evaluate(t)
            d_t = torch.dot(g_t, d)
            finite = torch.isfinite(f_t) & torch.isfinite(d_t)
            armijo = (f_t <= f0 + self.c1 * t * slope + slack) & finite
            wolfe = armijo & (d_t.abs() <= self.c2 * slope.abs())
            # Where the search already ended nothing changes.
            live = ~done
            # The new point replaces hi when it lacks sufficient decrease (or is above lo).
            to_hi = live & ~wolfe & (~armijo | (f_t >= f_lo))
            # Otherwise it becomes lo; the old lo becomes hi when the slope at t points back
            # towards it (bracketed) or, before bracketing, when φ'(t) ≥ 0.
            to_lo = live & ~wolfe & ~to_hi
            flip = to_lo & torch.where(bracketed, d_t * (t_hi - t_lo) >= 0, d_t >= 0)
            new_hi = (
                torch.where(to_hi, t, torch.where(flip, t_lo, t_hi)),
                torch.where(to_hi, f_t, torch.where(flip, f_lo, f_hi)),
                torch.where(to_hi, d_t, torch.where(flip, d_lo, d_hi)),
            )
            take_lo = to_lo | (live & wolfe)
            if x_lo is None:
                x_lo, g_lo = x_t, g_t
            else:
                x_lo = torch.where(take_lo, x_t, x_lo)
                g_lo = torch.where(take_lo, g_t, g_lo)
            t_lo = torch.where(take_lo, t, t_lo)
            f_lo = torch.where(take_lo, f_t, f_lo)
            d_lo = torch.where(take_lo, d_t, d_lo)
            t_hi, f_hi, d_hi = new_hi
            bracketed = bracketed | to_hi | flip
            done = done | (live & wolfe)
            if stop_early and bool(done):
                break
            # Before bracketing t is the new lo: expand.
            t = torch.where(bracketed, _cubic_step(t_lo, f_lo, d_lo, t_hi, f_hi, d_hi), 2 * t)
        accepted = t_lo > 0
        return t_lo, x_lo, f_lo, g_lo, accepted

    def _scalar_fun(self, x: Any, *args: Any) -> Tensor:
        value = self.fun(x, *args)
        _check_scalar(value)
        return value.reshape(())

    def _value_and_grad(self, x: Any, args: tuple) -> tuple[Tensor, Any]:
        if not self.value_and_grad:
            return objective_value_and_grad(self._scalar_fun, x, args, False)
        value, grad = objective_value_and_grad(self.fun, x, args, True)
        _check_scalar(value)
        return value.reshape(()), grad

    def optimality_fun(self, params: Any, *args: Any) -> Any:
        """``∇ₓ fun(params, *args)``."""
        return make_stationarity_fun(self.fun, self.value_and_grad)(params, *args)


def _two_loop(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor) -> Tensor:
    """``H g`` by the L-BFGS two-loop recursion (rows with ``rho = 0`` contribute nothing)."""
    q = g
    alphas = []
    for i in reversed(range(S.shape[0])):
        a = rho[i] * torch.dot(S[i], q)
        q = q - a * Y[i]
        alphas.append(a)
    alphas.reverse()
    has_pair = rho[-1] > 0
    yy = torch.dot(Y[-1], Y[-1])
    gamma = torch.where(
        has_pair,
        torch.dot(S[-1], Y[-1]) / torch.where(has_pair, yy, 1),
        1 / torch.clamp(torch.linalg.vector_norm(g), min=1),
    )
    r = gamma * q
    for i in range(S.shape[0]):
        b = rho[i] * torch.dot(Y[i], r)
        r = r + (alphas[i] - b) * S[i]
    return r


def _check_scalar(value: Any) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"fun must return a scalar (0-d) tensor, got {shape}")


def _cubic_step(t_lo, f_lo, d_lo, t_hi, f_hi, d_hi):
    """The minimiser of the cubic interpolating ``φ`` and ``φ'`` at ``t_lo`` and ``t_hi``
    (Nocedal & Wright, 2006, eq. 3.59), or the midpoint where it is undefined or outside the
    middle 80% of the interval."""
    width = t_hi - t_lo
    safe = torch.where(width == 0, torch.ones_like(width), width)
    d1 = d_lo + d_hi - 3 * (f_lo - f_hi) / (-safe)
    disc = d1 * d1 - d_lo * d_hi
    d2 = torch.sign(safe) * torch.sqrt(disc.clamp(min=0))
    den = d_hi - d_lo + 2 * d2
    t = t_hi - width * (d_hi + d2 - d1) / torch.where(den == 0, torch.ones_like(den), den)
    lo, hi = torch.minimum(t_lo, t_hi), torch.maximum(t_lo, t_hi)
    ok = (disc >= 0) & (den != 0) & (t >= lo + 0.1 * (hi - lo)) & (t <= hi - 0.1 * (hi - lo))
    return torch.where(ok & torch.isfinite(t), t, (t_lo + t_hi) / 2)
