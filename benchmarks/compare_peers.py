"""Peer benchmark: implicit_torch against torchopt, JAXopt, unrolled PyTorch, qpth, cvxpylayers.

The same problems, the same forward solver work and the same backward linear-solver tolerance
through every library; one markdown table of times, ratios and gradient agreement.

Problems (all float64, on the CPU):

* ``ridge`` and ``logistic``: the hypergradient ``d L_val(w*(λ)) / dλ`` of per-feature
  ℓ2-regularised ridge and logistic regression, set up exactly as in
  ``benchmarks/hypergradient.py`` (its ``make_problem``, ``nesterov`` and ``reference`` are
  imported): ``n = 100, 1000, 4000`` features, ``m = min(2n, 1000)`` training and as many
  validation samples, ``K`` steps of Nesterov's accelerated gradient from ``w = 0``
  (``--iters``, default 500: condition bound κ ≈ 270, so the iterate is converged to ~1e-13).
  The optimality condition is ``∇_w f(w; λ) = 0``; the backward is CG on the Hessian at relative
  tolerance 1e-10 (``‖r‖ ≤ 1e-10 ‖b‖``, the same criterion in all three libraries).
  Reference: closed form (ridge), Newton to machine precision + dense Cholesky (logistic).
* ``lasso``: ``min_w ½‖Xw − y‖² + λ‖w‖₁`` with a scalar ``λ``, solved by ``K`` FISTA steps
  (fixed step ``η = 1/L``), differentiated implicitly through the proximal-gradient fixed point
  ``w = prox_{ηλ‖·‖₁}(w − η∇f(w))``, backward by CG on the normal equations (tolerance 1e-10; the
  fixed-point Jacobian is not symmetric, and normal CG is torchopt's and JAXopt's default).
  ``n = 100, 1000`` features and ``m = 2n`` samples (so the problem is well conditioned and the
  support is identified), sparse ground truth, ``λ = 0.1 ‖Xᵀy‖∞``. The solver classes
  ``it.ProximalGradient`` and ``jaxopt.ProximalGradient`` (same ``K`` steps, ``tol = 0``, each
  with its own default fixed-point step, linear solver normal CG) are timed as well (ours also
  with ``value_and_grad=True`` and the analytic gradient), and
  implicit_torch with GMRES (its default for fixed points). Reference: the closed form on the
  support, ``dw_S/dλ = −(X_SᵀX_S)⁻¹ sign(w_S)``, with the KKT conditions checked.
* ``qp``: the batched QP layer of ``benchmarks/qp_layer.py`` (its functions are imported):
  implicit_torch's ``QP`` against qpth and cvxpylayers, forward + backward of ``Σ w ⊙ x*`` in
  ``(L, c, G, h)``. Reference: the active-set KKT system at the solution, solved densely per
  problem and differentiated by autograd (independent of every library's backward). Agreement
  for the QP is ``qp_layer.rel_diff`` (largest absolute difference over largest entry).

Methods (hypergradient problems):

* ``implicit_torch``: ``@it.custom_root(optimality)`` (``@it.custom_fixed_point`` for the lasso)
  around the torch forward solver, ``solve=partial(it.solve_cg, tol=1e-10)`` (normal CG for the
  lasso);
* ``torchopt``: ``torchopt.diff.implicit.custom_root(optimality, argnums=1,
  solve=torchopt.linear_solve.solve_cg(rtol=1e-10, atol=0))`` around the same torch solver;
* ``JAXopt``: ``jaxopt.implicit_diff.custom_root`` (``custom_fixed_point``) around the same
  algorithm written in JAX (``lax.fori_loop``), ``solve=partial(jaxopt.linear_solve.solve_cg,
  tol=1e-10)``, jax x64 enabled, everything ``jax.jit``-compiled and timed after a warm-up call
  (compile time reported separately);
* ``torchopt (default: normal CG)``, ``JAXopt (default: normal CG)``: the same, with each
  library's default linear solver for ``custom_root`` (normal CG, at the same tolerance), for
  ``n ≤ --defaults-max-n`` (1000): what their users get without passing ``solve=``.
  implicit_torch's default for ``custom_root`` is CG (its row above) and, for
  ``custom_fixed_point``, GMRES (the lasso's ``implicit_torch (gmres)`` row);
* ``unrolled``: the torch solver recorded by autograd and backpropagated through.

Timing: ``time.perf_counter`` medians (JAX results ``block_until_ready``), one warm-up, methods
interleaved repeat by repeat so that load from other processes hits all alike. ``forward`` is
the solver call; ``hypergrad`` is the validation loss plus the backward (torch:
``torch.autograd.grad`` after the forward; JAXopt: a jitted ``jax.grad`` of the loss at the
solution followed by ``jaxopt.implicit_diff.root_vjp``); ``total`` is forward + hypergradient
(torch: the two, in the same call; JAXopt: one fused jitted ``jax.grad(L_val ∘ solver)``). Ratios
are ``peer / implicit_torch`` (> 1: implicit_torch is faster).

Threads: ``--threads`` (default 1) sets ``torch.set_num_threads``, sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` when 1, and pins
the process (before JAX starts its threads) to the first ``--threads`` CPUs it may run on with
``os.sched_setaffinity``: with jax 0.10 the XLA flags alone do not stop XLA:CPU from using
every core (measured: process CPU time twice the wall time on 2 cores), so without the pin a
one-thread comparison would give JAX both cores whenever the machine is idle. ``--no-pin``
turns the pin off. Peers are optional: one that is not installed or fails is
reported and the rest runs. Install them into their own venv (benchmarks/requirements-peers.txt):

    PYTHONPATH=. /tmp/peers-venv/bin/python benchmarks/compare_peers.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qp_layer
from hypergradient import make_problem, nesterov, reference

import implicit_torch as it

DTYPE = torch.float64
TOL = 1e-10  # relative tolerance of every backward linear solve
# Rows of torchopt and JAXopt with their own default linear solver for custom_root (normal CG;
# implicit_torch's default is CG, its plain row). Measured for n <= --defaults-max-n.
DEFAULT_NAMES = {
    "torchopt": "torchopt (default: normal CG)",
    "JAXopt": "JAXopt (default: normal CG)",
}
OUT_DIR = Path(__file__).resolve().parent / "out"


# ------------------------------------------------------------------------------------------
# Peers: optional imports
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Peers:
    torchopt: object = None
    torchopt_why: str = ""
    jax: object = None  # a namespace: jax, jnp, lax, jaxopt, np
    jax_why: str = ""


def load_peers(threads: int) -> Peers:
    peers = Peers()
    try:
        import torchopt

        peers.torchopt = torchopt
    except Exception as e:  # ImportError, or a broken install
        peers.torchopt_why = f"torchopt unavailable ({type(e).__name__}: {e})"
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_platforms", "cpu")
        import jax.numpy as jnp
        import jaxopt
        import numpy as np
        from jax import lax

        peers.jax = argparse.Namespace(jax=jax, jnp=jnp, lax=lax, jaxopt=jaxopt, np=np)
    except Exception as e:
        peers.jax_why = f"JAXopt unavailable ({type(e).__name__}: {e})"
    return peers


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------------
# Timing harness
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    """``run()`` returns (forward s, hypergradient s, total s, hypergradient as float64 torch)."""

    name: str
    run: Callable[[], tuple[float, float, float, torch.Tensor]]
    note: str = ""


def torch_method(name: str, forward: Callable, lam0: torch.Tensor, outer: Callable, note=""):
    def run():
        lam = lam0.detach().clone().requires_grad_()
        t0 = time.perf_counter()
        w = forward(lam)
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(outer(w), lam)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, t2 - t0, g.detach()

    return Method(name, run, note)


def jax_method(jx, name: str, fwd: Callable, bwd: Callable, total: Callable, lam_t, note=""):
    """JAX: jitted forward, backward at the solution, and the fused forward + backward."""
    lam = jx.jnp.asarray(lam_t.detach().numpy())
    t0 = time.perf_counter()
    w = fwd(lam).block_until_ready()
    bwd(w, lam).block_until_ready()
    total(lam).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run():
        t0 = time.perf_counter()
        w = fwd(lam).block_until_ready()
        t1 = time.perf_counter()
        bwd(w, lam).block_until_ready()
        t2 = time.perf_counter()
        g = total(lam).block_until_ready()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, torch.from_numpy(jx.np.array(g)).to(DTYPE)

    extra = f"jit warm-up {compile_s:.1f} s"
    return Method(name, run, f"{note}; {extra}" if note else extra)


def jax_implicit_method(jx, name, run, optimality, outer, w0, solve, lam_t) -> Method:
    """A JAXopt method from ``run(init, lam) -> w`` (implicitly differentiated) and the
    optimality function ``F(w, lam) = 0`` of its solution: jitted forward, backward at the
    solution by ``root_vjp``, and fused forward + backward."""
    jax = jx.jax
    fwd = jax.jit(lambda lam: run(w0, lam))

    @jax.jit
    def bwd(w, lam):
        cot = jax.grad(outer)(w)
        return jx.jaxopt.implicit_diff.root_vjp(optimality, w, (lam,), cot, solve=solve)[0]

    total = jax.jit(jax.grad(lambda lam: outer(run(w0, lam))))
    return jax_method(jx, name, fwd, bwd, total, lam_t)


def guarded(names: list[str], build: Callable[[], list[Method]]) -> list[Method]:
    """Build peer methods (JAX compiles here); a failure becomes a method that reports it."""
    try:
        return build()
    except Exception as e:
        print(f"    {', '.join(names)} failed to build:\n" + traceback.format_exc(limit=3))
        err = f"{type(e).__name__}: {str(e)[:200]}"

        def run():
            raise RuntimeError(err)

        return [Method(name, run) for name in names]


def bench(methods: list[Method], reps_cap: int) -> dict[str, dict]:
    """Warm-up, then interleaved repeats; medians per phase. A failing method is reported."""
    out: dict[str, dict] = {}
    live = []
    warm = {}
    for m in methods:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tf, tb, tt, g = m.run()
            msgs = {
                f"{w.category.__name__}: {str(w.message)[:80]}"
                for w in caught
                if not issubclass(w.category, (FutureWarning, DeprecationWarning))
            }
            note = "; ".join([m.note, *sorted(msgs)]) if msgs else m.note
            out[m.name] = dict(g=g, fwd=[], bwd=[], tot=[], note=note.strip("; "))
            warm[m.name] = tt
            live.append(m)
        except Exception as e:
            out[m.name] = dict(failed=f"{type(e).__name__}: {str(e)[:200]}")
            print(f"    {m.name} failed:\n" + traceback.format_exc(limit=3))
    if not live:
        return out
    slowest = max(warm.values())
    reps = reps_cap if slowest < 0.5 else max(3, min(reps_cap, 5)) if slowest < 3 else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            for m in live:
                tf, tb, tt, _ = m.run()
                r = out[m.name]
                r["fwd"].append(tf)
                r["bwd"].append(tb)
                r["tot"].append(tt)
    for m in live:
        r = out[m.name]
        for k in ("fwd", "bwd", "tot"):
            r[k + "_ms"] = 1e3 * statistics.median(r[k])
        r["reps"] = reps
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------
# Ridge and logistic hypergradients (problem set-up from hypergradient.py)
# ------------------------------------------------------------------------------------------


def hyper_methods(p, K: int, peers: Peers, unrolled: bool, defaults: bool) -> list[Method]:
    """implicit_torch (its default, CG), torchopt and JAXopt given CG, unrolled; with
    ``defaults``, torchopt and JAXopt also with their own default linear solver, normal CG."""
    lam0 = p.lam
    w0 = torch.zeros(p.n, dtype=DTYPE)
    methods = []

    it_solver = it.custom_root(p.grad, solve=functools.partial(it.solve_cg, tol=TOL))(
        lambda init, lam: nesterov(p, lam, init, K)
    )
    methods.append(torch_method("implicit_torch", lambda lam: it_solver(w0, lam), lam0, p.outer))

    if peers.torchopt is not None:
        to = peers.torchopt

        def grad_fn(w, lam):  # torchopt binds arguments by the optimality function's signature
            return p.grad(w, lam)

        solves = {"torchopt": to.linear_solve.solve_cg(rtol=TOL, atol=0.0)}
        if defaults:
            solves[DEFAULT_NAMES["torchopt"]] = to.linear_solve.solve_normal_cg(rtol=TOL, atol=0.0)
        for name, to_solve in solves.items():
            to_solver = to.diff.implicit.custom_root(grad_fn, argnums=1, solve=to_solve)(
                lambda init, lam: nesterov(p, lam, init, K)
            )
            methods.append(torch_method(name, lambda lam, f=to_solver: f(w0, lam), lam0, p.outer))

    if peers.jax is not None:
        kinds = {"JAXopt": "cg"}
        if defaults:
            kinds[DEFAULT_NAMES["JAXopt"]] = "normal_cg"
        for name, kind in kinds.items():
            methods += guarded(
                [name], lambda n=name, k=kind: [jax_hyper_method(peers.jax, p, K, n, k)]
            )

    if unrolled:
        methods.append(torch_method("unrolled", lambda lam: nesterov(p, lam, w0, K), lam0, p.outer))
    return methods


def jax_hyper_method(jx, p, K: int, name: str = "JAXopt", kind: str = "cg") -> Method:
    jax, jnp, lax, jaxopt = jx.jax, jx.jnp, jx.lax, jx.jaxopt
    X, y, Xv, yv = (jnp.asarray(t.numpy()) for t in (p.X, p.y, p.Xv, p.yv))
    step, beta = p.step, p.beta
    ridge = p.name == "ridge"

    def grad(w, lam):
        z = X @ w
        if ridge:
            return X.T @ (z - y) + lam * w
        return X.T @ (-y * jax.nn.sigmoid(-y * z)) + lam * w

    def outer(w):
        z = Xv @ w
        if ridge:
            return 0.5 * jnp.mean((z - yv) ** 2)
        return jnp.mean(jax.nn.softplus(-yv * z))

    if kind == "cg":
        solve = functools.partial(jaxopt.linear_solve.solve_cg, tol=TOL, atol=0.0)
    else:  # JAXopt's default for custom_root
        solve = functools.partial(jaxopt.linear_solve.solve_normal_cg, tol=TOL, atol=0.0)

    @jaxopt.implicit_diff.custom_root(grad, solve=solve)
    def solver(init, lam):
        def body(_, carry):
            w, w_prev = carry
            v = w + beta * (w - w_prev)
            return v - step * grad(v, lam), w

        return lax.fori_loop(0, K, body, (init, init))[0]

    return jax_implicit_method(jx, name, solver, grad, outer, jnp.zeros(p.n), solve, p.lam)


# ------------------------------------------------------------------------------------------
# Lasso by proximal gradient (FISTA), implicit through the prox-grad fixed point
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Lasso:
    n: int
    m: int
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor  # 0-d
    eta: float = 0.0

    def grad_f(self, w):
        return self.X.T @ (self.X @ w - self.y)

    def fun(self, w, *args):  # smooth part, for it.ProximalGradient
        return 0.5 * ((self.X @ w - self.y) ** 2).sum()

    def value_and_grad(self, w, *args):  # (fun, ∇fun), for value_and_grad=True
        r = self.X @ w - self.y
        return 0.5 * (r * r).sum(), self.X.T @ r

    def T(self, w, lam):  # the proximal-gradient map; its fixed point is the solution
        return soft(w - self.eta * self.grad_f(w), self.eta * lam)

    def F(self, w, lam):
        return self.T(w, lam) - w

    def outer(self, w):
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean()


def soft(v, thr):
    return torch.sign(v) * torch.clamp(v.abs() - thr, min=0)


def make_lasso(n: int, seed: int = 0) -> Lasso:
    g = torch.Generator().manual_seed(seed * 1000003 + n * 7 + 2)
    m = 2 * n
    scale = 1.0 / (math.sqrt(m) + math.sqrt(n))
    w_true = torch.randn(n, generator=g, dtype=DTYPE)
    w_true[torch.rand(n, generator=g, dtype=DTYPE) > 0.1] = 0.0

    def sample():
        X = torch.randn(m, n, generator=g, dtype=DTYPE).mul_(scale)
        s = X @ w_true
        return X, s + 0.5 * s.std() * torch.randn(m, generator=g, dtype=DTYPE)

    X, y = sample()
    Xv, yv = sample()
    lam = 0.1 * (X.T @ y).abs().max()
    lp = Lasso(n, m, X, y, Xv, yv, lam)
    v = torch.randn(n, generator=g, dtype=DTYPE)
    for _ in range(100):
        v = X.T @ (X @ v)
        s2 = v.norm()
        v = v / s2
    lp.eta = 1.0 / (1.01 * float(s2))
    return lp


def fista(lp: Lasso, lam, w0, K: int):
    x = yk = w0
    t = 1.0
    for _ in range(K):
        x_new = soft(yk - lp.eta * lp.grad_f(yk), lp.eta * lam)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        yk = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def lasso_reference(lp: Lasso, K: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Closed form on the support of a long FISTA run: (w*, dL/dλ, KKT check)."""
    with torch.no_grad():
        w = fista(lp, lp.lam, torch.zeros(lp.n, dtype=DTYPE), 4 * K)
    S = w != 0
    s = torch.sign(w[S])
    XS = lp.X[:, S]
    C = torch.linalg.cholesky(XS.T @ XS)
    wS = torch.cholesky_solve((XS.T @ lp.y - lp.lam * s)[:, None], C)[:, 0]
    w_star = torch.zeros_like(w)
    w_star[S] = wS
    corr = lp.X.T @ (lp.X @ w_star - lp.y)
    sign_ok = bool((torch.sign(wS) == s).all())
    off = float(corr[~S].abs().max() / lp.lam) if (~S).any() else 0.0
    check = f"|S|={int(S.sum())}, signs consistent {sign_ok}, max off-support |corr|/λ {off:.3f}"
    wg = w_star.clone().requires_grad_()
    (gv,) = torch.autograd.grad(lp.outer(wg), wg)
    dw = -torch.cholesky_solve(s[:, None], C)[:, 0]
    return w_star, (gv[S] @ dw).reshape(()), check


def lasso_methods(lp: Lasso, K: int, peers: Peers, unrolled: bool) -> list[Method]:
    w0 = torch.zeros(lp.n, dtype=DTYPE)
    methods = []
    ncg = functools.partial(it.solve_normal_cg, tol=TOL)
    it_solver = it.custom_fixed_point(lp.T, solve=ncg)(lambda init, lam: fista(lp, lam, init, K))
    methods.append(torch_method("implicit_torch", lambda lam: it_solver(w0, lam), lp.lam, lp.outer))
    gm = functools.partial(it.solve_gmres, tol=TOL)
    it_gm = it.custom_fixed_point(lp.T, solve=gm)(lambda init, lam: fista(lp, lam, init, K))
    methods.append(
        torch_method("implicit_torch (gmres)", lambda lam: it_gm(w0, lam), lp.lam, lp.outer)
    )
    pg = it.ProximalGradient(
        fun=lp.fun, prox=it.prox.prox_lasso, stepsize=lp.eta, maxiter=K, tol=0.0,
        acceleration=True, implicit_diff_solve=ncg, on_failure="ignore",
    )  # fmt: skip
    methods.append(
        torch_method(
            "implicit_torch ProximalGradient", lambda lam: pg.run(w0, lam).params, lp.lam, lp.outer
        )
    )
    # The same solver given the analytic gradient (value_and_grad=True, as JAXopt allows).
    pg_vg = dataclasses.replace(pg, fun=lp.value_and_grad, value_and_grad=True)
    methods.append(
        torch_method(
            "implicit_torch ProximalGradient (value_and_grad)",
            lambda lam: pg_vg.run(w0, lam).params,
            lp.lam,
            lp.outer,
        )
    )

    if peers.torchopt is not None:
        to = peers.torchopt

        def F(w, lam):
            return lp.F(w, lam)

        @to.diff.implicit.custom_root(
            F, argnums=1, solve=to.linear_solve.solve_normal_cg(rtol=TOL, atol=0.0)
        )
        def to_solver(init, lam):
            return fista(lp, lam, init, K)

        methods.append(torch_method("torchopt", lambda lam: to_solver(w0, lam), lp.lam, lp.outer))

    if peers.jax is not None:
        names = ["JAXopt", "JAXopt ProximalGradient"]
        methods += guarded(names, lambda: jax_lasso_methods(peers.jax, lp, K))

    if unrolled:
        methods.append(
            torch_method("unrolled", lambda lam: fista(lp, lam, w0, K), lp.lam, lp.outer)
        )
    return methods


def jax_lasso_methods(jx, lp: Lasso, K: int) -> list[Method]:
    jnp, lax, jaxopt = jx.jnp, jx.lax, jx.jaxopt
    X, y, Xv, yv = (jnp.asarray(t.numpy()) for t in (lp.X, lp.y, lp.Xv, lp.yv))
    eta = lp.eta

    def soft_j(v, thr):
        return jnp.sign(v) * jnp.maximum(jnp.abs(v) - thr, 0.0)

    def grad_f(w):
        return X.T @ (X @ w - y)

    def T(w, lam):
        return soft_j(w - eta * grad_f(w), eta * lam)

    def outer(w):
        return 0.5 * jnp.mean((Xv @ w - yv) ** 2)

    solve = functools.partial(jaxopt.linear_solve.solve_normal_cg, tol=TOL, atol=0.0)

    @jaxopt.implicit_diff.custom_fixed_point(T, solve=solve)
    def solver(init, lam):
        def body(_, carry):
            x, yk, t = carry
            x_new = soft_j(yk - eta * grad_f(yk), eta * lam)
            t_new = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
            return x_new, x_new + ((t - 1) / t_new) * (x_new - x), t_new

        return lax.fori_loop(0, K, body, (init, init, jnp.asarray(1.0)))[0]

    def F(w, lam):
        return T(w, lam) - w

    w0 = jnp.zeros(lp.n)
    methods = [jax_implicit_method(jx, "JAXopt", solver, F, outer, w0, solve, lp.lam)]

    def fun(w):
        return 0.5 * jnp.sum((X @ w - y) ** 2)

    pg = jaxopt.ProximalGradient(
        fun=fun, prox=jaxopt.prox.prox_lasso, stepsize=eta, maxiter=K, tol=0.0,
        acceleration=True, implicit_diff_solve=solve, jit=True,
    )  # fmt: skip
    methods.append(
        jax_implicit_method(
            jx, "JAXopt ProximalGradient", lambda init, lam: pg.run(init, lam).params,
            pg.optimality_fun, outer, w0, solve, lp.lam,
        )
    )  # fmt: skip
    return methods


# ------------------------------------------------------------------------------------------
# Batched QP layer (qp_layer.py's problems and peers)
# ------------------------------------------------------------------------------------------


def qp_kkt_reference(data, w) -> tuple[tuple[torch.Tensor, ...], str]:
    """Gradients of Σ w ⊙ x* from the active-set KKT system at implicit_torch's solution."""
    L, c, G, h = (t.detach() for t in data)
    with torch.no_grad():
        sol = it.QP().run(None, (qp_layer.make_Q(L), c), None, (G, h)).params
    x = sol.primal
    slack = h - (G @ x.unsqueeze(-1)).squeeze(-1)
    grads = [torch.zeros_like(t) for t in (L, c, G, h)]
    worst_dual = math.inf
    n_active = []
    for b in range(L.shape[0]):
        act = slack[b] < 1e-7 * (1 + h[b].abs().max())
        n_active.append(int(act.sum()))
        Lb, cb, Gb, hb = (t[b].clone().requires_grad_() for t in (L, c, G, h))
        Q = Lb @ Lb.T + qp_layer.EPS * torch.eye(Lb.shape[0], dtype=DTYPE)
        GA = Gb[act]
        k = GA.shape[0]
        K = torch.cat(
            [torch.cat([Q, GA.T], 1), torch.cat([GA, torch.zeros(k, k, dtype=DTYPE)], 1)], 0
        )
        z = torch.linalg.solve(K, torch.cat([-cb, hb[act]]))
        if k:
            worst_dual = min(worst_dual, float(z[Lb.shape[0] :].detach().min()))
        gb = torch.autograd.grad((w[b] * z[: Lb.shape[0]]).sum(), (Lb, cb, Gb, hb))
        for acc, gi in zip(grads, gb):
            acc[b] = gi
    check = (
        f"active constraints per problem {min(n_active)}..{max(n_active)}, "
        f"min active multiplier {worst_dual:.1e} (> 0: strict complementarity)"
    )
    return tuple(grads), check


def qp_rows(B: int, n: int, m: int, reps: int, cvx_reps: int) -> tuple[list[dict], list[str]]:
    data, w = qp_layer.problems(B, n, m)
    ref, check = qp_kkt_reference(data, w)
    notes = [f"QP reference: {check}."]
    solvers = {"implicit_torch": (qp_layer.ours, None)}
    solvers["qpth"] = qp_layer.make_qpth()
    solvers["cvxpylayers"] = qp_layer.make_cvxpylayers(n, m)
    rows = []
    g_it = None
    for name, (fn, why) in solvers.items():
        row = dict(problem="qp", n=n, m=f"{m} ineq, B={B}", method=name)
        if fn is None:
            row["failed"] = why
            rows.append(row)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grads = qp_layer.fwd_bwd(fn, data, w)
                r = cvx_reps if name == "cvxpylayers" else reps
                t_fb = qp_layer.median_ms(lambda f=fn: qp_layer.fwd_bwd(f, data, w), r)
                with torch.no_grad():
                    t_f = qp_layer.median_ms(lambda f=fn: f(*data), r)
        except Exception as e:
            row["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            continue
        if g_it is None:
            g_it = grads
        row.update(
            fwd_ms=t_f, tot_ms=t_fb, bwd_ms=None, reps=r,
            err=qp_layer.rel_diff(grads, ref), d_it=qp_layer.rel_diff(grads, g_it), d_jax=None,
        )  # fmt: skip
        rows.append(row)
    return rows, notes


# ------------------------------------------------------------------------------------------
# Driver and table
# ------------------------------------------------------------------------------------------


def machine_header(threads: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = ", ".join(
        f"{d} {_version(d)}"
        for d in (
            "torch", "implicit_torch", "torchopt", "jax", "jaxlib", "jaxopt", "qpth",
            "cvxpylayers", "cvxpy", "diffcp", "scs", "numpy",
        )
    )  # fmt: skip
    if _version("implicit_torch") == "not installed":
        vers = vers.replace("implicit_torch not installed", f"implicit_torch {it.__version__}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "—"
    return (
        f"{model}, {os.cpu_count()} CPUs (shared with other jobs: load average {load} at "
        f"start), Python {platform.python_version()}; threads: torch {torch.get_num_threads()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(default)')!r}, CPU affinity {affinity}; "
        f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='minutes')}.\n"
        f"Versions: {vers}."
    )


def hyper_rows(label, n, m, res, g_ref) -> list[dict]:
    rows = []
    g_it = res.get("implicit_torch", {}).get("g")
    g_jx = res.get("JAXopt", {}).get("g")
    for name, r in res.items():
        row = dict(problem=label, n=n, m=m, method=name)
        if "failed" in r:
            row["failed"] = r["failed"]
        else:
            g = r["g"]
            row.update(
                fwd_ms=r["fwd_ms"], bwd_ms=r["bwd_ms"], tot_ms=r["tot_ms"], reps=r["reps"],
                err=rel(g, g_ref), d_it=rel(g, g_it) if g_it is not None else None,
                d_jax=rel(g, g_jx) if g_jx is not None else None, note=r.get("note", ""),
            )  # fmt: skip
        rows.append(row)
    return rows


def fmt(x, spec=".1e") -> str:
    return "—" if x is None else format(x, spec)


def render(rows: list[dict], header: str, notes: list[str], K: int, elapsed: float) -> str:
    lines = [
        f"Machine: {header}",
        "",
        f"Forward work: K = {K} Nesterov (ridge, logistic) / FISTA (lasso) steps for every "
        f"method; backward linear solves at relative tolerance {TOL:g}. Times are medians (ms) "
        "after a warm-up, methods interleaved; ratio = peer / implicit_torch (> 1: "
        "implicit_torch faster). Errors are relative 2-norm differences (QP: max-abs over "
        f"max-entry). Run time {elapsed:.0f} s.",
        "",
        "| problem | n | m | method | forward ms | hypergrad ms | total ms | ratio total "
        "| ratio hypergrad | err vs reference | diff vs implicit_torch | diff vs JAXopt | notes |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    base = {}
    for r in rows:
        if r["method"] == "implicit_torch" and "failed" not in r:
            base[(r["problem"], r["n"])] = r
    for r in rows:
        head = f"| {r['problem']} | {r['n']} | {r['m']} | {r['method']} "
        if "failed" in r:
            lines.append(head + f"| failed or skipped: {r['failed']} | | | | | | | | |")
            continue
        b = base.get((r["problem"], r["n"]))
        rt = f"{r['tot_ms'] / b['tot_ms']:.2f}×" if b else "—"
        rb = f"{r['bwd_ms'] / b['bwd_ms']:.2f}×" if b and r["bwd_ms"] is not None else "—"
        lines.append(
            head + f"| {r['fwd_ms']:.2f} | {fmt(r['bwd_ms'], '.2f')} | {r['tot_ms']:.2f} | {rt} "
            f"| {rb} | {fmt(r['err'])} | {fmt(r['d_it'])} | {fmt(r['d_jax'])} "
            f"| {r.get('note', '')} |"
        )
    lines += ["", "Targets (n = 1000):", ""]
    by = {(r["problem"], r["n"], r["method"]): r for r in rows if "failed" not in r}
    for prob in ("ridge", "logistic", "lasso"):
        imp = by.get((prob, 1000, "implicit_torch"))
        if imp is None:
            continue
        to = by.get((prob, 1000, "torchopt"))
        jx = by.get((prob, 1000, "JAXopt"))
        if to:
            st, sb = to["tot_ms"] / imp["tot_ms"], to["bwd_ms"] / imp["bwd_ms"]
            lines.append(
                f"- {prob}: ≥ 2× faster than torchopt — total {st:.2f}× "
                f"({'met' if st >= 2 else 'NOT met'}), hypergradient alone {sb:.2f}× "
                f"({'met' if sb >= 2 else 'NOT met'})"
            )
        else:
            lines.append(f"- {prob}: torchopt not measured")
        if jx:
            st, sb = jx["tot_ms"] / imp["tot_ms"], jx["bwd_ms"] / imp["bwd_ms"]
            d = imp["d_jax"]
            lines.append(
                f"- {prob}: no slower than JAXopt — total {st:.2f}× "
                f"({'met' if st >= 1 else 'NOT met'}), hypergradient alone {sb:.2f}× "
                f"({'met' if sb >= 1 else 'NOT met'}); gradient agreement with JAXopt "
                f"{d:.1e} ({'met' if d <= 1e-6 else 'NOT met'}, target 1e-6)"
            )
        else:
            lines.append(f"- {prob}: JAXopt not measured")
    lines += ["", "With each library's default linear solver (n = 1000):", ""]
    for prob in ("ridge", "logistic", "lasso"):
        mine = "implicit_torch (gmres)" if prob == "lasso" else "implicit_torch"
        imp = by.get((prob, 1000, mine))
        if imp is None:
            continue
        for peer, target in (("torchopt", 2.0), ("JAXopt", 1.0)):
            name = peer if prob == "lasso" else DEFAULT_NAMES[peer]
            r = by.get((prob, 1000, name))
            if r is None:
                lines.append(f"- {prob}: {name} not measured")
                continue
            st, sb = r["tot_ms"] / imp["tot_ms"], r["bwd_ms"] / imp["bwd_ms"]
            lines.append(
                f"- {prob}: {mine} vs {name}, target ≥ {target:g}× — total {st:.2f}× "
                f"({'met' if st >= target else 'NOT met'}), hypergradient alone {sb:.2f}× "
                f"({'met' if sb >= target else 'NOT met'})"
            )
    lines += [
        "",
        "Defaults: implicit_torch's custom_root solves with CG (custom_fixed_point: GMRES); "
        "torchopt's and JAXopt's custom_root default to normal CG (CG on JᵀJ: two products "
        "with J per iteration and the condition number squared), which is what their users get "
        "unless they pass solve=. Every solver here runs at the same relative tolerance.",
        "",
        "implicit_torch, torchopt and unrolled run the same eager torch forward loop, so their "
        "forward times are equal up to noise and a total ratio is bounded by the forward's "
        "share; the hypergradient column compares the implicit backward alone. JAXopt runs the "
        "same algorithm compiled by XLA (one fused loop, no per-op dispatch).",
    ]
    if notes:
        lines += [""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes (seconds)")
    ap.add_argument("--threads", type=int, default=1, help="torch and XLA threads (default 1)")
    ap.add_argument("--sizes", type=int, nargs="*", help="ridge/logistic n (100 1000 4000)")
    ap.add_argument("--lasso-sizes", type=int, nargs="*", help="lasso n (default 100 1000)")
    ap.add_argument("--iters", type=int, help="forward solver steps K (default 500)")
    ap.add_argument("--repeats", type=int, default=7, help="max timed repeats per config")
    ap.add_argument("--problems", nargs="*", default=["ridge", "logistic", "lasso", "qp"])
    ap.add_argument("--no-pin", action="store_true", help="do not pin to --threads CPUs")
    ap.add_argument("--no-unrolled", action="store_true", help="skip unrolled PyTorch")
    ap.add_argument(
        "--defaults-max-n", type=int, default=1000,
        help="largest n with the peers' default (normal CG) rows; normal CG is slow at 4000",
    )  # fmt: skip
    ap.add_argument("--out", default=str(OUT_DIR / "compare_peers"), help="output path stem")
    args = ap.parse_args()

    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    torch.set_num_threads(args.threads)
    peers = load_peers(args.threads)
    sizes = args.sizes or ([50, 200] if args.quick else [100, 1000, 4000])
    lasso_sizes = args.lasso_sizes or ([50] if args.quick else [100, 1000])
    K = args.iters or (100 if args.quick else 500)
    reps = 3 if args.quick else args.repeats
    header = machine_header(args.threads)
    print(header)
    notes = [x for x in (peers.torchopt_why, peers.jax_why) if x]
    for x in notes:
        print("  " + x)
    started = time.perf_counter()
    rows: list[dict] = []
    for name in ("ridge", "logistic"):
        if name not in args.problems:
            continue
        for n in sizes:
            p = make_problem(name, n)
            _, g_ref = reference(p)
            print(f"\n{name} n={n} m={p.m}: κ bound {p.kappa:.0f}")
            defaults = n <= args.defaults_max_n
            res = bench(hyper_methods(p, K, peers, not args.no_unrolled, defaults), reps)
            rows += hyper_rows(name, n, p.m, res, g_ref)
            for r in rows[-len(res) :]:
                if "failed" not in r:
                    print(
                        f"  {r['method']:>30}: {r['fwd_ms']:.1f} + {r['bwd_ms']:.1f} ms, total "
                        f"{r['tot_ms']:.1f} ms, err {r['err']:.1e}"
                    )
    if "lasso" in args.problems:
        for n in lasso_sizes:
            lp = make_lasso(n)
            _, g_ref, check = lasso_reference(lp, K)
            notes.append(f"lasso n={n} reference: {check}.")
            print(f"\nlasso n={n} m={lp.m}: {check}")
            res = bench(lasso_methods(lp, K, peers, not args.no_unrolled), reps)
            rows += hyper_rows("lasso", n, lp.m, res, g_ref)
            for r in rows[-len(res) :]:
                if "failed" not in r:
                    print(
                        f"  {r['method']:>32}: {r['fwd_ms']:.1f} + {r['bwd_ms']:.1f} ms, total "
                        f"{r['tot_ms']:.1f} ms, err {r['err']:.1e}"
                    )
    if "qp" in args.problems:
        B, n, m = (8, 10, 10) if args.quick else (64, 20, 20)
        print(f"\nqp B={B} n={n} m={m}")
        qrows, qnotes = qp_rows(B, n, m, reps if args.quick else 15, 1 if args.quick else 3)
        rows += qrows
        notes += qnotes
    md = render(rows, header, notes, K, time.perf_counter() - started)
    print("\n" + md)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
