"""How precise is an implicit Jacobian taken at an inexact solution? (the paper's Theorem 1)

What this example shows
-----------------------
Implicit differentiation evaluates ``∂x*(θ) = −A⁻¹B`` at the point the forward solver returns,
which is never exactly the solution ``x*``. Blondel et al. (2022, Theorem 1) bound the error
this causes: it is at most linear in the error of the solution. This example measures both
sides along the iterates ``x_t`` of gradient descent on a ridge regression, and compares with
the other way of differentiating a solver, unrolling (autograd through the ``t`` iterations).

The math
--------
Ridge regression on scikit-learn's diabetes data with one penalty ``λ``:

    x*(λ) = argmin_x ½‖Xx − y‖² + ½λ‖x‖²,   F(x, λ) = Xᵀ(Xx − y) + λx = 0.

With ``A(x, λ) = ∂F/∂x = XᵀX + λI`` and ``B(x, λ) = ∂F/∂λ = x``, the implicit Jacobian
evaluated at any point ``x̂`` is ``J(x̂) = −A⁻¹B(x̂) = −A⁻¹x̂``; at ``x*`` it is the true
``∂x*/∂λ``. Theorem 1: if ``A`` is α-well-conditioned (``‖Av‖ ≥ α‖v‖``) and γ-Lipschitz in
``x``, and ``B`` is β-Lipschitz in ``x`` with ``‖B‖ ≤ R``, then

    ‖J(x̂) − ∂x*(λ)‖ ≤ C ‖x̂ − x*‖,   C = β/α + γR/α².

Here ``A`` does not depend on ``x`` (γ = 0), ``B(x) = x`` is 1-Lipschitz (β = 1), and
``α = λ_min(XᵀX) + λ``, so ``C = 1/α``. In fact ``J(x̂) − ∂x* = −A⁻¹(x̂ − x*)`` exactly, and
gradient descent's error ``x_t − x*`` aligns with the slowest eigenvector of ``A`` (whose
eigenvalue is α), so the bound is attained asymptotically: the measured error should run
along the line ``C‖x_t − x*‖``.

The unrolled Jacobian ``∂x_t/∂λ`` obeys its own recursion,
``∂x_{t+1}/∂λ = (I − ηA) ∂x_t/∂λ − η x_t``; its error decays like ``t (1 − ηα)^t``, a factor
``t`` slower than the solution error, so at a given solution error unrolling is less precise.

Steps
-----
1. Data: the 442 × 10 diabetes design (scikit-learn scales the columns to unit norm), the
   target standardised; ``λ = 0.05``. Closed-form references ``x* = A⁻¹Xᵀy`` and
   ``∂x*/∂λ = −A⁻¹x*``.
2. Gradient descent ``x_{t+1} = x_t − ηF(x_t, λ)`` with the fixed step ``η = 1/λ_max(A)``,
   run with ``λ`` as a forward-mode dual number (``torch.autograd.forward_ad``): the tangent
   of ``x_t`` is the unrolled Jacobian at every ``t``, in one pass.
3. At checkpoints ``t``, the implicit Jacobian at ``x_t`` from ``implicit_torch.root_jvp``
   (one linear solve, dense Cholesky so that the solve itself adds no error).
4. Checks: the implicit Jacobian at ``x*`` against the closed form; at every checkpoint the
   implicit error against the exact identity ``‖A⁻¹(x_t − x*)‖`` and against the bound; and,
   at a few ``t``, the same two Jacobians through the package's own solver
   (``GradientDescent`` with ``implicit_diff=True``, and with ``unroll=True`` differentiated
   in reverse mode).
5. Log-log slopes of both errors against the solution error, and a figure.

What to expect: the implicit error lies on the bound ``C‖x_t − x*‖`` with ``C = 1/α ≈ 17.1``
(ratio 1.000 at the last iterates; fitted log-log slope 0.99, constant 16); the unrolled error
is larger, with a fitted slope of about 0.85 and ≈ 25–30× the implicit error at a solution
error of 1e-11. The exact identities agree to ~1e-15. About ten seconds.

Run ``python examples/jacobian_precision.py`` (``--iters N``, ``--lam L``, ``--out DIR``,
``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the example only writes a PNG
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from sklearn.datasets import load_diabetes
from tqdm import tqdm

import implicit_torch as it

DTYPE = torch.float64
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
CHECK_TOL = 1e-8  # relative agreement required of the exact identities
FIT_FLOOR = 1e-11  # solution errors below this are near round-off: left out of the slope fits


# ----------------------------------------------------------------------------------------------
# Problem
# ----------------------------------------------------------------------------------------------


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The diabetes design (columns centred, unit norm) and the standardised target."""
    X, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    return torch.tensor(X, dtype=DTYPE), torch.tensor(y, dtype=DTYPE)


def optimality(x, lam, X, y):
    """F(x, λ) = Xᵀ(Xx − y) + λx, the gradient of the ridge objective."""
    return X.T @ (X @ x - y) + lam * x


def objective(x, lam, X, y):
    return 0.5 * torch.sum((X @ x - y) ** 2) + 0.5 * lam * torch.sum(x * x)


# ----------------------------------------------------------------------------------------------
# The two Jacobian estimates along the iterates
# ----------------------------------------------------------------------------------------------


def run_gradient_descent(X, y, lam, eta: float, iters: int, checkpoints: set[int]) -> dict:
    """Gradient descent with λ a forward-mode dual number.

    The step ``eta`` is a plain float (not a function of λ), so the tangent of ``x_t`` is
    exactly the derivative of the t-step algorithm: the unrolled Jacobian ``∂x_t/∂λ``.
    """
    xs, unrolled = {}, {}
    with fwAD.dual_level():
        lam_dual = fwAD.make_dual(lam, torch.ones_like(lam))
        x = torch.zeros(X.shape[1], dtype=DTYPE)
        for t in tqdm(range(iters + 1), desc="gradient descent (forward-mode unrolling)"):
            if t in checkpoints:
                primal, tangent = fwAD.unpack_dual(x)
                xs[t] = primal.clone()
                unrolled[t] = torch.zeros_like(primal) if tangent is None else tangent.clone()
            if t < iters:
                x = x - eta * optimality(x, lam_dual, X, y)
    return {"x": xs, "unrolled": unrolled}


def implicit_jacobian_at(x_hat, lam, X, y):
    """J(x̂) = −A⁻¹ B at the point x̂, by the engine's forward-mode rule (one linear solve).

    Dense Cholesky (the 10 × 10 Hessian formed from 10 matvecs) makes the solve exact to
    round-off, so what is measured is Theorem 1's error, not the linear solver's tolerance.
    """
    return it.root_jvp(
        optimality, x_hat, (lam, X, y), (torch.ones_like(lam), None, None), solve="cholesky"
    )


def package_solver_jacobians(X, y, lam, eta: float, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """∂x_t/∂λ through ``it.GradientDescent`` run for exactly t steps: implicitly (custom-root
    machinery at the returned x_t) and unrolled (reverse-mode autograd through the t steps)."""
    out = []
    for unroll in (False, True):
        solver = it.GradientDescent(
            fun=objective,
            stepsize=eta,
            acceleration=False,
            maxiter=t,
            tol=0.0,  # never stop early: exactly t iterations
            unroll=unroll,
            implicit_diff_solve="cholesky",
            on_failure="ignore",
        )
        lam_var = lam.clone().requires_grad_(True)
        x_t = solver.run(torch.zeros(X.shape[1], dtype=DTYPE), lam_var, X, y).params
        rows = [torch.autograd.grad(x_t[i], lam_var, retain_graph=True)[0] for i in range(len(x_t))]
        out.append(torch.stack(rows))
    return out[0], out[1]


def loglog_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares fit log10 y = s log10 x + c; returns (s, 10^c)."""
    s, c = np.polyfit(np.log10(x), np.log10(y), 1)
    return float(s), float(10**c)


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------


def make_figure(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    sol, imp, unr = res["sol_err"], res["impl_err"], res["unrolled_err"]
    ts, C = res["t"], res["C"]

    ax = axes[0]
    ax.loglog(
        sol, unr, "o", ms=3.5, color="C1", label=f"unrolled (slope {res['slope_unrolled']:.2f})"
    )
    ax.loglog(
        sol, imp, "o", ms=3.5, color="C0", label=f"implicit (slope {res['slope_implicit']:.2f})"
    )
    grid = np.geomspace(sol.min(), sol.max(), 50)
    ax.loglog(
        grid, C * grid, "k--", lw=1.2, label=f"Theorem 1 bound C‖x_t − x*‖, C = 1/α = {C:.1f}"
    )
    ax.set_xlabel("solution error ‖x_t − x*‖")
    ax.set_ylabel("Jacobian error ‖∂x estimate − ∂x*/∂λ‖")
    ax.set_title("Jacobian error vs solution error")
    ax.invert_xaxis()  # iterations progress to the right
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1]
    ax.semilogy(ts, sol, color="k", lw=1.2, label="solution error ‖x_t − x*‖")
    ax.semilogy(ts, imp, color="C0", label="implicit Jacobian at x_t")
    ax.semilogy(ts, unr, color="C1", label="unrolled Jacobian ∂x_t/∂λ")
    ax.semilogy(ts, C * sol, "k--", lw=1, label="bound C‖x_t − x*‖")
    ax.set_xlabel("gradient-descent iteration t")
    ax.set_ylabel("error")
    ax.set_title("Errors along the iterations")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")

    fig.suptitle(
        f"Ridge on diabetes (λ = {res['lam']:g}): implicit vs unrolled Jacobian precision "
        "(Blondel et al. 2022, Theorem 1)",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000, help="gradient-descent iterations")
    parser.add_argument("--lam", type=float, default=0.05, help="ridge penalty λ")
    parser.add_argument("--points", type=int, default=200, help="checkpoints (log-spaced in t)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the figure")
    parser.add_argument(
        "--smoke", action="store_true", help="fewer checkpoints and package-solver checks"
    )
    args = parser.parse_args(argv)
    # 10 × 10 linear algebra: thread start-up costs more than it saves (and on a shared
    # machine extra threads contend), so run on one thread and restore the setting after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    points = min(args.points, 40) if args.smoke else args.points
    if args.smoke and args.iters == 2000:
        args.iters = 1000
    t_start = time.perf_counter()

    X, y = load_data()
    lam = torch.tensor(args.lam, dtype=DTYPE)
    A = X.T @ X + lam * torch.eye(X.shape[1], dtype=DTYPE)
    eig = torch.linalg.eigvalsh(A)
    alpha, L = float(eig[0]), float(eig[-1])
    eta = 1.0 / L
    # Theorem 1's constant: β = 1 (B(x) = x), γ = 0 (A independent of x) → C = β/α + γR/α².
    beta, gamma = 1.0, 0.0
    x_star = torch.linalg.solve(A, X.T @ y)
    J_star = -torch.linalg.solve(A, x_star)  # closed-form ∂x*/∂λ
    R = float(x_star.norm())  # ‖B‖ near x* (only enters with γ, which is 0 here)
    C = beta / alpha + gamma * R / alpha**2
    # Round-off in the measured quantities, from the problem's conditioning: x* and J* come from
    # solves with A, so each carries a relative error of order eps·κ(A); ‖x_t − x*‖ and
    # ‖J(x_t) − J*‖ are differences of such quantities, so their absolute errors are of order
    # eps·κ(A)·‖x*‖ and eps·κ(A)·‖J*‖ (with a safety factor of 10 for the few operations).
    kappa = L / alpha
    eps = torch.finfo(DTYPE).eps
    round_x = 10 * eps * kappa * float(x_star.norm())
    round_J = 10 * eps * kappa * float(J_star.norm())
    print(
        f"diabetes: X {tuple(X.shape)}, λ = {args.lam:g}; A = XᵀX + λI has α = λ_min = "
        f"{alpha:.4g}, λ_max = {L:.4g}; step η = 1/λ_max; Theorem 1: β = 1, γ = 0, "
        f"C = 1/α = {C:.4g}"
    )

    check_ts = [t for t in (10, 100, 1000) if t <= args.iters][: 1 if args.smoke else 3]
    ts = sorted({int(t) for t in np.geomspace(1, args.iters, points)} | set(check_ts))
    gd = run_gradient_descent(X, y, lam, eta, args.iters, set(ts))

    sol_err, impl_err, unr_err, ident_dev = [], [], [], []
    A_inv = torch.linalg.inv(A)
    for t in tqdm(ts, desc="implicit Jacobian at each checkpoint"):
        x_t = gd["x"][t]
        J_impl = implicit_jacobian_at(x_t, lam, X, y)
        e = x_t - x_star
        sol_err.append(float(e.norm()))
        impl_err.append(float((J_impl - J_star).norm()))
        unr_err.append(float((gd["unrolled"][t] - J_star).norm()))
        # Exact identity for ridge: J(x_t) − ∂x* = −A⁻¹(x_t − x*).
        predicted = -(A_inv @ e)
        ident_dev.append(float((J_impl - J_star - predicted).norm() / J_star.norm()))
    sol_err, impl_err, unr_err = map(np.array, (sol_err, impl_err, unr_err))

    def report(what: str, value: float, passed: bool) -> bool:
        print(f"  {what:66s} {value:9.3g}  [{'ok' if passed else 'FAIL'}]")
        return passed

    print("checks:")
    J_at_star = implicit_jacobian_at(x_star, lam, X, y)
    err_star = float((J_at_star - J_star).norm() / J_star.norm())
    ok = report(
        "implicit Jacobian at x* vs closed form −A⁻¹x* (rel.)", err_star, err_star < CHECK_TOL
    )
    dev = max(ident_dev)
    ok &= report(
        "implicit error at x_t vs exact identity −A⁻¹(x_t − x*) (max rel.)", dev, dev < CHECK_TOL
    )
    # The bound, up to the round-off in both measured errors (not a tolerance tuned to one
    # machine: near x* the computed ‖x_t − x*‖ is itself only known to about round_x).
    within = impl_err - round_J - C * round_x
    ratio = float(np.max(within / (C * sol_err)))
    ok &= report(
        "max over t of implicit error / (C‖x_t − x*‖)  (must be ≤ 1)", ratio, ratio <= 1 + 1e-9
    )
    pkg_dev = 0.0
    for t in check_ts:
        J_pkg_impl, J_pkg_unr = package_solver_jacobians(X, y, lam, eta, t)
        J_impl = implicit_jacobian_at(gd["x"][t], lam, X, y)
        scale = float(J_star.norm())
        pkg_dev = max(
            pkg_dev,
            float((J_pkg_impl - J_impl).norm()) / scale,
            float((J_pkg_unr - gd["unrolled"][t]).norm()) / scale,
        )
    ok &= report(
        f"it.GradientDescent, implicit & unrolled (reverse), t={check_ts}",
        pkg_dev,
        pkg_dev < CHECK_TOL,
    )
    print(f"Jacobian precision check {'passed' if ok else 'FAILED'}")

    # Solution errors within a thousand times the round-off bend the fits: left out.
    fit = sol_err > max(FIT_FLOOR, 1e3 * round_x)
    slope_i, c_i = loglog_slope(sol_err[fit], impl_err[fit])
    slope_u, c_u = loglog_slope(sol_err[fit], unr_err[fit])
    tail = max(t for t, m in zip(ts, fit) if m)
    k = ts.index(tail)
    ratio_end = unr_err[k] / impl_err[k]
    tight = float(np.median(within[fit][-10:] / (C * sol_err[fit][-10:])))
    print(f"log-log fits over ‖x_t − x*‖ ∈ [{sol_err[fit].min():.1e}, {sol_err[fit].max():.1e}]:")
    print(f"  implicit: slope {slope_i:.3f}, constant {c_i:.3g} (bound C = {C:.3g})")
    print(f"  unrolled: slope {slope_u:.3f}, constant {c_u:.3g}")
    print(
        f"at t = {tail}: ‖x_t − x*‖ = {sol_err[k]:.2e}, implicit error {impl_err[k]:.2e} "
        f"({tight:.3f} of the bound), unrolled error {unr_err[k]:.2e} "
        f"({ratio_end:.0f}× the implicit one)"
    )

    res = {
        "t": np.array(ts),
        "sol_err": sol_err,
        "impl_err": impl_err,
        "unrolled_err": unr_err,
        "C": C,
        "alpha": alpha,
        "lam": args.lam,
        "slope_implicit": slope_i,
        "slope_unrolled": slope_u,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "jacobian_precision.png"
    make_figure(res, png)
    shown = os.path.relpath(png)
    shown = str(png.resolve()) if shown.startswith("..") else shown
    print(f"done in {time.perf_counter() - t_start:.1f} s; figure written to {shown}")

    return {
        "check_passed": ok,
        "err_at_solution": err_star,
        "identity_dev": dev,
        "bound_ratio": ratio,
        "package_dev": pkg_dev,
        "C": C,
        "slope_implicit": slope_i,
        "slope_unrolled": slope_u,
        "bound_tightness": tight,
        "unrolled_over_implicit": float(ratio_end),
        "figure": str(png),
    }


if __name__ == "__main__":
    main()
