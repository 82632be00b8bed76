"""Hypergradients of ridge and ℓ2-regularised logistic regression: implicit vs unrolled.

For a per-feature regularisation vector ``λ ∈ Rⁿ`` (the interesting case for hyperparameter
optimisation: one hyperparameter per feature) the inner problem is

* ridge:     ``f(w; λ) = ½‖Xw − y‖² + ½ Σⱼ λⱼ wⱼ²``
* logistic:  ``f(w; λ) = Σᵢ log(1 + exp(−yᵢ xᵢᵀw)) + ½ Σⱼ λⱼ wⱼ²``   (labels ``yᵢ ∈ {±1}``)

and the outer loss is the mean validation squared error (ridge) or the mean validation
logistic loss on a held-out set. The hypergradient ``d L_val(w*(λ)) / dλ ∈ Rⁿ`` is computed by

* ``implicit``: ``@implicit_torch.custom_root(∇_w f)`` around the forward solver (which the
  engine runs under ``no_grad``), backward by matrix-free CG (``solve="cg"``, the default
  relative tolerance 1e-10 in float64);
* ``unrolled``: the same forward solver run with autograd recording, then backpropagation
  through its ``K`` iterations;
* ``closed``: ridge only, ``w = (XᵀX + diag λ)⁻¹ Xᵀy`` by Cholesky, differentiated by autograd.

The forward solver, identical for ``implicit`` and ``unrolled``, is Nesterov-accelerated
gradient descent for strongly convex functions, plain torch, ``K`` iterations from ``w = 0``:
``v = w + β (w − w_prev)``, ``w ← v − ∇f(v)/L`` with ``β = (√κ − 1)/(√κ + 1)``, ``κ = L/μ``.
``L`` (power iteration on ``XᵀX``, times 1.01, plus ``max λ``; for logistic ``‖X‖²/4 + max λ``)
and ``μ = min λ`` are computed once from the data, so the step is a constant, not a function of
``λ`` that the unrolled gradient would differentiate.

Data (float64, fixed seed): ``m = min(2n, 1000)`` training and as many validation samples,
``X = Z / (√m + √n)`` with ``Z`` standard normal (so ``‖X‖₂ ≈ 1``), ``w_true ~ N(0, I)``;
ridge targets ``y = X w_true + noise``, logistic labels ``sign(X w_true + noise)``.
``λⱼ = λ₀ exp(Uⱼ)``, ``Uⱼ ~ U(−1, 1)``, ``λ₀ = 1e-2`` (ridge) and ``2.5e-3`` (logistic): the
solver's condition bound ``κ = L/μ`` is then about 270 for ``n ≥ 1000`` in both problems, so
Nesterov reaches machine precision by ``K = 1000`` and is still visibly inexact at ``K = 100``
(the "iterate err" column). ``m`` is capped at 1000 so that the biggest unrolled case
(``n = 4000``, ``K = 1000``) runs in seconds; ``n > m`` is well-posed thanks to ``λ > 0``.

Accuracy is reported against a reference: ridge, the closed form; logistic, Newton's method to
machine precision followed by a dense Cholesky solve of ``H u = ∇_w L_val`` with
``H = Xᵀ diag(σ(1 − σ)) X + diag λ`` (hypergradient ``−u ⊙ w*``).

Timing: ``time.perf_counter``, one warm-up run, then the median of several repeats (fewer for
slow configurations); implicit and unrolled repeats are interleaved so that load from other
processes hits both alike. ``forward`` is the call of the solver (unrolled: with recording),
``hypergrad`` the validation loss plus ``torch.autograd.grad`` (the backward pass).

Memory, two measures per configuration:

* ``saved MB`` (deterministic): the peak, over the forward pass, of the bytes that autograd
  holds for the backward, measured with ``torch.autograd.graph.saved_tensors_hooks``: every
  saved tensor is wrapped, its storage counted once while any wrapper holding it is alive
  (``weakref.finalize`` removes it when the graph frees it), and the problem data (X, y, the
  validation set and λ, which exist anyway) are not counted. This is what grows with ``K`` when
  unrolling. It does not see the backward's own temporaries (the implicit backward's CG vectors
  and its ``torch.func.vjp`` graph, a few vectors of size m and n), which the hooks cannot
  observe because ``torch.func`` refuses them.
* ``peak RSS MB`` (includes everything, allocator effects too): each configuration runs once in
  a fresh subprocess after a small warm-up; the kernel's peak-RSS counter is reset
  (``/proc/self/clear_refs``) and ``VmHWM − VmRSS`` read after forward + backward. Skipped with
  ``--no-rss`` or where ``/proc`` does not allow it.

Finally, the implicit backward is profiled at one size: CG iterations (``solve_cg`` with
``return_info=True`` on the same system the engine solves), time per engine matvec (a
``torch.func.vjp`` closure of ``∇_w f``) against an analytic Hessian-vector product, a bare CG
loop as a lower bound, and the top of a cProfile of the backward.

Run: ``python benchmarks/hypergradient.py`` (full, a few minutes), ``--quick`` (seconds).
Writes ``benchmarks/out/hypergradient.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _memory import SavedBytes

import implicit_torch as it

DTYPE = torch.float64
OUT_DIR = Path(__file__).resolve().parent / "out"
SEED = 0
# "implicit-tol": the same solver stopped at this relative gradient norm (implicit
# differentiation only needs the solution, not a fixed iteration count).
FORWARD_TOL = 1e-10


# ------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    name: str
    n: int
    m: int
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    lam: torch.Tensor
    L: float = 0.0
    mu: float = 0.0
    last_iters: int = 0

    @property
    def kappa(self) -> float:
        return self.L / self.mu

    @property
    def step(self) -> float:
        return 1.0 / self.L

    @property
    def beta(self) -> float:
        s = math.sqrt(self.kappa)
        return (s - 1.0) / (s + 1.0)

    def data_ptrs(self) -> set[int]:
        ts = (self.X, self.y, self.Xv, self.yv, self.lam)
        return {t.untyped_storage().data_ptr() for t in ts}

    # ∇_w f(w; λ): the optimality condition, written in differentiable torch ops.
    def grad(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        z = self.X @ w
        if self.name == "ridge":
            return self.X.T @ (z - self.y) + lam * w
        return self.X.T @ (-self.y * torch.sigmoid(-self.y * z)) + lam * w

    def hvp(self, w: torch.Tensor, lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Analytic Hessian-vector product ∇²_w f(w; λ) u (for profiling and references)."""
        Xu = self.X @ u
        if self.name == "ridge":
            return self.X.T @ Xu + lam * u
        s = torch.sigmoid(self.X @ w)
        return self.X.T @ (s * (1 - s) * Xu) + lam * u

    def hessian(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if self.name == "ridge":
            d = torch.ones(self.m, dtype=DTYPE)
        else:
            s = torch.sigmoid(self.X @ w)
            d = s * (1 - s)
        return self.X.T @ (d[:, None] * self.X) + torch.diag(lam)

    def outer(self, w: torch.Tensor) -> torch.Tensor:
        z = self.Xv @ w
        if self.name == "ridge":
            return 0.5 * ((z - self.yv) ** 2).mean()
        return torch.nn.functional.softplus(-self.yv * z).mean()


def make_problem(name: str, n: int, seed: int = SEED) -> Problem:
    g = torch.Generator().manual_seed(seed * 1000003 + n * 7 + (name == "logistic"))
    m = min(2 * n, 1000)
    scale = 1.0 / (math.sqrt(m) + math.sqrt(n))
    w_true = torch.randn(n, generator=g, dtype=DTYPE)

    def sample():
        X = torch.randn(m, n, generator=g, dtype=DTYPE).mul_(scale)
        signal = X @ w_true
        noise = 0.5 * signal.std() * torch.randn(m, generator=g, dtype=DTYPE)
        t = signal + noise
        return X, (t if name == "ridge" else torch.where(t >= 0, 1.0, -1.0).to(DTYPE))

    X, y = sample()
    Xv, yv = sample()
    lam0 = 1e-2 if name == "ridge" else 2.5e-3
    lam = lam0 * torch.exp(2 * torch.rand(n, generator=g, dtype=DTYPE) - 1)
    p = Problem(name, n, m, X, y, Xv, yv, lam)
    # ‖X‖² by power iteration on XᵀX (with a 1% margin: the step must stay below 1/L).
    v = torch.randn(n, generator=g, dtype=DTYPE)
    for _ in range(100):
        v = X.T @ (X @ v)
        s2 = v.norm()
        v = v / s2
    curv = 1.01 * float(s2) * (1.0 if name == "ridge" else 0.25)
    p.L = curv + float(lam.max())
    p.mu = float(lam.min())
    return p


def nesterov(p: Problem, lam: torch.Tensor, w0: torch.Tensor, K: int, tol=None) -> torch.Tensor:
    """K steps of accelerated gradient descent (constant momentum, strongly convex case).

    With ``tol``, stop early once ``‖∇f(v)‖ ≤ tol · ‖∇f(w0)‖`` (checked every 10 steps); the
    number of steps taken is left in ``p.last_iters``.
    """
    step, beta = p.step, p.beta
    w_prev = w = w0
    g0 = float(p.grad(w0, lam).norm()) if tol is not None else 0.0
    k = 0
    for k in range(1, K + 1):
        v = w + beta * (w - w_prev)
        g = p.grad(v, lam)
        w_prev, w = w, v - step * g
        if tol is not None and k % 10 == 0 and float(g.norm()) <= tol * g0:
            break
    p.last_iters = k
    return w


def reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(w*, hypergradient) to near machine precision, independently of CG."""
    lam = p.lam
    if p.name == "ridge":
        H = p.hessian(torch.zeros(p.n, dtype=DTYPE), lam)
        C = torch.linalg.cholesky(H)
        w = torch.cholesky_solve((p.X.T @ p.y)[:, None], C)[:, 0]
    else:
        with torch.no_grad():
            w = nesterov(p, lam, torch.zeros(p.n, dtype=DTYPE), 1000)
        for _ in range(20):  # Newton from a good start: quadratic convergence
            gw = p.grad(w, lam)
            if float(gw.norm()) <= 1e-14 * max(1.0, float(w.norm())):
                break
            C = torch.linalg.cholesky(p.hessian(w, lam))
            w = w - torch.cholesky_solve(gw[:, None], C)[:, 0]
        C = torch.linalg.cholesky(p.hessian(w, lam))
    wg = w.clone().requires_grad_()
    (gv,) = torch.autograd.grad(p.outer(wg), wg)
    u = torch.cholesky_solve(gv[:, None], C)[:, 0]
    # dw*/dλ = −H⁻¹ diag(w*), so dL/dλ = −(H⁻¹ ∇_w L) ⊙ w*.
    return w, -u * w


# ------------------------------------------------------------------------------------------
# Methods: each returns (forward seconds, hypergradient seconds, hypergradient, iterate)
# ------------------------------------------------------------------------------------------


def _implicit_solver(p: Problem, K: int, tol=None) -> Callable:
    @it.custom_root(p.grad, solve="cg")
    def solver(init, lam):
        return nesterov(p, lam, init, K, tol)

    return solver


def run_method(p: Problem, method: str, K: int, hooks=None):
    lam = p.lam.clone().requires_grad_()
    w0 = torch.zeros(p.n, dtype=DTYPE)
    ctx = hooks if hooks is not None else _NullCtx()
    t0 = time.perf_counter()
    with ctx:
        if method == "implicit":
            w = _implicit_solver(p, K)(w0, lam)
        elif method == "implicit-tol":
            w = _implicit_solver(p, K, FORWARD_TOL)(w0, lam)
        elif method == "unrolled":
            w = nesterov(p, lam, w0, K)
        elif method == "closed":
            C = torch.linalg.cholesky(p.X.T @ p.X + torch.diag(lam))
            w = torch.cholesky_solve((p.X.T @ p.y)[:, None], C)[:, 0]
        else:
            raise ValueError(method)
    t1 = time.perf_counter()
    (g,) = torch.autograd.grad(p.outer(w), lam)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, g.detach(), w.detach()


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def saved_mb(p: Problem, method: str, K: int) -> float:
    meter = SavedBytes(p.data_ptrs())
    run_method(p, method, K, hooks=meter)
    gc.collect()
    return meter.peak / 2**20


# ------------------------------------------------------------------------------------------
# Peak RSS in a fresh process
# ------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def child_main(spec: str) -> None:
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    p = make_problem(cfg["problem"], cfg["n"])
    run_method(p, cfg["method"], min(cfg["K"], 3))  # warm-up: lazy initialisations
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    run_method(p, cfg["method"], cfg["K"])
    # VmHWM is updated lazily, so tiny negative differences are clamped.
    print(json.dumps({"peak_mb": max(0, _status_kb("VmHWM") - base) / 1024}))


def rss_mb(problem: str, n: int, method: str, K: int, threads: int) -> float | None:
    spec = json.dumps(dict(problem=problem, n=n, method=method, K=K, threads=threads))
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", spec],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
        print(f"  (peak RSS unavailable for {problem} n={n} {method} K={K}: {e})")
        return None


def rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------
# Profiling the implicit backward
# ------------------------------------------------------------------------------------------


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def profile_backward(p: Problem, K: int, reps: int) -> dict:
    """Where the implicit backward spends its time, at the converged forward solution."""
    lam = p.lam.clone()
    solver = _implicit_solver(p, K)
    with torch.no_grad():
        w = nesterov(p, lam, torch.zeros(p.n, dtype=DTYPE), K)
    wg = w.clone().requires_grad_()
    (v,) = torch.autograd.grad(p.outer(wg), wg)

    # The engine's matvec: u ↦ Aᵀu from one torch.func.vjp of F at (w*, λ), reused.
    _, vjp_x = torch.func.vjp(lambda x: p.grad(x, lam), w)

    def engine_mv(u):
        return vjp_x(u)[0]

    def analytic_mv(u):
        return p.hvp(w, lam, u)

    u0 = torch.randn(p.n, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    t_mv_engine = _median_time(lambda: engine_mv(u0), 5 * reps)
    t_mv_analytic = _median_time(lambda: analytic_mv(u0), 5 * reps)

    # Same system and solver as the engine (b = −v, default tol), with diagnostics.
    _, info = it.solve_cg(engine_mv, -v, return_info=True)
    iters = int(info.iterations)
    t_cg = _median_time(lambda: it.solve_cg(engine_mv, -v), reps)
    t_cg_analytic = _median_time(lambda: it.solve_cg(analytic_mv, -v), reps)

    def bare_cg():  # textbook CG, same iteration count, no masking/bookkeeping
        x = torch.zeros_like(v)
        r = -v.clone()
        q = r.clone()
        rr = r @ r
        for _ in range(iters):
            Aq = analytic_mv(q)
            a = rr / (q @ Aq)
            x = x + a * q
            r = r - a * Aq
            rr_new = r @ r
            q = r + (rr_new / rr) * q
            rr = rr_new
        return x

    t_bare = _median_time(bare_cg, reps)

    lam_r = p.lam.clone().requires_grad_()

    def fwd():
        return solver(torch.zeros(p.n, dtype=DTYPE), lam_r)

    def bwd(out):
        return torch.autograd.grad(p.outer(out), lam_r)

    t_fwd = _median_time(fwd, reps)
    bwd(fwd())
    tb = []
    for _ in range(reps):
        out = fwd()
        t0 = time.perf_counter()
        bwd(out)
        tb.append(time.perf_counter() - t0)
    t_bwd = statistics.median(tb)

    prof = cProfile.Profile()
    for _ in range(3):
        out = fwd()
        prof.enable()
        bwd(out)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    top = "\n".join(
        line for line in s.getvalue().splitlines() if line.strip() and "function calls" not in line
    )
    return dict(
        problem=p.name,
        n=p.n,
        K=K,
        cg_iterations=iters,
        cg_converged=bool(info.converged),
        cg_residual=float(info.residual_norm),
        t_forward_ms=1e3 * t_fwd,
        t_backward_ms=1e3 * t_bwd,
        t_cg_engine_matvec_ms=1e3 * t_cg,
        t_cg_analytic_matvec_ms=1e3 * t_cg_analytic,
        t_bare_cg_ms=1e3 * t_bare,
        t_matvec_engine_us=1e6 * t_mv_engine,
        t_matvec_analytic_us=1e6 * t_mv_analytic,
        cprofile_top_tottime=top,
    )


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bench_config(p, K, reps_cap, w_ref, g_ref, methods) -> dict:
    """Interleaved repeats of every method at (problem, n, K): medians of each phase."""
    results = {m: dict(fwd=[], bwd=[], tot=[]) for m in methods}
    warm_t = {}
    for m in methods:  # warm-up, also decides the repeat count
        tf, tb, g, w = run_method(p, m, K)
        warm_t[m] = tf + tb
        results[m]["g"], results[m]["w"] = g, w
        results[m]["iters"] = p.last_iters if m != "closed" else None
    slowest = max(warm_t.values())
    reps = reps_cap if slowest < 0.5 else max(3, min(reps_cap, 5)) if slowest < 3 else 3
    for _ in range(reps):
        for m in methods:
            tf, tb, _, _ = run_method(p, m, K)
            results[m]["fwd"].append(tf)
            results[m]["bwd"].append(tb)
            results[m]["tot"].append(tf + tb)
    out = {}
    for m in methods:
        r = results[m]
        out[m] = dict(
            fwd_ms=1e3 * statistics.median(r["fwd"]),
            bwd_ms=1e3 * statistics.median(r["bwd"]),
            tot_ms=1e3 * statistics.median(r["tot"]),
            reps=reps,
            iter_err=rel(r["w"], w_ref),
            iters=r["iters"],
            grad_err=rel(r["g"], g_ref),
        )
    return out


def fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "—"
    return format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small n and K (seconds)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--sizes", type=int, nargs="*", help="override n (default 100 1000 4000)")
    ap.add_argument("--ks", type=int, nargs="*", help="override K (default 100 1000)")
    ap.add_argument("--repeats", type=int, default=5, help="max timed repeats per config")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-profile", action="store_true", help="skip profiling the backward")
    ap.add_argument("--out", default=str(OUT_DIR / "hypergradient"), help="output path stem")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([50, 200] if args.quick else [100, 1000, 4000])
    ks = args.ks or ([20, 100] if args.quick else [100, 1000])
    reps_cap = 3 if args.quick else args.repeats
    do_rss = not args.no_rss and not args.quick and rss_supported()
    profile_ns = sorted({min(sizes), 200 if args.quick else 1000} & set(sizes))
    K_big = max(ks)
    warnings.simplefilter("always", it.ConvergenceWarning)

    started = time.perf_counter()
    header = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, float64, "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}"
    )
    print(header)
    rows = []
    for name in ("ridge", "logistic"):
        for n in sizes:
            p = make_problem(name, n)
            t0 = time.perf_counter()
            w_ref, g_ref = reference(p)
            print(
                f"\n{name} n={n} m={p.m}: κ bound L/μ = {p.kappa:.0f}, "
                f"reference in {time.perf_counter() - t0:.1f} s"
            )
            if name == "ridge":
                cf = bench_config(p, 0, reps_cap, w_ref, g_ref, ["closed"])["closed"]
                cf.update(
                    problem=name, n=n, m=p.m, kappa=p.kappa, method="closed", K=None,
                    saved_mb=saved_mb(p, "closed", 0),
                    rss_mb=rss_mb(name, n, "closed", 0, args.threads) if do_rss else None,
                )  # fmt: skip
                rows.append(cf)
                print(f"  closed form: {cf['tot_ms']:.1f} ms, grad err {cf['grad_err']:.1e}")
            for K in ks:
                methods = ["implicit", "unrolled"] + (["implicit-tol"] if K == K_big else [])
                res = bench_config(p, K, reps_cap, w_ref, g_ref, methods)
                for m, r in res.items():
                    r.update(
                        problem=name, n=n, m=p.m, kappa=p.kappa, method=m, K=K,
                        saved_mb=saved_mb(p, m, K),
                        rss_mb=rss_mb(name, n, m, K, args.threads) if do_rss else None,
                    )  # fmt: skip
                    rows.append(r)
                imp, unr = res["implicit"], res["unrolled"]
                print(
                    f"  K={K}: implicit {imp['fwd_ms']:.1f}+{imp['bwd_ms']:.1f} ms "
                    f"(bwd/fwd {imp['bwd_ms'] / imp['fwd_ms']:.2f}), unrolled "
                    f"{unr['fwd_ms']:.1f}+{unr['bwd_ms']:.1f} ms "
                    f"(unrolled/implicit {unr['tot_ms'] / imp['tot_ms']:.2f}×), saved MB "
                    f"{imp['saved_mb']:.3f} vs {unr['saved_mb']:.2f}"
                )

    profiles = []
    if not args.no_profile:
        for pn in profile_ns:
            for name in ("ridge", "logistic"):
                profiles.append(profile_backward(make_problem(name, pn), K_big, reps_cap))

    md = render(rows, profiles, header, sizes, ks, time.perf_counter() - started)
    print("\n" + md)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(
        json.dumps(dict(header=header, rows=rows, profiles=profiles), indent=1)
    )
    print(f"wrote {stem.with_suffix('.md')} and .json")


def render(rows, profiles, header, sizes, ks, elapsed) -> str:
    lines = [
        f"Machine: {header}. Run time {elapsed:.0f} s.",
        "",
        "| problem | n | m | κ | method | K | forward ms | hypergrad ms | total ms | bwd/fwd "
        "| unrolled/implicit total | unrolled/implicit hypergrad | saved MB | peak RSS MB "
        "| iterate err | hypergrad err |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by = {(r["problem"], r["n"], r["method"], r["K"]): r for r in rows}
    for r in rows:
        ratio = ratio_b = ""
        if r["method"] in ("unrolled", "implicit-tol"):
            unr = by[(r["problem"], r["n"], "unrolled", r["K"])]
            imp = by[(r["problem"], r["n"], "implicit", r["K"])] if r is unr else r
            ratio = f"**{unr['tot_ms'] / imp['tot_ms']:.2f}×**"
            ratio_b = f"{unr['bwd_ms'] / imp['bwd_ms']:.2f}×"
        bf = f"{r['bwd_ms'] / r['fwd_ms']:.2f}" if r["method"].startswith("implicit") else ""
        k = "—" if r["K"] is None else str(r["K"])
        if r["method"] == "implicit-tol":
            k = f"{r['iters']} of {r['K']}"
        lines.append(
            f"| {r['problem']} | {r['n']} | {r['m']} | {r['kappa']:.0f} | {r['method']} "
            f"| {k} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} "
            f"| {r['tot_ms']:.1f} | {bf} | {ratio} | {ratio_b} | {r['saved_mb']:.3f} "
            f"| {fmt(r['rss_mb'], '.1f')} | {r['iter_err']:.1e} | {r['grad_err']:.1e} |"
        )
    lines += ["", "Targets:", ""]
    K_big = max(ks)
    for r in rows:
        if r["method"] != "implicit":
            continue
        ok = r["bwd_ms"] <= 1.5 * r["fwd_ms"]
        lines.append(
            f"- implicit backward ≤ 1.5× forward, {r['problem']} n={r['n']} K={r['K']}: "
            f"{r['bwd_ms'] / r['fwd_ms']:.2f}× — {'met' if ok else 'NOT met'}"
        )
    n_mid = 1000 if 1000 in sizes else sorted(sizes)[len(sizes) // 2]
    for name in ("ridge", "logistic"):
        imp = by.get((name, n_mid, "implicit", K_big))
        unr = by.get((name, n_mid, "unrolled", K_big))
        if imp and unr:
            s = unr["tot_ms"] / imp["tot_ms"]
            sb = unr["bwd_ms"] / imp["bwd_ms"]
            lines.append(
                f"- implicit ≥ 3× faster than unrolled, {name} n={n_mid} K={K_big}: forward + "
                f"hypergradient {s:.2f}× — {'met' if s >= 3 else 'NOT met'}; hypergradient "
                f"(backward) alone {sb:.2f}× — {'met' if sb >= 3 else 'NOT met'}"
            )
            tol = by.get((name, n_mid, "implicit-tol", K_big))
            if tol:
                st = unr["tot_ms"] / tol["tot_ms"]
                lines.append(
                    f"  - with the forward stopped at tolerance ({tol['iters']} of {K_big} "
                    f"steps, implicit-tol): forward + hypergradient {st:.2f}× — "
                    f"{'met' if st >= 3 else 'NOT met'}"
                )
    k_lo, k_hi = min(ks), max(ks)
    for name in ("ridge", "logistic"):
        for n in sizes:
            i_lo = by.get((name, n, "implicit", k_lo))
            i_hi = by.get((name, n, "implicit", k_hi))
            u_lo = by.get((name, n, "unrolled", k_lo))
            u_hi = by.get((name, n, "unrolled", k_hi))
            if not (i_lo and i_hi and u_lo and u_hi):
                continue
            gi = i_hi["saved_mb"] / i_lo["saved_mb"]
            gu = u_hi["saved_mb"] / u_lo["saved_mb"]
            ok = abs(gi - 1) < 0.01 and gu > 0.8 * k_hi / k_lo
            lines.append(
                f"- memory, {name} n={n}: K {k_lo}→{k_hi} multiplies saved bytes by {gi:.2f} "
                f"(implicit) and {gu:.2f} (unrolled; linear would be {k_hi / k_lo:.0f}) — "
                f"{'met' if ok else 'NOT met'}"
            )
    for pr in profiles:
        per_it = pr["t_cg_engine_matvec_ms"] / max(pr["cg_iterations"], 1)
        lines += [
            "",
            f"Implicit backward profile, {pr['problem']} n={pr['n']} K={pr['K']}: forward "
            f"{pr['t_forward_ms']:.1f} ms, backward {pr['t_backward_ms']:.1f} ms (of which "
            f"outside the CG solve ≈ {pr['t_backward_ms'] - pr['t_cg_engine_matvec_ms']:.1f} "
            f"ms); CG "
            f"{pr['cg_iterations']} iterations (converged {pr['cg_converged']}, residual "
            f"{pr['cg_residual']:.1e}); solve_cg with the engine's vjp matvec "
            f"{pr['t_cg_engine_matvec_ms']:.1f} ms ({1e3 * per_it:.0f} µs/iteration), with an "
            f"analytic Hessian-vector product {pr['t_cg_analytic_matvec_ms']:.1f} ms, bare "
            f"textbook CG loop {pr['t_bare_cg_ms']:.1f} ms; one matvec: engine vjp "
            f"{pr['t_matvec_engine_us']:.0f} µs, analytic {pr['t_matvec_analytic_us']:.0f} µs.",
            "",
            "```",
            pr["cprofile_top_tottime"],
            "```",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
