"""Learning one ridge penalty per feature by implicit differentiation.

What this example shows
-----------------------
A bilevel problem: the inner problem fits ridge regression on a training set with one penalty
per feature, and the outer problem tunes those penalties to minimise the error on a validation
set. The hypergradient (the gradient of the validation loss with respect to the penalties)
goes *through* the inner solution, which is found by an ordinary iterative solver written
here. ``implicit_torch.custom_root`` makes that solver differentiable without backpropagating
through its iterations.

The math
--------
With ``λ = exp(θ)`` (so penalties stay positive and are tuned on a log scale), the inner
problem is

    w(θ) = argmin_w  ½‖X_tr w − y_tr‖² + ½ Σ_j λ_j w_j²,

whose solution is the root of the stationarity condition

    F(w, θ) = X_trᵀ(X_tr w − y_tr) + λ ⊙ w = 0.

The implicit function theorem differentiates that root: with ``A = ∂F/∂w = X_trᵀX_tr + diag λ``
and ``B = ∂F/∂θ = diag(λ ⊙ w)``,

    dw/dθ = −A⁻¹ B = −(X_trᵀX_tr + diag λ)⁻¹ diag(λ ⊙ w).

For the validation loss ``L(θ) = mean((X_val w(θ) − y_val)²)`` reverse mode needs one linear
solve with ``Aᵀ`` per hypergradient, whatever the number of penalties and however many
iterations the forward solver took. implicit_torch does that solve (conjugate gradient, as
``A`` is symmetric positive definite) from ``F`` alone; ``A`` is never formed.

Steps
-----
1. Data: scikit-learn's diabetes data (442 patients, 10 features, no download), plus pure
   noise columns, standardised and split train/validation/test with a fixed seed.
2. Checks at the initial θ: the implicit hypergradient against autograd through a closed-form
   ``torch.linalg.solve`` and against central finite differences of the end-to-end solve; the
   Jacobian dw/dθ by ``torch.func.jacrev`` and ``torch.func.jacfwd`` (forward mode).
3. Outer loop: Adam on θ, the inner solver warm-started from the previous solution.
4. Results against scikit-learn's ``RidgeCV`` (one shared penalty chosen by cross-validation),
   and a figure.

What to expect: the derivative checks agree to ~1e-13 (closed form) and ~1e-8 (finite
differences, limited by their own truncation error). The validation MSE drops well below
RidgeCV's, but the test MSE ends up close to RidgeCV's (within a few per cent either way,
depending on learning rate and number of steps): 25 penalties tuned on 171 validation points
overfit the validation set. For the same reason the noise features are not cleanly separated
from the real ones: about half of them get penalties far above RidgeCV's α, but others, which
happen to correlate with the validation targets, are left weakly penalised. Implicit
differentiation gives exact hypergradients; it does not make the bilevel problem immune to
overfitting.

Run ``python examples/ridge_hypergradient.py`` (``--steps N``, ``--out DIR``, ``--smoke``).
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
from sklearn.datasets import load_diabetes
from sklearn.linear_model import RidgeCV
from tqdm import tqdm

import implicit_torch

DTYPE = torch.float64  # float64 throughout, so the derivative checks can be tight
SEED = 0
N_NOISE = 15  # pure-noise columns appended to the 10 real features
N_TRAIN = 100  # a small training set, so that unpenalised noise features overfit
N_VAL = 171  # the remaining 342 patients are split evenly between validation and test
CG_TOL = 1e-12  # forward-solver tolerance, well under the checks' 1e-6
CHECK_TOL = 1e-6  # the implicit hypergradient must match the closed form to this
FD_TOL = 1e-5  # finite differences carry O(eps²) truncation and O(roundoff/eps) error
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_data(seed: int = SEED) -> dict:
    """Diabetes features + noise columns, split and standardised with training statistics."""
    data = load_diabetes()
    rng = np.random.default_rng(seed)
    n = data.data.shape[0]
    noise = rng.standard_normal((n, N_NOISE))
    X = np.concatenate([data.data, noise], axis=1)
    y = data.target.astype(np.float64)
    names = [*data.feature_names, *(f"noise{i + 1}" for i in range(N_NOISE))]

    perm = rng.permutation(n)
    idx = {
        "tr": perm[:N_TRAIN],
        "val": perm[N_TRAIN : N_TRAIN + N_VAL],
        "te": perm[N_TRAIN + N_VAL :],
    }
    # Statistics from the training split only, so nothing leaks from validation or test. y is
    # scaled too, so MSEs read as fractions of the training variance of y (1.0 = predicting
    # the mean).
    mu, sd = X[idx["tr"]].mean(0), X[idx["tr"]].std(0)
    y_mu, y_sd = y[idx["tr"]].mean(), y[idx["tr"]].std()
    out = {"names": names, "n_real": data.data.shape[1]}
    for k, i in idx.items():
        out[f"X_{k}"] = torch.tensor((X[i] - mu) / sd, dtype=DTYPE)
        out[f"y_{k}"] = torch.tensor((y[i] - y_mu) / y_sd, dtype=DTYPE)
    return out


# ----------------------------------------------------------------------------------------------
# Inner problem: its optimality condition and an iterative solver made differentiable
# ----------------------------------------------------------------------------------------------


def ridge_optimality(w, theta, X, y):
    """F(w, θ) = Xᵀ(Xw − y) + exp(θ) ⊙ w: the gradient of the ridge objective in w."""
    return X.T @ (X @ w - y) + torch.exp(theta) * w


@implicit_torch.custom_root(ridge_optimality, has_aux=True)
def ridge_solver(init, theta, X, y):
    """Jacobi-preconditioned conjugate gradient on (XᵀX + diag λ) w = Xᵀy.

    Any solver would do: implicit_torch runs it under ``torch.no_grad`` and differentiates its
    output through ``ridge_optimality``, never through these iterations (so a Python loop with
    an early exit is fine). ``init`` warm-starts it; it never receives a gradient. Returns
    ``(w, iterations)``; the iteration count is passed through as auxiliary output.
    """
    lam = torch.exp(theta)

    def matvec(v):  # XᵀX is never formed: two matrix-vector products per iteration
        return X.T @ (X @ v) + lam * v

    # The diagonal of XᵀX + diag λ as preconditioner: large learned penalties make the system
    # badly scaled, which Jacobi scaling undoes.
    inv_diag = 1.0 / ((X * X).sum(0) + lam)
    b = X.T @ y
    w = torch.zeros_like(b) if init is None else init.clone()
    r = b - matvec(w)
    z = inv_diag * r
    p = z
    rz = r @ z
    threshold = CG_TOL * torch.linalg.vector_norm(b)
    for k in range(10 * b.numel()):
        if torch.linalg.vector_norm(r) <= threshold:
            return w, k
        Ap = matvec(p)
        alpha = rz / (p @ Ap)
        w = w + alpha * p
        r = r - alpha * Ap
        z = inv_diag * r
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    raise RuntimeError(f"ridge CG did not converge: ‖r‖ = {float(r.norm()):.3e}")


def solve_w(theta, X, y, init=None):
    """The differentiable inner solution w(θ) (drops the iteration count)."""
    return ridge_solver(init, theta, X, y)[0]


def mse(w, X, y):
    return torch.mean((X @ w - y) ** 2)


# ----------------------------------------------------------------------------------------------
# Checks of the implicit derivatives
# ----------------------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    """Max-norm relative error ‖a − b‖∞ / ‖b‖∞ (normwise: tiny entries cannot inflate it)."""
    return float((a - b).abs().max() / b.abs().max())


def closed_form_val_loss(theta, d):
    """The same validation loss with w from a dense solve, differentiated by plain autograd."""
    X, y = d["X_tr"], d["y_tr"]
    A = X.T @ X + torch.diag(torch.exp(theta))
    return mse(torch.linalg.solve(A, X.T @ y), d["X_val"], d["y_val"])


def check_hypergradient(theta0, d, finite_differences: bool = True) -> dict:
    """Implicit hypergradient vs closed form (and vs central finite differences)."""
    theta = theta0.clone().requires_grad_(True)
    g_impl = torch.autograd.grad(
        mse(solve_w(theta, d["X_tr"], d["y_tr"]), d["X_val"], d["y_val"]), theta
    )[0]

    theta = theta0.clone().requires_grad_(True)
    g_closed = torch.autograd.grad(closed_form_val_loss(theta, d), theta)[0]
    out = {"g_impl": g_impl, "g_closed": g_closed, "err_closed": rel_err(g_impl, g_closed)}

    if finite_differences:
        # Central differences of the end-to-end solve, one coordinate at a time.
        eps = 1e-5
        g_fd = torch.empty_like(theta0)
        with torch.no_grad():
            for j in range(theta0.numel()):
                e = torch.zeros_like(theta0)
                e[j] = eps
                lp = mse(solve_w(theta0 + e, d["X_tr"], d["y_tr"]), d["X_val"], d["y_val"])
                lm = mse(solve_w(theta0 - e, d["X_tr"], d["y_tr"]), d["X_val"], d["y_val"])
                g_fd[j] = (lp - lm) / (2 * eps)
        out["g_fd"] = g_fd
        out["err_fd"] = rel_err(g_impl, g_fd)
    return out


def check_jacobians(theta0, d) -> dict:
    """dw/dθ by reverse mode (jacrev) and forward mode (jacfwd) vs the IFT closed form."""
    X, y = d["X_tr"], d["y_tr"]

    def w_of(theta):
        return solve_w(theta, X, y)

    J_rev = torch.func.jacrev(w_of)(theta0)
    J_fwd = torch.func.jacfwd(w_of)(theta0)
    # −(XᵀX + diag λ)⁻¹ diag(λ ⊙ w), the formula of the module docstring.
    lam = torch.exp(theta0)
    w = torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ y)
    J_ift = -torch.linalg.solve(X.T @ X + torch.diag(lam), torch.diag(lam * w))
    return {"err_rev": rel_err(J_rev, J_ift), "err_fwd": rel_err(J_fwd, J_rev)}


# ----------------------------------------------------------------------------------------------
# Outer loop and baseline
# ----------------------------------------------------------------------------------------------


def fit_penalties(theta0, d, steps: int, lr: float) -> dict:
    """Adam on θ, minimising the validation MSE; the inner solver is warm-started."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    w_prev = None
    hist = {"val": [], "test": [], "cg_iters": []}
    bar = tqdm(range(steps), desc="outer steps (Adam on θ)", unit="step")
    for _ in bar:
        opt.zero_grad()
        # Warm start: θ moves a little per step, so the previous w is close to the new one.
        w, iters = ridge_solver(w_prev, theta, d["X_tr"], d["y_tr"])
        loss = mse(w, d["X_val"], d["y_val"])
        loss.backward()  # one implicit CG solve with Aᵀ, not a pass through the CG iterations
        opt.step()
        w_prev = w.detach()
        with torch.no_grad():
            hist["val"].append(float(loss))
            hist["test"].append(float(mse(w, d["X_te"], d["y_te"])))
        hist["cg_iters"].append(iters)
        bar.set_postfix(val_mse=f"{hist['val'][-1]:.4f}", cg_iters=iters)
    bar.close()
    # Losses of the final θ (the history holds the losses *before* each update).
    theta = theta.detach()
    with torch.no_grad():
        w = solve_w(theta, d["X_tr"], d["y_tr"], init=w_prev)
        hist["val"].append(float(mse(w, d["X_val"], d["y_val"])))
        hist["test"].append(float(mse(w, d["X_te"], d["y_te"])))
    hist["theta"] = theta
    hist["w"] = w
    return hist


def ridgecv_baseline(d) -> dict:
    """scikit-learn's RidgeCV: one shared penalty, chosen by leave-one-out CV on the train set.

    sklearn minimises ‖y − Xw‖² + α‖w‖², twice our objective, so α is on the same scale as λ.
    The data are already centred with training statistics, hence no intercept.
    """
    model = RidgeCV(alphas=np.logspace(-3, 5, 161), fit_intercept=False)
    model.fit(d["X_tr"].numpy(), d["y_tr"].numpy())

    def score(k):
        pred = model.predict(d[f"X_{k}"].numpy())
        return float(np.mean((pred - d[f"y_{k}"].numpy()) ** 2))

    return {"alpha": float(model.alpha_), "val": score("val"), "test": score("te")}


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------


def make_figure(hist, base, check, d, theta0, path: Path) -> None:
    has_fd = "g_fd" in check
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1.6, 1]})

    ax = axes[0]
    steps = np.arange(len(hist["val"]))
    ax.plot(steps, hist["val"], label="validation (optimised)", color="C0")
    ax.plot(steps, hist["test"], label="test (held out)", color="C1")
    ax.axhline(base["test"], color="C1", ls="--", lw=1, label="RidgeCV test (shared α)")
    ax.axhline(base["val"], color="C0", ls=":", lw=1, label="RidgeCV validation")
    ax.set_xlabel("outer step")
    ax.set_ylabel("MSE (fraction of Var y)")
    ax.set_title("Loss during hyperparameter descent")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    n_real, names = d["n_real"], d["names"]
    log10_lam = hist["theta"].numpy() / np.log(10)
    colours = ["C2" if j < n_real else "C7" for j in range(len(names))]
    ax.bar(range(len(names)), log10_lam, color=colours)
    ax.axhline(float(theta0[0]) / np.log(10), color="k", ls=":", lw=1, label="initial λ")
    ax.axhline(np.log10(base["alpha"]), color="C3", ls="--", lw=1, label="RidgeCV shared α")
    ax.bar([0], [0], color="C2", label="diabetes feature")  # legend entries for the colours
    ax.bar([0], [0], color="C7", label="pure-noise feature")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("learned log₁₀ λⱼ")
    ax.set_title("Learned per-feature penalty")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[2]
    ref = check["g_fd"] if has_fd else check["g_closed"]
    ref_name = "central finite differences" if has_fd else "closed form (autograd)"
    ax.scatter(ref.numpy(), check["g_impl"].numpy(), s=18, color="C0")
    lim = float(max(ref.abs().max(), check["g_impl"].abs().max())) * 1.1
    ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, ls="--", label="y = x")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(f"∂L_val/∂θⱼ, {ref_name}")
    ax.set_ylabel("∂L_val/∂θⱼ, implicit_torch")
    err = check["err_fd"] if has_fd else check["err_closed"]
    ax.set_title(f"Hypergradient check at initial θ (rel. err {err:.1e})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    fig.suptitle(
        "Per-feature ridge penalties tuned by implicit differentiation (diabetes + noise)",
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
    parser.add_argument("--steps", type=int, default=200, help="outer Adam steps (default 200)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on θ = log λ")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the figure")
    parser.add_argument(
        "--smoke", action="store_true", help="a few steps, no finite differences or Jacobians"
    )
    args = parser.parse_args(argv)
    steps = 10 if args.smoke and args.steps == 200 else args.steps
    t_start = time.perf_counter()

    d = load_data()
    p = d["X_tr"].shape[1]
    print(
        f"diabetes: {d['n_real']} real + {N_NOISE} noise features; "
        f"train/val/test = {len(d['y_tr'])}/{len(d['y_val'])}/{len(d['y_te'])}"
    )
    theta0 = torch.zeros(p, dtype=DTYPE)  # λ = 1 for every feature

    # 1. Check the implicit derivatives before trusting them.
    def report(what: str, err: float, tol: float) -> bool:
        passed = err < tol
        print(f"{what:62s} max rel err {err:.2e}  [{'ok' if passed else 'FAIL'}]")
        return passed

    check = check_hypergradient(theta0, d, finite_differences=not args.smoke)
    ok = report(
        "hypergradient vs closed form (torch.linalg.solve + autograd)",
        check["err_closed"],
        CHECK_TOL,
    )
    if "err_fd" in check:
        ok &= report(
            "hypergradient vs central finite differences (eps=1e-5)", check["err_fd"], FD_TOL
        )
        jac = check_jacobians(theta0, d)
        ok &= report("dw/dθ by jacrev vs IFT closed form −A⁻¹ diag(λ⊙w)", jac["err_rev"], CHECK_TOL)
        ok &= report("dw/dθ by jacfwd (forward mode) vs jacrev", jac["err_fwd"], CHECK_TOL)
    print(f"hypergradient check {'passed' if ok else 'FAILED'}")

    # 2. Tune the penalties.
    hist = fit_penalties(theta0, d, steps, args.lr)
    base = ridgecv_baseline(d)

    # 3. Report.
    theta = hist["theta"]
    n_real = d["n_real"]
    print(f"average forward CG iterations per step (warm-started): {np.mean(hist['cg_iters']):.1f}")
    rows = [
        ("initial θ (λ = 1 for all)", hist["val"][0], hist["test"][0]),
        (f"learned per-feature λ ({steps} steps)", hist["val"][-1], hist["test"][-1]),
        (f"RidgeCV shared α = {base['alpha']:.3g} (LOO on train)", base["val"], base["test"]),
    ]
    print(f"{'':40s} {'val MSE':>8s} {'test MSE':>9s}")
    for label, val, test in rows:
        print(f"{label:40s} {val:8.4f} {test:9.4f}")
    print("(MSEs in units of the training variance of y; θ was tuned on the validation set.)")
    log10_lam = theta.numpy() / np.log(10)
    log10_alpha = np.log10(base["alpha"])
    for kind, part in (("real", log10_lam[:n_real]), ("noise", log10_lam[n_real:])):
        print(
            f"{kind:>5s} features: median log10 λ {np.median(part):5.2f}; "
            f"{int((part > log10_alpha).sum())} of {part.size} penalised more than RidgeCV's α"
        )
    gap = 100 * (hist["test"][-1] - base["test"]) / base["test"]
    print(
        f"test MSE, per-feature λ vs RidgeCV: {gap:+.1f} %. With {p} penalties tuned on "
        f"{len(d['y_val'])} validation points, part of the validation gain is overfitting "
        f"(compare the val and test columns)."
    )

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "ridge_hypergradient.png"
    make_figure(hist, base, check, d, theta0, png)
    elapsed = time.perf_counter() - t_start
    shown = os.path.relpath(png)
    shown = str(png.resolve()) if shown.startswith("..") else shown
    print(f"done in {elapsed:.1f} s; figure written to {shown}")

    return {
        "check_passed": ok,
        "err_closed": check["err_closed"],
        "err_fd": check.get("err_fd"),
        "val_initial": hist["val"][0],
        "val_final": hist["val"][-1],
        "test_initial": hist["test"][0],
        "test_final": hist["test"][-1],
        "ridgecv_test": base["test"],
        "ridgecv_alpha": base["alpha"],
        "figure": str(png),
    }


if __name__ == "__main__":
    main()
