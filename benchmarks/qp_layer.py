"""Batched QP layer, forward + backward: implicit_torch's QP against qpth and cvxpylayers.

The problems are qpth's example construction: for each of B problems,

    min_x ½ xᵀQx + cᵀx  subject to  G x ≤ h,    Q = L Lᵀ + εI,  h = G z₀ + s₀ (s₀ > 0),

with L, c, G, z₀ standard normal (so z₀ is strictly feasible) and every parameter given per
problem (B = 64, n = 20, m = 20 by default). The loss is ``Σ w ⊙ x*`` for a fixed random w, and
the gradients are taken in L, c, G and h. Every parameter is per problem: qpth averages, rather
than sums, the gradient of a parameter shared across the batch, so shared parameters would not
compare like for like.

* implicit_torch - ``implicit_torch.solvers.qp.QP`` (batched Mehrotra interior point, implicit
  differentiation of the KKT conditions);
* qpth           - ``qpth.qp.QPFunction`` (batched PDIPM; Amos & Kolter, 2017);
* cvxpylayers    - ``CvxpyLayer`` of ``½‖Lᵀx‖² + ½ε‖x‖² + cᵀx`` (DPP), solved and
  differentiated by diffcp/SCS on the CPU, one problem at a time (``eps=1e-10``, dense
  derivative: diffcp's default LSQR derivative is far off, see ``make_cvxpylayers``).

Times are medians over ``--reps`` calls after a warm-up, on ``--threads`` intra-op threads
(default 1: on a shared 2-core machine a second thread mostly waits for the other process).
Ratios are the peer's time over implicit_torch's (> 1: implicit_torch is faster). Gradient
agreement is the largest absolute difference of each solver's gradients from implicit_torch's
float64 gradients, relative to their largest entry. The peers are optional: a peer that is not
installed is reported as such and the rest still runs. Install them into their own venv (see
benchmarks/requirements-peers.txt):

    PYTHONPATH=. /tmp/peers-venv/bin/python benchmarks/qp_layer.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from implicit_torch.solvers.qp import QP

EPS = 1e-3


def problems(B: int, n: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    c = torch.randn(B, n, generator=g, dtype=torch.float64)
    G = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    s0 = torch.rand(B, m, generator=g, dtype=torch.float64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    w = torch.randn(B, n, generator=g, dtype=torch.float64)
    return (L, c, G, h), w


def make_Q(L):
    return L @ L.mT + EPS * torch.eye(L.shape[-1], dtype=L.dtype)


def ours(L, c, G, h):
    return QP().run(None, (make_Q(L), c), None, (G, h)).params.primal


def make_qpth():
    try:
        from qpth.qp import QPFunction, QPSolvers
    except ImportError as e:
        return None, f"not installed ({e.name})"

    def solve(L, c, G, h):
        e = torch.empty(0, dtype=L.dtype)
        fn = QPFunction(verbose=-1, eps=1e-12, maxIter=50, solver=QPSolvers.PDIPM_BATCHED)
        return fn(make_Q(L), c, G, h, e, e)

    return solve, None


def make_cvxpylayers(n: int, m: int):
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError as e:
        return None, f"not installed ({e.name})"
    x = cp.Variable(n)
    Lp, cp_, Gp, hp = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    objective = 0.5 * cp.sum_squares(Lp.T @ x) + 0.5 * EPS * cp.sum_squares(x) + cp_ @ x
    problem = cp.Problem(cp.Minimize(objective), [Gp @ x <= hp])
    layer = CvxpyLayer(problem, parameters=[Lp, cp_, Gp, hp], variables=[x])
    # diffcp's default derivative (mode="lsqr", an inexact iterative solve) gives gradients
    # off by up to 100% here; mode="dense" and a tight SCS tolerance agree to ~1e-7.
    args = {"eps": 1e-10, "max_iters": 100_000, "mode": "dense"}

    forward_args = {k: v for k, v in args.items() if k != "mode"}  # no derivative: plain SCS

    def solve(L, c, G, h):
        return layer(L, c, G, h, solver_args=args if torch.is_grad_enabled() else forward_args)[0]

    return solve, None


def fwd_bwd(solve, data, w):
    args = [t.detach().clone().requires_grad_() for t in data]
    x = solve(*args)
    loss = (w.to(x.dtype) * x).sum()
    return torch.autograd.grad(loss, args)


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def rel_diff(grads, ref) -> float:
    worst = 0.0
    for g, r in zip(grads, ref):
        scale = float(r.abs().max())
        worst = max(worst, float((g.double() - r).abs().max()) / scale)
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cvx-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="qpth")
    data64, w = problems(a.batch, a.n, a.m)
    ref = fwd_bwd(ours, data64, w)  # implicit_torch, float64: the reference gradients

    peers = {"qpth": make_qpth(), "cvxpylayers": make_cvxpylayers(a.n, a.m)}
    print(
        f"Batched QP forward + backward, B={a.batch}, n={a.n}, m={a.m} inequalities, CPU, "
        f"torch {torch.__version__}, {a.threads} thread(s); medians of {a.reps} "
        f"({a.cvx_reps} for cvxpylayers). Gradients in L, c, G, h (all per problem)."
    )
    for name, (fn, why) in peers.items():
        if fn is None:
            print(f"  {name}: {why}; skipped")
    print()
    header = "| dtype | solver | fwd+bwd ms | fwd ms | ratio vs implicit_torch | grad rel. diff |"
    print(header)
    print("|---|---|---|---|---|---|")
    for dname in a.dtypes:
        dtype = getattr(torch, dname)
        data = [t.to(dtype) for t in data64]
        solvers = {"implicit_torch": ours}
        solvers.update({k: fn for k, (fn, _) in peers.items() if fn is not None})
        base = None
        for name, solve in solvers.items():
            reps = a.cvx_reps if name == "cvxpylayers" else a.reps
            try:
                grads = fwd_bwd(solve, data, w)
                t_fb = median_ms(lambda s=solve, d=data: fwd_bwd(s, d, w), reps)
                with torch.no_grad():
                    t_f = median_ms(lambda s=solve, d=data: s(*d), reps)
            except Exception as e:  # a peer failing must not stop the others
                print(f"| {dname} | {name} | failed: {type(e).__name__}: {e} | | | |")
                continue
            if base is None:
                base = t_fb
            ratio = t_fb / base
            print(
                f"| {dname} | {name} | {t_fb:.2f} | {t_f:.2f} | {ratio:.2f} | "
                f"{rel_diff(grads, ref):.1e} |"
            )


if __name__ == "__main__":
    main()
